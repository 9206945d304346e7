"""Evaluation on held-out prompts: greedy (or sampled, pass@k) completions, scored by the
training reward functions.

The core is pure: prompts (token ids) and their dataset rows in, metrics and a table of example
completions out. Generation is `stages.rollout.generate_rollouts`: greedy is temperature 0 and
one completion per prompt; sampling draws `num_samples` completions per prompt at the rollout
temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from stages import multiturn, rewards
from stages.rollout import RolloutConfig, generate_rollouts
from stages.settings import check, setting

import numpy as np


@dataclass
class EvalConfig:
    """`eval.*`: evaluation on held-out prompts (data.eval_size or data.eval_source)."""

    every: int = setting(0, "every N steps, and always at the end; 0: only at the end")
    at_start: bool = setting(
        False, "also before the first step (logged as step 0): the untrained model's score"
    )
    num_samples: int = setting(1, "1: greedy; k > 1: k sampled completions per prompt (pass@k)")
    max_prompts: int = setting(0, "at most this many eval prompts; 0: all")
    batch_size: int = setting(16, "prompts per generate call")
    accuracy_reward: str | None = setting(
        None, 'reward function that defines "correct"; null: the first one'
    )
    accuracy_threshold: float = setting(1.0, "correct when that reward >= this")
    table_rows: int = setting(16, "example completions logged as an MLflow table")

    def validate(self) -> None:
        check(self.every >= 0, "every", self.every, ">= 0 (0: only at the end)")
        check(self.num_samples >= 1, "num_samples", self.num_samples, ">= 1 (1: greedy)")
        check(self.max_prompts >= 0, "max_prompts", self.max_prompts, ">= 0 (0: all)")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.table_rows >= 0, "table_rows", self.table_rows, ">= 0")


@dataclass
class EvalResult:
    metrics: dict[str, float]  # eval/* names
    table: dict[str, list]  # columns of example completions
    failures: list  # RewardFailure records (reward.on_error=none)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with `correct` right (Chen et al. 2021)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.prod((n - correct - i) / (n - i) for i in range(k))


def evaluate(
    model,
    tokenizer,
    prompts: list[list[int]],
    rows: list[dict],
    reward_funcs: list,
    names: list[str],
    weights: list[float],
    rollout_cfg: RolloutConfig,
    cfg: EvalConfig,
    *,
    seed: int = 0,
    timeout: float | None = None,
    on_error: str = "raise",
    turns=None,
) -> EvalResult:
    """Generate on every prompt (one dataset row each) and score with the reward functions.

    Metrics: eval/reward (mean weighted total), eval/reward_std, eval/rewards/<fn>/mean and /std,
    eval/accuracy (fraction of completions whose `accuracy_reward`, default the first function,
    is >= the threshold), eval/pass@k when num_samples = k > 1 (fraction of prompts with at
    least one correct completion), and eval/completions/* lengths. `seed` seeds sampling
    (pass@k); `timeout` and `on_error` are the reward stage's (stages.rewards.run_rewards).
    `turns` (stages.multiturn.MultiTurn): generate with the run's tools or environment.
    """
    if len(prompts) != len(rows) or not prompts:
        raise ValueError(f"evaluate needs one row per prompt, got {len(prompts)} and {len(rows)}")
    if cfg.num_samples < 1:
        raise ValueError(f"eval num_samples must be >= 1, got {cfg.num_samples}")
    accuracy_name = cfg.accuracy_reward or names[0]
    if accuracy_name not in names:
        raise ValueError(f"eval accuracy_reward {accuracy_name!r} is not one of {names}")
    greedy = cfg.num_samples == 1
    generation = replace(
        rollout_cfg,
        group_size=cfg.num_samples,
        temperature=0.0 if greedy else rollout_cfg.temperature,
    )
    score_parts, lengths, stopped, prompt_texts, texts = [], [], [], [], []
    failures, logged = [], {}
    for start in range(0, len(prompts), cfg.batch_size):
        part = rows[start : start + cfg.batch_size]
        if turns is None:
            batch = generate_rollouts(
                model,
                tokenizer,
                prompts[start : start + cfg.batch_size],
                generation,
                seed=seed + start,
            )
            batch.with_columns(part)
        else:
            batch = multiturn.generate(model, tokenizer, part, generation, turns, seed=seed + start)
        logged_here: dict[str, float] = {}
        scores, found = rewards.run_rewards(
            batch, reward_funcs, names, timeout=timeout, on_error=on_error, metrics=logged_here
        )
        for key, value in logged_here.items():
            logged.setdefault(key, []).append(value)
        failures.extend(found)
        score_parts.append(np.array(scores, dtype=np.float64))
        lengths.append(np.array(batch.generated_mask.sum(axis=1)))
        stopped.extend(reason == "stop" for reason in batch.finish_reasons)
        prompt_texts.extend(batch.prompt_texts)
        texts.extend(batch.texts)
    matrix = np.concatenate(score_parts)
    total = np.where(np.isnan(matrix), 0.0, matrix * np.array(weights)[None, :]).sum(axis=1)
    scored = ~np.isnan(matrix).all(axis=1)
    correct = np.nan_to_num(matrix[:, names.index(accuracy_name)], nan=-np.inf) >= (
        cfg.accuracy_threshold
    )

    metrics = {
        "eval/reward": float(total[scored].mean()) if scored.any() else math.nan,
        "eval/reward_std": float(total[scored].std(ddof=1)) if scored.sum() > 1 else math.nan,
        "eval/accuracy": float(correct.mean()),
        "eval/num_prompts": float(len(prompts)),
    }
    for i, name in enumerate(names):
        column = matrix[:, i][~np.isnan(matrix[:, i])]
        metrics[f"eval/rewards/{name}/mean"] = float(column.mean()) if column.size else math.nan
        metrics[f"eval/rewards/{name}/std"] = (
            float(column.std(ddof=1)) if column.size > 1 else math.nan
        )
    if not greedy:
        k = cfg.num_samples
        per_prompt = correct.reshape(-1, k).sum(axis=1)
        metrics[f"eval/pass@{k}"] = float(np.mean([pass_at_k(k, int(c), k) for c in per_prompt]))
    all_lengths = np.concatenate(lengths)
    stopped_mask = np.array(stopped)
    metrics["eval/completions/mean_length"] = float(all_lengths.mean())
    metrics["eval/completions/clipped_ratio"] = float(1.0 - stopped_mask.mean())
    if failures:
        metrics["eval/reward_failures"] = float(len(failures))
    # what the reward functions logged through log_metric (e.g. math_answer's parse failures),
    # averaged over the generate calls as TRL averages over calls
    metrics.update({f"eval/{key}": float(np.mean(values)) for key, values in logged.items()})

    shown = min(cfg.table_rows, len(texts))
    table = {
        "prompt": prompt_texts[:shown],
        "completion": texts[:shown],
        "reward": total[:shown].tolist(),
        "correct": correct[:shown].tolist(),
        **{f"rewards/{name}": matrix[:shown, i].tolist() for i, name in enumerate(names)},
    }
    return EvalResult(metrics, table, failures)
