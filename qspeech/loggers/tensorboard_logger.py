"""logger=tensorboard: event files in <run folder>/tensorboard (`tensorboard --logdir outputs`); the config
as text."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qspeech.loggers import LoggerConfig, MetricLogger


class TensorBoardLogger(MetricLogger):
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self, status: str = "ok") -> None:
        self.writer.close()


def make(cfg: LoggerConfig, run_dir: Path, run_name: str) -> TensorBoardLogger:
    return TensorBoardLogger(run_dir / "tensorboard")
