"""Data parallelism over mx.distributed: who am I, which prompts are mine, and reductions.

Launched with MLX's own launcher (`mlx.launch -n 2 --backend ring python -m pipelines.grpo ...`,
NCCL on NVIDIA GPUs, MPI where installed). With one process everything here is a no-op, so the
single-process path is the same code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from stages.settings import check, one_of, setting

import mlx.core as mx

BACKENDS = ("any", "ring", "mpi", "nccl")


@dataclass
class DistributedConfig:
    """`distributed.*`: read under `mlx.launch -n N ...` (data parallel); a lone process is
    world size 1."""

    backend: str = setting(
        "any", "any | ring | mpi | nccl: mx.distributed backend; error if unavailable"
    )
    stop_grace_seconds: float = setting(
        300.0,
        "after SIGTERM/Ctrl-C with several processes, the step has this long to finish, else "
        "exit without saving (a dead peer blocks it forever)",
    )

    def validate(self) -> None:
        one_of("backend", self.backend, BACKENDS)
        check(self.stop_grace_seconds > 0, "stop_grace_seconds", self.stop_grace_seconds, "> 0")


class DistributedError(RuntimeError):
    """The process group is misconfigured (world size, backend, mismatched configs)."""


@dataclass(frozen=True)
class World:
    group: mx.distributed.Group | None = None
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the side effects: MLflow run, checkpoints, Prefect artifacts."""
        return self.rank == 0


# How MLX's backends word a collective that failed because another process went away.
_PEER_FAILURE_MARKS = ("[ring]", "nccl", "[mpi]", "mpi_")


def is_peer_failure(error: BaseException) -> bool:
    """True for the error a collective raises when another process of the group has gone
    (ring: "[ring] connection to a peer was lost"; NCCL and MPI errors name their library)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(mark in text for mark in _PEER_FAILURE_MARKS)


def init(backend: str = "any") -> World:
    """Join the process group started by `mlx.launch`; a single process gets World(size=1)."""
    try:
        group = mx.distributed.init(strict=backend != "any", backend=backend)
    except RuntimeError as error:
        raise DistributedError(
            f"distributed backend {backend!r} is not available: {error}"
        ) from None
    if group.size() == 1:
        return World()
    return World(group, group.rank(), group.size())


def shard(n_global: int, world: World, what: str = "prompts per step") -> slice:
    """This rank's contiguous share of `n_global` items (each prompt keeps its whole group)."""
    if n_global % world.size:
        raise DistributedError(
            f"{what} ({n_global}) must be divisible by the number of processes ({world.size})"
        )
    per_rank = n_global // world.size
    return slice(world.rank * per_rank, (world.rank + 1) * per_rank)


def all_gather(x: mx.array, world: World) -> mx.array:
    """Concatenate every rank's `x` along axis 0, in rank order."""
    return x if world.size == 1 else mx.distributed.all_gather(x, group=world.group)


def all_sum(x: mx.array, world: World) -> mx.array:
    return x if world.size == 1 else mx.distributed.all_sum(x, group=world.group)


def all_extreme(x: mx.array, world: World, *, largest: bool) -> mx.array:
    """Elementwise max (largest) or min of `x` over ranks."""
    if world.size == 1:
        return x
    reduce = mx.distributed.all_max if largest else mx.distributed.all_min
    return reduce(x, group=world.group)


def reduce_metrics(metrics: dict[str, float], world: World) -> dict[str, float]:
    """Average metrics over ranks; names whose last part is `min`/`max`, ends in `_min`/`_max` or
    starts with `min_`/`max_` take the min/max, so TRL-style extremes stay extremes. Every rank
    must pass the same names."""
    if world.size == 1 or not metrics:
        return dict(metrics)
    names = sorted(metrics)
    values = mx.array([float(metrics[n]) for n in names], dtype=mx.float32)
    mean = mx.distributed.all_sum(values, group=world.group) / world.size
    low = mx.distributed.all_min(values, group=world.group)
    high = mx.distributed.all_max(values, group=world.group)
    mx.eval(mean, low, high)
    out = {}
    for i, name in enumerate(names):
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "min" or leaf.endswith("_min") or leaf.startswith("min_"):
            out[name] = low[i].item()
        elif leaf == "max" or leaf.endswith("_max") or leaf.startswith("max_"):
            out[name] = high[i].item()
        else:
            out[name] = mean[i].item()
    return out


def check_same(text: str, world: World, what: str = "resolved config") -> None:
    """Fail on every rank when ranks disagree on `text` (e.g. the resolved config)."""
    if world.size == 1:
        return
    digest = hashlib.sha256(text.encode()).digest()[:8]
    mine = mx.array(list(digest), dtype=mx.int32)[None]
    every = mx.distributed.all_gather(mine, group=world.group)
    differ = [r for r in range(world.size) if not mx.array_equal(every[r], every[0]).item()]
    if differ:
        raise DistributedError(
            f"ranks {differ} have a different {what} than rank 0; "
            "launch every process with the same command line"
        )
