"""MLflow tracking for one training run: params, per-step metrics, tables, artifacts.

The store defaults to a SQLite file, `sqlite:///mlflow.db` in the working directory (MLflow's
own default), unless `mlflow.tracking_uri` or $MLFLOW_TRACKING_URI says otherwise. Everything
goes through an explicit MlflowClient and run id, so Prefect tasks can log from any thread.

If the tracking server becomes unreachable mid-run, training goes on: the tracker prints one
warning, appends every record it could not send to a spool file (JSON lines, next to the
checkpoints) and sends the spool, in order, as soon as the server answers again (it retries at
most every `retry_seconds`). A spool left by a run that ended while MLflow was down is sent by
the next Tracker on the same spool file (e.g. the run resumed) or by
`python -m pipelines.tracking flush <spool>`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stages.settings import check, setting


@dataclass
class MlflowConfig:
    """`mlflow.*`: where the run is tracked."""

    experiment: str = setting("grpo", "MLflow experiment name")
    tracking_uri: str | None = setting(
        None, "null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd"
    )
    log_completions_every: int = setting(
        10, "log a table of sample completions every N steps; 0: never"
    )

    def validate(self) -> None:
        every = self.log_completions_every
        check(every >= 0, "log_completions_every", every, ">= 0 (0: never)")


def quiet_logs() -> None:
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
    """One MLflow run. `run_id` resumes an existing run (after a checkpoint resume).

    spool: where records go while the server is unreachable (None: kept in memory only).
    """

    def __init__(
        self,
        experiment: str,
        run_name: str,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        *,
        spool: str | Path | None = None,
        retry_seconds: float = 10.0,
    ):
        quiet_logs()
        # MLflow's HTTP client retries a dead server with backoff for minutes per call; the
        # spool below does the retrying instead, so a call fails fast and training goes on.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        self.uri = resolve_uri(tracking_uri)
        self.client = MlflowClient(self.uri)
        self.spool = Path(spool) if spool is not None else None
        self.retry_seconds = retry_seconds
        self._pending: list[dict] = []
        self._step_metrics: dict | None = None  # this step's metrics, written as one batch
        self._down_since: float | None = None
        self._next_try = 0.0
        self._warned = False
        existing = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            existing.experiment_id if existing else self.client.create_experiment(experiment)
        )
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        if self.spool is not None and self.spool.exists():
            self._pending = _read_spool(self.spool)
            count = len(self._pending)
            if self._flush():
                print(f"note: sent {count} MLflow records left in {self.spool}", file=sys.stderr)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    @property
    def link(self) -> str:
        """Where to see the run: a UI address for an HTTP server, else the `mlflow ui` command."""
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"mlflow ui --backend-store-uri {self.uri}  (run {self.run_id})"

    # -- resilient delivery ------------------------------------------------------------------

    def _submit(self, record: dict) -> None:
        if record["kind"] != "metrics":
            self.end_step()  # records reach MLflow in the order they were logged
        record.setdefault("run_id", self.run_id)
        self._pending.append(record)
        if self.spool is not None and self._down_since is not None:
            _append_spool(self.spool, [record])
        if self._down_since is None or time.monotonic() >= self._next_try:
            self._flush()

    def _flush(self) -> bool:
        """Send pending records in order. False (and the rest kept) if the server is down."""
        while self._pending:
            try:
                _send(self.client, self._pending[0])
            except Exception as error:  # noqa: BLE001  (any failure to reach the store)
                if not _unreachable(error):
                    raise
                self._went_down(error)
                return False
            self._pending.pop(0)
        if self._down_since is not None:
            print(
                f"note: MLflow at {self.uri} is reachable again; buffered records sent",
                file=sys.stderr,
                flush=True,
            )
        if self.spool is not None and self.spool.exists():
            self.spool.unlink()
        self._down_since = None
        return True

    def _went_down(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        if self.spool is not None:
            # While down, every unsent record is also on disk, so a crash loses nothing.
            _write_spool(self.spool, self._pending)
        self._next_try = time.monotonic() + self.retry_seconds
        if not self._warned:
            self._warned = True
            where = f" and in {self.spool}" if self.spool is not None else ""
            print(
                f"\nwarning: MLflow at {self.uri} is unreachable ({type(error).__name__}); "
                f"training goes on, metrics are kept in memory{where} and sent when it is back",
                file=sys.stderr,
                flush=True,
            )

    # -- logging -----------------------------------------------------------------------------

    def log_params(self, params: dict[str, str]) -> None:
        # Already-logged keys (a resumed run) are skipped when sent: MLflow params are immutable.
        self._submit({"kind": "params", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Collects a step's metrics (from every stage) into one MLflow write, sent by
        `end_step`, by the first metric of another step or before any other record."""
        values = {k: float(v) for k, v in metrics.items()}
        if self._step_metrics is not None and self._step_metrics["step"] != step:
            self.end_step()
        if self._step_metrics is None:
            now = int(time.time() * 1000)
            self._step_metrics = {"kind": "metrics", "metrics": {}, "step": step, "timestamp": now}
        self._step_metrics["metrics"].update(values)

    def end_step(self) -> None:
        """Send the metrics collected for the current step (one write to MLflow)."""
        record, self._step_metrics = self._step_metrics, None
        if record is not None:
            self._submit(record)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        self._submit({"kind": "table", "data": columns, "artifact_file": artifact_file})

    def log_artifacts(
        self, local_dir: str | Path, artifact_path: str | None = None, exclude: tuple = ()
    ) -> None:
        """Every file under `local_dir` but the top-level files named in `exclude`."""
        record = {
            "kind": "artifacts",
            "local": str(Path(local_dir).resolve()),
            "path": artifact_path,
        }
        self._submit(record | ({"exclude": sorted(exclude)} if exclude else {}))

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self._submit(
            {"kind": "artifact", "local": str(Path(local_file).resolve()), "path": artifact_path}
        )

    def finish(self, status: str = "FINISHED") -> None:
        self._submit({"kind": "terminate", "status": status})
        if self._pending:
            # One last try, then the spool stays for the next run or `flush`.
            self._flush()
        if self._pending:
            where = (
                f"kept in {self.spool}; send them with: python -m pipelines.tracking flush "
                f"{self.spool} --tracking-uri {self.uri}"
                if self.spool is not None
                else "lost (no spool file configured)"
            )
            print(
                f"warning: MLflow at {self.uri} is still unreachable; {len(self._pending)} "
                f"records {where}",
                file=sys.stderr,
                flush=True,
            )


def _unreachable(error: Exception) -> bool:
    """Connection-level failures (server down, timeouts, 5xx), not bad requests."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, OSError | ConnectionError | TimeoutError):
        return True
    if isinstance(error, MlflowException):
        text = str(error)
        return any(
            marker in text
            for marker in (
                "Max retries exceeded",
                "Connection",
                "timed out",
                "API request to",
                "database is locked",
                "503",
                "502",
                "504",
            )
        )
    import requests

    return isinstance(error, requests.exceptions.RequestException)


def _send(client, record: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag

    run_id, kind = record["run_id"], record["kind"]
    if kind == "metrics":
        batch = [
            Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()
        ]
        for start in range(0, len(batch), 500):
            client.log_batch(run_id, metrics=batch[start : start + 500])
    elif kind == "params":
        logged = client.get_run(run_id).data.params
        fresh = [Param(k, v) for k, v in record["params"].items() if k not in logged]
        for start in range(0, len(fresh), 100):
            client.log_batch(run_id, params=fresh[start : start + 100])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif kind == "table":
        client.log_table(run_id, data=record["data"], artifact_file=record["artifact_file"])
    elif kind in ("artifact", "artifacts"):
        local = Path(record["local"])
        if not local.exists():
            print(f"warning: {local} no longer exists; not logged to MLflow", file=sys.stderr)
        elif kind == "artifact":
            client.log_artifact(run_id, str(local), record["path"])
        elif not record.get("exclude"):
            client.log_artifacts(run_id, str(local), record["path"])
        else:
            for entry in sorted(local.iterdir()):
                if entry.name in record["exclude"]:
                    continue
                if entry.is_dir():
                    inner = f"{record['path']}/{entry.name}" if record["path"] else entry.name
                    client.log_artifacts(run_id, str(entry), inner)
                else:
                    client.log_artifact(run_id, str(entry), record["path"])
    elif kind == "terminate":
        client.set_terminated(run_id, status=record["status"])
    else:
        raise ValueError(f"unknown spool record kind {kind!r}")


def _append_spool(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _write_spool(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.unlink(missing_ok=True)
    _append_spool(staging, records)
    staging.replace(path)


def _read_spool(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A crash mid-append leaves at most one torn last line.
            print(f"warning: {path}:{number} is a torn record; skipped", file=sys.stderr)
    return records


def flush_spool(path: str | Path, tracking_uri: str | None = None) -> int:
    """Send a spool file left by a run that ended while MLflow was down. Returns records sent."""
    quiet_logs()
    from mlflow import MlflowClient

    path = Path(path)
    client = MlflowClient(resolve_uri(tracking_uri))
    records = _read_spool(path)
    for record in records:
        _send(client, record)
    path.unlink()
    return len(records)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    flush = sub.add_parser("flush", help="send a spool file of records MLflow did not get")
    flush.add_argument("spool")
    flush.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    if not Path(args.spool).exists():
        print(f"error: spool file {args.spool} does not exist", file=sys.stderr)
        return 2
    sent = flush_spool(args.spool, args.tracking_uri)
    print(f"sent {sent} records to {resolve_uri(args.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
