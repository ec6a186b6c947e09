"""SUPERB downstream tasks. `run_task` dispatches on cfg.task.kind (only 'asr' so far)."""

from __future__ import annotations

from pathlib import Path

from qspeech.errors import ConfigError
from qspeech.train import validate_train_config

__all__ = ["run_task", "validate_task_config", "validate_train_config"]


def validate_task_config(task_cfg):
    kind = (task_cfg or {}).get("kind", "asr")
    if kind == "asr":
        from qspeech.tasks.asr import validate_task_config as v

        return v(task_cfg)
    raise ConfigError(f"task.kind={kind!r}: unknown task kind; available: asr")


def run_task(cfg, upstream, run_dir: Path, upstream_key: str, progress: bool = True, on_step=None) -> dict:
    """Train and evaluate cfg.task on the frozen `upstream`; returns JSON-able metrics (see tasks/asr.py)."""
    validate_task_config(cfg.task)
    from qspeech.tasks.asr import run_task as run_asr

    return run_asr(cfg, upstream, Path(run_dir), upstream_key, progress=progress, on_step=on_step)
