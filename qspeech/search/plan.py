"""`qspeech search`: sensitivity -> exact allocation under a budget -> a plan that `qspeech run` takes.

The costs of every choice come from the project's own accounting (qspeech.cost.account, the function behind
`qspeech cost` and result.json), one accounting per candidate bit width: a module's row there (its weight at
b bits + the method's 16-bit scales + its bias at 16 bits) is what choosing b for it costs, and modules add up.
The plan is then accounted once more as `qspeech run` will account it, and must cost exactly what was planned.

What is searched: the modules the quant config quantizes (quant.targets minus quant.exclude). Modules that a
pattern of the given quant.overrides matches are pinned at their bits; their cost is a constant.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import re
import shlex
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from omegaconf import OmegaConf
from tabulate import tabulate

from qspeech.atomic import ensure_folder, write_json_atomic, write_text_atomic
from qspeech.cost import REFERENCE_BITS, account, account_quantized
from qspeech.data import load_split
from qspeech.errors import ConfigError
from qspeech.quant import overhead_values
from qspeech.quant.targets import candidate_modules, select_targets
from qspeech.search.config import SearchRunConfig, budget_tag
from qspeech.search.sensitivity import cached_sensitivity
from qspeech.search.solve import Infeasible, solve
from qspeech.seeding import seed_everything
from qspeech.upstream import build_upstream

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"
PLAN_GROUP = "quant_plan"  # the Hydra config group the plan files form (one folder, any number of plans)
SELECTION_FIELDS = ("targets", "exclude", "overrides")


@dataclass
class Costs:
    """The exact price of every choice: storage bits and runtime units (MACs x weight bits, 32 = not
    quantized) of each searched module at each candidate bit width, plus what everything else costs."""

    names: list[str]
    bits: list[int]  # candidates, ascending
    storage: list[list[int]]  # [module][candidate] bits
    runtime: list[list[int]]  # [module][candidate] MACs x bits
    fixed_storage: int  # every other parameter, pinned modules included
    fixed_runtime: int
    total_macs: int
    groups: dict[str, str]  # module -> part of the model (cost.py's summary groups: CNN, FFN, ...)
    params: dict[str, int]  # module -> weight parameters
    uniform_storage: dict[int, int]  # b -> total storage bits with every searched module at b

    def storage_mb(self, total_bits: int) -> float:
        return total_bits / 8 / 1e6  # as qspeech.cost.account

    def runtime_of(self, total_units: int) -> float:
        return total_units / REFERENCE_BITS / self.total_macs if self.total_macs else 1.0


def searched_modules(model, quant) -> tuple[list[str], dict[str, int]]:
    """(modules to search, in forward order; {pinned module: bits} for those a quant.overrides pattern
    matches: 32 = kept at full precision)."""
    targets = select_targets(model, 2, quant.targets, quant.exclude, {})
    pinned_names = {n for n in candidate_modules(model)
                    if any(fnmatch.fnmatchcase(n, p) for p in quant.overrides)}
    with_pins = select_targets(model, 2, quant.targets, quant.exclude, quant.overrides)
    pinned = {n: with_pins.get(n, 32) for n in pinned_names
              if not any(fnmatch.fnmatchcase(n, p) for p in quant.exclude)}
    return [n for n in targets if n not in pinned], pinned


def price(upstream, quant, names: list[str], pinned: dict[str, int], bits: list[int], seconds: float,
          extra_bits: tuple[int, ...] = ()) -> Costs:
    """Costs from one accounting per bit width (the same function that writes result.json's storage)."""
    overhead = lambda shape, b: overhead_values(quant, shape, b)  # noqa: E731
    pins = {n: b for n, b in pinned.items() if b < 32}
    reports = {b: account(upstream, pins | ({n: b for n in names} if b < 32 else {}), overhead, seconds)
               for b in sorted(set(bits) | set(extra_bits))}
    rows = {b: {r.name: r for r in rep.rows} for b, rep in reports.items()}
    any_b = next(iter(reports))
    first = reports[any_b]
    searched = set(names)
    others = [r for r in first.rows if r.name not in searched]
    fixed_storage = sum(r.storage_bits for r in others)
    fixed_runtime = sum(r.macs * (r.bits if r.quantized else REFERENCE_BITS) for r in others)
    storage = [[rows[b][n].storage_bits for b in bits] for n in names]
    runtime = [[rows[b][n].macs * min(b, REFERENCE_BITS) for b in bits] for n in names]
    modules = dict(upstream.model.named_modules())
    return Costs(names=names, bits=list(bits), storage=storage, runtime=runtime, fixed_storage=fixed_storage,
                 fixed_runtime=fixed_runtime, total_macs=first.macs,
                 groups={n: rows[any_b][n].group for n in names},
                 params={n: int(modules[n].weight.numel()) if hasattr(modules[n], "weight")
                         else rows[any_b][n].params for n in names},
                 uniform_storage={b: sum(r.storage_bits for r in rep.rows) for b, rep in reports.items()})


def capacity(cfg: SearchRunConfig, costs: Costs) -> tuple[str, int, float]:
    """(what is budgeted: storage | runtime, the capacity in its integer units for the searched modules,
    the budget as a number). Storage: the largest total bits whose MB, computed as the accounting computes
    it, is <= budget_mb, so result.json never shows more than the budget."""
    if cfg.budget_runtime is not None:
        total = math.floor(Fraction(float(cfg.budget_runtime)) * REFERENCE_BITS * costs.total_macs)
        return "runtime", total - costs.fixed_runtime, float(cfg.budget_runtime)
    if cfg.budget_bits is not None:
        total = costs.uniform_storage[int(cfg.budget_bits)]
        return "storage", total - costs.fixed_storage, costs.storage_mb(total)
    budget = float(cfg.budget_mb)
    total = math.floor(budget * 8e6)
    while costs.storage_mb(total + 1) <= budget:
        total += 1
    while total > 0 and costs.storage_mb(total) > budget:
        total -= 1
    return "storage", total - costs.fixed_storage, budget


def _budget_error(cfg: SearchRunConfig, costs: Costs, kind: str, e: Infeasible) -> ConfigError:
    low = costs.bits[0]
    if kind == "runtime":
        least = costs.runtime_of(costs.fixed_runtime + e.minimum)
        return ConfigError(f"budget_runtime={cfg.budget_runtime} is below the least estimated runtime of this "
                           f"search, {least:.4f} (every searched module at {low} bits); raise it, or add lower "
                           "bits to search.bits")
    least = costs.storage_mb(costs.fixed_storage + e.minimum)
    budget = f"budget_mb={cfg.budget_mb}" if cfg.budget_mb is not None else f"budget_bits={cfg.budget_bits}"
    return ConfigError(f"{budget} is below the smallest storage of this search, {least:.4f} MB (every searched "
                       f"module at {low} bits); raise it, or add lower bits to search.bits")


def equivalent_bits(uniform: list[dict], planned: float, on: str) -> int:
    """The plan's `bits`: the candidate width whose uniform allocation costs nearest the plan (ties: the lower),
    so that its run folder and report row sit beside the uniform run it competes with. Every searched module
    has its own override, so which modules get which bits does not depend on it."""
    key = "storage_mb" if on == "storage" else "est_runtime"
    quantized = [u for u in uniform if u["bits"] < 32]
    if not quantized:
        return 32
    return min(quantized, key=lambda u: (abs(u[key] - planned), u["bits"]))["bits"]


def plan_quant(quant, allocation: dict[str, int]):
    """The quant config of the plan: the given one, its pinning patterns first, then one override per
    searched module (later patterns win in select_targets; the two never match the same module)."""
    return dataclasses.replace(quant, overrides=dict(quant.overrides) | dict(allocation))


def non_default_quant(quant) -> dict:
    """The quant settings of the search that differ from the method's own YAML option (its dataclass defaults
    are that YAML's): the plan keeps them, so it runs with the quantizer that was measured."""
    defaults = dataclasses.asdict(type(quant)())
    return {k: v for k, v in dataclasses.asdict(quant).items()
            if k not in SELECTION_FIELDS and k != "method" and v != defaults[k]}


_PLAIN = re.compile(r"[A-Za-z0-9_/\-+.%*@?|]+")  # what Hydra's override grammar reads unquoted


def _hydra_value(v) -> str:
    """A value in Hydra's override grammar. Dict keys cannot be quoted there: ValueError for one that needs it."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not all(_PLAIN.fullmatch(str(k)) for k in v):
            raise ValueError("a dict key Hydra cannot read unquoted")
        return "{" + ",".join(f"{k}:{_hydra_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return "null"
    if isinstance(v, str) and not _PLAIN.fullmatch(v):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def commands(name: str, plan_root: Path, quant, bits: int) -> tuple[str, str | None]:
    """(the command that runs the plan file, a self-contained one with the plan as overrides, or None when a
    pinning pattern cannot be written there). quant.overrides takes a dict only as `++quant.overrides=...` on
    Hydra's command line (plain `quant.overrides={...}` is refused as a new key of a structured dict)."""
    root = plan_root.resolve()
    with_file = f"qspeech run {shlex.quote(f'hydra.searchpath=[file://{root}]')} +{PLAN_GROUP}={name}"
    parts = [f"bits={bits}", f"quant={quant.method}", f"quant.targets={_hydra_value(list(quant.targets))}"]
    if quant.exclude:
        parts.append(f"quant.exclude={_hydra_value(list(quant.exclude))}")
    parts += [f"quant.{k}={_hydra_value(v)}" for k, v in non_default_quant(quant).items()]
    try:
        parts.append(f"++quant.overrides={_hydra_value(dict(quant.overrides))}")
    except ValueError:
        return with_file, None
    return with_file, "qspeech run " + " ".join(shlex.quote(p) for p in parts)


def plan_yaml(name: str, quant, bits: int, header: list[str]) -> str:
    """The plan as a Hydra config of the `quant_plan` group (`# @package _global_`: it sets the root's bits
    and quant); `override /quant` selects the measured method, which a `quant=...` on the command line
    replaces."""
    body = {"defaults": [{"override /quant": quant.method}], "bits": int(bits),
            "quant": {"targets": list(quant.targets), "exclude": list(quant.exclude)}
            | non_default_quant(quant) | {"overrides": {k: int(v) for k, v in quant.overrides.items()}}}
    lines = ["# @package _global_", *[f"# {h}" for h in header]]
    return "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.create(body))


def group_summary(names: list[str], allocation: dict[str, int], costs: Costs, damage: dict, chosen_cost: dict) -> list[dict]:
    """One row per part of the model (CNN, attention linears, FFN, ...): modules, weights, how many modules at
    each bit width, the parameter-weighted mean bits, storage and predicted damage."""
    out: dict[str, dict] = {}
    for n in names:
        g = out.setdefault(costs.groups[n], {"group": costs.groups[n], "modules": 0, "params": 0, "bits": Counter(),
                                             "bit_params": 0, "storage_bits": 0, "damage": 0.0})
        b = allocation[n]
        g["modules"] += 1
        g["params"] += costs.params[n]
        g["bits"][b] += 1
        g["bit_params"] += costs.params[n] * min(b, 16)  # an unquantized weight is stored at 16 bits
        g["storage_bits"] += chosen_cost[n]
        g["damage"] += damage[n][b]
    rows = []
    for g in out.values():
        rows.append({"group": g["group"], "modules": g["modules"], "params": g["params"],
                     "bits": {int(b): c for b, c in sorted(g["bits"].items())},
                     "mean_bits": g["bit_params"] / g["params"] if g["params"] else None,
                     "storage_mb": g["storage_bits"] / 8 / 1e6, "damage": g["damage"]})
    return rows


def _uniform(costs: Costs, damage: dict, names: list[str], kind: str, cap: int) -> list[dict]:
    """Every candidate width applied to all searched modules: its storage, runtime, damage, and whether it fits."""
    uniform = []
    for j, b in enumerate(costs.bits):
        st = costs.fixed_storage + sum(costs.storage[i][j] for i in range(len(names)))
        rt = costs.fixed_runtime + sum(costs.runtime[i][j] for i in range(len(names)))
        uniform.append({"bits": b, "storage_mb": costs.storage_mb(st), "est_runtime": costs.runtime_of(rt),
                        "damage": sum(damage[n][b] for n in names),
                        "fits": (st - costs.fixed_storage if kind == "storage" else rt - costs.fixed_runtime) <= cap})
    return uniform


def _check_plan(upstream, final, base: int, expected: dict[str, int], planned_storage: int, seconds: float):
    """The plan as `qspeech run` will see it: its module selection and its accounting must be the planned
    ones; returns that accounting."""
    if select_targets(upstream.model, base, final.targets, final.exclude, final.overrides) != expected:
        raise RuntimeError("the plan's quant config does not select the planned bits (a bug in qspeech.search)")
    report = account_quantized(upstream, final, base, seconds)
    if sum(r.storage_bits for r in report.rows) != planned_storage:
        raise RuntimeError("the plan's accounting differs from the search's (a bug in qspeech.search)")
    return report


def _setup(cfg: SearchRunConfig, run_dir: Path):
    """(run folder, the upstream, searched modules, pinned modules, the prices of every choice): the
    search's folders checked, the upstream built (seeded: random-init upstreams are reproducible too)."""
    run_dir = ensure_folder(run_dir, "the search folder", "set hydra.run.dir=/a/writable/folder")
    ensure_folder(cfg.cache_dir, "cache_dir (QSPEECH_CACHE)", "set QSPEECH_CACHE to a writable folder")
    seed_everything(int(cfg.seed))
    upstream = build_upstream(cfg.model)
    upstream.eval()
    names, pinned = searched_modules(upstream.model, cfg.quant)
    if not names:
        raise ConfigError(f"quant.targets={list(cfg.quant.targets)} leaves no module of {cfg.model.name} to search "
                          "(all excluded or pinned by quant.overrides); widen quant.targets")
    bits = sorted(int(b) for b in cfg.search.bits)
    extra = (int(cfg.budget_bits),) if cfg.budget_bits is not None else ()
    costs = price(upstream, cfg.quant, names, pinned, bits, float(cfg.cost.seconds), extra)
    return run_dir, upstream, names, pinned, costs


def main(cfg: SearchRunConfig, run_dir: Path, progress: bool = True) -> dict:
    """Search, write <run_dir>/plan.json and <run_dir>/../quant_plan/<name>.yaml, print the summary and the
    command; returns the plan."""
    run_dir, upstream, names, pinned, costs = _setup(cfg, run_dir)
    quant, bits = cfg.quant, costs.bits
    kind, cap, budget = capacity(cfg, costs)
    table = costs.storage if kind == "storage" else costs.runtime
    try:  # an impossible budget is found before the (long) sensitivity pass
        solve(table, [[0.0] * len(bits) for _ in names], cap, cfg.search.max_units)
    except Infeasible as e:
        raise _budget_error(cfg, costs, kind, e) from None

    utts = load_split(cfg.data, cfg.search.split, cfg.cache_dir)
    damage, sens_info = cached_sensitivity(upstream, quant, names, bits, utts, cfg.search.utterances,
                                           cfg.search.max_seconds, cfg.search.measure, cfg.cache_dir, progress)
    sol = solve(table, [[damage[n][b] for b in bits] for n in names], cap, cfg.search.max_units)
    allocation = {n: bits[j] for n, j in zip(names, sol.choices)}

    planned_storage = costs.fixed_storage + sum(costs.storage[i][j] for i, j in enumerate(sol.choices))
    planned_runtime = costs.fixed_runtime + sum(costs.runtime[i][j] for i, j in enumerate(sol.choices))
    uniform = _uniform(costs, damage, names, kind, cap)
    base = equivalent_bits(uniform, costs.storage_mb(planned_storage) if kind == "storage"
                           else costs.runtime_of(planned_runtime), kind)
    final = plan_quant(quant, allocation)
    expected = {n: b for n, b in (pinned | allocation).items() if b < 32}
    report = _check_plan(upstream, final, base, expected, planned_storage, float(cfg.cost.seconds))

    name, plan_root = run_dir.name, run_dir.parent
    plan_file = plan_root / PLAN_GROUP / f"{name}.yaml"
    command, inline = commands(name, plan_root, final, base)
    chosen_cost = {n: costs.storage[i][j] for i, (n, j) in enumerate(zip(names, sol.choices))}
    plan = {
        "name": name, "model": cfg.model.name, "init": cfg.model.init, "method": quant.method,
        "targets": list(quant.targets), "exclude": list(quant.exclude), "pinned": pinned,
        "budget": {"on": kind, "value": budget, "given": budget_tag(cfg)},
        "storage_mb": report.storage_mb, "est_runtime": report.est_runtime,
        "planned_storage_bits": planned_storage, "planned_runtime": costs.runtime_of(planned_runtime),
        "predicted_damage": sol.damage, "exact": sol.exact, "dp_unit": sol.unit,
        "bits": base, "overrides": dict(final.overrides),
        "groups": group_summary(names, allocation, costs, damage, chosen_cost), "uniform": uniform,
        "modules": [{"name": n, "group": costs.groups[n], "params": costs.params[n], "bits": allocation[n],
                     "storage_bits": chosen_cost[n], "damage": {str(b): damage[n][b] for b in bits}}
                    for n in names],
        "sensitivity": sens_info | {"measure": cfg.search.measure, "split": cfg.search.split},
        "plan_file": str(plan_file), "command": command, "command_inline": inline,
    }
    _write_plan(cfg, run_dir, plan, final)
    return plan


def _write_plan(cfg: SearchRunConfig, run_dir: Path, plan: dict, final) -> None:
    """<run_dir>/plan.json and the plan's quant_plan/<name>.yaml (headed by its summary), then the summary."""
    header = [f"Mixed-precision plan from `qspeech search` ({run_dir / PLAN_FILE} has the details):",
              f"{cfg.model.name}, {plan['method']}, budget {budget_tag(cfg)}: storage {plan['storage_mb']:.4f} MB, "
              f"est. runtime {plan['est_runtime']:.4f}, predicted damage {plan['predicted_damage']:.4g}",
              f"Run it: {plan['command']}"]
    write_text_atomic(Path(plan["plan_file"]), plan_yaml(plan["name"], final, plan["bits"], header))
    write_json_atomic(run_dir / PLAN_FILE, plan)
    print(format_plan(plan))


def format_plan(plan: dict) -> str:
    mods = tabulate([(m["name"], m["group"], f"{m['params']:,}", m["bits"], f"{m['damage'][str(m['bits'])]:.3g}"
                      if str(m["bits"]) in m["damage"] else "0") for m in plan["modules"]],
                    headers=("module", "part", "weights", "bits", "damage"), tablefmt="github", disable_numparse=True)
    groups = tabulate([(g["group"], g["modules"], f"{g['params']:,}",
                        " ".join(f"{c}x{b}" for b, c in g["bits"].items()),
                        "-" if g["mean_bits"] is None else f"{g['mean_bits']:.2f}", f"{g['storage_mb']:.4f}",
                        f"{g['damage']:.4g}") for g in plan["groups"]],
                      headers=("part", "modules", "weights", "bits (modules x bits)", "mean bits", "MB", "damage"),
                      tablefmt="github", disable_numparse=True)
    uniform = tabulate([(f"uniform {u['bits']}-bit", f"{u['storage_mb']:.4f}", f"{u['est_runtime']:.4f}",
                         f"{u['damage']:.4g}", "yes" if u["fits"] else "no") for u in plan["uniform"]]
                       + [("searched", f"{plan['storage_mb']:.4f}", f"{plan['est_runtime']:.4f}",
                           f"{plan['predicted_damage']:.4g}", "yes")],
                       headers=("allocation", "storage MB", "est. runtime", "predicted damage", "fits"),
                       tablefmt="github", disable_numparse=True)
    s = plan["sensitivity"]
    exact = "exact optimum" if plan["exact"] else f"within budget, costs rounded up to {plan['dp_unit']} units"
    return (f"{mods}\n\nBy part of the model:\n\n{groups}\n\n{uniform}\n\n"
            f"budget {plan['budget']['given']} ({plan['budget']['on']}): {exact}; sensitivity {s['status']} "
            f"({s['utterances']} utterances, {s['seconds']} s, {s['path']})\n"
            f"plan: {plan['plan_file']}\nrun it: {plan['command']}")
