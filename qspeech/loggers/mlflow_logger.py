"""logger=mlflow: one MLflow run per experiment, in a file store under the run folder (<run>/mlruns:
`mlflow ui --backend-store-uri <run>/mlruns`) unless logger.tracking_uri names another store or a server."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qspeech.loggers import LoggerConfig, MetricLogger

MAX_PARAMS = 100  # per log_batch call (MLflow's limit)


class MLflowLogger(MetricLogger):
    def __init__(self, tracking_uri: str, experiment: str, run_name: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def close(self, status: str = "ok") -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "ok" else "FAILED")


def make(cfg: LoggerConfig, run_dir: Path, run_name: str) -> MLflowLogger:
    uri = cfg.tracking_uri
    if uri is None:
        # MLflow 3 keeps its file store in maintenance mode behind this switch; a sqlite store would cost
        # ~8 s of schema migrations in every new run folder.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (run_dir / "mlruns").resolve().as_uri()
    return MLflowLogger(uri, cfg.experiment, run_name)
