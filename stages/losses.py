"""TRL's GRPO loss: each loss type's per-token surrogate and normaliser, the KL penalty, and the
importance-sampling correction for a rollout engine that rounds differently from the trainer.

Formulas and names follow TRL 1.16's GRPOTrainer (`_compute_loss`,
`_generate_and_score_completions`): importance ratios (per token, or one per completion for GSPO's
sequence level), the surrogate of `loss_type`, the masks in TRL's order (high-entropy tokens, then
the sampler importance-sampling ratio), the k3 KL to a reference policy (times the ratio with
`use_bias_correction_kl`), and the normalisation of `loss_type`. To add a loss type, add a row to
LOSS_TYPES.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

IS_LEVELS = ("token", "sequence")
# TRL's vllm_importance_sampling_mode values: ratio per token or one per completion (exp of the
# summed log-ratio), and out-of-bounds ratios clipped (truncate) or zeroed (mask).
SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass(frozen=True)
class LossKnobs:
    """The loss-type settings grpo_loss passes to a surrogate (TRL's GRPOConfig names)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


@dataclass(frozen=True)
class LossType:
    """A loss type: its per-token surrogate, its normaliser, and how a share of the batch is
    weighted so that the shares of an optimizer step add up as TRL's do.

    surrogate(logprobs, log_ratio, ratio, advantages, mask, knobs, sampler_ratio) ->
    (per_token_loss, metrics): logprobs/log_ratio/mask are (B, T), ratio is (B, T) or (B, 1)
    (sequence level), advantages (B, 1); metrics are TRL's for that loss type (batch means).
    normalise(per_token_loss, mask, max_completion_length, num_items_in_batch) -> scalar.
    micro_batch_weight(rows, step_rows, chunks): the factor that turns a micro-batch's loss into
    its share of the optimizer step's loss (gradient accumulation; `chunks` micro-batches).
    sums_over_processes: the loss is a sum over the batch (its normaliser already counts every
    process's tokens), so averaging the processes' gradients must be undone (x world size);
    otherwise each process's loss is a mean over its own rows (TRL's DDP average).
    applies_sampler_ratio: the sampler importance-sampling ratio multiplies the per-token loss
    (vespo folds it into its weight instead, as TRL).
    """

    surrogate: Callable[..., tuple[mx.array, dict]]
    normalise: Callable[..., mx.array]
    micro_batch_weight: Callable[[int, int, int], float]
    sums_over_processes: bool
    applies_sampler_ratio: bool = True


def _token_count(mask: mx.array) -> mx.array:
    return mx.maximum(mask.sum(), 1.0)


def batch_mean(x: mx.array, mask: mx.array) -> mx.array:
    """TRL's global_masked_mean on one batch: a token mean of (B, T) values over `mask`, or a
    plain mean over rows of (B, 1) values (one per sequence)."""
    if x.shape[1] == 1:
        return x.mean()
    return (x * mask).sum() / _token_count(mask)


def _sequence_means(x: mx.array, mask: mx.array) -> mx.array:
    """TRL's masked_seq_mean: (B,) per-row means; NaN for a row with no real token."""
    if x.shape[1] == 1:
        return x[:, 0]
    return (x * mask).sum(-1) / mask.sum(-1)


def _nan_extreme(values: mx.array, largest: bool) -> mx.array:
    """TRL's nanmin / nanmax: NaN when every value is NaN."""
    fill = -mx.inf if largest else mx.inf
    finite = mx.where(mx.isnan(values), fill, values)
    extreme = finite.max() if largest else finite.min()
    return mx.where(mx.isnan(values).all(), mx.nan, extreme)


# -- per-token surrogates ----------------------------------------------------------------------


def _clipped(logprobs, log_ratio, ratio, adv, mask, knobs: LossKnobs, sampler_ratio):
    """PPO's clipped surrogate -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); `delta` caps the
    unclipped r (two-sided clipping). Metrics: TRL's clip_ratio/* (read after the delta cap)."""
    clipped = mx.clip(ratio, 1 - knobs.epsilon_low, 1 + knobs.epsilon_high)
    if knobs.delta is not None:
        ratio = mx.minimum(ratio, knobs.delta)
    per_token = -mx.minimum(ratio * adv, clipped * adv)
    low = ((ratio < 1 - knobs.epsilon_low) & (adv < 0)).astype(mx.float32)
    high = ((ratio > 1 + knobs.epsilon_high) & (adv > 0)).astype(mx.float32)
    metrics = {
        "clip_ratio/low_mean": batch_mean(low, mask),
        "clip_ratio/high_mean": batch_mean(high, mask),
        "clip_ratio/region_mean": batch_mean(mx.maximum(low, high), mask),
        "clip_ratio/low_min": _nan_extreme(_sequence_means(low, mask), largest=False),
        "clip_ratio/high_max": _nan_extreme(_sequence_means(high, mask), largest=True),
    }
    return per_token, metrics


def _cispo(logprobs, log_ratio, ratio, adv, mask, knobs: LossKnobs, sampler_ratio):
    """CISPO (MiniMax-M1): -stopgrad(min(r, epsilon_high)) A log p; epsilon_high is an absolute
    cap on the ratio (TRL recommends 5.0). Metric: cispo_clip_ratio."""
    weight = mx.stop_gradient(mx.minimum(ratio, knobs.epsilon_high))
    capped = ((ratio > knobs.epsilon_high) & (adv > 0)).astype(mx.float32)
    return -weight * adv * logprobs, {"cispo_clip_ratio": batch_mean(capped, mask)}


def _sapo(logprobs, log_ratio, ratio, adv, mask, knobs: LossKnobs, sampler_ratio):
    """SAPO: a soft gate in place of the clip, -(4 / tau) sigmoid(tau (r - 1)) A, with tau =
    sapo_temperature_pos where A > 0, else sapo_temperature_neg. No clip metrics (as TRL)."""
    tau = mx.where(adv > 0, knobs.sapo_temperature_pos, knobs.sapo_temperature_neg)
    return -(mx.sigmoid(tau * (ratio - 1)) * 4 / tau) * adv, {}


def vespo_weights(
    advantages: mx.array,
    log_ratio: mx.array,
    mask: mx.array,
    sampler_ratio: mx.array | None,
    knobs: LossKnobs,
) -> mx.array:
    """VESPO's gamma weight per sequence (TRL's get_gamma_weights), no gradient. (B, 1).

    phi(w) = exp(lambda) w^k exp(-lambda w), phi(1) = 1, where w is the product of the token
    ratios (their summed log, each clamped to [-20, 20], with the sampler ratio's log folded in)
    clamped to [1e-8, e^20]; (k, lambda) are the _pos values where A >= 0, else the _neg ones.
    """
    lower = math.log(1e-8)
    log_w = (mx.clip(mx.stop_gradient(log_ratio), -20.0, 20.0) * mask).sum(-1, keepdims=True)
    if sampler_ratio is not None:
        log_w = log_w + mx.clip(mx.log(sampler_ratio), lower, 20.0).sum(-1, keepdims=True)
    log_w = mx.clip(log_w, lower, 20.0)
    nonnegative = advantages >= 0
    k = mx.where(nonnegative, knobs.vespo_k_pos, knobs.vespo_k_neg)
    lam = mx.maximum(mx.where(nonnegative, knobs.vespo_lambda_pos, knobs.vespo_lambda_neg), 1e-4)
    phi = mx.exp(lam + k * log_w - lam * mx.exp(log_w))
    return mx.stop_gradient(mx.where(mx.isfinite(phi), phi, 0.0))


def _vespo(logprobs, log_ratio, ratio, adv, mask, knobs: LossKnobs, sampler_ratio):
    """VESPO: -stopgrad(phi) A log p with phi the sequence's gamma weight. Metric:
    vespo/phi_seq_mean."""
    phi = vespo_weights(adv, log_ratio, mask, sampler_ratio, knobs)
    return -phi * adv * logprobs, {"vespo/phi_seq_mean": phi.mean()}


# -- normalisers and micro-batch weights -------------------------------------------------------


def _sequence_mean(loss, mask, max_completion_length, num_items_in_batch):
    return ((loss * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)).mean()


def _token_mean(loss, mask, max_completion_length, num_items_in_batch):
    return (loss * mask).sum() / _token_count(mask)


def _per_max_length(loss, mask, max_completion_length, num_items_in_batch):
    length = max_completion_length or mask.shape[1]
    return (loss * mask).sum() / (mask.shape[0] * length)


def _per_step_tokens(loss, mask, max_completion_length, num_items_in_batch):
    normaliser = num_items_in_batch if num_items_in_batch is not None else _token_count(mask)
    return (loss * mask).sum() / normaliser


def _length_weighted(loss, mask, max_completion_length, num_items_in_batch):
    # each sequence's summed loss, mean over sequences: longer sequences weigh more
    return (loss * mask).sum(-1).mean()


def _by_rows(rows: int, step_rows: int, chunks: int) -> float:
    return rows / step_rows


def _by_chunks(rows: int, step_rows: int, chunks: int) -> float:
    # TRL's bnpo: each micro-batch is its own token mean, divided by the accumulation steps
    return 1.0 / chunks


def _as_is(rows: int, step_rows: int, chunks: int) -> float:
    return 1.0


LOSS_TYPES: dict[str, LossType] = {
    # token mean per completion, then mean over completions
    "grpo": LossType(_clipped, _sequence_mean, _by_rows, sums_over_processes=False),
    # token mean over the micro-batch (TRL: over each process's micro-batch, then averaged)
    "bnpo": LossType(_clipped, _token_mean, _by_chunks, sums_over_processes=False),
    # sum over completions / (completions x max_completion_length)
    "dr_grpo": LossType(_clipped, _per_max_length, _by_rows, sums_over_processes=False),
    # sum / (active tokens of the generation batch / its optimizer steps)
    "dapo": LossType(_clipped, _per_step_tokens, _as_is, sums_over_processes=True),
    # CISPO's capped, detached ratio times A log p; normalised as dapo
    "cispo": LossType(_cispo, _per_step_tokens, _as_is, sums_over_processes=True),
    # SAPO's soft gate; normalised as grpo
    "sapo": LossType(_sapo, _sequence_mean, _by_rows, sums_over_processes=False),
    # LUSPO: each sequence's summed loss, mean over sequences (meant for sequence-level ratios)
    "luspo": LossType(_clipped, _length_weighted, _by_rows, sums_over_processes=False),
    # VESPO's gamma weight times A log p; normalised as dapo; folds in the sampler ratio
    "vespo": LossType(
        _vespo, _per_step_tokens, _as_is, sums_over_processes=True, applies_sampler_ratio=False
    ),
}


def find_loss_type(name: str) -> LossType:
    """The LOSS_TYPES row for `name`; ValueError listing the valid ones otherwise."""
    if name not in LOSS_TYPES:
        raise ValueError(f"loss_type {name!r} is not one of {', '.join(LOSS_TYPES)}")
    return LOSS_TYPES[name]


# grpo_loss metrics that are extremes over sequences (reduced with min / max, not averaged)
EXTREME_METRICS = {"clip_ratio/low_min": "min", "clip_ratio/high_max": "max"}


def metric_count(name: str, mask: mx.array, importance_sampling_level: str) -> float:
    """What a grpo_loss mean metric averages over, so that micro-batches and processes combine
    as TRL's global_masked_mean: rows for values that are one per sequence (sequence-level
    clip ratios, vespo/phi_seq_mean), real tokens otherwise."""
    per_sequence = name == "vespo/phi_seq_mean" or (
        importance_sampling_level == "sequence" and name.startswith(("clip_ratio/", "cispo_"))
    )
    return float(mask.shape[0]) if per_sequence else float(mask.sum().item())


def grpo_loss(
    logprobs: mx.array,
    old_logprobs: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float | None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logprobs: mx.array | None = None,
    delta: float | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    entropy_mask: mx.array | None = None,
    sampler_ratio: mx.array | None = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> tuple[mx.array, dict]:
    """TRL's GRPO loss. logprobs/old/ref/mask/entropy_mask: (B, T) float32; advantages: (B,).

    `epsilon_high=None` is epsilon_low (TRL); for cispo it is the absolute cap on the ratio.
    `num_items_in_batch`: the normaliser of dapo, cispo and vespo, the real tokens of the whole
    generation batch divided by its optimizer steps (TRL's rescaled num_items_in_batch);
    defaults to this batch's tokens. `max_completion_length` is dr_grpo's (defaults to T).
    `sampler_ratio`: the importance-sampling ratio between the training forward and the rollout
    engine ((B, T) or (B, 1), from `sampler_importance_ratio`), a constant that multiplies the
    surrogate (vespo: folded into its weight). `use_bias_correction_kl`: the k3 KL is multiplied
    by the (differentiable) ratio, as TRL's default.

    Returns (scalar loss, metrics): "kl" (when beta > 0), and per loss type TRL's
    "clip_ratio/low_mean", "high_mean", "region_mean" (token fractions; row fractions for
    sequence-level ratios) with "clip_ratio/low_min", "high_max" (min / max over sequences of
    each one's clipped fraction) for grpo, bnpo, dr_grpo, dapo, luspo; "cispo_clip_ratio";
    "vespo/phi_seq_mean".
    """
    rule = find_loss_type(loss_type)
    knobs = LossKnobs(
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_low if epsilon_high is None else epsilon_high,
        delta=delta,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
    )
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
    adv = advantages[:, None]
    per_token_loss, metrics = rule.surrogate(
        logprobs, log_ratio, ratio, adv, mask, knobs, sampler_ratio
    )
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if sampler_ratio is not None and rule.applies_sampler_ratio:
        per_token_loss = per_token_loss * sampler_ratio
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        diff = ref_logprobs - logprobs
        per_token_kl = mx.exp(diff) - diff - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = batch_mean(per_token_kl, mask)
    loss = rule.normalise(per_token_loss, mask, max_completion_length, num_items_in_batch)
    return loss, metrics


def sampler_importance_ratio(
    old_logprobs: mx.array,
    sampler_logprobs: mx.array,
    mask: mx.array,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[mx.array, dict[str, mx.array]]:
    """TRL's vLLM importance-sampling correction, for any rollout engine whose log-probs may
    differ from the training forward's: (ratio, metrics).

    old_logprobs: the training forward's log-probs of the batch at generation time;
    sampler_logprobs: the rollout engine's (NaN where it gave none: ratio 1 there); mask: (B, T).
    Token modes give a (B, T) ratio exp(old - sampler); sequence modes one per completion, exp of
    the summed difference. *_truncate clips the ratio to [clip_min, clip_max]; *_mask sets ratios
    outside it to 0 (None: no bound on that side).

    Metrics (TRL's names): sampling/sampling_logp_difference/mean and /max of |old - sampler|
    over real tokens; sampling/importance_sampling_ratio/min, /mean, /max after clipping or
    masking (over real tokens, or over rows for sequence modes). 0 where there is nothing.
    """
    if mode not in SAMPLER_IS_MODES:
        raise ValueError(f"importance sampling mode {mode!r} is not one of {SAMPLER_IS_MODES}")
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"importance sampling mode {mode} needs clip_min or clip_max")
    difference = (old_logprobs - sampler_logprobs) * mask
    difference = mx.where(mx.isnan(difference), 0.0, difference)
    per_sequence = mode.startswith("sequence")
    ratio = mx.exp(difference.sum(-1, keepdims=True) if per_sequence else difference)
    low = -mx.inf if clip_min is None else clip_min
    high = mx.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        ratio = mx.clip(ratio, low, high)
    else:
        ratio = mx.where((ratio < low) | (ratio > high), 0.0, ratio)

    real = (mask > 0) & ~mx.isnan(sampler_logprobs)
    gap = mx.abs(old_logprobs - sampler_logprobs)
    n_gap = real.sum()
    considered = mx.ones(ratio.shape, dtype=mx.bool_) if per_sequence else mask > 0
    n_ratio = considered.sum()

    def guarded(value):
        return mx.where(n_ratio > 0, value, 0.0)

    metrics = {
        "sampling/sampling_logp_difference/mean": mx.where(
            n_gap > 0, mx.where(real, gap, 0.0).sum() / mx.maximum(n_gap, 1), 0.0
        ),
        "sampling/sampling_logp_difference/max": mx.where(
            n_gap > 0, mx.where(real, gap, -mx.inf).max(), 0.0
        ),
        "sampling/importance_sampling_ratio/min": guarded(
            mx.where(considered, ratio, mx.inf).min()
        ),
        "sampling/importance_sampling_ratio/mean": guarded(
            mx.where(considered, ratio, 0.0).sum() / mx.maximum(n_ratio, 1)
        ),
        "sampling/importance_sampling_ratio/max": guarded(
            mx.where(considered, ratio, -mx.inf).max()
        ),
    }
    return mx.stop_gradient(ratio), metrics
