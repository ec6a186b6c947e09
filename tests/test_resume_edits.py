"""Resume that survives edits: runtime settings and schedule settings (eval_every, max_steps under a constant
learning rate) keep a head's resume key, so a rerun continues its training instead of restarting it."""

import json
from pathlib import Path

from conftest import run_cli

BASE = ["experiment=smoke", "train.num_threads=1", "cost.seconds=1", "train.lr_schedule=constant",
        "train.max_steps=4", "train.eval_every=2", "task.lr=0.02"]


def _result(root: Path, name_part: str = "") -> dict:
    [path] = [p for p in (root / "outputs").rglob("result.json") if name_part in str(p)]
    return json.loads(path.read_text())


def test_editing_the_schedule_continues_the_head_instead_of_restarting(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    # caches of their own, built alike: features another test built (other threads) may differ in the last bit
    env = {"QSPEECH_CACHE": str(tmp_path / "cache1")}
    assert run_cli("run", *BASE, cwd=a, env=env).returncode == 0
    # another eval cadence and a runtime knob: the same training, resumed at its end (nothing to redo)
    proc = run_cli("run", *BASE, "train.eval_every=4", "train.save_every=1", "train.log_every=1", cwd=b, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _result(b)["metrics"]["resumed_from_step"] == 4
    # more steps under a constant rate: the head goes on from step 4 ...
    proc = run_cli("run", *BASE, "train.max_steps=6", cwd=b, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    longer = [r for r in map(lambda p: json.loads(p.read_text()), (b / "outputs").rglob("result.json"))
              if r["config"]["train"]["max_steps"] == 6]
    assert longer[0]["metrics"]["resumed_from_step"] == 4 and longer[0]["metrics"]["steps"] == 6
    # ... to the numbers of a run that trained 6 steps from the start (in its own cache)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc = run_cli("run", *BASE, "train.max_steps=6", cwd=fresh, env={"QSPEECH_CACHE": str(tmp_path / "cache2")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = _result(fresh)
    assert want["metrics"]["resumed_from_step"] == 0
    for k in ("value", "dev_wer", "cer", "layer_weights", "best_step"):
        assert longer[0]["metrics"][k] == want["metrics"][k], k
