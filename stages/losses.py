"""TRL's GRPO loss: the clipped surrogate, the KL penalty, and each loss type's normaliser.

Formulas and names follow TRL's GRPOTrainer (`_compute_loss`): importance ratios (per token, or
one per completion for GSPO's sequence level) clipped to [1 - epsilon_low, 1 + epsilon_high],
an optional cap `delta` on the unclipped ratio, an optional k3 KL to a reference policy, and the
normalisation of `loss_type`. To add a loss type, add a row to LOSS_TYPES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

IS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossType:
    """How a loss type turns masked per-token losses into one number, and how a share of the
    batch is weighted so that shares add up to the whole batch's loss.

    normalise(per_token_loss, mask, max_completion_length, num_items_in_batch) -> scalar, where
    per_token_loss and mask are (B, T).
    micro_batch_weight(rows, step_rows, tokens, step_tokens): the factor that turns a
    micro-batch's loss into its share of the optimizer step's loss (gradient accumulation).
    sums_over_processes: the loss is a sum over the batch (its normaliser already counts every
    process's tokens), so averaging the processes' gradients must be undone (x world size);
    otherwise it is a mean over rows and every process holds the same number of rows.
    """

    normalise: Callable[..., mx.array]
    micro_batch_weight: Callable[[int, int, float, float], float]
    sums_over_processes: bool


def _token_count(mask: mx.array) -> mx.array:
    return mx.maximum(mask.sum(), 1.0)


def _sequence_mean(loss, mask, max_completion_length, num_items_in_batch):
    return ((loss * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)).mean()


def _token_mean(loss, mask, max_completion_length, num_items_in_batch):
    return (loss * mask).sum() / _token_count(mask)


def _per_max_length(loss, mask, max_completion_length, num_items_in_batch):
    length = max_completion_length or mask.shape[1]
    return (loss * mask).sum() / (mask.shape[0] * length)


def _per_batch_tokens(loss, mask, max_completion_length, num_items_in_batch):
    normaliser = num_items_in_batch if num_items_in_batch is not None else _token_count(mask)
    return (loss * mask).sum() / normaliser


def _by_rows(rows: int, step_rows: int, tokens: float, step_tokens: float) -> float:
    return rows / step_rows


def _by_tokens(rows: int, step_rows: int, tokens: float, step_tokens: float) -> float:
    # each micro-batch divides by its own token count
    return max(tokens, 1.0) / max(step_tokens, 1.0)


def _as_is(rows: int, step_rows: int, tokens: float, step_tokens: float) -> float:
    return 1.0


LOSS_TYPES: dict[str, LossType] = {
    # token mean per completion, then mean over completions
    "grpo": LossType(_sequence_mean, _by_rows, sums_over_processes=False),
    # token mean over the batch
    "bnpo": LossType(_token_mean, _by_tokens, sums_over_processes=True),
    # sum over completions / (completions x max_completion_length)
    "dr_grpo": LossType(_per_max_length, _by_rows, sums_over_processes=False),
    # sum / active tokens of the whole generation batch (num_items_in_batch)
    "dapo": LossType(_per_batch_tokens, _as_is, sums_over_processes=True),
}


def find_loss_type(name: str) -> LossType:
    """The LOSS_TYPES row for `name`; ValueError listing the valid ones otherwise."""
    if name not in LOSS_TYPES:
        raise ValueError(f"loss_type {name!r} is not one of {', '.join(LOSS_TYPES)}")
    return LOSS_TYPES[name]


def grpo_loss(
    logprobs: mx.array,
    old_logprobs: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logprobs: mx.array | None = None,
    delta: float | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    entropy_mask: mx.array | None = None,
) -> tuple[mx.array, dict]:
    """TRL's GRPO loss. logprobs/old/ref/mask/entropy_mask: (B, T) float32; advantages: (B,).

    Returns (scalar loss, metrics) with metrics "kl" (when beta > 0) and the clip ratios
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean" (fractions of real
    tokens). `num_items_in_batch` is dapo's normaliser (active tokens of the whole generation
    batch; defaults to this batch's); `max_completion_length` is dr_grpo's (defaults to T).
    """
    normalise = find_loss_type(loss_type).normalise
    log_ratio = logprobs - old_logprobs
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        per_sequence = (log_ratio * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)
        log_weights = per_sequence[:, None]
    else:
        raise ValueError(
            f"importance_sampling_level {importance_sampling_level!r} is not token or sequence"
        )
    ratio = mx.exp(log_weights)
    clipped_ratio = mx.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = mx.minimum(ratio, delta)
    adv = advantages[:, None]
    per_token_loss = -mx.minimum(ratio * adv, clipped_ratio * adv)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    metrics = {}
    token_count = _token_count(mask)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        diff = ref_logprobs - logprobs
        per_token_kl = mx.exp(diff) - diff - 1
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = (per_token_kl * mask).sum() / token_count

    loss = normalise(per_token_loss, mask, max_completion_length, num_items_in_batch)

    # TRL's masked_batch_mean: a token mean, or with sequence-level weights a plain mean over rows.
    def batch_mean(x):
        return x.mean() if x.shape[1] == 1 else (x * mask).sum() / token_count

    low = ((ratio < 1 - epsilon_low) & (adv < 0)).astype(mx.float32)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).astype(mx.float32)
    metrics["clip_ratio/low_mean"] = batch_mean(low)
    metrics["clip_ratio/high_mean"] = batch_mean(high)
    metrics["clip_ratio/region_mean"] = batch_mean(mx.maximum(low, high))
    return loss, metrics
