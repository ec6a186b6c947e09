"""One run on several processes (qspeech.distributed, `torchrun --nproc_per_node=N -m qspeech run ...`), on CPU
with gloo: the helpers on hand-checkable inputs; two ranks train like one process on the same global batches
(within float summation order: TOL); a two-rank run stopped after a checkpoint resumes to exactly the numbers of
an uninterrupted two-rank run; the real CLI under torchrun (slow).

Measured on the 2-core machine: the default-suite tests ~10 s together; the slow CLI tests ~1 min each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from qspeech import distributed
from qspeech.train import TrainConfig, fit

# Two ranks against one process: the same updates, but each rank's loss is a mean over its shard and the
# gradients are summed across ranks, so floats are added in another order. Measured largest differences: the
# toy's weights ~1e-7 after 30 Adam steps, the smoke run's head weights ~1e-6 and its losses ~1e-6.
TOL = 1e-5


# ---------------------------------------------------------------------------------------------- helpers
def test_shard_takes_every_world_th_item():
    items = [10, 11, 12, 13, 14]
    assert distributed.shard(items, 0, 2) == [10, 12, 14]
    assert distributed.shard(items, 1, 2) == [11, 13]
    assert distributed.shard([7], 1, 2) == []  # a batch smaller than the world: a rank may get nothing
    assert distributed.shard(items) == items  # a single process: the whole batch


def test_pack_unpack_weights_by_items():
    """Each rank's gradient and loss weighted by its items, summed, divided by the global count."""
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.tensor([1.0, 2.0])
    a = distributed.pack([p], loss=2.0, items=3)
    p.grad = torch.tensor([5.0, -2.0])
    b = distributed.pack([p], loss=6.0, items=1)
    assert a.tolist() == [3.0, 6.0, 6.0, 3.0]
    loss, total = distributed.unpack(a + b, [p])  # what all_reduce sums
    assert (loss, total) == (3.0, 4)  # (2 * 3 + 6 * 1) / 4
    assert p.grad.tolist() == [2.0, 1.0]  # ([1, 2] * 3 + [5, -2]) / 4
    p.grad = None
    assert distributed.unpack(distributed.pack([p], 0.0, 0), [p]) == (0.0, 0) and p.grad is None


def test_shard_gradients_make_the_whole_batch_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5)
    params = list(model.parameters())

    def grads_of(idx):
        model.zero_grad()
        loss = ((model(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()
        loss.backward()
        return distributed.pack(params, float(loss.detach()), len(idx))

    whole = distributed.unpack(grads_of(list(range(5))), params)
    expect = [p.grad.clone() for p in params]
    loss, total = distributed.unpack(grads_of(distributed.shard(range(5), 0, 2))
                                     + grads_of(distributed.shard(range(5), 1, 2)), params)
    assert total == 5 and loss == pytest.approx(whole[0], abs=1e-6)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(expect, params))


# ------------------------------------------------------------------------------------ two ranks, in-process
class Toy:
    """y = x . w + noise, batches of 7 (an odd size: the ranks' shards differ in size)."""

    select_metric = "mse"

    def __init__(self, dropout=0.0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(70, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(70, generator=g)
        torch.manual_seed(1)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(dropout), nn.ReLU(), nn.Linear(16, 1))

    def train_lengths(self):
        return [float(i % 7) for i in range(len(self.x))]

    def make_batch(self, idx, device):
        return self.x[idx], self.y[idx]

    def loss(self, batch):
        x, y = batch
        return ((self.model(x).squeeze(-1) - y) ** 2).mean(), len(x)

    def evaluate(self, split, device):
        return {"mse": float(((self.model(self.x).squeeze(-1) - self.y) ** 2).mean())}

    def make_optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=1e-2)


CFG = TrainConfig(max_steps=30, batch_size=7, eval_every=10, save_every=5, log_every=5, lr_schedule="linear",
                  device="cpu", num_threads=1)


def _fit(tmp: Path, dropout: float, stop_at: int | None) -> None:
    """One rank's (or one process's) fit of the toy; writes what it returned to tmp/out<rank>.pt."""

    def stop(step):
        if step == stop_at:
            raise KeyboardInterrupt  # as a kill right after that step's checkpoint

    task = Toy(dropout)
    try:
        res = fit(task, CFG, seed=0, state_dir=tmp / "state", run_dir=tmp / f"run{distributed.rank()}",
                  progress=False, on_step=stop)
    except KeyboardInterrupt:
        return
    torch.save({"weights": task.model.state_dict(), "history": res.history, "best": res.best,
                "best_step": res.best_step, "items": res.train_items, "resumed_from": res.resumed_from},
               tmp / f"out{distributed.rank()}.pt")


def _rank(r: int, world: int, port: int, tmp: Path, dropout: float, stop_at: int | None) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _fit(tmp, dropout, stop_at)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp: Path, dropout: float = 0.0, stop_at: int | None = None) -> dict | None:
    mp.spawn(_rank, args=(2, _free_port(), tmp, dropout, stop_at), nprocs=2)
    outs = [tmp / f"out{r}.pt" for r in range(2)]
    if not outs[0].exists():
        return None
    got = [torch.load(p, weights_only=True) for p in outs]
    # every rank ends with rank 0's record and the best weights
    assert got[0]["history"] == got[1]["history"] and got[0]["best_step"] == got[1]["best_step"]
    assert all(torch.equal(v, got[1]["weights"][k]) for k, v in got[0]["weights"].items())
    return got[0]


def test_two_ranks_train_like_one_process(tmp_path):
    one = tmp_path / "one"
    _fit(one, 0.0, None)
    single = torch.load(one / "out0.pt", weights_only=True)
    two = _two_ranks(tmp_path / "two")
    assert two["items"] == single["items"] == 30 * 7  # every rank's shard counted once
    assert [(h["step"], h["split"], h["metric"]) for h in two["history"]] == \
        [(h["step"], h["split"], h["metric"]) for h in single["history"]]
    diffs = [abs(a["value"] - b["value"]) for a, b in zip(two["history"], single["history"])]
    weights = [float((v - single["weights"][k]).abs().max()) for k, v in two["weights"].items()]
    print(f"two ranks vs one process: history max diff {max(diffs):.2e}, weights {max(weights):.2e}")
    assert max(diffs) < TOL and max(weights) < TOL
    assert two["best_step"] == single["best_step"]
    # rank 0 alone wrote the run folder and the state; the state of two ranks lives apart from one process's
    assert (tmp_path / "two" / "run0" / "metrics.csv").exists() and not (tmp_path / "two" / "run1").exists()
    state = torch.load(tmp_path / "two" / "state" / "ranks2" / "last.pt", weights_only=True)
    assert len(state["rngs"]) == 2 and not (tmp_path / "two" / "state" / "last.pt").exists()


def test_two_ranks_resume_to_the_numbers_of_an_uninterrupted_run(tmp_path):
    """Dropout on: each rank's RNG stream matters, and each must come back from the state file."""
    whole = _two_ranks(tmp_path / "whole", dropout=0.3)
    assert _two_ranks(tmp_path / "killed", dropout=0.3, stop_at=15) is None
    assert torch.load(tmp_path / "killed" / "state" / "ranks2" / "last.pt", weights_only=True)["step"] == 15
    resumed = _two_ranks(tmp_path / "killed", dropout=0.3)
    assert resumed["resumed_from"] == 15
    assert resumed["history"] == whole["history"] and resumed["best_step"] == whole["best_step"]
    assert all(torch.equal(v, whole["weights"][k]) for k, v in resumed["weights"].items())
