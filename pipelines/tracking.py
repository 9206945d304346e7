"""MLflow tracking for one training run: params, per-step metrics, tables, artifacts.

The store defaults to a SQLite file, `sqlite:///mlflow.db` in the working directory (MLflow's
own default), unless `mlflow.tracking_uri` or $MLFLOW_TRACKING_URI says otherwise. Everything
goes through an explicit MlflowClient and run id, so Prefect tasks can log from any thread.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path


def _quiet() -> None:
    # First use of a SQLite store runs alembic migrations that log at INFO; keep the console clean.
    # mlflow sets its logger level on import, so import it first.
    import mlflow  # noqa: F401

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_uri(configured: str | None) -> str:
    return (
        configured
        or os.environ.get("MLFLOW_TRACKING_URI")
        or (f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    )


class Tracker:
    """One MLflow run. `run_id` resumes an existing run (after a checkpoint resume)."""

    def __init__(
        self,
        experiment: str,
        run_name: str,
        tracking_uri: str | None = None,
        run_id: str | None = None,
    ):
        _quiet()
        from mlflow import MlflowClient

        self.uri = resolve_uri(tracking_uri)
        self.client = MlflowClient(self.uri)
        existing = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            existing.experiment_id if existing else self.client.create_experiment(experiment)
        )
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
