"""Prefect tasks: one per stage, each a thin call into the stage core that logs its metrics.

The stage cores (stages/*) know nothing of Prefect or MLflow; each task takes its stage's config
node. Only stages that are safe to repeat retry: loading weights and writing a checkpoint
(atomic, same content). Rollout, rewards and the update are not retried: a retried update would
apply an optimizer step twice.
"""

from __future__ import annotations

import sys
import time

from stages import (
    advantages,
    checkpoint,
    evaluate,
    grpo_update,
    load_weights,
    multiturn,
    rewards,
    rollout,
)

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
    prompts: list,
    cfg: rollout.RolloutConfig,
    tracker: Tracker,
    step: int,
    turns: multiturn.MultiTurn | None = None,
    world=None,
    **placement,
) -> rollout.RolloutBatch:
    """`prompts`: token ids (single-turn), or with `turns` (tools, environments, rollout_func)
    the dataset rows. `placement`: generate_rollouts' seed, row_offset and total_rows."""
    start = time.perf_counter()
    if turns is None:
        batch = rollout.generate_rollouts(model, tokenizer, prompts, cfg, **placement)
    else:
        batch = multiturn.generate(model, tokenizer, prompts, cfg, turns, **placement)
    seconds = time.perf_counter() - start
    metrics = rollout.rollout_metrics(batch)
    metrics.update(multiturn.tool_metrics(batch, world))
    metrics["rollout/tokens_per_s"] = batch.generated_mask.sum().item() / seconds
    metrics["rollout/seconds"] = seconds
    metrics["rollout/engine_bytes"] = batch.engine_bytes
    tracker.log_metrics(metrics, step)
    return batch


@task(name="rewards", **_TASK)
def rewards_task(
    batch: rollout.RolloutBatch,
    funcs: rewards.RewardFuncs,
    cfg: rewards.RewardConfig,
    tracker: Tracker,
    step: int,
) -> mx.array:
    logged: dict[str, float] = {}
    scores, failures = rewards.run_rewards(
        batch, funcs.funcs, funcs.names, timeout=cfg.timeout, on_error=cfg.on_error, metrics=logged
    )
    metrics = rewards.reward_metrics(scores, funcs.names, funcs.weights)
    metrics.update(logged)
    metrics.update(_report_failures(failures, funcs.names, f"step {step}"))
    tracker.log_metrics(metrics, step)
    return scores


def _report_failures(failures: list, names: list[str], where: str) -> dict[str, float]:
    """One stderr line per failing reward call (reward.on_error=none), and a count per function."""
    for failure in failures[:5]:
        print(f"warning: {where}: {failure.describe()}; recorded as None", file=sys.stderr)
    if len(failures) > 5:
        print(f"warning: {where}: {len(failures) - 5} more reward failures", file=sys.stderr)
    counts = {name: 0 for name in names}
    for failure in failures:
        counts[failure.function] = counts.get(failure.function, 0) + 1
    return {f"rewards/{name}/failures": float(n) for name, n in counts.items() if failures}


@task(name="advantages", **_TASK)
def advantages_task(
    scores: mx.array,
    weights: list[float],
    group_size: int,
    cfg: grpo_update.TrainConfig,
    tracker: Tracker,
    step: int,
) -> mx.array:
    values, metrics = advantages.group_advantages(
        scores, weights, group_size, cfg.scale_rewards, cfg.multi_objective_aggregation
    )
    tracker.log_metrics(metrics, step)
    return values


@task(name="evaluate", **_TASK)
def evaluate_task(
    model,
    tokenizer,
    prompts: list[list[int]],
    rows: list[dict],
    funcs: rewards.RewardFuncs,
    rollout_cfg: rollout.RolloutConfig,
    cfg: evaluate.EvalConfig,
    reward_cfg: rewards.RewardConfig,
    seed: int,
    tracker: Tracker,
    step: int,
    turns: multiturn.MultiTurn | None = None,
) -> dict[str, float]:
    """Evaluate on held-out rows (`prompts`: their token ids) after `step` training steps; log
    eval/* and a table of example completions. `turns`: the run's tools or environment."""
    start = time.perf_counter()
    result = evaluate.evaluate(
        model,
        tokenizer,
        prompts,
        rows,
        funcs.funcs,
        funcs.names,
        funcs.weights,
        rollout_cfg,
        cfg,
        seed=seed,
        timeout=reward_cfg.timeout,
        on_error=reward_cfg.on_error,
        turns=turns,
    )
    metrics = dict(result.metrics)
    failures = _report_failures(result.failures, funcs.names, "eval")
    metrics.update({f"eval/{k}": v for k, v in failures.items()})
    metrics["eval/seconds"] = time.perf_counter() - start
    tracker.log_metrics(metrics, step)
    if result.table["prompt"]:
        table = {"step": [step] * len(result.table["prompt"]), **result.table}
        tracker.log_table(table, f"eval/step_{step:06d}.json")
    return metrics


@task(name="grpo_update", **_TASK)
def update_task(
    model,
    optimizer,
    batch: rollout.RolloutBatch,
    advantages: mx.array,
    cfg: grpo_update.TrainConfig,
    ref_model,
    tracker: Tracker,
    step: int,
    world=None,
    seed: int = 0,
) -> dict[str, float]:
    start = time.perf_counter()
    metrics = grpo_update.update_step(
        model, optimizer, batch, advantages, cfg, ref_model, world, seed=seed
    )
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
