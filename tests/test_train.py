"""The task-agnostic training loop: bucketing, NaN guard, checkpoint/resume equality (toy task and ASR)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from qspeech.errors import ConfigError, TrainingError
from qspeech.tasks import run_task
from qspeech.checks import typed
from qspeech.train import TrainConfig, epoch_batches, fit, lr_factor

from test_asr_fixture import use_corpus, make_cfg, tiny_upstream, write_corpus


class Toy:
    """y = x . w + noise; a dropout layer makes the result depend on the RNG state."""

    select_metric = "mse"

    def __init__(self, n=64, nan_at=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
        torch.manual_seed(1)  # the same init in every instance (run_task seeds before building the head)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))
        self.nan_at, self.calls = nan_at, 0

    def train_lengths(self):
        return [float(i % 7) for i in range(len(self.x))]

    def make_batch(self, idx, device):
        return self.x[idx], self.y[idx]

    def loss(self, batch):
        self.calls += 1
        x, y = batch
        loss = ((self.model(x).squeeze(-1) - y) ** 2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, len(x)

    def evaluate(self, split, device):
        return {"mse": float(((self.model(self.x).squeeze(-1) - self.y) ** 2).mean())}

    def make_optimizer(self):
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        return self.opt


def _cfg(**kw):
    return dataclasses.replace(TrainConfig(max_steps=30, batch_size=8, eval_every=10, save_every=5, log_every=5,
                                           lr_schedule="constant", device="cpu", cache_features=False), **kw)


def test_epoch_batches_deterministic_complete_and_bucketed():
    lengths = [float(i % 13) + 0.5 for i in range(100)]
    cfg = _cfg(batch_size=8, bucket_window=4)
    b1, b2 = epoch_batches(lengths, cfg, 0, 0), epoch_batches(lengths, cfg, 0, 0)
    assert b1 == b2 and b1 != epoch_batches(lengths, cfg, 0, 1)
    assert sorted(i for b in b1 for i in b) == list(range(100))
    assert all(len(b) <= 8 for b in b1)
    # within a batch, lengths are sorted (descending): neighbours in length
    assert all([lengths[i] for i in b] == sorted([lengths[i] for i in b], reverse=True) for b in b1)
    halved = epoch_batches(lengths, dataclasses.replace(cfg, half_batch_above_s=10.0), 0, 0)
    assert any(len(b) == 4 for b in halved) and all(max(lengths[i] for i in b) <= 10 or len(b) <= 4 for b in halved)


def test_nan_loss_raises_training_error(tmp_path):
    task = Toy(nan_at=3)
    with pytest.raises(TrainingError, match="step 3"):
        fit(task, _cfg(), seed=0, state_dir=tmp_path / "s", progress=False)


def test_lr_factor_schedules():
    lin = _cfg(max_steps=10, lr_schedule="linear", warmup_steps=2)
    assert [lr_factor(lin, s) for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert [lr_factor(_cfg(max_steps=4, lr_schedule="linear"), s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert {lr_factor(_cfg(max_steps=5), s) for s in range(5)} == {1.0}
    for bad in ({"lr_schedule": "cosine"}, {"warmup_steps": 30}, {"warmup_steps": -1}):
        with pytest.raises(ConfigError, match="train.(lr_schedule|warmup_steps)"):
            typed(TrainConfig, {**dataclasses.asdict(_cfg()), **bad}, "train")


def test_fit_applies_the_schedule_to_the_task_optimizer(tmp_path):
    task, seen = Toy(), []
    fit(task, _cfg(max_steps=8, lr_schedule="linear", warmup_steps=2), seed=0, state_dir=tmp_path / "s",
        progress=False, on_step=lambda step: seen.append(task.opt.param_groups[0]["lr"]))
    assert seen == pytest.approx([1e-2 * f for f in (0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6)])


@pytest.mark.parametrize("sched", [{}, {"lr_schedule": "linear", "warmup_steps": 4}])
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, sched):
    def cfg(**kw):  # the toy run's settings plus the schedule under test
        return _cfg(**{**sched, **kw})

    full = Toy()
    r_full = fit(full, cfg(), seed=0, state_dir=tmp_path / "a", run_dir=tmp_path / "ra", progress=False)

    class Stop(Exception):
        pass

    def stop_at(step):
        if step == 13:  # 3 steps after the last checkpoint (10): those are redone
            raise Stop

    part = Toy()
    with pytest.raises(Stop):
        fit(part, cfg(), seed=0, state_dir=tmp_path / "b", progress=False, on_step=stop_at)
    again = Toy()
    with torch.no_grad():  # a different init: everything must come from the checkpoint
        for p in again.model.parameters():
            p.add_(1.0)
    r_res = fit(again, cfg(), seed=0, state_dir=tmp_path / "b", run_dir=tmp_path / "rb", progress=False)
    assert r_res.resumed_from == 10 and r_res.steps == r_full.steps == 30
    assert r_res.best_step == r_full.best_step and r_res.best == r_full.best
    for p, q in zip(full.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(p, q)
    assert (tmp_path / "ra" / "metrics.csv").read_text() == (tmp_path / "rb" / "metrics.csv").read_text()
    # a finished run resumed again does no more steps
    r3 = fit(Toy(), cfg(), seed=0, state_dir=tmp_path / "b", progress=False)
    assert r3.resumed_from == 30 and r3.best == r_full.best
    # resume off: starts over
    assert fit(Toy(), cfg(resume=False, max_steps=5), seed=0, state_dir=tmp_path / "b",
               progress=False).resumed_from == 0


def test_asr_run_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "wav", {"train": 8, "dev": 3, "test": 3}, seconds=(0.5, 0.8))
    use_corpus(monkeypatch, corpus)
    up = tiny_upstream()
    over = {"train.max_steps": 12, "train.batch_size": 4, "train.eval_every": 4, "train.save_every": 4,
            "train.log_every": 2, "task.project_dim": 32, "task.hidden_size": 32, "task.num_layers": 1}
    full = run_task(make_cfg(tmp_path / "a", **over), up, tmp_path / "run_a", "up", progress=False).to_dict()

    def stop_at(step):
        if step == 6:
            raise KeyboardInterrupt

    cfg_b = make_cfg(tmp_path / "b", **over)
    with pytest.raises(KeyboardInterrupt):
        run_task(cfg_b, up, tmp_path / "run_b1", "up", progress=False, on_step=stop_at)
    res = run_task(cfg_b, up, tmp_path / "run_b2", "up", progress=False).to_dict()
    assert res["resumed_from_step"] == 4 and res["feature_cache"] == "hit"
    drop = {"train_wall_s", "train_utts_per_s", "upstream_utts_per_s", "resumed_from_step", "feature_cache"}
    assert {k: v for k, v in res.items() if k not in drop} == {k: v for k, v in full.items() if k not in drop}
    a = torch.load(tmp_path / "run_a" / "downstream.pt")["model"]
    b = torch.load(tmp_path / "run_b2" / "downstream.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
