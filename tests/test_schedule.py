"""pipelines.schedule: the deployment object (fast), then end to end against a real Prefect
server: the deployment is created with its cron schedule, the server creates scheduled runs,
and one run of the deployment trains to completion and publishes its summary artifact."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from pipelines.config import ConfigError, compose

TINY = (
    "+experiment=quickstart",
    "train.steps=3",
    "checkpoint.every=3",
    "train.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=2",
    "mlflow.log_completions_every=0",
)


def test_deployment_has_the_schedule_and_absolute_paths(tmp_path, monkeypatch):
    from pipelines.schedule import make_deployment

    monkeypatch.chdir(tmp_path)
    cfg = compose([*TINY, 'schedule.cron="0 3 * * *"', "schedule.timezone=Europe/Paris"])
    deployment = make_deployment(cfg)
    assert deployment.name == "quickstart"
    assert deployment.entrypoint == "pipelines.grpo.grpo_flow"
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * *"
    assert schedule.schedule.timezone == "Europe/Paris"
    config = deployment.parameters["config"]
    assert config["run"]["output_dir"] == str(tmp_path / "outputs" / "quickstart")
    assert config["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert config["train"]["steps"] == 3

    cfg = compose([*TINY, "schedule.interval=90", "schedule.name=hourly"])
    deployment = make_deployment(cfg)
    assert deployment.name == "hourly"
    assert deployment.schedules[0].schedule.interval.total_seconds() == 90


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.cron=nonsense", "config schedule.cron='nonsense' is invalid"),
        ("schedule.timezone=Mars/Olympus", "config schedule.timezone='Mars/Olympus' is invalid"),
        ("schedule.interval=-5", "config schedule.interval=-5.0 is invalid: expected > 0"),
        ("safety.max_nonfinite_steps=0", "config safety.max_nonfinite_steps=0 is invalid"),
    ],
)
def test_bad_schedule_and_safety_keys_are_one_line(override, message):
    with pytest.raises(ConfigError) as error:
        compose([override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_cron_and_interval_together_is_an_error():
    with pytest.raises(ConfigError, match="schedule.interval=60.0 is invalid: expected null"):
        compose(['schedule.cron="0 3 * * *"', "schedule.interval=60"])


def test_schedule_cli_needs_a_schedule(tmp_path):
    from pipelines.schedule import main

    assert main(list(TINY)) == 2


def _api(api: str, path: str, body: dict | None = None, attempts: int = 10):
    """One Prefect REST call; retries 5xx (a loaded 2-core machine makes SQLite busy)."""
    request = urllib.request.Request(
        f"{api}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == attempts - 1:
                raise
            time.sleep(1)


def _wait(predicate, timeout: float, what: str, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"schedule exited {process.returncode}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_served_deployment_schedules_runs_and_completes_one(tmp_path, prefect_api):
    log = tmp_path / "schedule.log"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    command = [sys.executable, "-m", "pipelines.schedule", *TINY, "schedule.name=nightly"]
    process = subprocess.Popen(
        [*command, 'schedule.cron="0 3 * * *"'],
        cwd=tmp_path,
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,  # flow runs are its subprocesses: stop them together
    )
    try:

        def deployment():
            try:
                return _api(prefect_api, "/deployments/name/grpo/nightly")
            except OSError:
                return None

        found = _wait(deployment, 180, "the deployment", process, log)
        assert found["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert found["parameters"]["config"]["train"]["steps"] == 3

        def scheduled_runs():
            return _api(
                prefect_api,
                "/flow_runs/filter",
                {
                    "deployments": {"id": {"any_": [found["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                },
            )

        runs = _wait(scheduled_runs, 120, "scheduled runs", process, log)
        starts = sorted(datetime.fromisoformat(r["expected_start_time"]) for r in runs)
        assert all((t.hour, t.minute) == (3, 0) for t in starts), starts
        assert starts[0] > datetime.now(starts[0].tzinfo)

        started = _api(prefect_api, f"/deployments/{found['id']}/create_flow_run", {})

        def finished():
            run = _api(prefect_api, f"/flow_runs/{started['id']}")
            return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") else None

        run = _wait(finished, 300, "the deployment run", process, log)
        assert run["state"]["type"] == "COMPLETED", log.read_text()[-3000:]

        artifacts = _api(
            prefect_api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
        )
        (summary,) = [a for a in artifacts if a["key"] == "grpo-summary-quickstart"]
        checkpoint = tmp_path / "outputs" / "quickstart" / "checkpoints" / "step-00000003"
        assert f"`{checkpoint}`" in summary["data"]
        assert (
            "| final reward |" in summary["data"]
            and "mlflow ui --backend-store-uri" in summary["data"]
        )
        assert (checkpoint / "model.safetensors").exists()

        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        (mlflow_run,) = client.search_runs([client.get_experiment_by_name("grpo").experiment_id])
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.info.run_id in summary["data"]
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_summary_artifact_markdown():
    from pipelines.report import artifact_key, summary_markdown

    assert artifact_key("My Run_2") == "grpo-summary-my-run-2"
    history = [{"step": 0, "reward": 0.25, "loss": 0.5}, {"step": 1, "reward": 0.125, "loss": 0.1}]
    summary = {"steps": 2, "final_reward": 0.125, "checkpoint": "/o/step-00000002"}
    text = summary_markdown(summary, history, "http://mlflow:5000/#/experiments/1/runs/abc")
    assert "| final reward | 0.1250 |" in text and "| best reward | 0.2500 |" in text
    assert "| checkpoint | `/o/step-00000002` |" in text
    assert "| MLflow run | http://mlflow:5000/#/experiments/1/runs/abc |" in text
    assert "| eval accuracy, first eval | - |" in text  # no eval rows
    summary.update(eval_first_step=0, eval_first_accuracy=0.1, eval_last_step=2)
    text = summary_markdown({**summary, "eval_last_accuracy": 0.625}, history, "mlflow.db")
    assert "| eval accuracy, first eval | 0.1000 (step 0) |" in text
    assert "| eval accuracy, last eval | 0.6250 (step 2) |" in text
