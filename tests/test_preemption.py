"""Preemption (qspeech.preemption) without SLURM: a stop signal to a running training saves its state at the next
step boundary and ends the run as preempted; the rerun resumes to the numbers of an uninterrupted run; inside a
submitit job the signal goes on to submitit, which requeues the job (or gives up after max_num_timeout)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import CFG, Toy, _free_port, _two_ranks
from test_loop import Regression, _cfg, _weights

from qspeech import distributed
from qspeech.errors import TrainingError
from qspeech.train import fit
from qspeech.loop import load_state, run
from qspeech.preemption import Preempted, stop, watch

EXE = Path(sys.executable).parent / "qspeech"
# 8 head steps at lr 0.02: the test CER and the predictions move with any change of the weights
ARGS = ["run", "experiment=smoke", "train.num_threads=1", "cost.seconds=1", "train.max_steps=8", "train.eval_every=4",
        "train.log_every=1", "task.lr=0.02"]


def _signal_at(step: int, signum: int):
    def on_step(s):
        if s == step:
            os.kill(os.getpid(), signum)
    return on_step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2], ids=lambda s: s.name)
def test_loop_saves_at_the_step_boundary_and_resumes_to_the_same_weights(tmp_path, signum):
    base = Regression()
    run(base, _cfg(tmp_path / "a"))
    before = signal.getsignal(signum)
    job = Regression()
    with pytest.raises(Preempted) as e:  # step 5: between the step-4 and step-8 checkpoints
        run(job, _cfg(tmp_path / "b", on_step=_signal_at(5, signum)))
    assert e.value.exit_code == 128 + signum and "at step 5/12 of toy" in str(e.value)
    assert load_state(tmp_path / "b" / "state.pt")["step"] == 5
    assert signal.getsignal(signum) is before  # restored after the loop
    resumed = Regression()
    res = run(resumed, _cfg(tmp_path / "b"))
    assert res.resumed_from == 5 and res.steps == 12
    assert all(torch.equal(a, b) for a, b in zip(_weights(base), _weights(resumed)))


def _signalled_rank(r: int, world: int, port: int, tmp: Path) -> None:
    """A rank of a two-rank fit of test_distributed's toy; rank 1 alone gets SIGUSR2 after step 12."""
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        fit(Toy(0.3), CFG, seed=0, state_dir=tmp / "state", run_dir=tmp / f"run{r}", progress=False,
            on_step=_signal_at(12, signal.SIGUSR2) if r == 1 else None)
    except Preempted as e:
        (tmp / f"preempted{distributed.rank()}.txt").write_text(str(e))


def test_two_ranks_stop_at_the_same_step_when_one_is_signalled(tmp_path):
    """Under torchrun the ranks agree on the stop (a rank alone would leave the others waiting in a collective):
    both stop after step 12, rank 0 writes the state, and the resumed run equals an uninterrupted one."""
    whole = _two_ranks(tmp_path / "whole", dropout=0.3)
    mp.start_processes(_signalled_rank, args=(2, _free_port(), tmp_path / "pre"), nprocs=2, start_method="fork")
    stops = [(tmp_path / "pre" / f"preempted{r}.txt").read_text() for r in range(2)]
    assert all(t.startswith("stopped by SIG") and "at step 12/30" in t for t in stops), stops
    assert torch.load(tmp_path / "pre" / "state" / "ranks2" / "last.pt", weights_only=True)["step"] == 12
    resumed = _two_ranks(tmp_path / "pre", dropout=0.3)
    assert resumed["resumed_from"] == 12 and resumed["history"] == whole["history"]
    assert all(torch.equal(v, whole["weights"][k]) for k, v in resumed["weights"].items())


def test_a_signal_the_loop_did_not_act_on_goes_to_the_previous_handler():
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        with watch() as w:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert w.requested and not got  # held while the loop runs
        assert got == [signal.SIGUSR1]  # the loop ended without stopping for it: delivered again
    finally:
        signal.signal(signal.SIGUSR1, previous)


class _Env:
    """submitit's SLURM job environment, without SLURM: requeues are recorded."""
    global_rank = 0

    def __init__(self):
        self.requeued = []

    def _requeue(self, countdown):
        self.requeued.append(countdown)


class _Launcher:
    def __call__(self):
        return None

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def _submitit_handler(tmp_path, countdown: int, timed_out: bool):
    submitit = pytest.importorskip("submitit")
    from submitit.core.job_environment import SignalHandler

    delayed = submitit.helpers.DelayedSubmission(_Launcher())
    delayed.set_timeout(10, countdown)
    handler = SignalHandler(_Env(), submitit.core.utils.JobPaths(tmp_path, job_id="7"), delayed)
    handler.has_timed_out = lambda: timed_out
    return handler


def test_inside_submitit_the_signal_requeues_the_job(tmp_path):
    handler = _submitit_handler(tmp_path, countdown=3, timed_out=True)
    with pytest.raises(SystemExit) as e:
        stop(Preempted(signal.SIGUSR2, "stopped by SIGUSR2", handler.checkpoint_and_try_requeue))
    assert e.value.code == -1 and handler.env.requeued == [2]  # one timeout used up
    assert (tmp_path / "7_submitted.pkl").exists()  # what the requeued job runs: the same launcher call


def test_a_job_that_timed_out_too_often_fails_instead_of_requeueing(tmp_path):
    handler = _submitit_handler(tmp_path, countdown=0, timed_out=True)
    err = stop(Preempted(signal.SIGUSR2, "stopped by SIGUSR2", handler.checkpoint_and_try_requeue))
    assert isinstance(err, TrainingError) and "timed-out too many times" in str(err) and not handler.env.requeued


def test_outside_submitit_the_process_exits_as_if_killed_by_the_signal():
    with pytest.raises(SystemExit) as e:
        stop(Preempted(signal.SIGTERM, "stopped by SIGTERM", signal.SIG_DFL))
    assert e.value.code == 128 + signal.SIGTERM


def _cli(cwd: Path, ckpt: Path, *extra) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(EXE), *ARGS, f"train.ckpt_dir={ckpt}", *extra], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _result(cwd: Path, name: str = "result.json") -> tuple[Path, dict]:
    [path] = (cwd / "outputs" / "run").glob(f"*/{name}")
    return path.parent, json.loads(path.read_text())


def _comparable(run_dir: Path) -> dict:
    res = json.loads((run_dir / "result.json").read_text())
    metrics = {k: v for k, v in res["metrics"].items()
               if k not in ("train_wall_s", "upstream_utts_per_s", "train_utts_per_s", "feature_cache",
                            "resumed_from_step")}
    files = {n: (run_dir / n).read_bytes() for n in ("test_predictions.tsv", "metrics.csv", "cost.json")}
    head = torch.load(run_dir / "downstream.pt", map_location="cpu", weights_only=True)["model"]
    return {"status": res["status"], "metrics": metrics, "files": files, "head": {k: v.tolist() for k, v in head.items()}}


def test_sigterm_to_a_running_head_training_saves_exits_and_resumes_to_identical_numbers(tmp_path):
    """The real CLI: SIGTERM once the head has logged step 2; the run ends at a step boundary as preempted
    (exit 143, one line, result.json says so, the state is saved); the same command then resumes from it and
    ends with the numbers of an uninterrupted run."""
    proc = _cli(tmp_path / "base", tmp_path / "ckpt_base")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]

    proc = _cli(tmp_path / "pre", tmp_path / "ckpt_pre")
    lines, t0 = [], time.time()
    for line in proc.stdout:  # progress lines: one per step (train.log_every=1)
        lines.append(line)
        if line.startswith("asr asr_small: step 2/8"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() - t0 < 600
    out = "".join(lines) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split("/")[0])
    assert 2 <= stopped < 8
    assert f"qspeech: stopped by SIGTERM at step {stopped}/8 of asr asr_small (state saved in " in out
    assert "Traceback" not in out
    run_dir, res = _result(tmp_path / "pre")
    assert res["status"] == "preempted" and res["error"].startswith(f"stopped by SIGTERM at step {stopped}/8")
    assert torch.load(tmp_path / "ckpt_pre" / "last.pt", weights_only=True)["step"] == stopped

    proc = _cli(tmp_path / "pre", tmp_path / "ckpt_pre")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert _result(tmp_path / "pre")[1]["metrics"]["resumed_from_step"] == stopped
    assert _comparable(run_dir) == _comparable(_result(tmp_path / "base")[0])
    assert _result(tmp_path / "base")[1]["metrics"]["cer"] < 100  # numbers that move with the weights
