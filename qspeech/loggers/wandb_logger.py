"""logger=wandb: one Weights & Biases run per experiment, in <run folder>/wandb, offline unless WANDB_MODE says
otherwise (`wandb sync outputs/run/*/wandb/offline-run-*` uploads the runs later; WANDB_MODE=online logs live).
The project is logger.experiment, the server logger.tracking_uri (null: W&B's default or WANDB_BASE_URL). The jobs
of one sweep share a group: QSPEECH_SWEEP, which `qspeech run -m` sets for its jobs (WANDB_RUN_GROUP wins).

Every stage logs against its own step (the QAT stages', the head's): each key `<stage>/<name>` is plotted against
`<stage>/step`, so W&B's one monotonic step counter never drops a stage's points."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qspeech.loggers import SWEEP_ENV, LoggerConfig, MetricLogger


class WandbLogger(MetricLogger):
    def __init__(self, run):
        self.run = run
        self.stages: set[str] = set()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        by_stage: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            by_stage.setdefault(key.split("/", 1)[0], {})[key] = float(value)
        for stage, values in by_stage.items():
            if stage not in self.stages:
                self.run.define_metric(f"{stage}/step", hidden=True)
                self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self.stages.add(stage)
            self.run.log({**values, f"{stage}/step": int(step)})

    def close(self, status: str = "ok") -> None:
        self.run.finish(exit_code=0 if status == "ok" else 1)


def make(cfg: LoggerConfig, run_dir: Path, run_name: str) -> WandbLogger:
    import wandb  # heavy optional package (qspeech[wandb]), imported only when this logger is chosen

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")  # its banner would interleave with the progress lines
    if cfg.tracking_uri:
        os.environ.setdefault("WANDB_BASE_URL", cfg.tracking_uri)
    run_dir = Path(run_dir).resolve()
    run = wandb.init(project=cfg.experiment, name=run_name, dir=str(run_dir), job_type="run",
                     group=os.environ.get("WANDB_RUN_GROUP") or os.environ.get(SWEEP_ENV))
    return WandbLogger(run)
