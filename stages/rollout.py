"""Rollout: `group_size` sampled completions per prompt on mlx-lm's BatchKVCache.

Prompts of different lengths are left-padded into one batch and prefilled once; the prefilled
KV state is then repeated `group_size` times, so each group shares its prompt's prefix compute.
Sampling filters are mlx-lm's (`apply_top_k`, `apply_top_p`, `apply_min_p`); the per-token
logprobs returned are those of the distribution actually sampled from (after the filters and
the temperature).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass
class RolloutConfig:
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0  # 0 disables
    seed: int = 0

    def validate(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")


@dataclass
class RolloutBatch:
    """N = len(prompts) * group_size rows; row r belongs to prompt r // group_size."""

    prompt_ids: list[list[int]]  # N prompts as token ids (unpadded)
    completion_ids: mx.array  # (N, T) int32, pad after the end
    completion_mask: mx.array  # (N, T) float32, 1 on generated tokens incl. the EOS
    logprobs: mx.array  # (N, T) float32, log p of each sampled token, 0 on padding
    finish_reasons: list[str]  # "stop" (EOS) or "length" (max_new_tokens)
    prompt_texts: list[str]
    texts: list[str]  # completions decoded without the EOS
    group_size: int
    columns: dict[str, list] = field(default_factory=dict)  # dataset columns, one value per row

    @property
    def num_rows(self) -> int:
        return len(self.prompt_ids)

    def with_columns(self, rows: list[dict]) -> RolloutBatch:
        """Attach dataset columns (one dict per prompt) repeated over each group."""
        names = [name for name in rows[0] if name != "prompt"] if rows else []
        self.columns = {
            name: [row[name] for row in rows for _ in range(self.group_size)] for name in names
        }
        return self


def _filter_logprobs(logprobs: mx.array, cfg: RolloutConfig) -> mx.array:
    """mlx-lm's filters, in mlx-lm's order; removed tokens get -inf."""
    if 0 < cfg.top_p < 1:
        logprobs = apply_top_p(logprobs, cfg.top_p)
    if cfg.min_p > 0:
        logprobs = apply_min_p(logprobs, cfg.min_p)
    if cfg.top_k > 0 and cfg.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, cfg.top_k)
    return logprobs


def sample_next(logits: mx.array, cfg: RolloutConfig, key: mx.array) -> tuple[mx.array, mx.array]:
    """Sample one token per row. logits: (N, V). Returns (tokens (N,), logprobs (N,)).

    The logprob is under the distribution sampled from: log_softmax(filtered / temperature).
    Greedy (temperature 0) reports the model's own log_softmax at temperature 1.
    """
    logprobs = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    if cfg.temperature == 0:
        tokens = mx.argmax(logprobs, axis=-1)
        return tokens, mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    scaled = _filter_logprobs(logprobs, cfg) / cfg.temperature
    tokens = mx.random.categorical(scaled, key=key)
    sampled = nn.log_softmax(scaled, axis=-1)
    return tokens, mx.take_along_axis(sampled, tokens[:, None], axis=-1)[:, 0]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[mx.array, list[int]]:
    """(P, L) int32 tokens with each prompt right-aligned, and the padding of each row."""
    width = max(len(p) for p in prompts)
    padding = [width - len(p) for p in prompts]
    tokens = [[pad_id] * n + p for n, p in zip(padding, prompts)]
    return mx.array(tokens, dtype=mx.int32), padding


def _repeat_rows(caches: list[BatchKVCache], times: int) -> None:
    """Repeat every row of each cache `times` times (row r -> rows r*times .. r*times+times-1)."""
    for cache in caches:
        keys, values, offset, left_padding, idx = cache.state
        cache.state = (
            mx.repeat(keys, times, axis=0),
            mx.repeat(values, times, axis=0),
            mx.repeat(offset, times, axis=0),
            mx.repeat(left_padding, times, axis=0),
            idx,
        )


def generate_rollouts(
    model: nn.Module, tokenizer, prompts: list[list[int]], cfg: RolloutConfig
) -> RolloutBatch:
    """`cfg.group_size` completions for each prompt (token ids), batched on BatchKVCache."""
    cfg.validate()
    if not prompts:
        raise ValueError("generate_rollouts needs at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty} are empty (no tokens)")
    eos_ids = sorted(tokenizer.eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    group = cfg.group_size

    tokens, padding = left_pad(prompts, pad_id)
    caches = [BatchKVCache(padding) for _ in model.layers]
    logits = model(tokens, cache=caches)[:, -1, :]
    _repeat_rows(caches, group)
    logits = mx.repeat(logits, group, axis=0)

    n_rows = len(prompts) * group
    eos = mx.array(eos_ids, dtype=mx.int32)
    finished = mx.zeros((n_rows,), dtype=mx.bool_)
    step_keys = mx.random.split(mx.random.key(cfg.seed), cfg.max_new_tokens)
    token_steps, logprob_steps, live_steps = [], [], []
    for step in range(cfg.max_new_tokens):
        token, logprob = sample_next(logits, cfg, step_keys[step])
        live = mx.logical_not(finished)
        token = mx.where(live, token, pad_id).astype(mx.int32)
        token_steps.append(token)
        logprob_steps.append(mx.where(live, logprob, 0.0))
        live_steps.append(live)
        finished = finished | (live & (token[:, None] == eos[None]).any(axis=-1))
        if step + 1 == cfg.max_new_tokens:
            break
        logits = model(token[:, None], cache=caches)[:, -1, :]
        mx.eval(logits, finished)
        if finished.all().item():
            break

    completion_ids = mx.stack(token_steps, axis=1)
    completion_mask = mx.stack(live_steps, axis=1).astype(mx.float32)
    logprobs = mx.stack(logprob_steps, axis=1).astype(mx.float32)
    mx.eval(completion_ids, completion_mask, logprobs, finished)

    ended = finished.tolist()
    texts, rows_ids = [], completion_ids.tolist()
    lengths = completion_mask.sum(axis=1).astype(mx.int32).tolist()
    for row, n, stopped in zip(rows_ids, lengths, ended):
        texts.append(tokenizer.decode(row[: n - 1] if stopped else row[:n]))
    prompt_ids = [p for p in prompts for _ in range(group)]
    prompt_texts = [tokenizer.decode(p) for p in prompts]
    return RolloutBatch(
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=logprobs,
        finish_reasons=["stop" if s else "length" for s in ended],
        prompt_texts=[t for t in prompt_texts for _ in range(group)],
        texts=texts,
        group_size=group,
    )


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """TRL's completion metrics: lengths in tokens, and the fraction cut at max_new_tokens."""
    lengths = batch.completion_mask.sum(axis=1)
    stopped = mx.array([reason == "stop" for reason in batch.finish_reasons])
    n_stopped = stopped.sum().item()
    metrics = {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - n_stopped / batch.num_rows,
        "completions/mean_terminated_length": (
            (lengths * stopped).sum().item() / n_stopped if n_stopped else 0.0
        ),
    }
    return metrics
