"""Rollout: `group_size` sampled completions per prompt on mlx-lm's batch KV caches.

Prompts of different lengths are left-padded into one batch and prefilled once (only the last
position goes through the vocabulary head); the prefilled KV rows are then repeated
`group_size` times with the cache's own `filter`, so each group shares its prompt's prefill.

Decoding is pipelined as in mlx-lm's `generate_step`: step t+1 is queued with `mx.async_eval`
before the host reads step t's tokens, so the device never waits for Python. Rows that finish
(EOS, a stop string, `max_new_tokens` or the model's context) are dropped from the caches with
`BatchKVCache.filter` once enough of them have piled up, so they stop costing compute.

Sampling is vectorised over the batch with mlx-lm's pieces: its logits processors
(repetition, presence and frequency penalties, made batched with `mx.vmap` over per-row token
histories), its filters (`apply_top_p`, `apply_min_p`, `apply_xtc` with a per-row coin,
`apply_top_k`, in `make_sampler`'s order), then temperature. The per-token logprobs returned
are those of the distribution actually sampled from, or (`logprobs_source="policy"`) those of
the training forward pass at the same temperature, as TRL computes them.

The model runs behind an engine (`make_engine`, `cfg.engine`): `MlxLmEngine` (mlx-lm's model
on the batch caches above, the reference) or `fused_decode.FusedDecoder` (fused projection
weights, a pre-allocated cache; the same tokens and logprobs). Both prefill, filter rows and
decode one step; everything else here is the same for both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from stages import distributed, fast_kernels, fused_decode
from stages.policy import hidden_and_head, policy_logprobs
from stages.settings import check, one_of, setting

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    apply_xtc,
    make_logits_processors,
)

LOGPROBS_SOURCES = ("sampler", "policy")
ENGINES = ("auto", "mlx_lm", "fused")
PREFILL_STEP = 2048  # prompt tokens per prefill forward (bounds activation memory)


@dataclass
class RolloutConfig:
    """`rollout.*`: how completions are generated and sampled."""

    group_size: int = setting(8, "completions per prompt (GRPO's G); >= 2")
    max_new_tokens: int = setting(4, "completion length limit, in tokens")
    temperature: float = setting(1.0, "0 = greedy")
    top_p: float = setting(1.0, "nucleus sampling, in (0, 1]; 1 disables")
    top_k: int = setting(0, "0 disables")
    min_p: float = setting(0.0, "0 disables")
    repetition_penalty: float = setting(
        1.0, "> 0; 1 disables; divides positive logits, multiplies negative ones"
    )
    repetition_context_size: int = setting(
        20, "last N tokens (prompt + completion) the repetition penalty sees"
    )
    presence_penalty: float = setting(
        0.0, "subtracted once from each token seen in the window; 0 disables"
    )
    presence_context_size: int = setting(20, "last N tokens the presence penalty sees")
    frequency_penalty: float = setting(0.0, "subtracted per occurrence in the window; 0 disables")
    frequency_context_size: int = setting(20, "last N tokens the frequency penalty sees")
    xtc_probability: float = setting(
        0.0, "XTC: per row and token, chance to drop the top choices; 0 disables"
    )
    xtc_threshold: float = setting(
        0.1, "XTC drops all tokens above this probability but the least likely"
    )
    stop_strings: list[str] = setting(
        factory=list, help="finish a completion at any of these (text cut before it)"
    )
    max_kv_size: int = setting(0, "0: full KV cache; N: rotating cache of the last N positions")
    logprobs_source: str = setting(
        "sampler",
        "sampler: logprobs of the distribution sampled from; policy: recomputed by the "
        "training forward (logits / temperature, TRL)",
    )
    engine: str = setting(
        "auto",
        "decode engine: fused (stages/fused_decode.py: fused projection weights, pre-allocated "
        "cache; the same tokens and logprobs as mlx_lm), mlx_lm (mlx-lm's model and batch "
        "caches), auto (fused where it supports the model and max_kv_size is 0, else mlx_lm)",
    )
    fused_compile: bool | None = setting(
        None,
        "mx.compile the fused engine's one-token block steps: a one-time trace and kernel "
        "build in the first rollout of a process (41 s on an H200), about 3% off a GPU step "
        "after; null: on exactly when fast_kernels (whose kernel pays only compiled)",
    )
    fast_kernels: bool = setting(
        False,
        "CUDA only: the fused engine's one-token matmuls through a hand-written kernel "
        "(stages/fast_kernels.py) that rounds differently from the trainer; turns on "
        "train.vllm_importance_sampling_correction unless that is set",
    )
    tools: list[str] = setting(
        factory=list,
        help="tools the model may call (TRL's tools): built-ins (calculator, python_eval, add) or "
        "import paths pkg.module.fn; their JSON schemas go to the chat template",
    )
    max_tool_calling_iterations: int | None = setting(
        None, "tool rounds per completion (TRL's); null: as many as the token budget allows"
    )
    max_completion_length: int | None = setting(
        None,
        "with tools or an environment: tokens per completion after the prompt, generated and "
        "tool results together (TRL's max_completion_length); null: max_new_tokens",
    )
    tool_timeout: float = setting(10.0, "seconds a tool call may run; then its result is an error")
    tool_max_output_chars: int = setting(
        2000, "a tool result longer than this is cut (and counted in tools/truncated_outputs)"
    )
    environment_factory: str | None = setting(
        None,
        "import path of a class making one environment per completion (TRL's): reset(**row) "
        "opens the episode, its public methods are tools, get_reward() is a reward",
    )
    rollout_func: str | None = setting(
        None,
        "import path of a custom rollout function(prompts, trainer) -> dict of prompt_ids, "
        "completion_ids, logprobs (TRL's rollout_func); replaces generation",
    )

    @property
    def compiles_fused(self) -> bool:
        """fused_compile resolved: null is on exactly when fast_kernels."""
        return self.fast_kernels if self.fused_compile is None else self.fused_compile

    def validate(self) -> None:
        check(self.group_size >= 1, "group_size", self.group_size, ">= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        check(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        check(self.top_k >= 0, "top_k", self.top_k, ">= 0 (0 disables)")
        check(0 <= self.min_p < 1, "min_p", self.min_p, "in [0, 1)")
        check(
            self.repetition_penalty > 0,
            "repetition_penalty",
            self.repetition_penalty,
            "> 0 (1 disables)",
        )
        for key in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
            check(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        check(0 <= self.xtc_probability <= 1, "xtc_probability", self.xtc_probability, "in [0, 1]")
        check(0 <= self.xtc_threshold <= 0.5, "xtc_threshold", self.xtc_threshold, "in [0, 0.5]")
        check(all(self.stop_strings), "stop_strings", self.stop_strings, "non-empty strings")
        check(self.max_kv_size >= 0, "max_kv_size", self.max_kv_size, ">= 0 (0 = unbounded)")
        one_of("logprobs_source", self.logprobs_source, LOGPROBS_SOURCES)
        one_of("engine", self.engine, ENGINES)
        check(
            not (self.engine == "fused" and self.max_kv_size),
            "engine",
            self.engine,
            "auto or mlx_lm when max_kv_size > 0 (the fused engine has no rotating cache)",
        )
        check(
            self.max_tool_calling_iterations is None or self.max_tool_calling_iterations >= 0,
            "max_tool_calling_iterations",
            self.max_tool_calling_iterations,
            "null or >= 0",
        )
        check(
            self.max_completion_length is None or self.max_completion_length >= self.max_new_tokens,
            "max_completion_length",
            self.max_completion_length,
            f"null or >= max_new_tokens ({self.max_new_tokens})",
        )
        check(self.tool_timeout > 0, "tool_timeout", self.tool_timeout, "> 0 seconds")
        check(
            self.tool_max_output_chars >= 1,
            "tool_max_output_chars",
            self.tool_max_output_chars,
            ">= 1",
        )
        check(all(self.tools), "tools", self.tools, "non-empty names or import paths")
        check(
            not self.rollout_func or not (self.tools or self.environment_factory),
            "rollout_func",
            self.rollout_func,
            "null when rollout.tools or rollout.environment_factory is set (a custom rollout "
            "runs its own turns)",
        )
        check(
            not (self.fast_kernels and self.engine == "mlx_lm"),
            "fast_kernels",
            self.fast_kernels,
            "false with engine=mlx_lm (the fast kernels are the fused engine's)",
        )
        if self.fast_kernels and (reason := fast_kernels.unavailable()) is not None:
            check(False, "fast_kernels", self.fast_kernels, f"false here: {reason}")

    @property
    def multi_turn(self) -> bool:
        """Completions of several turns: tools or an environment (stages/multiturn.py)."""
        return bool(self.tools or self.environment_factory)

    @property
    def completion_budget(self) -> int:
        """Tokens per completion after the prompt (TRL's max_completion_length): generated and
        tool-result tokens of a multi-turn completion, generated tokens otherwise."""
        if self.multi_turn and self.max_completion_length is not None:
            return self.max_completion_length
        return self.max_new_tokens


def step_seed(run_seed: int, step: int, purpose: str = "train", round_index: int = 0) -> int:
    """The seed of one step's sampling (and update shuffle) from `run.seed`: every step, and
    evaluation after a step, draws from its own stream; so does each extra generation round of
    a step (dynamic sampling, `round_index` >= 1)."""
    if round_index:
        return int(np.random.SeedSequence([run_seed, step, round_index]).generate_state(1)[0])
    offset = {"train": 0, "eval": 999_983}[purpose]
    return run_seed * 1_000_003 + offset + step


@dataclass
class RolloutBatch:
    """N = len(prompts) * group_size rows; row r belongs to prompt r // group_size.

    A completion is everything after the prompt. Single-turn, that is the generated tokens; a
    multi-turn completion (stages/multiturn.py) also holds tool results and the chat template's
    tokens around them (context the model reads, not policy output). `completion_mask` covers
    the whole completion (what the training forward reads); `tool_mask` (TRL's) is 1 on the
    model's own tokens and 0 on the others; `generated_mask`, their product, is what the loss,
    the log-probs and every normaliser count.
    """

    prompt_ids: list[list[int]]  # N prompts as token ids (unpadded)
    completion_ids: mx.array  # (N, T) int32, pad after the end
    completion_mask: mx.array  # (N, T) float32, 1 on every completion token incl. the EOS
    logprobs: mx.array  # (N, T) float32, log p of each sampled token, 0 elsewhere
    finish_reasons: list[str]  # "stop" (EOS or a stop string) or "length"
    prompt_texts: list[str]
    texts: list[str]  # completions decoded without the EOS, cut before a stop string
    group_size: int
    columns: dict[str, list] = field(default_factory=dict)  # dataset columns, one value per row
    temperature: float = 1.0  # the sampling temperature (0: greedy); the update divides by it
    engine: str = ""  # the decode engine that generated it: mlx_lm | fused
    engine_bytes: int = 0  # memory that engine added to the model's (fused weight copies)
    # Multi-turn only (None otherwise):
    tool_mask: mx.array | None = None  # (N, T) float32, 1 on generated tokens, 0 on tool tokens
    prompt_messages: list | None = None  # N prompts as chat messages (what rewards get)
    conversations: list | None = None  # N message lists after the prompt (assistant, tool, ...)
    environments: list | None = None  # N environment objects (rollout.environment_factory)
    tool_counts: dict[str, list[int]] | None = None  # per row: calls, turns, failures/<kind>, ...

    @property
    def num_rows(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated_mask(self) -> mx.array:
        """(N, T) float32: 1 on the tokens the model generated (TRL's completion_mask *
        tool_mask), the only tokens with a loss; equal to completion_mask single-turn."""
        if self.tool_mask is None:
            return self.completion_mask
        return self.completion_mask * self.tool_mask

    def with_columns(self, rows: list[dict]) -> RolloutBatch:
        """Attach dataset columns (one dict per prompt) repeated over each group."""
        names = [name for name in rows[0] if name != "prompt"] if rows else []
        self.columns = {
            name: [row[name] for row in rows for _ in range(self.group_size)] for name in names
        }
        return self


def _pick(values: list | None, rows: list[int]) -> list | None:
    return None if values is None else [values[r] for r in rows]


def _joined(lists: list) -> list | None:
    return None if any(v is None for v in lists) else [x for v in lists for x in v]


def select_rows(batch: RolloutBatch, rows) -> RolloutBatch:
    """The rows `rows` (whole groups, in order) of a batch; dataset columns are kept."""
    rows = [int(r) for r in rows]
    index = mx.array(rows, dtype=mx.int32)
    counts = batch.tool_counts
    return RolloutBatch(
        prompt_ids=[batch.prompt_ids[r] for r in rows],
        completion_ids=batch.completion_ids[index],
        completion_mask=batch.completion_mask[index],
        logprobs=batch.logprobs[index],
        finish_reasons=[batch.finish_reasons[r] for r in rows],
        prompt_texts=[batch.prompt_texts[r] for r in rows],
        texts=[batch.texts[r] for r in rows],
        group_size=batch.group_size,
        columns={k: [v[r] for r in rows] for k, v in batch.columns.items()},
        temperature=batch.temperature,
        tool_mask=None if batch.tool_mask is None else batch.tool_mask[index],
        prompt_messages=_pick(batch.prompt_messages, rows),
        conversations=_pick(batch.conversations, rows),
        environments=_pick(batch.environments, rows),
        tool_counts=None if counts is None else {k: _pick(v, rows) for k, v in counts.items()},
    )


def concatenate(batches: list[RolloutBatch]) -> RolloutBatch:
    """The rows of `batches` one after another (same group size, temperature, width)."""
    first = batches[0]
    columns = {k: [x for b in batches for x in b.columns.get(k, [])] for k in first.columns}
    counts = None
    if all(b.tool_counts is not None for b in batches):
        counts = {k: [x for b in batches for x in b.tool_counts[k]] for k in first.tool_counts}
    tool_masks = [b.tool_mask for b in batches]
    return RolloutBatch(
        prompt_ids=[p for b in batches for p in b.prompt_ids],
        completion_ids=mx.concatenate([b.completion_ids for b in batches]),
        completion_mask=mx.concatenate([b.completion_mask for b in batches]),
        logprobs=mx.concatenate([b.logprobs for b in batches]),
        finish_reasons=[r for b in batches for r in b.finish_reasons],
        prompt_texts=[t for b in batches for t in b.prompt_texts],
        texts=[t for b in batches for t in b.texts],
        group_size=first.group_size,
        columns=columns,
        temperature=first.temperature,
        tool_mask=None if any(m is None for m in tool_masks) else mx.concatenate(tool_masks),
        prompt_messages=_joined([b.prompt_messages for b in batches]),
        conversations=_joined([b.conversations for b in batches]),
        environments=_joined([b.environments for b in batches]),
        tool_counts=counts,
    )


def _gather_ragged(rows: list, world) -> list:
    """Every rank's list of int lists (or str), concatenated in rank order."""
    as_text = bool(rows) and isinstance(rows[0], str)
    encoded = [list(r.encode()) if as_text else list(r) for r in rows]
    width = max([len(r) for r in encoded] + [1])
    width = int(distributed.all_extreme(mx.array(width), world, largest=True).item())
    padded = np.zeros((len(encoded), width), dtype=np.int32)
    lengths = np.array([len(r) for r in encoded], dtype=np.int32)
    for i, r in enumerate(encoded):
        padded[i, : len(r)] = r
    every = np.array(distributed.all_gather(mx.array(padded), world))
    every_lengths = np.array(distributed.all_gather(mx.array(lengths), world))
    out = [every[i, : every_lengths[i]].tolist() for i in range(len(every))]
    return [bytes(r).decode() for r in out] if as_text else out


def all_gather_batch(batch: RolloutBatch, world) -> RolloutBatch:
    """Every rank's rows of a data-parallel generation round, in rank order, on every rank
    (dynamic sampling keeps groups that other ranks generated). Dataset columns and
    environment objects are not gathered (they are only the reward functions')."""
    if world.size == 1:
        return batch
    reasons = mx.array([r == "length" for r in batch.finish_reasons], dtype=mx.int32)

    def json_lists(values: list | None) -> list | None:
        if values is None:
            return None
        return [json.loads(t) for t in _gather_ragged([json.dumps(v) for v in values], world)]

    counts = batch.tool_counts
    if counts is not None:
        names = sorted(counts)
        table = mx.array([counts[k] for k in names], dtype=mx.int32).T  # (N, kinds)
        table = np.array(distributed.all_gather(table, world))
        counts = {k: table[:, i].tolist() for i, k in enumerate(names)}
    return RolloutBatch(
        prompt_ids=_gather_ragged(batch.prompt_ids, world),
        completion_ids=distributed.all_gather(batch.completion_ids, world),
        completion_mask=distributed.all_gather(batch.completion_mask, world),
        logprobs=distributed.all_gather(batch.logprobs, world),
        finish_reasons=[
            "length" if r else "stop" for r in distributed.all_gather(reasons, world).tolist()
        ],
        prompt_texts=_gather_ragged(batch.prompt_texts, world),
        texts=_gather_ragged(batch.texts, world),
        group_size=batch.group_size,
        temperature=batch.temperature,
        tool_mask=(
            None if batch.tool_mask is None else distributed.all_gather(batch.tool_mask, world)
        ),
        prompt_messages=json_lists(batch.prompt_messages),
        conversations=json_lists(batch.conversations),
        tool_counts=counts,
    )


class Sampler:
    """One vectorised sampling step: processors, filters, temperature, categorical draw.

    `__call__(logits (n, V), history (n, C) | None, keys (n, 2)) -> (tokens (n,), logprobs (n,))`.
    Each row draws with its own key, so a row's sample depends only on its logits and key, never
    on which other rows share the batch (finished rows can be dropped without changing the
    others' samples). `history` holds each row's last C tokens (prompt then completion); the
    value V marks "no token yet" for prompts shorter than C (processors then run on V+1
    columns, the extra one thrown away). Greedy (temperature 0) reports the log_softmax of the
    processed logits.
    """

    def __init__(
        self, cfg: RolloutConfig, special_tokens: list[int] = (), compiled: bool | None = None
    ):
        self.cfg = cfg
        processors = make_logits_processors(
            repetition_penalty=cfg.repetition_penalty if cfg.repetition_penalty != 1 else None,
            repetition_context_size=cfg.repetition_context_size,
            presence_penalty=cfg.presence_penalty or None,
            presence_context_size=cfg.presence_context_size,
            frequency_penalty=cfg.frequency_penalty or None,
            frequency_context_size=cfg.frequency_context_size,
        )
        # mlx-lm's processors take one sequence's tokens; vmap runs them row by row on device.
        self.processors = [
            mx.vmap(lambda tokens, logits, p=p: p(tokens, logits[None])[0]) for p in processors
        ]
        sizes = []
        if cfg.repetition_penalty != 1:
            sizes.append(cfg.repetition_context_size)
        if cfg.presence_penalty:
            sizes.append(cfg.presence_context_size)
        if cfg.frequency_penalty:
            sizes.append(cfg.frequency_context_size)
        self.context_size = max(sizes, default=0)
        self.special_tokens = sorted(set(special_tokens))
        # A sampling step is a few dozen small operations, and on a GPU each one costs host
        # time to dispatch: compiled, the elementwise ones fuse and the Python runs once per
        # shape. On CPU the step is compute-bound and compiling costs more than it saves.
        self.compiled = mx.default_device() != mx.cpu if compiled is None else compiled
        self._traced = {}

    def initial_history(self, prompts: list[list[int]], vocab_size: int) -> mx.array | None:
        """(n, C) last C tokens of each prompt, left-filled with `vocab_size`."""
        if not self.context_size:
            return None
        c = self.context_size
        rows = [[vocab_size] * (c - len(p[-c:])) + p[-c:] for p in prompts]
        return mx.array(rows, dtype=mx.int32)

    def process(self, logits: mx.array, history: mx.array | None, filled: bool) -> mx.array:
        """Apply the logits processors. `filled`: no row's history holds the marker."""
        if history is None or not self.processors:
            return logits
        vocab = logits.shape[-1]
        if not filled:
            logits = mx.concatenate([logits, mx.zeros_like(logits[:, :1])], axis=-1)
        for processor in self.processors:
            logits = processor(history, logits)
        return logits if filled else logits[:, :vocab]

    def __call__(
        self, logits: mx.array, history: mx.array | None, keys: mx.array, filled: bool = True
    ) -> tuple[mx.array, mx.array]:
        if not self.compiled:
            return self._sample(logits, history, keys, filled)
        variant = (history is None, filled)
        if variant not in self._traced:
            if history is None:
                self._traced[variant] = mx.compile(lambda x, k: self._sample(x, None, k, filled))
            else:
                self._traced[variant] = mx.compile(lambda x, h, k: self._sample(x, h, k, filled))
        inputs = (logits, keys) if history is None else (logits, history, keys)
        return self._traced[variant](*inputs)

    def _sample(
        self, logits: mx.array, history: mx.array | None, keys: mx.array, filled: bool
    ) -> tuple[mx.array, mx.array]:
        cfg = self.cfg
        logits = self.process(logits.astype(mx.float32), history, filled)
        if cfg.temperature == 0:
            tokens = mx.argmax(logits, axis=-1)
            picked = mx.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
            return tokens, picked - mx.logsumexp(logits, axis=-1)
        filtered = cfg.top_p < 1 or cfg.min_p > 0 or cfg.xtc_probability > 0
        filtered = filtered or 0 < cfg.top_k < logits.shape[-1]
        if not filtered:  # the draw normalises by itself: skip a pass over the vocabulary
            return _draw_rows(keys, logits / cfg.temperature if cfg.temperature != 1 else logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        # mlx-lm's make_sampler order: top_p, min_p, xtc, top_k; then temperature.
        if cfg.top_p < 1:
            logprobs = apply_top_p(logprobs, cfg.top_p)
        if cfg.min_p > 0:
            logprobs = apply_min_p(logprobs, cfg.min_p)
        if cfg.xtc_probability > 0:
            # apply_xtc draws one coin for the whole batch; each row is its own sequence, so
            # run it unconditionally (probability 1) and draw the coin per row ourselves.
            pairs = _split_rows(keys)
            keys, coin = pairs[:, 0], _uniform_rows(pairs[:, 1])
            excluded = apply_xtc(logprobs, 1.0, cfg.xtc_threshold, self.special_tokens)
            logprobs = mx.where(coin[:, None] < cfg.xtc_probability, excluded, logprobs)
        if 0 < cfg.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, cfg.top_k)
        return _draw_rows(keys, logprobs / cfg.temperature)


_split_rows = mx.vmap(lambda key: mx.random.split(key))  # (n, 2) -> (n, 2, 2)
_uniform_rows = mx.vmap(lambda key: mx.random.uniform(key=key))  # (n, 2) -> (n,)


def _exp(x: mx.array) -> mx.array:
    """exp(x). On CPU as 2 ** (x log2 e): MLX's CPU `power` is about 2.5x faster than its `exp`
    (5.1 vs 12.5 ms for 64 x 16,384 floats on this project's CPU), within 1.2e-7 relative, and
    this pass over the vocabulary is the largest part of sampling there."""
    if mx.default_device() == mx.cpu:
        return mx.power(2.0, x * math.log2(math.e))
    return mx.exp(x)


def _draw_rows(keys: mx.array, logits: mx.array) -> tuple[mx.array, mx.array]:
    """One exact categorical draw per row from softmax(logits), by inverse CDF with the row's
    key, and log p of the drawn token. (n, 2), (n, V) -> (n,), (n,).

    One exp pass over the vocabulary gives both the draw and the normaliser; the Gumbel-max
    draw of `mx.random.categorical` needs a random number and two logs per vocabulary entry
    on top of the log-softmax, which dominates a CPU decode step. -inf entries are never drawn.
    """
    top = mx.max(logits, axis=-1, keepdims=True)
    cdf = mx.cumsum(_exp(logits - top), axis=-1)
    total = cdf[:, -1:]
    # u < total strictly, so the first index with cdf > u exists and has p > 0
    u = mx.minimum(_uniform_rows(keys)[:, None] * total, total * (1 - 2**-23))
    tokens = (cdf <= u).sum(axis=-1).astype(mx.uint32)
    picked = mx.take_along_axis(logits, tokens[:, None].astype(mx.int32), axis=-1)
    return tokens, (picked - top - mx.log(total))[:, 0]


def sample_next(
    logits: mx.array, cfg: RolloutConfig, key: mx.array, history: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Sample one token per row. logits: (N, V); history: (N, C) token ids or None; row i
    draws with `mx.random.split(key, N)[i]`.

    Returns (tokens (N,), logprobs (N,)): log p of each token under the distribution sampled
    from, log_softmax(filtered(processed logits) / temperature).
    """
    return Sampler(cfg)(logits, history, mx.random.split(key, logits.shape[0]))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[mx.array, list[int]]:
    """(P, L) int32 tokens with each prompt right-aligned, and the padding of each row."""
    width = max(len(p) for p in prompts)
    padding = [width - len(p) for p in prompts]
    tokens = [[pad_id] * n + p for n, p in zip(padding, prompts)]
    return mx.array(tokens, dtype=mx.int32), padding


def context_length(model: nn.Module) -> int | None:
    """The model's maximum positions (`max_position_embeddings`), if its args say."""
    value = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return int(value) if value else None


def check_prompts(model: nn.Module, prompts: list[list[int]]) -> None:
    """Clear errors for input generation cannot handle, before any compute."""
    if not prompts:
        raise ValueError("generate_rollouts needs at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty} are empty (no tokens)")
    limit = context_length(model)
    if limit is not None:
        long = [(i, len(p)) for i, p in enumerate(prompts) if len(p) >= limit]
        if long:
            shown = ", ".join(f"prompt {i}: {n} tokens" for i, n in long[:5])
            raise ValueError(
                f"{len(long)} prompt(s) leave no room in the model's context of {limit} "
                f"tokens (max_position_embeddings): {shown}; shorten or drop them"
            )


class UnpaddedBatchKVCache(BatchKVCache):
    """mlx-lm's `BatchKVCache` for a batch whose rows have no left padding.

    With no padding, the array mask `BatchKVCache` builds is all-true for one new token and
    plain causal for a prompt chunk, so this passes `None` / `"causal"` instead. The result is
    the same; the attention takes the fused kernel (on CUDA an array mask sends every layer's
    decode attention to the unfused fallback). Rows keep zero padding when `filter` drops some.
    """

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        if return_array or kwargs.get("window_size"):
            return super().make_mask(N, return_array=return_array, **kwargs)
        return None if N == 1 else "causal"


def _make_caches(model: nn.Module, padding: list[int], max_kv_size: int) -> list:
    if max_kv_size:
        return [BatchRotatingKVCache(max_kv_size, padding) for _ in model.layers]
    if not any(padding):
        return [UnpaddedBatchKVCache(padding) for _ in model.layers]
    return [BatchKVCache(padding) for _ in model.layers]


def _prefill(model: nn.Module, tokens: mx.array, caches: list) -> mx.array:
    """Run the prompts through the caches; returns the last position's logits (P, V)."""
    backbone, head = hidden_and_head(model)
    for start in range(0, tokens.shape[1], PREFILL_STEP):
        chunk = tokens[:, start : start + PREFILL_STEP]
        last = start + PREFILL_STEP >= tokens.shape[1]
        if backbone is None:
            out = model(chunk, cache=caches)
        else:
            out = backbone(chunk, cache=caches)
        if not last:
            mx.eval([c.state for c in caches])
    return out[:, -1, :] if backbone is None else head(out[:, -1, :])


class MlxLmEngine:
    """The rollout's engine seam on mlx-lm's own model and batch KV caches (the reference).

    An engine runs the model for `generate_rollouts`:
    prefill(tokens (P, L) int32 left-padded, padding [P], new_tokens) -> logits (P, V) of each
    prompt's last position; filter(index (n,)) keeps (and repeats) rows; decode(tokens (n,))
    -> logits (n, V) of the next position. `nbytes`: memory it adds to the model's (weights
    copies), `name`: which engine. `fused_decode.FusedDecoder` is the other implementation.
    """

    name = "mlx_lm"
    nbytes = 0

    def __init__(self, model: nn.Module, max_kv_size: int):
        self.model, self.max_kv_size = model, max_kv_size

    def prefill(self, tokens: mx.array, padding: list[int], new_tokens: int) -> mx.array:
        self.caches = _make_caches(self.model, padding, self.max_kv_size)
        return _prefill(self.model, tokens, self.caches)

    def filter(self, index: mx.array) -> None:
        for cache in self.caches:
            cache.filter(index)

    def decode(self, tokens: mx.array) -> mx.array:
        return self.model(tokens[:, None], cache=self.caches)[:, -1, :]


def uses_fused(model: nn.Module, cfg: RolloutConfig) -> bool:
    """Whether `cfg.engine` runs `model` on the fused engine: fused, or auto where the fused
    engine supports the model and there is no rotating cache. engine=fused on a model it does
    not support is a one-line ValueError saying why."""
    if cfg.engine == "mlx_lm":
        return False
    reason = fused_decode.unsupported(model)
    if reason is None and cfg.max_kv_size:
        reason = f"max_kv_size={cfg.max_kv_size} (a rotating cache)"
    if reason is not None and cfg.fast_kernels:
        raise ValueError(
            f"rollout.fast_kernels=true needs the fused engine, which does not support {reason}; "
            "set rollout.fast_kernels=false"
        )
    if reason is not None and cfg.engine == "fused":
        raise ValueError(f"rollout engine=fused does not support {reason}; use auto or mlx_lm")
    return reason is None


def make_engine(model: nn.Module, cfg: RolloutConfig):
    """The decode engine `cfg.engine` names; auto: fused where it supports the model."""
    if uses_fused(model, cfg):
        return fused_decode.FusedDecoder(
            model, prefill_step=PREFILL_STEP, compiled=cfg.compiles_fused, fast=cfg.fast_kernels
        )
    return MlxLmEngine(model, cfg.max_kv_size)


class StopStrings:
    """Per-row streaming detokenizers (mlx-lm's) that spot stop strings across tokens."""

    def __init__(self, tokenizer, stop_strings: list[str], n_rows: int):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.longest = max(len(s) for s in stop_strings)
        self.detokenizers = [tokenizer.detokenizer for _ in range(n_rows)]
        self.seen = [0] * n_rows  # chars of text already searched

    def restart(self, row: int) -> None:
        """Start row `row` afresh (a new assistant turn)."""
        self.detokenizers[row] = self.tokenizer.detokenizer
        self.seen[row] = 0

    def add(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Feed one token to each row; True where a stop string has now appeared."""
        hit = np.zeros(len(rows), dtype=bool)
        for i, (row, token) in enumerate(zip(rows.tolist(), tokens.tolist())):
            detok = self.detokenizers[row]
            detok.add_token(token)
            text = detok.text
            start = max(0, self.seen[row] - self.longest + 1)
            hit[i] = any(s in text[start:] for s in self.stop_strings)
            self.seen[row] = len(text)
        return hit

    def cut(self, text: str) -> str:
        """Text before the first stop string."""
        found = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return text[: min(found)] if found else text


def _append(history: mx.array | None, tokens: mx.array) -> mx.array | None:
    if history is None:
        return None
    return mx.concatenate([history[:, 1:], tokens[:, None].astype(history.dtype)], axis=1)


def generate_rollouts(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    cfg: RolloutConfig,
    *,
    seed: int = 0,
    row_offset: int = 0,
    total_rows: int = 0,
) -> RolloutBatch:
    """`cfg.group_size` completions for each prompt (token ids), batched on mlx-lm's caches.

    `seed` seeds sampling (stages.rollout.step_seed in training). Data parallel: these rows are
    rows `row_offset`.. of a global batch of `total_rows` (0: this batch is the whole batch);
    row i draws with key i of the global batch, as one process would.
    """
    cfg.validate()
    check(row_offset >= 0, "row_offset", row_offset, ">= 0")
    check(total_rows >= 0, "total_rows", total_rows, ">= 0 (0 = this batch)")
    check_prompts(model, prompts)
    eos_ids = sorted(tokenizer.eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    group, steps = cfg.group_size, cfg.max_new_tokens
    n_rows = len(prompts) * group
    row_prompts = [p for p in prompts for _ in range(group)]
    prompt_lengths = np.array([len(p) for p in row_prompts])
    limit = context_length(model)
    row_limits = np.full(n_rows, steps)
    if limit is not None:
        row_limits = np.minimum(row_limits, limit - prompt_lengths)

    special = list(eos_ids)
    if cfg.xtc_probability > 0:
        special += tokenizer.encode("\n", add_special_tokens=False)  # as mlx-lm's CLI does
    sampler = Sampler(cfg, special)
    stops = StopStrings(tokenizer, cfg.stop_strings, n_rows) if cfg.stop_strings else None

    tokens, padding = left_pad(prompts, pad_id)
    engine = make_engine(model, cfg)
    logits = engine.prefill(tokens, padding, steps)
    shared = mx.repeat(mx.arange(len(prompts)), group)
    engine.filter(shared)  # row r of each prompt's KV -> rows r*group .. r*group+group-1
    logits = logits[shared]
    history = sampler.initial_history(row_prompts, logits.shape[-1])
    filled_after = max(0, sampler.context_size - int(prompt_lengths.min()))

    out_tokens = np.full((n_rows, steps), pad_id, dtype=np.int32)
    out_logprobs = np.zeros((n_rows, steps), dtype=np.float32)
    lengths = np.zeros(n_rows, dtype=np.int64)
    reasons = np.array([""] * n_rows, dtype=object)
    running = np.ones(n_rows, dtype=bool)
    active = np.arange(n_rows)  # row ids of the device batch, in order
    eos = np.array(eos_ids)
    step_keys = mx.random.split(mx.random.key(seed), steps)
    total_rows = total_rows or n_rows
    if row_offset + n_rows > total_rows:
        raise ValueError(
            f"rows {row_offset}..{row_offset + n_rows} are not within total_rows={total_rows}"
        )

    def row_keys(step: int) -> mx.array:
        keys = mx.random.split(step_keys[step], total_rows)
        if total_rows != n_rows:
            keys = keys[row_offset : row_offset + n_rows]
        return keys if len(active) == n_rows else keys[mx.array(active)]

    token, logprob = sampler(logits, history, row_keys(0), filled=filled_after <= 0)
    mx.async_eval(token, logprob)
    for step in range(steps):
        if step + 1 < steps:  # queue step + 1 before reading step: the device stays busy
            logits = engine.decode(token)
            history = _append(history, token)
            next_token, next_logprob = sampler(
                logits, history, row_keys(step + 1), filled=step + 1 >= filled_after
            )
            mx.async_eval(next_token, next_logprob)
        got_tokens, got_logprobs = np.array(token), np.array(logprob)
        live = running[active]
        rows = active[live]
        got_tokens, got_logprobs = got_tokens[live], got_logprobs[live]
        out_tokens[rows, step] = got_tokens
        out_logprobs[rows, step] = got_logprobs
        ended = np.isin(got_tokens, eos)
        if stops is not None:
            ended |= stops.add(rows, got_tokens)
        reasons[rows[ended]] = "stop"
        at_limit = ~ended & (step + 1 >= row_limits[rows])
        reasons[rows[at_limit]] = "length"
        ended |= at_limit
        lengths[rows[ended]] = step + 1
        running[rows[ended]] = False
        if not running.any():
            break
        finished_in_batch = int((~running[active]).sum())
        if finished_in_batch and finished_in_batch * 8 >= len(active):
            # Drop finished rows; step + 1 (already queued) still has them, so filter its
            # outputs and the caches after its update alike.
            keep = np.flatnonzero(running[active])
            keep_index = mx.array(keep)
            engine.filter(keep_index)
            next_token, next_logprob = next_token[keep_index], next_logprob[keep_index]
            history = None if history is None else history[keep_index]
            active = active[keep]
        token, logprob = next_token, next_logprob

    texts = []
    for row in range(n_rows):
        ids = out_tokens[row, : lengths[row]].tolist()
        if reasons[row] == "stop" and ids and ids[-1] in eos_ids:
            ids = ids[:-1]
        text = tokenizer.decode(ids)
        texts.append(stops.cut(text) if stops is not None and reasons[row] == "stop" else text)
    mask = np.arange(steps)[None, :] < lengths[:, None]
    batch = RolloutBatch(
        prompt_ids=row_prompts,
        completion_ids=mx.array(out_tokens),
        completion_mask=mx.array(mask.astype(np.float32)),
        logprobs=mx.array(out_logprobs),
        finish_reasons=reasons.tolist(),
        prompt_texts=[tokenizer.decode(p) for p in row_prompts],
        texts=texts,
        group_size=group,
        temperature=cfg.temperature,
        engine=engine.name,
        engine_bytes=engine.nbytes,
    )
    if cfg.logprobs_source == "policy":
        batch.logprobs = policy_logprobs(model, batch, cfg.temperature or 1.0)
    return batch


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """TRL's completion metrics: lengths in generated tokens (tool results not counted, as
    TRL), and the fraction cut at the length limit."""
    lengths = batch.generated_mask.sum(axis=1)
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
        # TRL logs 0 for both when no completion terminated.
        "completions/min_terminated_length": (
            mx.where(stopped, lengths, mx.inf).min().item() if n_stopped else 0.0
        ),
        "completions/max_terminated_length": (
            mx.where(stopped, lengths, 0).max().item() if n_stopped else 0.0
        ),
    }
    return metrics
