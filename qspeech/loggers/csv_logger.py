"""logger=csv: <run folder>/logs/metrics.csv, one row per value (step, key, value), appended and flushed as
training goes, so a killed run keeps what it logged."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from qspeech.loggers import LoggerConfig, MetricLogger


class CSVLogger(MetricLogger):
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "key", "value"])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.writer.writerows([step, k, v] for k, v in metrics.items())
        self.file.flush()

    def close(self, status: str = "ok") -> None:
        self.file.close()


def make(cfg: LoggerConfig, run_dir: Path, run_name: str) -> CSVLogger:
    return CSVLogger(run_dir / "logs" / "metrics.csv")
