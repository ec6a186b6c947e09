"""The real CLI end to end on the smoke recipe: run, sweep, report, kill + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli

SMOKE = ["experiment=smoke", "train.num_threads=1"]


def _results(root: Path):
    return [json.loads(p.read_text()) for p in sorted((root / "outputs").rglob("result.json"))]


def test_run_then_sweep_then_report(tmp_path):
    proc = run_cli("run", *SMOKE, "export=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [res] = _results(tmp_path)
    assert res["status"] == "ok" and res["metric"] == "wer" and 0 <= res["value"]
    assert res["params"] == 5_298_752 and res["est_runtime"] == 1.0
    assert res["config"]["model"]["name"] == "tiny_hubert" and res["timings"]["wall_s"] > 0
    assert len(res["metrics"]["layer_weights"]) == 7
    # result.json's layout (RunResult.to_dict): the same keys as when the runner assembled a dict
    assert list(res) == ["model", "init", "quant", "targets", "bits", "task", "data", "status", "git_commit", "started",
                         "config", "params", "quantized_params", "macs", "storage_mb", "est_runtime", "metric", "value",
                         "metrics", "packed_path", "packed_mb", "finished", "timings"]
    assert list(res["timings"]) == ["load_s", "quantize_s", "task_s", "wall_s"]

    proc = run_cli("run", "-m", *SMOKE, "export=true", "bits=2,32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = _results(tmp_path)
    # bits=32 is the same experiment as the first run (same folder, one row); bits=2 is new
    assert sorted(r["bits"] for r in results) == [2, 32]
    two = next(r for r in results if r["bits"] == 2)
    assert two["quantized_params"] == 4_718_592 and two["est_runtime"] < 1.0 and two["storage_mb"] < res["storage_mb"]
    # the packed file is the accounted size up to headers and metadata
    assert abs(two["packed_mb"] - two["storage_mb"]) / two["storage_mb"] < 0.03
    # `qspeech cost` describes exactly the model the run evaluated
    proc = run_cli("cost", *SMOKE, "bits=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [cost_file] = (tmp_path / "outputs" / "cost").rglob("cost.json")
    cost = json.loads(cost_file.read_text())
    assert round(cost["storage_mb"], 4) == two["storage_mb"] and round(cost["est_runtime"], 4) == two["est_runtime"]

    proc = run_cli("report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "outputs" / "results.csv")
    ours = table[table.source == "qspeech"]
    assert sorted(ours.bits) == [2, 32] and set(ours.status) == {"ok"}
    assert (tmp_path / "outputs" / "report.md").read_text().count("tiny_hubert") >= 2


def test_sweep_failure_does_not_stop_other_jobs(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    proc = run_cli("run", "-m", *SMOKE, f"model.ckpt={bad},null", "model.init=pretrained,random", cwd=tmp_path)
    # (bad ckpt, pretrained) fails; jobs with init=random ignore the file and run
    assert proc.returncode == 2, proc.stderr[-2000:]
    statuses = sorted(r["status"] for r in _results(tmp_path))
    assert "failed" in statuses and "ok" in statuses
    assert "Traceback" not in proc.stderr


def test_killed_run_resumes_to_one_result(tmp_path):
    env = {**os.environ, "QSPEECH_CACHE": str(tmp_path / "cache")}
    args = [*SMOKE, "train.max_steps=12", "train.eval_every=3"]
    exe = Path(sys.executable).parent / "qspeech"
    proc = subprocess.Popen([str(exe), "run", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    ckpts = []
    while time.time() < deadline and proc.poll() is None:
        # the resumable state (best.pt is written just before it, at the same step)
        ckpts = list((tmp_path / "cache" / "runs").rglob("last.pt")) if (tmp_path / "cache" / "runs").exists() else []
        if ckpts:
            break
        time.sleep(0.5)
    assert ckpts and proc.poll() is None, "no training checkpoint appeared before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    restarted = run_cli("run", *args, cwd=tmp_path, env=env)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    results = _results(tmp_path)
    assert len(results) == 1 and results[0]["status"] == "ok"
    assert results[0]["metrics"]["resumed_from_step"] >= 3


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "real-speech").is_dir(),
                    reason="../shared/data/real-speech not present")
def test_real_speech_evaluates_through_manifest(tmp_path):
    """Real human recordings (16 kHz WAV, mixed-case text with punctuation) through data=manifest."""
    manifest = Path(__file__).resolve().parents[2] / "shared/data/real-speech/pocketsphinx-librivox-cards/manifest.tsv"
    proc = run_cli("run", *SMOKE, "data=manifest", f"data.manifest={manifest}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [res] = _results(tmp_path)
    assert res["status"] == "ok" and res["data"] == "manifest"
    assert res["metrics"]["n_test"] == 10 and res["value"] >= 0


def test_failed_rerun_keeps_the_earlier_result(tmp_path):
    from qspeech.results import write_json_atomic
    from qspeech.runner import _result_path

    write_json_atomic(tmp_path / "result.json", {"status": "ok", "value": 1.0})
    assert _result_path(tmp_path, "failed").name == "result.last_failure.json"
    assert _result_path(tmp_path, "ok").name == "result.json"
    assert _result_path(tmp_path / "new", "failed").name == "result.json"


def test_eval_data_scores_the_trained_head_on_a_second_test_set(tmp_path):
    """eval_data=<data config>: after training, the head is also scored on that data set's test split
    (here a manifest of three 16 kHz and 8 kHz clips written by the test), with its own predictions file."""
    import numpy as np
    import soundfile as sf

    rows = ["utt_id\taudio\ttext"]
    for i, (sr, text) in enumerate([(16000, "Hello there."), (8000, "one, two"), (16000, "Yes!")]):
        t = np.arange(int(1.2 * sr)) / sr
        sf.write(tmp_path / f"c{i}.wav", (0.1 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype("float32"), sr)
        rows.append(f"c{i}\tc{i}.wav\t{text}")
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    plain = run_cli("run", *SMOKE, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    [first] = _results(tmp_path)
    proc = run_cli("run", *SMOKE, "eval_data=real_speech", f"eval_data.splits.test={tmp_path / 'm.tsv'}",
                   "eval_data.splits.dev=null", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [res] = [r for r in _results(tmp_path) if "eval" in r["metrics"]]
    # the second test set changes nothing about the head: the first run's trained head is reused as is
    assert res["metrics"]["resumed_from_step"] == res["metrics"]["steps"] and res["value"] == first["value"]
    ev = res["metrics"]["eval"]
    assert ev["data"] == "real_speech" and ev["split"] == "test" and ev["n"] == 3
    assert 0 <= ev["cer"] and 0 <= ev["wer"]
    [pred] = list((tmp_path / "outputs").rglob("eval_real_speech_predictions.tsv"))
    lines = pred.read_text().splitlines()
    assert lines[0] == "utt_id\tref\thyp"
    assert sorted(x.split("\t")[1] for x in lines[1:]) == ["HELLO THERE", "ONE TWO", "YES"]
