"""The policy's training forward pass, shared by the rollout and the update.

A RolloutBatch is packed as [prompt | completion | pad] rows with positions from 0; one forward
pass gives the hidden states, and only the positions that predict completion tokens go through
the vocabulary head. The log-probs are log_softmax(logits / temperature) of each completion
token, as TRL computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# float32 logits per chunk when recomputing log-probs outside the update (bounds memory)
LOGITS_BUDGET = 1 << 27


@dataclass
class PackedBatch:
    """Prompt + completion per row, right-padded, for the training forward pass."""

    tokens: mx.array  # (N, L) int32
    gather_index: mx.array  # (N, T) int32: position whose logits predict completion token t
    completion_ids: mx.array  # (N, T) int32
    completion_mask: mx.array  # (N, T) float32


def pack(batch) -> PackedBatch:
    """Pack a RolloutBatch as [prompt | completion | pad] rows with positions from 0.

    Right padding keeps every real token at its true position under a plain causal mask, so the
    training forward needs no attention mask and matches generation on the left-padded cache.
    """
    completion_ids = np.array(batch.completion_ids)
    lengths = np.array(batch.completion_mask).sum(axis=1).astype(np.int64)
    prompt_lengths = np.array([len(p) for p in batch.prompt_ids])
    width = int((prompt_lengths + lengths).max())
    n_rows, n_steps = completion_ids.shape
    tokens = np.zeros((n_rows, width), dtype=np.int32)
    for row, (prompt, n) in enumerate(zip(batch.prompt_ids, lengths)):
        tokens[row, : len(prompt)] = prompt
        tokens[row, len(prompt) : len(prompt) + n] = completion_ids[row, :n]
    gather = prompt_lengths[:, None] - 1 + np.arange(n_steps)[None, :]
    gather = np.minimum(gather, width - 1).astype(np.int32)
    return PackedBatch(
        mx.array(tokens), mx.array(gather), batch.completion_ids, batch.completion_mask
    )


def take_rows(packed: PackedBatch, rows) -> PackedBatch:
    """The packed rows `rows` (an index array or a slice)."""
    return PackedBatch(
        packed.tokens[rows],
        packed.gather_index[rows],
        packed.completion_ids[rows],
        packed.completion_mask[rows],
    )


def hidden_and_head(model: nn.Module):
    """(backbone, head) of an mlx-lm causal LM, so that only the positions that are needed go
    through the vocabulary head; (None, None) for a model without that structure."""
    backbone = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if backbone is None or args is None:
        return None, None
    if getattr(args, "tie_word_embeddings", False):
        return backbone, backbone.embed_tokens.as_linear
    head = getattr(model, "lm_head", None)
    return (backbone, head) if head is not None else (None, None)


def completion_logits(model: nn.Module, packed: PackedBatch, temperature: float = 1.0) -> mx.array:
    """Logits that predict each completion token: (N, T, V) float32, divided by temperature."""
    inputs = packed.tokens[:, :-1] if packed.tokens.shape[1] > 1 else packed.tokens
    index = mx.minimum(packed.gather_index, inputs.shape[1] - 1)
    backbone, head = hidden_and_head(model)
    if backbone is not None:
        hidden = backbone(inputs)
        picked = mx.take_along_axis(hidden, index[..., None], axis=1)
        logits = head(picked)
    else:
        logits = mx.take_along_axis(model(inputs), index[..., None], axis=1)
    return logits.astype(mx.float32) / temperature


def token_logprobs(logits: mx.array, token_ids: mx.array) -> mx.array:
    """log softmax(logits)[token]. (N, T, V), (N, T) -> (N, T)."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logprobs, token_ids[..., None], axis=-1)[..., 0]


def policy_logprobs(model: nn.Module, batch, temperature: float) -> mx.array:
    """(N, T) log p of each completion token of a RolloutBatch under the training forward pass,
    log_softmax(logits / temperature) with no processors or filters (TRL); 0 on padding.
    Evaluated in row chunks of at most LOGITS_BUDGET logits."""
    packed = pack(batch)
    n_rows, n_steps = packed.completion_ids.shape
    vocab = model.args.vocab_size if hasattr(model, "args") else 1 << 17
    per_chunk = max(1, LOGITS_BUDGET // max(1, n_steps * vocab))
    parts = []
    for start in range(0, n_rows, per_chunk):
        rows = take_rows(packed, slice(start, min(start + per_chunk, n_rows)))
        part = token_logprobs(completion_logits(model, rows, temperature), rows.completion_ids)
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts) * packed.completion_mask
