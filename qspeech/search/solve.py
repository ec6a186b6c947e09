"""The allocation problem: a multiple-choice knapsack, solved exactly by dynamic programming.

Each item (a module) takes exactly one of its choices (a bit width); choice j of item i costs an integer
w[i][j] (storage bits, or MACs x bits) and predicts damage d[i][j]. minimize sum d subject to sum w <= capacity.

Costs are integers, so the DP over capacity is exact once every cost is divided by their common divisor
(storage costs of real models share a large one: 256 bits for tiny_hubert). Only when the budget still
spans more than `max_units` units are the costs coarsened, each rounded *up*, so the answer always respects
the budget; `Solution.exact` then says it may be a little short of the optimum. Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

__all__ = ["Infeasible", "Solution", "solve"]


class Infeasible(ValueError):
    """Even the cheapest choice of every item exceeds the capacity. `minimum` is that cheapest total."""

    def __init__(self, minimum: int, capacity: int):
        self.minimum, self.capacity = minimum, capacity
        super().__init__(f"the cheapest allocation costs {minimum} > capacity {capacity}")


@dataclass
class Solution:
    choices: list[int]  # index of the chosen option per item
    cost: int  # its exact total cost (original units)
    damage: float  # its total predicted damage
    exact: bool  # True: provably optimal; False: optimal for costs rounded up to `unit`
    unit: int  # the DP's cost unit


def solve(costs: Sequence[Sequence[int]], damages: Sequence[Sequence[float]], capacity: int,
          max_units: int = 200_000) -> Solution:
    """The choices minimizing the summed damage with summed cost <= capacity (ties: the cheaper choice).
    Raises Infeasible when no allocation fits."""
    if len(costs) != len(damages) or any(len(c) != len(d) or not c for c, d in zip(costs, damages)):
        raise ValueError("every item needs as many costs as damages, and at least one choice")
    w = [np.asarray(c, dtype=np.int64) for c in costs]
    d = [np.asarray(x, dtype=np.float64) for x in damages]
    if any((c < 0).any() for c in w) or any(not np.isfinite(x).all() for x in d):
        raise ValueError("costs must be >= 0 and damages finite")
    base = [int(c.min()) for c in w]
    minimum = sum(base)
    if minimum > capacity:
        raise Infeasible(minimum, int(capacity))
    # Only what each choice costs above its item's cheapest one competes for the slack.
    extra = [c - b for c, b in zip(w, base)]
    slack = min(int(capacity) - minimum, sum(int(e.max()) for e in extra))
    unit = math.gcd(*(int(v) for e in extra for v in e)) or 1
    exact = True
    if slack // unit > max_units:  # coarsen: round costs up, so a fit in units is a fit in bits
        unit = unit * math.ceil(slack / unit / max_units)
        exact = False
    units = [-(-e // unit) for e in extra]  # ceil; exact when unit divides every cost
    cap = slack // unit

    # best[c]: least damage of the items so far with cost <= c units; pick[i, c]: item i's choice there.
    best = np.zeros(cap + 1)
    pick = np.zeros((len(units), cap + 1), dtype=np.int16)
    for i, (u, dmg) in enumerate(zip(units, d)):
        new = np.full(cap + 1, np.inf)
        for j in np.argsort(u, kind="stable"):  # cheapest first: a later choice must be strictly better
            k = int(u[j])
            if k > cap:
                continue
            cand = best[: cap + 1 - k] + dmg[j]
            better = cand < new[k:]
            new[k:][better] = cand[better]
            pick[i, k:][better] = j
        best = new
    choices, c = [0] * len(units), cap
    for i in range(len(units) - 1, -1, -1):
        j = int(pick[i, c])
        choices[i] = j
        c -= int(units[i][j])
    total = sum(int(w[i][j]) for i, j in enumerate(choices))
    assert total <= capacity, (total, capacity)  # rounding up keeps every unit-feasible choice feasible
    return Solution(choices, total, float(sum(d[i][j] for i, j in enumerate(choices))), exact, unit)
