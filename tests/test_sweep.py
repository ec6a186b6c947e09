"""Hydra sweepers on `qspeech run`: the job returns optimized_metric (a dev score, never the test score), the
pre-check expands what it can of a sweeper's search space, and a real Optuna sweep optimises it."""

import json
from types import SimpleNamespace

import pytest
import yaml

from conftest import run_cli

SMOKE = ["experiment=smoke", "train.num_threads=1"]


def _result(metric="wer", test=50.0, dev=40.0):
    from qspeech.tasks.metrics import TaskMetrics

    return SimpleNamespace(task="asr", storage_mb=2.5, est_runtime=0.5,
                           metrics=TaskMetrics(metric=metric, value=test, dev_wer=dev, dev_cer=12.0))


@pytest.mark.parametrize("name,expected", [("dev", 40.0), ("dev_cer", 12.0), ("storage_mb", 2.5),
                                           (["dev", "storage_mb"], [40.0, 2.5])])
def test_objective_is_the_dev_score_or_accounting(name, expected):
    from qspeech.runner import objective

    assert objective(SimpleNamespace(optimized_metric=name), _result()) == expected


def test_objective_refuses_a_dev_score_the_task_lacks():
    from qspeech.runner import objective
    from qspeech.errors import ConfigError

    with pytest.raises(ConfigError, match="dev_acc"):
        objective(SimpleNamespace(optimized_metric="dev_acc"), _result())


def test_optuna_sweep_optimises_the_dev_score(tmp_path):
    """The issue's command, as written: sweeper-only syntax passes the pre-check, every trial completes."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli("run", "-m", *SMOKE, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "bits=choice(2,4)",
                   "task.lr=interval(0.0005,0.005)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("result.json")]
    assert len(results) == 3 and {r["status"] for r in results} == {"ok"}
    assert {r["bits"] for r in results} <= {2, 4}
    assert all(0.0005 <= r["config"]["task"]["lr"] <= 0.005 for r in results)
    [best_file] = (tmp_path / "outputs").rglob("optimization_results.yaml")
    best = yaml.safe_load(best_file.read_text())
    assert best["best_value"] == min(r["metrics"]["dev_wer"] for r in results)
    assert "Failed experiment" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["hparams_search=optuna", 'hydra.sweeper.params={bits: "choice(2,5)"}'], "bits=5 is not supported"),
    (["-m", "hydra/sweeper=optuna", "task.lr=tag(log, interval(0, 0.01))"], "task.lr=0.0: must be a number > 0"),
    (["-m", "hydra/sweeper=optuna", "bits=interval(1,4)"], "bits=1.0: must be an integer"),
    (["hparams_search=optuna", "optimized_metric=wer"], "never a test score"),
])
def test_precheck_expands_the_search_space(tmp_path, args, needle):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli("run", *SMOKE, *args, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "outputs").exists()
