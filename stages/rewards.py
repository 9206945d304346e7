"""Reward functions with TRL's signature, a registry of built-ins, and scoring.

A reward function is `fn(prompts: list[str], completions: list[str], **columns) -> list[float |
None]`, where `columns` are the dataset columns of each row (e.g. `answer`). `None` means "does not
apply to this sample" and becomes NaN in the score matrix. An exception inside a function is
never turned into a silent 0: it stops scoring with an error naming the function.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence

import mlx.core as mx

from stages.chat import completion_parts

RewardFunc = Callable[..., list]
REGISTRY: dict[str, RewardFunc] = {}


def register(name: str):
    """Decorator: make a reward function available by `name` in configs."""

    def add(fn: RewardFunc) -> RewardFunc:
        REGISTRY[name] = fn
        return fn

    return add


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable."""


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalize_number(text: str) -> str | None:
    text = text.replace(",", "").strip()
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


@register("exact_answer")
def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **_) -> list:
    """1.0 when the completion, stripped, is exactly the `answer` column, else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


@register("first_number")
def first_number(prompts: list[str], completions: list[str], answer: list[str], **_) -> list:
    """1.0 when the first number in the completion equals `answer` (numerically), else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer):
        found = _NUMBER.search(completion)
        got = _normalize_number(found.group()) if found else None
        rewards.append(float(got is not None and got == _normalize_number(str(expected))))
    return rewards


@register("gsm8k_answer")
def gsm8k_answer(prompts: list[str], completions: list[str], answer: list[str], **_) -> list:
    """GSM8K: the last number in the completion equals the number after `####` in `answer`."""
    rewards = []
    for completion, reference in zip(completions, answer):
        expected = _normalize_number(str(reference).split("####")[-1])
        numbers = _NUMBER.findall(completion)
        got = _normalize_number(numbers[-1]) if numbers else None
        rewards.append(float(got is not None and got == expected))
    return rewards


def resolve(spec: str | RewardFunc) -> tuple[str, RewardFunc]:
    """(name, function) for a registry name, an import path `pkg.module.fn`, or a callable."""
    if callable(spec):
        return getattr(spec, "__name__", "reward"), spec
    if spec in REGISTRY:
        return spec, REGISTRY[spec]
    module_name, _, attribute = spec.rpartition(".")
    if not module_name:
        raise ValueError(
            f"reward {spec!r} is not a built-in ({', '.join(sorted(REGISTRY))}) "
            "nor an import path like my_package.rewards.my_reward"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {spec!r} cannot be imported: {error}") from None
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return attribute, fn


def score(batch, reward_funcs: Sequence[RewardFunc], weights: Sequence[float]) -> mx.array:
    """Run every reward function on the batch. Returns (N, n_funcs) float32, NaN where None.

    `batch` is a RolloutBatch (prompt_texts, texts, columns). `weights` must match
    `reward_funcs` one to one; they are applied by `combine`, not here, so per-function
    metrics stay unweighted as in TRL.
    """
    if len(weights) != len(reward_funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_funcs)} reward functions")
    columns = []
    # The parsed parts of thinking-mode completions: <think>...</think> and the answer after it.
    parts = completion_parts(batch.texts)
    for fn in reward_funcs:
        name = getattr(fn, "__name__", repr(fn))
        try:
            values = fn(
                prompts=batch.prompt_texts, completions=batch.texts, **parts, **batch.columns
            )
        except Exception as error:
            raise RewardError(
                f"reward function {name} raised {type(error).__name__}: {error}"
            ) from error
        values = list(values)
        if len(values) != len(batch.texts):
            raise RewardError(
                f"reward function {name} returned {len(values)} values for {len(batch.texts)} "
                "completions"
            )
        column = []
        for i, value in enumerate(values):
            if value is None:
                column.append(math.nan)
                continue
            try:
                column.append(float(value))
            except (TypeError, ValueError):
                raise RewardError(
                    f"reward function {name} returned {value!r} for sample {i}; "
                    "expected a number or None"
                ) from None
        columns.append(column)
    return mx.array(columns, dtype=mx.float32).T.reshape(len(batch.texts), len(reward_funcs))


def combine(rewards: mx.array, weights: Sequence[float]) -> mx.array:
    """Weighted sum over functions, ignoring NaN (TRL's nansum). (N, F) -> (N,)."""
    weighted = rewards * mx.array(weights, dtype=mx.float32)[None, :]
    return mx.where(mx.isnan(weighted), 0.0, weighted).sum(axis=1)


def reward_metrics(
    rewards: mx.array, names: Sequence[str], weights: Sequence[float], group_size: int
) -> dict[str, float]:
    """TRL's reward metrics for an (N, F) score matrix (NaN = None).

    reward: mean of the weighted total; reward_std: mean over groups of the total's std;
    rewards/<fn>/mean and /std: per function, ignoring None; frac_reward_zero_std: fraction of
    groups whose completions all got the same total (no learning signal).
    """
    import numpy as np

    matrix = np.array(rewards, dtype=np.float64)
    total = np.array(combine(rewards, weights), dtype=np.float64)
    group_std = total.reshape(-1, group_size).std(axis=1, ddof=1)
    metrics = {
        "reward": float(total.mean()),
        "reward_std": float(group_std.mean()),
        "frac_reward_zero_std": float(np.isclose(group_std, 0.0).mean()),
    }
    for i, name in enumerate(names):
        column = matrix[:, i][~np.isnan(matrix[:, i])]
        metrics[f"rewards/{name}/mean"] = float(column.mean()) if column.size else math.nan
        metrics[f"rewards/{name}/std"] = float(column.std(ddof=1)) if column.size > 1 else 0.0
    return metrics
