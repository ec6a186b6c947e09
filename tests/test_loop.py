"""qspeech.loop, the one training loop: its protocol, schedule, guards and resumable state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qspeech.errors import TrainingError
from qspeech.loop import STATE_VERSION, Job, LoopConfig, Step, linear_warmup_decay, load_state, run


class Regression(Job):
    """Batches drawn from the step index; dropout makes the numbers depend on the RNG state; every `skip`-th
    call has no usable batch."""

    def __init__(self, skip: int = 0, nan_at: int | None = None, init: float = 0.0):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(init)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.skip, self.nan_at, self.calls, self.logs, self.evals = skip, nan_at, 0, [], []

    def step(self, index):
        self.calls += 1
        if self.skip and self.calls % self.skip == 0:
            return None
        x = torch.randn(4 + index % 3, 3, generator=torch.Generator().manual_seed(index))
        loss = ((self.model(x) - x.sum(-1, keepdim=True)) ** 2).mean()
        if index == self.nan_at:
            loss = loss * float("nan")
        return Step(loss, {"index": float(index)}, items=len(x))

    def log(self, step, averages, lr, wall_s):
        self.logs.append((step, averages, lr))

    def evaluate(self, step):
        assert not self.model.training and not torch.is_grad_enabled()
        torch.rand(7)  # evaluation's randomness must not reach the training
        self.evals.append(step)

    def state(self):
        return {"calls": self.calls}

    def load(self, state):
        self.calls = state["calls"]


def _cfg(tmp_path, **kw):
    return LoopConfig(**{"total": 12, "desc": "toy", "log_every": 4, "ckpt_every": 4, "eval_every": 3, "seed": 1,
                         "progress": False, "state_path": tmp_path / "state.pt", **kw})


def _weights(job):
    return [p.detach().clone() for p in job.model.state_dict().values()]


def test_schedule_warms_up_then_decays_or_stays():
    assert [linear_warmup_decay(2.0, s, 6, 2) for s in range(6)] == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0, 0.5])
    assert [linear_warmup_decay(2.0, s, 6, 2, decay=False) for s in range(6)] == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert [linear_warmup_decay(1.0, s, 4, 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_skipped_batches_weighted_logs_and_the_schedule(tmp_path):
    job = Regression(skip=3)
    res = run(job, _cfg(tmp_path, total=6, log_every=2, schedule=lambda lr, step: lr * (step + 1)))
    assert res.steps == 6 and job.calls == 8  # calls 3 and 6 had no batch: not steps
    assert res.items == sum(4 + i % 3 for i in range(6))
    assert [s for s, _, _ in job.logs] == [2, 4, 6]
    # averages weight each step by its items; lr is the last update's
    assert job.logs[0][1]["index"] == pytest.approx((0 * 4 + 1 * 5) / 9)
    assert [lr for _, _, lr in job.logs] == pytest.approx([0.05 * 2, 0.05 * 4, 0.05 * 6])
    assert job.evals == [3, 6]


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    full = Regression()
    r_full = run(full, _cfg(tmp_path / "a", grad_clip=1.0))
    part = Regression()
    run(part, _cfg(tmp_path / "b", grad_clip=1.0, stop_after=7))  # state at 4; steps 5-7 are redone
    again = Regression(init=1.0)  # another init: everything must come from the state
    r = run(again, _cfg(tmp_path / "b", grad_clip=1.0))
    assert r.resumed_from == 4 and r.steps == r_full.steps == 12
    assert all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(again)))
    assert again.evals == [6, 9, 12] and again.calls == full.calls
    # evaluation does not change what the training sees (its RNG is forked)
    no_eval = Regression()
    run(no_eval, _cfg(tmp_path / "c", grad_clip=1.0, eval_every=None))
    assert all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(no_eval)))
    # a finished run does nothing more; resume off starts over
    assert run(Regression(), _cfg(tmp_path / "b")).resumed_from == 12
    assert run(Regression(), _cfg(tmp_path / "b", resume=False, total=2)).resumed_from == 0


def test_state_format_and_unusable_states(tmp_path):
    run(Regression(), _cfg(tmp_path, total=4))
    path = tmp_path / "state.pt"
    state = load_state(path)
    assert state["version"] == STATE_VERSION and state["step"] == 4 and state["calls"] == 4
    assert {"model", "optimizer", "rng", "wall_s", "step_s", "items"} <= set(state)
    legacy = {k: v for k, v in state.items() if k != "version"}  # pretraining's state.pt before the format
    torch.save(legacy, tmp_path / "legacy.pt")
    assert load_state(tmp_path / "legacy.pt")["step"] == 4
    torch.save({**state, "version": STATE_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(TrainingError, match="another version"):
        load_state(tmp_path / "newer.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot read"):
        run(Regression(), _cfg(tmp_path, state_path=tmp_path / "bad.pt"))

    class Other(Regression):  # a state of another run (e.g. another QAT stage) is not resumed
        def accepts(self, state):
            return False

    assert run(Other(), _cfg(tmp_path, total=4)).resumed_from == 0


def test_divergence_names_the_step_and_the_fix(tmp_path):
    with pytest.raises(TrainingError, match=r"toy: the loss is nan at step 3: training diverged; lower lr"):
        run(Regression(nan_at=2), _cfg(tmp_path / "a", hint="lower lr"))

    class BadGrad(Regression):
        def step(self, index):  # finite loss, NaN gradient (d sqrt(0 * w) / dw = 0 * inf)
            return Step(torch.sqrt(self.model[0].weight * 0).sum())

    with pytest.raises(TrainingError, match="gradient norm is nan at step 1"):
        run(BadGrad(), _cfg(tmp_path / "b", grad_clip=1.0))
    assert not (tmp_path / "b" / "state.pt").exists()
