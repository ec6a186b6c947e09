"""logger=csv: <run folder>/logs/metrics.csv, one row per value (step, key, value), appended as training goes,
so a killed run keeps what it logged."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from qspeech.loggers import LoggerConfig, MetricLogger
from qspeech.loggers.csv_file import append_csv

FIELDS = ["step", "key", "value"]


class CSVLogger(MetricLogger):
    def __init__(self, path: Path):
        self.path = path
        append_csv(path, FIELDS, [])  # the header, at once

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        append_csv(self.path, FIELDS, ({"step": step, "key": k, "value": v} for k, v in metrics.items()))


def make(cfg: LoggerConfig, run_dir: Path, run_name: str) -> CSVLogger:
    return CSVLogger(run_dir / "logs" / "metrics.csv")
