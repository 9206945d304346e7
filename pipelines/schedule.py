"""Serve the GRPO flow on a schedule, as a Prefect deployment on a Prefect server.

    prefect server start                                   # once, in another terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.schedule +experiment=quickstart schedule.cron="0 3 * * *"
    python -m pipelines.schedule +experiment=quickstart schedule.interval=3600

The config is composed and checked now (same overrides as `pipelines.grpo`); the resolved
config is the deployment's `config` parameter, so every scheduled run trains exactly it. This
process is the runner: it stays up, picks up each scheduled (or manually started) run and
executes it in a subprocess, one at a time. Ctrl-C stops serving.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipelines.config import ConfigError, GRPOConfig, compose, to_container
from pipelines.grpo import grpo_flow
from pipelines.inputs import InputError, preflight
from pipelines.tracking import resolve_uri


def deployment_parameters(cfg: GRPOConfig) -> dict:
    """The flow's `config` parameter: the resolved config with paths made absolute, so runs
    write to the same output folder and MLflow store whatever directory they start in."""
    config = to_container(cfg)
    config["run"]["output_dir"] = str(Path(cfg.run.output_dir).resolve())
    config["mlflow"]["tracking_uri"] = resolve_uri(cfg.mlflow.tracking_uri)
    return {"config": config}


def make_deployment(cfg: GRPOConfig):
    """A RunnerDeployment of `grpo_flow` with the config's schedule and parameters."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    s = cfg.schedule
    if s.cron is not None:
        schedule = Cron(s.cron, timezone=s.timezone)
    else:
        schedule = Interval(s.interval, timezone=s.timezone)
    return grpo_flow.to_deployment(
        name=s.name or cfg.run.name,
        schedule=schedule,
        parameters=deployment_parameters(cfg),
        description=f"GRPO training, run.name={cfg.run.name}",
        tags=["grpo"],
        # Load the flow by module path, so the runner finds it from any working directory.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def describe(cfg: GRPOConfig) -> str:
    s = cfg.schedule
    return f'cron "{s.cron}" ({s.timezone})' if s.cron else f"every {s.interval:g} s"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        cfg = compose(args)
        if cfg.schedule.cron is None and cfg.schedule.interval is None:
            raise ConfigError(
                'no schedule: set schedule.cron="0 3 * * *" or schedule.interval=<seconds>'
            )
        preflight(cfg)
    except (ConfigError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()
    if not api:
        print(
            "error: PREFECT_API_URL is not set; start a server (prefect server start) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2

    from prefect import serve

    deployment = make_deployment(cfg)
    ui = api.rstrip("/").removesuffix("/api")
    print(
        f"serving deployment grpo/{deployment.name} ({describe(cfg)}) on {api}\n"
        f"runs: {ui}/deployments (flow runs appear there and under Runs); "
        f"outputs: {deployment.parameters['config']['run']['output_dir']}; "
        f"MLflow: {deployment.parameters['config']['mlflow']['tracking_uri']}\n"
        "Ctrl-C stops serving",
        flush=True,
    )
    # limit=1: a run that overruns its slot delays the next instead of sharing its output dir.
    serve(deployment, limit=1, print_starting_message=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
