"""Experiment loggers: where a run's training curves and final metrics go, besides result.json and the
task's metrics.csv. The `logger` config group picks one: csv (default), tensorboard, mlflow or wandb.

The CLI opens one for each `qspeech run` (`session`) and makes it the active logger; every training loop
of that run (qspeech.loop: the downstream head, QAT distillation) sends its train loss, learning rate and
dev metrics to it, and the CLI adds the final metrics. Stages between the CLI and the loop pass nothing
along: the active logger is the one seam.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qspeech.checks import choice
from qspeech.errors import ConfigError

# name -> (module in this package, the package it needs, the pip command that installs it)
KINDS = {
    "csv": ("csv_logger", None, None),
    "tensorboard": ("tensorboard_logger", "tensorboard", "pip install 'qspeech[tensorboard]'"),
    "mlflow": ("mlflow_logger", "mlflow", "pip install 'qspeech[mlflow]'"),
    "wandb": ("wandb_logger", "wandb", "pip install 'qspeech[wandb]'"),
}
# The sweep a job belongs to (set by `qspeech run -m`, inherited by launcher workers and SLURM jobs): W&B's group
SWEEP_ENV = "QSPEECH_SWEEP"

__all__ = ["KINDS", "SWEEP_ENV", "LoggerConfig", "MetricLogger", "active", "check_available", "flatten", "mark_sweep",
           "open_logger", "session"]


@dataclass
class LoggerConfig:
    """The `logger` group; the defaults are conf/logger/csv.yaml (the default option)."""

    name: str = "csv"  # csv | tensorboard | mlflow | wandb
    # mlflow: where runs are tracked; null: a file store in <run folder>/mlruns (sqlite:///..., http://...);
    # wandb: the W&B server; null: W&B's default (WANDB_BASE_URL)
    tracking_uri: str | None = None
    experiment: str = "qspeech"  # mlflow's experiment name, W&B's project

    def __post_init__(self):
        choice(self, "name", tuple(KINDS))


class MetricLogger:
    """What a logger implements. Keys are `<stage>/<name>` (asr/train_loss, asr/lr, asr/dev_wer,
    final/test_wer); `step` is the stage's training step."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's flattened config, once at the start."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, status: str = "ok") -> None:
        """Flush and release; status: ok | failed."""


def check_available(cfg: LoggerConfig) -> None:
    """ConfigError naming the install command when the selected logger's package is missing (checked before
    a sweep starts, not when its first job opens the logger)."""
    _, package, install = KINDS[cfg.name]
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"logger={cfg.name} needs the {package} package, which is not installed: {install}")


def mark_sweep(command: str) -> None:
    """Name the sweep this process starts, for its jobs (SWEEP_ENV), unless a parent process already did."""
    os.environ.setdefault(SWEEP_ENV, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def open_logger(cfg: LoggerConfig, run_dir: Path, run_name: str) -> MetricLogger:
    check_available(cfg)
    module = importlib.import_module(f"{__name__}.{KINDS[cfg.name][0]}")
    return module.make(cfg, Path(run_dir), run_name)


_ACTIVE: list[MetricLogger] = []


def active() -> MetricLogger | None:
    """The logger of the running experiment, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def session(cfg: LoggerConfig, run_dir: Path, run_name: str, params: Mapping[str, Any]) -> Iterator[MetricLogger]:
    """Open the logger, record `params`, make it the active logger inside the block; closed with status
    failed when the block raises."""
    logger = open_logger(cfg, run_dir, run_name)
    logger.log_params(params)
    _ACTIVE.append(logger)
    status = "failed"
    try:
        yield logger
        status = "ok"
    finally:
        _ACTIVE.remove(logger)
        logger.close(status)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
