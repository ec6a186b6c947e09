"""logger=csv | tensorboard | mlflow | wandb: a real smoke run through the CLI, then its train loss, learning rate, dev
metric and final metrics read back with each tool's own reader and checked against the run's own records."""

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import run_cli

SMOKE = ["experiment=smoke", "train.num_threads=1"]


def _csv(run_dir: Path) -> dict:
    series = defaultdict(list)
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            series[row["key"]].append((int(row["step"]), float(row["value"])))
    return series


def _tensorboard(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(run_dir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("qspeech").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "tiny_hubert"
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics}


def _wandb_records(path: Path):
    """The records of a W&B run file (run-<id>.wandb): a 7-byte header (":W&B", magic, version), then LevelDB's
    log format (32 KiB blocks of chunks: crc32c, length, type full/first/middle/last), each record a protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, parts = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def _wandb_run(run_dir: Path):
    [path] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return next(r.run for r in _wandb_records(path) if r.WhichOneof("record_type") == "run")


def _wandb(run_dir: Path) -> dict:
    [path] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    series, runs, exits, config = defaultdict(list), [], [], {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            runs += [r.run] if kind == "run" else []
            updates = r.run.config.update if kind == "run" else r.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "exit":
            exits.append(r.exit.exit_code)
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for key, value in row.items():
                stage = key.split("/", 1)[0]
                if not key.startswith("_") and key != f"{stage}/step":
                    series[key].append((row[f"{stage}/step"], value))
    [run] = runs
    assert run.project == "qspeech" and run.display_name == run_dir.name and exits == [0]
    assert config["model.name"] == "tiny_hubert"
    return series


def _same(series, expected, rel=1e-5) -> bool:
    """Same steps, values equal up to float32 (TensorBoard stores float32)."""
    return [s for s, _ in series] == [s for s, _ in expected] and \
        [v for _, v in series] == pytest.approx([v for _, v in expected], rel=rel)


READERS = {"csv": (_csv, None), "tensorboard": (_tensorboard, "tensorboard"), "mlflow": (_mlflow, "mlflow"),
           "wandb": (_wandb, "wandb")}


@pytest.mark.parametrize("logger", sorted(READERS))
def test_logger_records_curves_and_final_metrics(tmp_path, monkeypatch, logger):
    read, package = READERS[logger]
    if package:
        pytest.importorskip(package)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the reader's client, like the run's
    proc = run_cli("run", *SMOKE, f"logger={logger}", f"train.ckpt_dir={tmp_path / 'state'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [result_file] = (tmp_path / "outputs").rglob("result.json")
    run_dir, result = result_file.parent, json.loads(result_file.read_text())
    got = read(run_dir)

    # train loss and dev WER: the values of the task's own history (metrics.csv), at the same steps
    with open(run_dir / "metrics.csv", newline="") as f:
        history = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["value"])) for r in history if r["split"] == "train"]
    dev = [(int(r["step"]), float(r["value"])) for r in history if r["split"] == "dev" and r["metric"] == "wer"]
    assert [s for s, _ in train] == [2, 4, 6] and [s for s, _ in dev] == [3, 6]
    assert _same(got["asr/train_loss"], train) and _same(got["asr/dev_wer"], dev)
    # the learning rate of each logged step's update: linear decay from task.lr over 6 steps
    lr = result["config"]["task"]["lr"]
    assert _same(got["asr/lr"], [(s, lr * (6 - (s - 1)) / 6) for s in (2, 4, 6)])
    # the final metrics are result.json's
    assert _same(got["final/test_wer"], [(6, result["value"])])
    assert _same(got["final/dev_wer"], [(6, result["metrics"]["dev_wer"])])
    assert _same(got["final/storage_mb"], [(6, result["storage_mb"])])
    # progress and result lines are in the run's log file
    text = (run_dir / "qspeech.log").read_text()
    assert "asr asr_small: step 6/6 dev wer=" in text and "[qspeech] tiny_hubert" in text


def test_a_missing_logger_package_names_the_install_command(monkeypatch):
    import importlib.util

    from qspeech.errors import ConfigError
    from qspeech.loggers import LoggerConfig, check_available

    check_available(LoggerConfig(name="csv"))  # needs nothing
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger=mlflow needs the mlflow package.*pip install 'qspeech\[mlflow\]'"):
        check_available(LoggerConfig(name="mlflow"))


def test_wandb_runs_of_one_sweep_share_a_group(tmp_path):
    pytest.importorskip("wandb")
    proc = run_cli("run", "-m", *SMOKE, "bits=2,32", "logger=wandb", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [_wandb_run(d.parent) for d in (tmp_path / "outputs" / "run").glob("*/result.json")]
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 2
    assert runs[0].run_group == runs[1].run_group and runs[0].run_group.startswith("run-")
