"""Multi-turn rollouts, side by side in one process: all rows in one batch vs a per-row loop.

    ./dev python benchmarks/multiturn.py [--shape small|0.6b] [--prompts 4] [--group 8]
        [--prompt-tokens 64] [--turns 3] [--turn-tokens 32] [--tool-tokens 24] [--rounds 2]
        [--tools-model-prompts 32]

Part 1, the engines on the same schedule of turns. Random weights of a Qwen3 shape (as
benchmarks/rollout.py), random prompts; every row has `--turns` turns, each generating a number
of tokens drawn per row and turn around `--turn-tokens` (0.5x to 1.5x), separated by
`--tool-tokens` tool tokens (random ids) that go into the cache as context. Sampling at
temperature 1 with the rollout's Sampler; no EOS. Three ways to do the same work:

- batched (fused_decode.RaggedDecoder, the default engine): one batch of all rows; each decode
  step advances every row, a row whose turn ends has its tool tokens appended to its own cache
  rows, finished rows leave;
- batched, re-prefill (stages.multiturn.ReprefillEngine, the mlx_lm fallback): the same loop,
  but an append re-prefills every row's context into fresh caches;
- per-row loop: the fused engine on one row at a time, its prompt prefilled per row.

Part 2, end to end (stages.multiturn.generate: parsing, the add tool, the chat template) on the
built-in tools model: `--tools-model-prompts` prompts, greedy, one completion each, all in one
batch vs one prompt at a time (the same completions, checked).

Tokens/s counts generated tokens (not tool tokens) over the whole call; each system runs
`--rounds` times alternately and reports its best round.
"""

from __future__ import annotations

import argparse
import time

import stages  # noqa: F401  (before mlx.core: fast CPU BLAS)

# isort: split
from stages import fused_decode, multiturn
from stages.backend import resolve_dtype
from stages.rollout import RolloutConfig, Sampler, left_pad

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from rollout import SHAPES, build_model  # benchmarks/rollout.py, beside this file: same shapes


def schedule(rows: int, turns: int, turn_tokens: int, seed: int) -> list[list[int]]:
    """Tokens each row generates in each turn (0.5x to 1.5x turn_tokens)."""
    rng = np.random.default_rng(seed)
    low, high = max(1, turn_tokens // 2), turn_tokens * 3 // 2 + 1
    return rng.integers(low, high, size=(rows, turns)).tolist()


def run_batched(model, engine, prompts, group, plan, tool_tokens, vocab, seed=0) -> int:
    """All rows in one batch through `engine` (prefill, decode, append, filter): the loop of
    stages.multiturn.generate_multiturn without tokenizer and tools. Returns generated tokens."""
    sampler = Sampler(RolloutConfig())
    rng = np.random.default_rng(seed)
    n = len(prompts) * group
    tokens, padding = left_pad(prompts, 0)
    budget = max(sum(p) for p in plan) + tool_tokens * (len(plan[0]) - 1)
    logits = engine.prefill(tokens, padding, budget)
    index = mx.repeat(mx.arange(len(prompts)), group)
    engine.filter(index)
    logits = logits[index]
    step_keys = mx.random.split(mx.random.key(seed), 4 * budget + 2)
    turn = np.zeros(n, dtype=np.int64)
    left = np.array([p[0] for p in plan])  # tokens left in the current turn
    done = np.zeros(n, dtype=bool)
    active = np.arange(n)
    generated = 0
    step = 0
    token, _ = sampler(logits, None, mx.random.split(step_keys[step], len(active)))
    while True:
        step += 1
        logits = engine.decode(token)
        next_token, _ = sampler(logits, None, mx.random.split(step_keys[step], len(active)))
        mx.async_eval(next_token)
        mx.eval(token)
        appends = []
        for i, row in enumerate(active):
            if done[row]:
                continue
            generated += 1
            left[row] -= 1
            if left[row] > 0:
                continue
            turn[row] += 1
            if turn[row] == len(plan[row]):
                done[row] = True
            else:
                left[row] = plan[row][turn[row]]
                appends.append(i)
        if appends:
            tool = rng.integers(0, vocab, size=(len(appends), tool_tokens)).tolist()
            appended = engine.append(np.array(appends), tool)
            first, _ = sampler(appended, None, mx.random.split(step_keys[-1], len(appends)))
            next_token[mx.array(appends)] = first.astype(next_token.dtype)
        if done.all():
            mx.eval(next_token)
            return generated
        finished = int(done[active].sum())
        if finished and finished * 8 >= len(active):
            keep = np.flatnonzero(~done[active])
            engine.filter(mx.array(keep))
            next_token = next_token[mx.array(keep)]
            active = active[keep]
        token = next_token


def part_one(args) -> None:
    model = build_model(SHAPES[args.shape], resolve_dtype("auto"))
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = np.random.default_rng(1)
    prompts = [
        rng.integers(0, vocab, size=args.prompt_tokens).tolist() for _ in range(args.prompts)
    ]
    rows = args.prompts * args.group
    plan = schedule(rows, args.turns, args.turn_tokens, seed=2)
    total = sum(map(sum, plan))

    def batched():
        return run_batched(
            model,
            fused_decode.RaggedDecoder(model),
            prompts,
            args.group,
            plan,
            args.tool_tokens,
            vocab,
        )

    def reprefill():
        engine = multiturn.ReprefillEngine(model, 0)
        return run_batched(model, engine, prompts, args.group, plan, args.tool_tokens, vocab)

    def per_row():
        count = 0
        for row in range(rows):
            engine = fused_decode.RaggedDecoder(model)
            count += run_batched(
                model, engine, [prompts[row // args.group]], 1, [plan[row]], args.tool_tokens, vocab
            )
        return count

    systems = {"batched (ragged fused)": batched, "batched (re-prefill)": reprefill}
    systems["per-row loop (fused)"] = per_row
    best = {name: float("inf") for name in systems}
    for _ in range(args.rounds):
        for name, system in systems.items():
            start = time.perf_counter()
            count = system()
            best[name] = min(best[name], time.perf_counter() - start)
            assert count == total, (name, count, total)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 2**20
    print(
        f"part 1: shape {args.shape} ({weights:.0f} MiB), {rows} rows ({args.prompts} prompts x "
        f"{args.group}), prompt {args.prompt_tokens} tokens, {args.turns} turns of ~"
        f"{args.turn_tokens} generated tokens with {args.tool_tokens} tool tokens between; "
        f"{total} generated tokens, best of {args.rounds}"
    )
    reference = best["per-row loop (fused)"]
    for name, seconds in best.items():
        print(
            f"  {name:26s} {seconds:7.2f} s  {total / seconds:8.0f} tok/s  "
            f"{reference / seconds:5.2f}x the per-row loop"
        )


def part_two(args) -> None:
    from stages.data import tool_arithmetic_rows
    from stages.load_weights import load

    model, tokenizer = load("builtin:tiny_qwen3_tools", dtype="float32")
    cfg = RolloutConfig(
        group_size=1, temperature=0.0, max_new_tokens=64, max_completion_length=128, tools=["add"]
    )
    turns = multiturn.setup(cfg, tokenizer)
    rows = tool_arithmetic_rows(args.tools_model_prompts, seed=5)

    def batched():
        return [multiturn.generate(model, tokenizer, rows, cfg, turns)]

    def per_row():
        return [multiturn.generate(model, tokenizer, [row], cfg, turns) for row in rows]

    best, outputs = {}, {}
    for _ in range(args.rounds):
        for name, system in {"batched": batched, "per-row loop": per_row}.items():
            start = time.perf_counter()
            batches = system()
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, float("inf")), seconds)
            outputs[name] = [t for b in batches for t in b.texts]
            count = sum(b.generated_mask.sum().item() for b in batches)
            calls = sum(sum(b.tool_counts["calls"]) for b in batches)
    assert outputs["batched"] == outputs["per-row loop"], "the two gave different completions"
    print(
        f"part 2: builtin:tiny_qwen3_tools, {len(rows)} prompts, greedy, add tool: "
        f"{count:.0f} generated tokens, {calls} tool calls, the same completions both ways"
    )
    for name, seconds in best.items():
        print(
            f"  {name:26s} {seconds:7.2f} s  {count / seconds:8.0f} tok/s  "
            f"{best['per-row loop'] / seconds:5.2f}x the per-row loop"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--turn-tokens", type=int, default=32)
    parser.add_argument("--tool-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tools-model-prompts", type=int, default=32)
    args = parser.parse_args()
    args.shape = args.shape or ("small" if mx.default_device() == mx.cpu else "0.6b")
    part_one(args)
    if args.tools_model_prompts:
        part_two(args)


if __name__ == "__main__":
    main()
