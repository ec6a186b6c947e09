"""Typed records (result.json, task metrics, cost.json): one serializer, round trips, files of the previous
version read back unchanged, bad files rejected with a reason."""

import copy
import json

import pytest

from qspeech.atomic import write_json_atomic
from qspeech.cost import CostReport, ModuleCost
from qspeech.results import RunResult, load_results
from qspeech.tasks.metrics import TaskMetrics

# What the previous version's runner wrote (dicts assembled by `update`), key for key, in its order.
METRICS_V0 = {
    "metric": "wer", "value": 87.5, "dev_wer": 90.25, "cer": 61.0, "dev_cer": 63.5, "steps": 40, "best_step": 30,
    "train_wall_s": 12.345, "upstream_utts_per_s": None, "train_utts_per_s": 15.2,
    "layer_weights": [0.142857, 0.142857, 0.142857, 0.142857, 0.142857, 0.142857, 0.142858],
    "n_train": 24, "n_dev": 8, "n_test": 8, "skipped_audio": 0, "feature_cache": "hit", "resumed_from_step": 0,
    "device": "cpu", "head_params": 123456,
}
OK_V0 = {
    "model": "tiny_hubert", "init": "pretrained", "quant": "rtn", "targets": ["linear"], "bits": 2,
    "task": "asr_small", "data": "mini", "status": "ok", "git_commit": "f187a92abcde-dirty",
    "started": "2026-01-01T00:00:00+00:00", "config": {"bits": 2, "seed": 0, "model": {"name": "tiny_hubert"}},
    "params": 5298752, "quantized_params": 4718592, "macs": 1234567890, "storage_mb": 2.4567, "est_runtime": 0.4321,
    "metric": "wer", "value": 87.5, "metrics": METRICS_V0,
    "packed_path": "outputs/x/upstream.packed.safetensors", "packed_mb": 2.5012,
    "finished": "2026-01-01T00:05:00+00:00", "timings": {"load_s": 0.5, "quantize_s": 1.25, "task_s": 30.0, "wall_s": 32.0},
}
# A run that failed while loading the upstream, outside a git checkout: no accounting, metrics or export keys.
FAILED_V0 = {
    "model": "tiny_hubert", "init": "pretrained", "quant": "rtn", "targets": ["linear", "cnn"], "bits": 1,
    "task": "asr_small", "data": "mini", "status": "failed", "git_commit": None,
    "started": "2026-01-01T00:00:00+00:00", "config": {"bits": 1}, "error": "DataError: the train split is empty",
    "finished": "2026-01-01T00:00:01+00:00", "timings": {"wall_s": 0.8},
}


@pytest.mark.parametrize("v0", [OK_V0, FAILED_V0], ids=["ok", "failed"])
def test_previous_result_files_read_back_unchanged(tmp_path, v0):
    r = RunResult.from_dict(copy.deepcopy(v0))
    assert isinstance(r.config, dict) and r.run_dir is None
    assert r.to_dict() == v0 and list(r.to_dict()) == list(v0)  # same keys, values and order
    a, b = write_json_atomic(tmp_path / "a.json", v0), write_json_atomic(tmp_path / "b.json", r.to_dict())
    assert a.read_bytes() == b.read_bytes()
    assert RunResult.from_dict(r.to_dict()) == r


def test_nested_metrics_are_typed():
    r = RunResult.from_dict(OK_V0)
    assert isinstance(r.metrics, TaskMetrics) and r.metrics.dev_value == 90.25 and r.metrics.layer_weights[0] == 0.142857
    assert RunResult.from_dict(FAILED_V0).metrics is None


def test_assembly_by_the_runner_gives_the_previous_layout(tmp_path):
    """RunResult's methods replace the runner's `update` calls: same keys, values and order as before."""
    packed = tmp_path / "upstream.packed.safetensors"
    packed.write_bytes(b"x" * 2_501_200)
    r = RunResult(**{k: copy.deepcopy(OK_V0[k]) for k in ("model", "init", "quant", "targets", "bits", "task", "data",
                                                            "git_commit", "started", "config")}, status="running")
    r.add_cost(CostReport(params=5298752, quantized_params=4718592, macs=1234567890, storage_mb=2.456749,
                          est_runtime=0.43214, seconds=10.0, rows=[]))
    r.add_metrics(TaskMetrics.from_dict(METRICS_V0))
    r.add_packed(packed)
    r.status = "ok"
    r.finish("2026-01-01T00:05:00+00:00", {"load_s": 0.50001, "quantize_s": 1.2499, "task_s": 30.0, "wall_s": 32.0})
    assert r.to_dict() == OK_V0 | {"packed_path": str(packed)} and list(r.to_dict()) == list(OK_V0)

    f = RunResult(**{k: FAILED_V0[k] for k in ("model", "init", "quant", "targets", "bits", "task", "data",
                                                 "git_commit", "started", "config")}, status="running")
    f.fail(FAILED_V0["error"])
    f.finish(FAILED_V0["finished"], {"wall_s": 0.8})
    assert f.to_dict() == FAILED_V0 and list(f.to_dict()) == list(FAILED_V0)


def test_records_round_trip():
    m = TaskMetrics(metric="acc", value=91.5, steps=3)  # a task without ASR's scores writes no such keys
    assert "dev_wer" not in m.to_dict() and m.to_dict()["upstream_utts_per_s"] is None
    assert TaskMetrics.from_dict(m.to_dict()) == m and m.dev_value is None
    rows = [ModuleCost("encoder.layers.0.fc1", "linear", 100, 2000, 2, 10, 360),
            ModuleCost("encoder.layer_norm", "norm", 8, 0, 32, 0, 128)]
    c = CostReport(params=108, quantized_params=100, macs=2000, storage_mb=6.1e-5, est_runtime=0.0625, seconds=1.0,
                   rows=rows)
    d = c.to_dict()
    # cost.json's layout: totals, then the rows under "modules", each with the derived `quantized`
    assert list(d) == ["params", "quantized_params", "macs", "storage_mb", "est_runtime", "seconds", "modules"]
    assert [x["quantized"] for x in d["modules"]] == [True, False]
    assert [x["stored_bits"] for x in d["modules"]] == [2, 16]  # what storage counts (bits=32: not quantized)
    assert CostReport.from_dict(json.loads(json.dumps(d))) == c


def test_older_files_without_optional_fields_load_with_defaults():
    """A file of an older version (before git_commit/config/timings, metrics without device/head_params)."""
    old = {"model": "tiny_hubert", "bits": 4, "task": "asr_small", "status": "ok", "metric": "wer", "value": 30.0,
           "metrics": {"metric": "wer", "value": 30.0, "dev_wer": 31.0, "steps": 10}, "unknown_key": 1}
    r = RunResult.from_dict(old)
    assert r.init == "pretrained" and r.config == {} and r.timings == {} and r.git_commit is None
    assert r.metrics.head_params is None and r.metrics.dev_value == 31.0
    assert "unknown_key" not in r.to_dict()


@pytest.mark.parametrize("bad, why", [
    ({"bits": "abc"}, "RunResult.bits='abc': expected int"),
    ({"bits": True}, "RunResult.bits=True: expected int"),
    ({"targets": "linear"}, "RunResult.targets='linear': expected list"),
    ({"metrics": [1, 2]}, "TaskMetrics: expected a JSON object"),
    ({"metrics": {"metric": "wer"}}, "TaskMetrics: missing value"),
    ({"storage_mb": "big"}, "RunResult.storage_mb='big': expected float"),
])
def test_bad_fields_are_rejected_with_the_key(bad, why):
    with pytest.raises(ValueError) as e:
        RunResult.from_dict(OK_V0 | bad)
    assert why in str(e.value)


def test_load_results_sets_run_dir_and_lists_bad_files(tmp_path):
    write_json_atomic(tmp_path / "good" / "result.json", OK_V0)
    write_json_atomic(tmp_path / "bad" / "result.json", OK_V0 | {"bits": "abc"})
    write_json_atomic(tmp_path / "list" / "result.json", [1])
    results, problems = load_results(tmp_path)
    assert [r.run_dir for r in results] == [str(tmp_path / "good")]
    assert len(problems) == 2 and any("bits='abc'" in p for p in problems)
    assert "run_dir" not in results[0].to_dict()  # the reader's, never written
