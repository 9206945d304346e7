"""Per-token entropy of the policy and TRL's high-entropy token mask (`top_entropy_quantile`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def token_entropy(logits: mx.array) -> mx.array:
    """Entropy in nats of softmax(logits) at each position. (B, T, V) -> (B, T) float32."""
    logprobs = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    return -(mx.exp(logprobs) * logprobs).sum(axis=-1)


def high_entropy_mask(
    entropies: mx.array,
    mask: mx.array,
    quantile: float,
    *,
    pool: tuple[mx.array, mx.array] | None = None,
) -> mx.array:
    """Keep the `quantile` fraction of highest-entropy real tokens (TRL's top_entropy_quantile).

    entropies, mask: (B, T). The threshold is the (1 - quantile) quantile, with linear
    interpolation as torch.quantile, of the entropies where mask is 1; tokens at or above it are
    kept. quantile=1.0 keeps every real token; quantile=0.0 keeps only the maximum.
    `pool`: (entropies, mask) of any shape to take the quantile over instead, e.g. every
    process's micro-batch gathered (TRL pools all processes). Returns a (B, T) float32 mask (0 on
    padding); all 0 when the pool has no real token.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {quantile}")
    pool_entropies, pool_mask = pool if pool is not None else (entropies, mask)
    pool_real = pool_mask.reshape(-1) > 0
    count = pool_real.sum()
    # Padding sorts last (+inf) so the first `count` sorted values are the real tokens.
    ordered = mx.sort(mx.where(pool_real, pool_entropies.reshape(-1), mx.inf))
    position = (1.0 - quantile) * mx.maximum(count - 1, 0).astype(mx.float32)
    low = mx.floor(position).astype(mx.int32)
    high = mx.minimum(low + 1, mx.maximum(count - 1, 0)).astype(mx.int32)
    low_value, high_value = ordered[low], ordered[high]
    threshold = low_value + (position - low.astype(mx.float32)) * (high_value - low_value)
    kept = (mask > 0) & (entropies >= threshold) & (count > 0)
    return kept.astype(mx.float32)
