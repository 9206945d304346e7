"""Prefect tasks: one per stage, each a thin call into the stage core that logs its metrics.

The stage cores (stages/*) know nothing of Prefect or MLflow. Only stages that are safe to
repeat retry: loading weights and writing a checkpoint (atomic, same content). Rollout, rewards
and the update are not retried: a retried update would apply an optimizer step twice.
"""

from __future__ import annotations

import time

from stages import checkpoint, grpo_update, load_weights, rewards, rollout

import mlx.core as mx
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipelines.tracking import Tracker

# Stage inputs are models and MLX arrays: never hash or persist them.
_TASK = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="load_weights", retries=1, **_TASK)
def load_weights_task(path: str, dtype: str):
    return load_weights.load(path, dtype=dtype)


@task(name="rollout", **_TASK)
def rollout_task(
    model,
    tokenizer,
    prompts: list[list[int]],
    cfg: rollout.RolloutConfig,
    tracker: Tracker,
    step: int,
) -> rollout.RolloutBatch:
    start = time.perf_counter()
    batch = rollout.generate_rollouts(model, tokenizer, prompts, cfg)
    seconds = time.perf_counter() - start
    metrics = rollout.rollout_metrics(batch)
    metrics["rollout/tokens_per_s"] = batch.completion_mask.sum().item() / seconds
    metrics["rollout/seconds"] = seconds
    tracker.log_metrics(metrics, step)
    return batch


@task(name="rewards", **_TASK)
def rewards_task(
    batch: rollout.RolloutBatch,
    funcs: list,
    names: list[str],
    weights: list[float],
    tracker: Tracker,
    step: int,
) -> mx.array:
    scores = rewards.score(batch, funcs, weights)
    tracker.log_metrics(rewards.reward_metrics(scores, names, weights, batch.group_size), step)
    return scores


@task(name="advantages", **_TASK)
def advantages_task(
    scores: mx.array, weights: list[float], group_size: int, scale: str
) -> mx.array:
    return grpo_update.compute_advantages(rewards.combine(scores, weights), group_size, scale)


@task(name="grpo_update", **_TASK)
def update_task(
    model,
    optimizer,
    batch: rollout.RolloutBatch,
    advantages: mx.array,
    cfg: grpo_update.UpdateConfig,
    ref_model,
    tracker: Tracker,
    step: int,
) -> dict[str, float]:
    start = time.perf_counter()
    metrics = grpo_update.update_step(model, optimizer, batch, advantages, cfg, ref_model)
    seconds = time.perf_counter() - start
    tokens = sum(len(p) for p in batch.prompt_ids) + batch.completion_mask.sum().item()
    metrics["update/tokens_per_s"] = tokens * cfg.num_iterations / seconds
    metrics["update/seconds"] = seconds
    tracker.log_metrics(metrics, step)
    return metrics


@task(name="checkpoint", retries=2, **_TASK)
def checkpoint_task(model, tokenizer, root: str, step: int, state: dict, keep_last: int):
    path = checkpoint.save(model, tokenizer, checkpoint.step_dir(root, step), state=state)
    checkpoint.prune(root, keep_last)
    return str(path)
