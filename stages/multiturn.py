"""Multi-turn rollouts: completions that call tools (or act in an environment) over several
turns, all rows of a step in one batch; and TRL's `rollout_func` escape hatch.

A completion is the model's turns plus the tool results between them. The batch works on the
rollout engine seam (stages/rollout.py) with one more operation, `append`:

- the group's prompt is prefilled once (unique prompts, left-padded) and its cache rows are
  repeated for the group, as single-turn;
- every decode step advances every row of the batch by one token, each at its own position;
- a row that ends a turn (its EOS) with tool calls has them run on the host (stages/tools.py)
  while the device computes the next step; the tool messages are rendered by the chat template
  into tokens (`tool_suffix_ids`), and `append` writes those tokens into that row's next cache
  positions only (other rows stay where they are), returning the logits its next turn starts
  from. Nothing is prefilled twice;
- a row that finishes (an EOS without a tool call, a stop string, the tool-round limit, or its
  token budget) leaves the batch once enough rows have finished, as single-turn.

Engines: `fused_decode.RaggedDecoder` (the default: per-row cache positions, RoPE offsets and
masks) and, for `rollout.engine=mlx_lm` or models the fused engine does not run, mlx-lm's model
and batch caches where `append` re-prefills every row's context into fresh caches (correct,
slower).

Sampling: the Sampler of stages/rollout.py; token k of row i draws with key k of global row i
(`seed`, `row_offset`, `total_rows`), so a row's samples do not depend on the other rows, on
when rows leave the batch or on how rows are shared between processes.

Budgets (TRL's semantics): a completion holds at most `rollout.max_completion_length` tokens
after the prompt (generated and tool tokens; null: `max_new_tokens`), of which at most
`max_new_tokens` generated, and stays within the model's context. A tool round whose results
would not fit is dropped and the completion ends after the call (TRL rolls it back); a
completion cut while generating, or left without room after a tool result, finishes "length".
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from stages import distributed, fused_decode, tools
from stages.data import encode_prompt, prompt_messages
from stages.policy import policy_logprobs
from stages.rollout import (
    PREFILL_STEP,
    MlxLmEngine,
    RolloutBatch,
    RolloutConfig,
    Sampler,
    StopStrings,
    check_prompts,
    context_length,
    left_pad,
    uses_fused,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class ReprefillEngine:
    """Multi-turn on mlx-lm's own model and batch KV caches (the fallback): `append` adds the
    new tokens to each row's context and prefills every row's whole context, left-padded,
    into fresh caches. Same interface as fused_decode.RaggedDecoder."""

    name = "mlx_lm"
    nbytes = 0

    def __init__(self, model: nn.Module, max_kv_size: int):
        self.inner = MlxLmEngine(model, max_kv_size)

    def prefill(self, tokens: mx.array, padding: list[int], new_tokens: int) -> mx.array:
        self.contexts = [row[pad:] for row, pad in zip(np.array(tokens).tolist(), padding)]
        self.fed: list[mx.array] = []  # decode inputs not yet added to `contexts`
        return self.inner.prefill(tokens, padding, new_tokens)

    def _catch_up(self) -> None:
        for tokens in self.fed:
            for context, token in zip(self.contexts, np.array(tokens).tolist()):
                context.append(token)
        self.fed = []

    def filter(self, index: mx.array) -> None:
        self._catch_up()
        self.contexts = [list(self.contexts[i]) for i in np.array(index).tolist()]
        self.inner.filter(index)

    def decode(self, tokens: mx.array) -> mx.array:
        self.fed.append(tokens)
        return self.inner.decode(tokens)

    def append(self, rows: np.ndarray, tokens: list[list[int]]) -> mx.array:
        self._catch_up()
        for row, new in zip(rows.tolist(), tokens):
            self.contexts[row] = self.contexts[row] + list(new)
        ids, padding = left_pad(self.contexts, 0)
        logits = self.inner.prefill(ids, padding, 0)
        return logits[mx.array(rows)]


def make_engine(model: nn.Module, cfg: RolloutConfig):
    """The multi-turn engine for `cfg.engine`: auto and fused take the ragged fused engine where
    it runs the model; mlx_lm (or a model it does not run, under auto) the re-prefill one."""
    if uses_fused(model, cfg):
        return fused_decode.RaggedDecoder(
            model, prefill_step=PREFILL_STEP, compiled=cfg.compiles_fused, fast=cfg.fast_kernels
        )
    return ReprefillEngine(model, cfg.max_kv_size)


COUNTS = ("calls", "turns", "truncated_outputs", *(f"failures/{k}" for k in tools.FAILURES))


@dataclass
class _Row:
    """Host state of one completion while it is generated."""

    prompt: list[int]
    budget: int  # tokens after the prompt
    max_new_tokens: int  # generated tokens
    functions: dict
    tokens: list[int] = field(default_factory=list)  # the completion: generated + tool tokens
    generated: list[float] = field(default_factory=list)  # 1 generated, 0 tool (TRL tool_mask)
    logprobs: list[float] = field(default_factory=list)
    turn_start: int = 0
    n_generated: int = 0
    rounds: int = 0
    messages: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    reason: str = ""  # "" while generating, then "stop" | "length"
    stopped_by_string: bool = False


def _observe(prompt: list[dict], observation) -> list[dict]:
    """TRL: an environment's opening observation is appended to the prompt's last message."""
    if observation is None:
        return prompt
    last = prompt[-1]
    return prompt[:-1] + [{**last, "content": str(last["content"]) + str(observation)}]


def generate_multiturn(
    model: nn.Module,
    tokenizer,
    rows: list[dict],
    cfg: RolloutConfig,
    toolbox: tools.Toolbox,
    *,
    system_prompt: str | None = None,
    template_kwargs: dict | None = None,
    seed: int = 0,
    row_offset: int = 0,
    total_rows: int = 0,
) -> RolloutBatch:
    """`cfg.group_size` multi-turn completions for each dataset row (its `prompt`: text or chat,
    always through the chat template with the tools' schemas), all in one batch.

    Returns a RolloutBatch whose completions hold generated and tool tokens (`tool_mask` 0 on
    the tool tokens, log-probs 0 there), with `conversations` (the messages after the prompt:
    assistant turns with their tool_calls, tool results), `prompt_messages`, `environments`
    (one object per row with an environment factory) and `tool_counts` per row. The width T is
    `cfg.completion_budget`. Data parallel: as stages.rollout.generate_rollouts.
    """
    cfg.validate()
    template_kwargs = dict(template_kwargs or {})
    group = cfg.group_size
    n_rows = len(rows) * group
    total_rows = total_rows or n_rows
    if row_offset < 0 or row_offset + n_rows > total_rows:
        raise ValueError(
            f"rows {row_offset}..{row_offset + n_rows} are not within total_rows={total_rows}"
        )
    row_data = [row for row in rows for _ in range(group)]
    environments = toolbox.environments(n_rows)
    schemas: dict[type, list[dict]] = {}
    prompts, prompt_ids, states = [], [], []
    limit = context_length(model)
    previous = None  # (messages, environment type) of the row before
    for i, row in enumerate(row_data):
        environment = None if environments is None else environments[i]
        messages = prompt_messages(row["prompt"], system_prompt)
        if environment is not None:
            messages = _observe(messages, environment.reset(**row))
        kind = type(environment)
        if kind not in schemas:
            schemas[kind] = toolbox.schemas(environment)
        if previous == (messages, kind):
            ids = prompt_ids[-1]  # the same object: shared prefill below
        else:
            ids = encode_prompt(
                tokenizer, messages, template_kwargs=template_kwargs, tools=schemas[kind]
            )
        previous = (messages, kind)
        prompts.append(messages)
        prompt_ids.append(ids)
        budget = cfg.completion_budget
        if limit is not None:
            budget = min(budget, limit - len(ids))
        states.append(_Row(ids, budget, cfg.max_new_tokens, toolbox.functions(environment)))
    check_prompts(model, prompt_ids)

    eos_ids = sorted(tokenizer.eos_token_ids)
    eos = set(eos_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    special = list(eos_ids)
    if cfg.xtc_probability > 0:
        special += tokenizer.encode("\n", add_special_tokens=False)
    sampler = Sampler(cfg, special)
    stops = StopStrings(tokenizer, cfg.stop_strings, n_rows) if cfg.stop_strings else None

    # Shared prefill: consecutive equal prompts (a group, unless an environment's observation
    # differs per row) are prefilled once and their cache rows repeated.
    unique, expand = [], []
    for ids in prompt_ids:
        if not unique or ids is not unique[-1]:
            unique.append(ids)
        expand.append(len(unique) - 1)
    tokens, padding = left_pad(unique, pad_id)
    engine = make_engine(model, cfg)
    logits = engine.prefill(tokens, padding, cfg.completion_budget)
    index = mx.array(expand)
    engine.filter(index)
    logits = logits[index]

    draws = cfg.max_new_tokens + 1
    row_keys = mx.random.split(mx.random.key(seed), total_rows)[row_offset : row_offset + n_rows]
    key_table = mx.vmap(lambda key: mx.random.split(key, draws))(row_keys)  # (n, draws, 2)

    def keys(batch_rows: np.ndarray, offset: int = 0) -> mx.array:
        taken = np.array([states[r].n_generated + offset for r in batch_rows])
        return key_table[mx.array(batch_rows), mx.array(np.minimum(taken, draws - 1))]

    context_size, vocab = sampler.context_size, logits.shape[-1]

    def window(r: int) -> list[int]:
        """The last tokens row r's next sample sees (the vocab size marks "none yet")."""
        seen = (states[r].prompt + states[r].tokens)[-context_size:]
        return [vocab] * (context_size - len(seen)) + seen

    def filled(batch_rows: np.ndarray, ahead: int = 0) -> bool:
        shortest = min(len(states[r].prompt) + len(states[r].tokens) for r in batch_rows)
        return shortest + ahead >= context_size

    active = np.arange(n_rows)
    history = None
    if context_size:
        history = mx.array([window(r) for r in active], dtype=mx.int32)
    token, logprob = sampler(logits, history, keys(active), filled=filled(active))
    mx.async_eval(token, logprob)
    while True:
        # queue the next step before reading this one: the device stays busy while the host
        # reads tokens and runs tools
        logits = engine.decode(token)
        if history is not None:
            history = mx.concatenate([history[:, 1:], token[:, None].astype(history.dtype)], 1)
        next_token, next_logprob = sampler(
            logits, history, keys(active, 1), filled=filled(active, 1)
        )
        mx.async_eval(next_token, next_logprob)
        got_tokens, got_logprobs = np.array(token).tolist(), np.array(logprob).tolist()
        live = [i for i, r in enumerate(active) if not states[r].reason]
        hits = np.zeros(len(active), dtype=bool)
        if stops is not None and live:
            live_rows = active[live]
            hits[live] = stops.add(live_rows, np.array([got_tokens[i] for i in live]))
        appends: list[tuple[int, list[int]]] = []
        for i in live:
            state = states[active[i]]
            state.tokens.append(got_tokens[i])
            state.generated.append(1.0)
            state.logprobs.append(got_logprobs[i])
            state.n_generated += 1
            if hits[i]:
                state.stopped_by_string = True
                _end_turn(state, tokenizer, toolbox, stops, None)
                state.reason = "stop"
            elif got_tokens[i] in eos:
                suffix = _end_turn(state, tokenizer, toolbox, stops, template_kwargs)
                if suffix:
                    appends.append((i, suffix))
                    if stops is not None:
                        stops.restart(int(active[i]))
            elif state.n_generated >= cfg.max_new_tokens or len(state.tokens) >= state.budget:
                _end_turn(state, tokenizer, toolbox, stops, None)
                state.reason = "length"
        if appends:
            at = np.array([i for i, _ in appends])
            appended_logits = engine.append(at, [suffix for _, suffix in appends])
            batch_rows = active[at]
            appended_history = None
            if history is not None:
                appended_history = mx.array([window(r) for r in batch_rows], dtype=mx.int32)
                history[mx.array(at)] = appended_history
            first, first_logprob = sampler(
                appended_logits, appended_history, keys(batch_rows), filled=filled(batch_rows)
            )
            next_token[mx.array(at)] = first.astype(next_token.dtype)
            next_logprob[mx.array(at)] = first_logprob
        running = np.array([not states[r].reason for r in active])
        if not running.any():
            break
        finished = int((~running).sum())
        if finished and finished * 8 >= len(active):
            keep = np.flatnonzero(running)
            keep_index = mx.array(keep)
            engine.filter(keep_index)
            next_token, next_logprob = next_token[keep_index], next_logprob[keep_index]
            history = None if history is None else history[keep_index]
            active = active[keep]
        token, logprob = next_token, next_logprob

    width = cfg.completion_budget
    out_tokens = np.full((n_rows, width), pad_id, dtype=np.int32)
    out_mask = np.zeros((n_rows, width), dtype=np.float32)
    out_generated = np.zeros((n_rows, width), dtype=np.float32)
    out_logprobs = np.zeros((n_rows, width), dtype=np.float32)
    texts = []
    for r, state in enumerate(states):
        n = len(state.tokens)
        out_tokens[r, :n] = state.tokens
        out_mask[r, :n] = 1.0
        out_generated[r, :n] = state.generated
        out_logprobs[r, :n] = state.logprobs
        ids = state.tokens[:-1] if state.tokens and state.tokens[-1] in eos else state.tokens
        text = tokenizer.decode(ids)
        texts.append(stops.cut(text) if state.stopped_by_string else text)
    batch = RolloutBatch(
        prompt_ids=prompt_ids,
        completion_ids=mx.array(out_tokens),
        completion_mask=mx.array(out_mask),
        logprobs=mx.array(out_logprobs),
        finish_reasons=[state.reason for state in states],
        prompt_texts=[tokenizer.decode(ids) for ids in prompt_ids],
        texts=texts,
        group_size=group,
        temperature=cfg.temperature,
        engine=engine.name,
        engine_bytes=engine.nbytes,
        tool_mask=mx.array(out_generated),
        prompt_messages=prompts,
        conversations=[state.messages for state in states],
        environments=environments,
        tool_counts={k: [state.counts[k] for state in states] for k in COUNTS},
    )
    if cfg.logprobs_source == "policy":
        batch.logprobs = policy_logprobs(model, batch, cfg.temperature or 1.0)
    return batch


def _end_turn(state: _Row, tokenizer, toolbox: tools.Toolbox, stops, template_kwargs):
    """Close the row's assistant turn: parse it, and (`template_kwargs` not None: the turn ended
    with its EOS) run its tool calls. Returns the tool tokens to append, or None when the
    completion ends here (its finish reason is then set)."""
    turn = state.tokens[state.turn_start :]
    if turn and turn[-1] in tokenizer.eos_token_ids:
        turn = turn[:-1]
    text = tokenizer.decode(turn)
    if stops is not None and state.stopped_by_string:
        text = stops.cut(text)
    content, calls = toolbox.parser.parse(text)
    message = {"role": "assistant", "content": content}
    readable = [call.message() for call in calls if call.failure is None]
    if readable:
        message["tool_calls"] = readable
    state.messages.append(message)
    state.counts["turns"] += 1
    if template_kwargs is None:
        return None
    out_of_rounds = toolbox.max_iterations is not None and state.rounds >= toolbox.max_iterations
    if not calls or out_of_rounds:
        state.reason = "stop"
        return None
    results = [
        tools.run_call(call, state.functions, toolbox.timeout, toolbox.max_output_chars)
        for call in calls
    ]
    state.counts["calls"] += len(results)
    for result in results:
        if result.failure is not None:
            state.counts[f"failures/{result.failure}"] += 1
        state.counts["truncated_outputs"] += int(result.truncated)
    tool_messages = [result.message() for result in results]
    suffix = tools.tool_suffix_ids(tokenizer, tool_messages, template_kwargs)
    if len(state.tokens) + len(suffix) > state.budget:
        state.reason = "stop"  # TRL: the results would overflow the budget; dropped
        return None
    state.tokens += suffix
    state.generated += [0.0] * len(suffix)
    state.logprobs += [0.0] * len(suffix)
    state.messages += tool_messages
    state.rounds += 1
    state.turn_start = len(state.tokens)
    if len(state.tokens) >= state.budget or state.n_generated >= state.max_new_tokens:
        state.reason = "length"  # no room left to answer
        return None
    return suffix


def tool_metrics(batch: RolloutBatch, world: distributed.World | None = None) -> dict:
    """TRL's tools/call_frequency (calls per completion) and tools/failure_frequency (failed
    calls per call), and ours: tools/failures/<kind> (failed calls of that kind),
    tools/turns_per_row (assistant turns per completion), tools/truncated_outputs (results cut
    to rollout.tool_max_output_chars); summed over every process."""
    counts = batch.tool_counts
    if counts is None:
        return {}
    names = list(COUNTS)
    sums = mx.array([float(sum(counts[k])) for k in names] + [float(batch.num_rows)])
    sums = distributed.all_sum(sums, world or distributed.World()).tolist()
    total = dict(zip(names, sums[:-1]))
    rows = sums[-1]
    failures = sum(total[f"failures/{k}"] for k in tools.FAILURES)
    metrics = {
        "tools/call_frequency": total["calls"] / rows,
        "tools/failure_frequency": failures / total["calls"] if total["calls"] else 0.0,
        "tools/turns_per_row": total["turns"] / rows,
        "tools/truncated_outputs": total["truncated_outputs"],
    }
    metrics.update({f"tools/failures/{k}": total[f"failures/{k}"] for k in tools.FAILURES})
    return metrics


# -- rollout_func (TRL's escape hatch) -----------------------------------------------------------


@dataclass
class RolloutContext:
    """What a rollout_func gets as its second argument (TRL passes its GRPOTrainer): the
    policy `model`, the tokenizer as `processing_class`, the rollout config as `args`, and
    this call's `seed` and place in a data-parallel batch (`row_offset`, `total_rows`)."""

    model: nn.Module
    processing_class: object
    args: RolloutConfig
    seed: int = 0
    row_offset: int = 0
    total_rows: int = 0


ROLLOUT_FUNC_KEYS = ("prompt_ids", "completion_ids", "logprobs")


def resolve_rollout_func(spec: str) -> Callable:
    """The function a `rollout.rollout_func` import path names, taking (prompts, trainer).
    Raises ValueError (one line) otherwise."""
    module_name, _, attribute = spec.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"rollout_func {spec!r} cannot be imported: {error}") from None
    if not callable(fn):
        raise ValueError(f"rollout_func {spec!r} is not callable")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise ValueError(
            f"rollout_func {spec!r} must take (prompts, trainer) (TRL's signature)"
        ) from None
    except ValueError:
        pass
    return fn


def custom_rollout(
    fn: Callable,
    model: nn.Module,
    tokenizer,
    rows: list[dict],
    cfg: RolloutConfig,
    *,
    seed: int = 0,
    row_offset: int = 0,
    total_rows: int = 0,
) -> RolloutBatch:
    """TRL's rollout_func contract: `fn(prompts, trainer) -> dict`. `prompts` are the rows' raw
    prompts, each repeated `group_size` times (templating is the function's); the result has
    one entry per prompt under prompt_ids, completion_ids and logprobs (per-token lists), and
    optionally env_mask (1 = model token, 0 = external: used as tool_mask). Any other key
    becomes a dataset column for the rewards (a list: one value per row; else broadcast).
    A completion that does not end with an EOS is "length" (TRL's truncation rule)."""
    group = cfg.group_size
    prompts = [row["prompt"] for row in rows for _ in range(group)]
    n = len(prompts)
    context = RolloutContext(model, tokenizer, cfg, seed, row_offset, total_rows or n)
    output = fn(prompts, context)
    if not isinstance(output, dict):
        raise ValueError(f"rollout_func returned {type(output).__name__}; expected a dict")
    missing = [key for key in ROLLOUT_FUNC_KEYS if key not in output]
    if missing:
        raise ValueError(f"rollout_func must return keys {missing} in its output dict")
    for key in (*ROLLOUT_FUNC_KEYS, "env_mask"):
        if key in output and len(output[key]) != n:
            raise ValueError(
                f"rollout_func returned {len(output[key])} {key} for {n} prompts (one per prompt, "
                f"group_size={group} repeats included)"
            )
    width = cfg.completion_budget
    completion_ids = [list(map(int, ids)) for ids in output["completion_ids"]]
    longest = max((len(ids) for ids in completion_ids), default=0)
    if longest > width:
        raise ValueError(
            f"rollout_func returned a completion of {longest} tokens; the completion budget "
            f"is {width} (rollout.max_new_tokens / rollout.max_completion_length)"
        )
    eos_ids = set(tokenizer.eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    out_tokens = np.full((n, width), pad_id, dtype=np.int32)
    out_mask = np.zeros((n, width), dtype=np.float32)
    out_logprobs = np.zeros((n, width), dtype=np.float32)
    tool_mask = np.zeros((n, width), dtype=np.float32) if "env_mask" in output else None
    texts, reasons = [], []
    for r, ids in enumerate(completion_ids):
        out_tokens[r, : len(ids)] = ids
        out_mask[r, : len(ids)] = 1.0
        out_logprobs[r, : len(ids)] = np.array(output["logprobs"][r], dtype=np.float32)[: len(ids)]
        if tool_mask is not None:
            tool_mask[r, : len(ids)] = np.array(output["env_mask"][r], dtype=np.float32)[: len(ids)]
        ended = bool(ids) and ids[-1] in eos_ids
        reasons.append("stop" if ended else "length")
        texts.append(tokenizer.decode(ids[:-1] if ended else ids))
    chat = not isinstance(prompts[0], str)
    batch = RolloutBatch(
        prompt_ids=[list(map(int, ids)) for ids in output["prompt_ids"]],
        completion_ids=mx.array(out_tokens),
        completion_mask=mx.array(out_mask),
        logprobs=mx.array(out_logprobs),
        finish_reasons=reasons,
        prompt_texts=[tokenizer.decode(list(ids)) for ids in output["prompt_ids"]],
        texts=texts,
        group_size=group,
        temperature=cfg.temperature,
        engine="rollout_func",
        tool_mask=None if tool_mask is None else mx.array(tool_mask),
        prompt_messages=prompts if chat else None,
        conversations=[[{"role": "assistant", "content": t}] for t in texts] if chat else None,
    )
    extra = {k: v for k, v in output.items() if k not in (*ROLLOUT_FUNC_KEYS, "env_mask")}
    batch.columns = {
        k: list(v) if isinstance(v, list | tuple) and len(v) == n else [v] * n
        for k, v in extra.items()
    }
    return batch


# -- the pipeline's entry ----------------------------------------------------------------------


@dataclass
class MultiTurn:
    """How a run's completions get more than one turn: a toolbox (tools, environments) or a
    rollout_func, and the prompt settings multi-turn prompts are encoded with."""

    toolbox: tools.Toolbox | None = None
    rollout_func: Callable | None = None
    system_prompt: str | None = None
    template_kwargs: dict = field(default_factory=dict)


def setup(
    cfg: RolloutConfig,
    tokenizer,
    *,
    system_prompt: str | None = None,
    template_kwargs: dict | None = None,
) -> MultiTurn | None:
    """The run's MultiTurn for `rollout.tools`, `environment_factory` or `rollout_func`, or None
    for single-turn rollouts. Raises ValueError (one line) on bad tools, environments,
    templates or functions."""
    template_kwargs = dict(template_kwargs or {})
    if cfg.rollout_func:
        return MultiTurn(
            rollout_func=resolve_rollout_func(cfg.rollout_func),
            system_prompt=system_prompt,
            template_kwargs=template_kwargs,
        )
    if not cfg.multi_turn:
        return None
    toolbox = tools.make_toolbox(
        list(cfg.tools),
        tokenizer,
        environment_factory=cfg.environment_factory,
        timeout=cfg.tool_timeout,
        max_output_chars=cfg.tool_max_output_chars,
        max_iterations=cfg.max_tool_calling_iterations,
        template_kwargs=template_kwargs,
    )
    return MultiTurn(toolbox, None, system_prompt, template_kwargs)


def generate(
    model: nn.Module,
    tokenizer,
    rows: list[dict],
    cfg: RolloutConfig,
    turns: MultiTurn,
    *,
    seed: int = 0,
    row_offset: int = 0,
    total_rows: int = 0,
) -> RolloutBatch:
    """The completions of `rows` (dataset rows) per `turns`: the multi-turn batch with tools or
    environments, or the rollout_func's. Dataset columns are attached (plus rollout_func's
    extra keys)."""
    placement = dict(seed=seed, row_offset=row_offset, total_rows=total_rows)
    if turns.rollout_func is not None:
        batch = custom_rollout(turns.rollout_func, model, tokenizer, rows, cfg, **placement)
        extra = batch.columns
        batch.with_columns(rows)
        batch.columns.update(extra)
        return batch
    batch = generate_multiturn(
        model,
        tokenizer,
        rows,
        cfg,
        turns.toolbox,
        system_prompt=turns.system_prompt,
        template_kwargs=turns.template_kwargs,
        **placement,
    )
    return batch.with_columns(rows)


def conversation_json(batch: RolloutBatch) -> list[str] | None:
    """Each row's conversation after the prompt as JSON text (the completions table's)."""
    if batch.conversations is None:
        return None
    return [
        json.dumps(messages, ensure_ascii=False, default=str) for messages in batch.conversations
    ]
