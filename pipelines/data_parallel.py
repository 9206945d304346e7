"""Data-parallel GRPO runs: joining the process group, and what each rank may touch.

    python -m pipelines.launch -n 2 --backend ring python -m pipelines.grpo +experiment=quickstart

Every rank runs the same training loop on its own share of each step's prompts (stages/
distributed.py). Rank 0 owns the side effects (the MLflow run, checkpoints, the Prefect flow and
its artifacts); the other ranks call the task functions directly and log nothing. Metrics are
reduced over ranks before rank 0 logs them.
"""

from __future__ import annotations

from types import SimpleNamespace

from stages import distributed

from pipelines.config import GRPOConfig, to_yaml


def join(cfg: GRPOConfig) -> distributed.World:
    """Join the process group per distributed.backend and check it can run `cfg`: the world size
    divides train.prompts_per_step and every rank resolved the same config. Raises
    distributed.DistributedError (one line) otherwise, on every rank."""
    world = distributed.init(cfg.distributed.backend)
    distributed.check_same(to_yaml(cfg), world)
    distributed.shard(cfg.train.prompts_per_step, world, "train.prompts_per_step")
    return world


def plain_tasks(tasks_module) -> SimpleNamespace:
    """The module's Prefect tasks as plain functions (`task.fn`): for ranks other than 0, which
    run no flow and create no task runs."""
    names = [n for n in dir(tasks_module) if n.endswith("_task")]
    return SimpleNamespace(**{n: getattr(tasks_module, n).fn for n in names})


class NullTracker:
    """The tracker of ranks other than 0: accepts everything, records nothing."""

    run_id = None
    uri = None

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class ReducedTracker:
    """Wraps a rank's tracker so every log_metrics is first reduced over ranks (a collective:
    every rank logs at the same points). When ranks disagree on the metric names (e.g. reward
    failure counts present on one rank only), rank 0 logs its own values."""

    def __init__(self, inner, world: distributed.World):
        self.inner = inner
        self.world = world

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        names = "\n".join(sorted(metrics))
        try:
            distributed.check_same(names, self.world, "set of metric names")
        except distributed.DistributedError:
            reduced = dict(metrics)
        else:
            reduced = distributed.reduce_metrics(metrics, self.world)
        self.inner.log_metrics(reduced, step)
