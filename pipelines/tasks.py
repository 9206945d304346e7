"""Prefect tasks: one per stage, each a thin call into the stage core that logs its metrics.

The stage cores (stages/*) know nothing of Prefect or MLflow. Only stages that are safe to
repeat retry: loading weights and writing a checkpoint (atomic, same content). Rollout, rewards
and the update are not retried: a retried update would apply an optimizer step twice.
"""

from __future__ import annotations

import sys
import time

from stages import checkpoint, data, evaluate, grpo_update, load_weights, rewards, rollout

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
    metrics["rollout/engine_bytes"] = batch.engine_bytes
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
    reward_cfg=None,
) -> mx.array:
    scores, failures = rewards.run_rewards(
        batch,
        funcs,
        names,
        timeout=getattr(reward_cfg, "timeout", None),
        on_error=getattr(reward_cfg, "on_error", "raise"),
    )
    metrics = rewards.reward_metrics(scores, names, weights)
    metrics.update(_report_failures(failures, names, f"step {step}"))
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
    scale: str,
    aggregation: str = "sum_then_normalize",
    tracker: Tracker | None = None,
    step: int = 0,
) -> mx.array:
    advantages, metrics = grpo_update.group_advantages(
        scores, weights, group_size, scale, aggregation
    )
    if tracker is not None:
        tracker.log_metrics(metrics, step)
    return advantages


@task(name="evaluate", **_TASK)
def evaluate_task(
    model,
    tokenizer,
    rows: list[dict],
    funcs: list,
    names: list[str],
    weights: list[float],
    cfg,
    tracker: Tracker,
    step: int,
) -> dict[str, float]:
    """Evaluate on held-out rows after `step` training steps; log eval/* and a table."""
    from dataclasses import asdict

    start = time.perf_counter()
    prompts = [
        data.encode_prompt(
            tokenizer,
            row["prompt"],
            use_chat_template=cfg.data.use_chat_template,
            system_prompt=cfg.data.system_prompt,
            template_kwargs=cfg.data.chat_template_kwargs,
        )
        for row in rows
    ]
    e = cfg.eval
    result = evaluate.evaluate(
        model,
        tokenizer,
        prompts,
        rows,
        funcs,
        names,
        weights,
        rollout.RolloutConfig(
            seed=cfg.run.seed * 1_000_003 + 999_983 + step, **asdict(cfg.rollout)
        ),
        evaluate.EvalConfig(
            num_samples=e.num_samples,
            batch_size=e.batch_size,
            accuracy_reward=e.accuracy_reward,
            accuracy_threshold=e.accuracy_threshold,
            table_rows=e.table_rows,
        ),
        timeout=cfg.reward.timeout,
        on_error=cfg.reward.on_error,
    )
    metrics = dict(result.metrics)
    metrics.update(
        {f"eval/{k}": v for k, v in _report_failures(result.failures, names, "eval").items()}
    )
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
    cfg: grpo_update.UpdateConfig,
    ref_model,
    tracker: Tracker,
    step: int,
    world=None,
) -> dict[str, float]:
    start = time.perf_counter()
    metrics = grpo_update.update_step(model, optimizer, batch, advantages, cfg, ref_model, world)
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
