"""A new task is one module and one YAML, even with a metric of its own: a throwaway task (is an utterance of
the mini corpus longer than a threshold? scored by F1, a metric no built-in task has) added as
qspeech/tasks/long.py and conf/task/long_small.yaml to a copy of the checkout, run by the real console script
on that copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

from conftest import ROOT, run_cli

MODULE = '''
"""Throwaway task: is an utterance longer than task.threshold_s? F1 of the 'long' class."""

from dataclasses import dataclass
from pathlib import Path

import qspeech.data
from qspeech.data.labeled import LabeledUtterance
from qspeech.tasks import Metric, Task
from qspeech.tasks.downstream import SPLITS, Splits
from qspeech.tasks.utterance import ClassificationTask, PooledDownstream, UtteranceConfig


@dataclass
class LongConfig(UtteranceConfig):
    name: str = "long"
    kind: str = "long"
    threshold_s: float = 1.5


class LongTask(ClassificationTask):
    def evaluate(self, split, device):
        scores = super().evaluate(split, device)
        pred, gold = self.last_predictions[split][:, 0] == 1, self.labels[split][:, 0] == 1
        tp, fp, fn = int((pred & gold).sum()), int((pred & ~gold).sum()), int((~pred & gold).sum())
        return scores | {"f1": 100.0 * 2 * tp / max(1, 2 * tp + fp + fn)}


class LongDownstream(PooledDownstream):
    trainable = LongTask

    def __init__(self, cfg):
        super().__init__(cfg, classes=[["short", "long"]])

    def load(self, progress):
        cache, t = Path(str(self.cfg.cache_dir)), self.cfg.task.threshold_s
        utts = {s: [LabeledUtterance(u.utt_id, u.path, "long" if u.duration_s > t else "short", u.speaker,
                                     u.duration_s) for u in qspeech.data.load_split(self.cfg.data, s, cache)]
                for s in SPLITS}
        return Splits(utts, {s: qspeech.data.config_fingerprint(self.cfg.data, s) for s in SPLITS})


TASK = Task("long", LongConfig, LongDownstream, (Metric("f1", higher_is_better=True, unit="%"),))
'''

YAML = '''
defaults: [_schema_long, _self_]
name: long_small
kind: long
threshold_s: 2.0
lr: 1.0e-2
'''

def test_a_new_task_with_a_new_metric_is_one_module_and_one_yaml(tmp_path):
    repo = tmp_path / "repo"
    for d in ("qspeech", "conf"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "qspeech" / "tasks" / "long.py").write_text(textwrap.dedent(MODULE))  # the two files a task needs
    (repo / "conf" / "task" / "long_small.yaml").write_text(YAML)
    proc = run_cli("run", "experiment=smoke", "train.num_threads=1", "task=long_small", cwd=tmp_path,
                   env={"PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = (tmp_path / "outputs").rglob("result.json")
    r = json.loads(path.read_text())
    m = r["metrics"]
    assert r["status"] == "ok" and r["task"] == "long_small" and r["metric"] == "f1" and 0 <= r["value"] <= 100
    assert m["higher_is_better"] is True and 0 <= m["dev_f1"] <= 100 and m["n_classes"] == [2]
    assert "dev_acc" not in m and m["steps"] == 6
    preds = (path.parent / "test_predictions.tsv").read_text().splitlines()
    assert preds[0] == "utt_id\tlabel\tpredicted" and len(preds) == 1 + m["n_test"]
    assert (path.parent / "downstream.pt").is_file()
    # the report learns the new metric's direction and unit from the task's declaration, and reads its scores back
    check = ("import json, sys; from qspeech.tasks.metrics import TaskMetrics, higher_is_better, metric_unit; "
             "d = json.load(open(sys.argv[1]))['metrics']; m = TaskMetrics.from_dict(d); "
             "print(higher_is_better('f1'), metric_unit('f1'), m.dev_value == d['dev_f1'], m.to_dict() == d)")
    out = subprocess.run([sys.executable, "-c", check, str(path)], cwd=tmp_path, env={"PYTHONPATH": str(repo)},
                         capture_output=True, text=True)
    assert out.stdout.split() == ["True", "%", "True", "True"], out.stderr[-2000:]
