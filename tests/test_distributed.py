"""One run on several processes (qspeech.distributed, `torchrun --nproc_per_node=N -m qspeech run ...`), on CPU
with gloo: the helpers on hand-checkable inputs; two ranks train like one process on the same global batches
(within float summation order: TOL); a two-rank run stopped after a checkpoint resumes to exactly the numbers of
an uninterrupted two-rank run; the real CLI under torchrun (slow).

Measured on the loaded 2-core machine: the default-suite tests 6-12 s together (the two-rank ones ~5 s and ~2 s);
the slow CLI tests 40-70 s (one vs two ranks) and ~90 s (kill and resume).
"""

from __future__ import annotations

import contextlib
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

from qspeech import cli, distributed
from qspeech.train import TrainConfig, fit

# Two ranks against one process: the same updates, but each rank's loss is a mean over its shard and the
# gradients are summed across ranks, so floats are added in another order. The toy (measured: weights 6e-8,
# losses 1e-6, i.e. the 6-decimal rounding of metrics.csv, after 30 Adam steps):
TOL = 1e-5
# The smoke ASR head: Adam's first updates are g / (|g| + 1e-8) * lr, so the summation noise in a gradient near
# 1e-8 moves that weight by up to ~lr. Measured at lr 0.02 after 6 steps: the largest weight difference 1.3e-2 (a
# handful of weights), the mean per tensor at most 6e-6; the losses 1.5e-4 relative; scores and predictions equal.
SMOKE_WEIGHT_MAX, SMOKE_WEIGHT_MEAN, SMOKE_LOSS_RTOL = 0.05, 1e-4, 1e-3


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


def test_under_torchrun_only_run_is_accepted(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        cli.main(["cost", "experiment=smoke"])
    assert e.value.code == 2 and "only `qspeech run`" in capsys.readouterr().err


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
    # fork: the ranks start in a second instead of re-importing torch (~20 s on the loaded 2-core machine); they
    # run one thread each (train.num_threads=1), so no OpenMP pool is used after the fork
    mp.start_processes(_rank, args=(2, _free_port(), tmp, dropout, stop_at), nprocs=2, start_method="fork")
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


# ------------------------------------------------------------------------------------- the CLI under torchrun
BIN = Path(sys.executable).parent
# lr 0.02: six steps move the head enough that its scores and predictions follow its weights
SMOKE = ["experiment=smoke", "train.num_threads=1", "task.lr=0.02"]
VOLATILE_METRICS = {"train_wall_s", "upstream_utts_per_s", "train_utts_per_s", "feature_cache", "resumed_from_step"}


def _cli(cwd: Path, cache: Path, args: list[str], ranks: int = 1) -> subprocess.Popen:
    """`qspeech run` (ranks=1) or `torchrun --standalone --nproc_per_node=<ranks> -m qspeech run` in cwd."""
    (cwd / "tmp").mkdir(parents=True, exist_ok=True)  # TMPDIR: where rank 1 keeps its scratch run folder
    env = {**os.environ, "QSPEECH_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TMPDIR": str(cwd / "tmp")}
    cmd = [str(BIN / "qspeech")] if ranks == 1 else [
        str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "qspeech"]
    return subprocess.Popen([*cmd, "run", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


def _descendants(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids + [d for k in kids for d in _descendants(k)]


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks at once (torchrun starts each rank in a session of its own)."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()


def _run_dir(cwd: Path) -> Path:
    (run,) = (cwd / "outputs" / "run").iterdir()
    return run


def _loss_history(run: Path) -> list[tuple[str, str, float]]:
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    return [(step, f"{split}/{metric}", float(value)) for step, split, metric, value in rows]


@pytest.mark.slow
def test_cli_two_ranks_train_like_one_process(tmp_path):
    """~1 min: the smoke run on one process and under torchrun on two (dropout and SpecAugment off: the
    ranks' random draws differ from one process's), sharing the cache: scores, losses and head weights."""
    args = [*SMOKE, "task.dropout=0", "task.specaug.enabled=false"]
    cache = tmp_path / "cache"
    _finish(_cli(tmp_path / "one", cache, args))
    _finish(_cli(tmp_path / "two", cache, args, ranks=2))
    one, two = _run_dir(tmp_path / "one"), _run_dir(tmp_path / "two")
    m1, m2 = (json.loads((r / "result.json").read_text())["metrics"] for r in (one, two))
    for k in ("value", "cer", "dev_wer", "dev_cer", "best_step", "n_train"):
        assert m2[k] == m1[k], k
    assert (one / "test_predictions.tsv").read_text() == (two / "test_predictions.tsv").read_text()
    h1, h2 = _loss_history(one), _loss_history(two)
    assert [h[:2] for h in h1] == [h[:2] for h in h2]
    rel = max(abs(a[2] - b[2]) / max(abs(a[2]), 1e-9) for a, b in zip(h1, h2))
    w1, w2 = (torch.load(r / "downstream.pt", weights_only=True)["model"] for r in (one, two))
    wmax = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    wmean = max(float((w1[k] - w2[k]).abs().mean()) for k in w1)
    print(f"CLI two ranks vs one process: metrics.csv rel diff {rel:.2e}, head weights max {wmax:.2e} mean {wmean:.2e}")
    assert rel < SMOKE_LOSS_RTOL and wmax < SMOKE_WEIGHT_MAX and wmean < SMOKE_WEIGHT_MEAN
    # rank 1 wrote nothing of its own into the run folder: the same files, one copy of each log line
    assert sorted(p.name for p in one.rglob("*")) == sorted(p.name for p in two.rglob("*"))
    assert "[rank" not in (two / "qspeech.log").read_text()
    assert not list((tmp_path / "two" / "tmp").glob("qspeech-rank*"))  # rank 1's scratch folder is gone
    assert len(list((cache / "runs").glob("*/ranks2/last.pt"))) == 1  # two ranks' state apart from one process's


@pytest.mark.slow
def test_cli_two_ranks_killed_resume_to_the_uninterrupted_numbers(tmp_path):
    """~2 min: a two-rank smoke run (dropout and SpecAugment on) SIGKILLed, torchrun and ranks at once, after
    its first checkpoint, then rerun, equals an uninterrupted two-rank run exactly."""
    args = [*SMOKE, "train.max_steps=12", "train.eval_every=3"]
    _finish(_cli(tmp_path / "whole", tmp_path / "cache_whole", args, ranks=2))
    cache = tmp_path / "cache"
    proc = _cli(tmp_path / "killed", cache, args, ranks=2)
    deadline = time.time() + 600
    while not list((cache / "runs").glob("*/ranks2/last.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    _kill_all(proc)
    (state,) = (cache / "runs").glob("*/ranks2/last.pt")
    stopped = torch.load(state, weights_only=True)["step"]
    assert 0 < stopped < 12, f"the kill came too late (state at step {stopped})"
    _finish(_cli(tmp_path / "killed", cache, args, ranks=2))
    whole, resumed = _run_dir(tmp_path / "whole"), _run_dir(tmp_path / "killed")
    r1, r2 = (json.loads((r / "result.json").read_text())["metrics"] for r in (whole, resumed))
    assert r2["resumed_from_step"] == stopped
    assert {k: v for k, v in r1.items() if k not in VOLATILE_METRICS} == \
        {k: v for k, v in r2.items() if k not in VOLATILE_METRICS}
    for name in ("metrics.csv", "test_predictions.tsv"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name
    w1, w2 = (torch.load(r / "downstream.pt", weights_only=True)["model"] for r in (whole, resumed))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
