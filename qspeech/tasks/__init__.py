"""SUPERB downstream tasks. `run_task` dispatches on cfg.task.kind (only 'asr' so far).

A task is one module here that defines `TASK = Task(kind, config class, run function)` plus
conf/task/<name>.yaml (`defaults: [_schema_<kind>, _self_]`): this package finds every module with a TASK.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from qspeech.tasks.config import Task, TaskConfig
from qspeech.tasks.metrics import TaskMetrics

__all__ = ["TASKS", "Task", "TaskConfig", "TaskMetrics", "run_task", "task_schemas"]


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
    return TASKS[cfg.task.kind].run(cfg, upstream, Path(run_dir), upstream_key, progress=progress, on_step=on_step)
