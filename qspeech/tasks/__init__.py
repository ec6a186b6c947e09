"""SUPERB downstream tasks. `run_task` dispatches on cfg.task.kind to the task module that declares it.

A task is one module here that defines `TASK = Task(kind, config class, downstream, metrics)` (its config,
its part of qspeech.tasks.downstream.run_downstream, the metrics it reports) plus conf/task/<name>.yaml
(`defaults: [_schema_<kind>, _self_]`): this package finds every module with a TASK.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from qspeech.tasks.config import Task, TaskConfig
from qspeech.tasks.downstream import run_downstream
from qspeech.tasks.metrics import Metric, TaskMetrics

__all__ = ["TASKS", "Metric", "Task", "TaskConfig", "TaskMetrics", "run_task", "task_schemas"]


def _discover() -> dict[str, Task]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        task = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TASK", None)
        if isinstance(task, Task):
            found[task.kind] = task
    return found


TASKS: dict[str, Task] = _discover()


def task_schemas() -> dict[str, type]:
    """kind -> config class, for the Hydra schema of each conf/task/<name>.yaml."""
    return {kind: task.config for kind, task in TASKS.items()}


def run_task(cfg, upstream, run_dir: Path, upstream_key: str, progress: bool = True,
             on_step=None) -> TaskMetrics:
    """Train and evaluate cfg.task on the frozen `upstream`; returns its TaskMetrics (see tasks/metrics.py).
    cfg: the typed run config (qspeech.config.RunConfig or anything with its task, train, data, seed and
    cache_dir)."""
    return run_downstream(cfg, upstream, Path(run_dir), upstream_key, TASKS[cfg.task.kind], progress=progress,
                          on_step=on_step)
