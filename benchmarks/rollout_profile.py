"""Where a rollout's time goes: the full rollout vs its parts, on the same weights and work.

    python benchmarks/rollout_profile.py [--shape small|0.6b]

Prints, side by side: (1) `generate_rollouts`; (2) the bare decode floor: the same prefill and
KV cache, then one model forward per step with a greedy argmax and nothing else (no sampling, no
host reads); (3) the floor plus our per-row sampler (`Sampler`, per-row keys, inverse-CDF
draw); (4) the floor plus `mx.random.categorical` on the whole batch (mlx-lm's draw). The gaps
between them are the sampler's cost and the host bookkeeping's cost. For each decode loop it also
prints the host's share: milliseconds per step spent building the step's graph in Python
(mlx-lm's forward) and dispatching it (`mx.async_eval`, which on CUDA encodes every kernel on the
calling thread). When build + dispatch is close to the step time, the step is host-bound: the
GPU waits for the host, and only fewer or cheaper operations per step make it faster.
"""

from __future__ import annotations

import time

import stages  # noqa: F401  (before mlx.core: fast CPU BLAS)

# isort: split
from stages.backend import resolve_dtype
from stages.rollout import RolloutConfig, Sampler, _make_caches, _prefill, generate_rollouts

import mlx.core as mx
import numpy as np
from rollout import SHAPES, build_model, work_arguments  # benchmarks/rollout.py, beside this file


class _Tokenizer:
    eos_token_ids = {-1}
    pad_token_id = 0

    def decode(self, ids):
        return ""


def decode_loop(model, prompts, group, steps, draw) -> tuple[float, float, float]:
    """(seconds in all, seconds building graphs, seconds dispatching them) of one rollout."""
    tokens = mx.array(prompts, dtype=mx.int32)
    start = time.perf_counter()
    caches = _make_caches(model, [0] * len(prompts), 0)
    logits = _prefill(model, tokens, caches)
    shared = mx.repeat(mx.arange(len(prompts)), group)
    for cache in caches:
        cache.filter(shared)
    logits = logits[shared]
    keys = mx.random.split(mx.random.key(0), steps)
    token = draw(logits, keys[0])
    build = dispatch = 0.0
    for step in range(1, steps):
        tick = time.perf_counter()
        logits = model(token[:, None], cache=caches)[:, -1, :]
        token = draw(logits, keys[step])
        tock = time.perf_counter()
        mx.async_eval(token)
        build, dispatch = build + tock - tick, dispatch + time.perf_counter() - tock
    mx.eval(token)
    return time.perf_counter() - start, build, dispatch


def main() -> None:
    args = work_arguments(__doc__.splitlines()[0]).parse_args()
    shape = args.shape or ("0.6b" if mx.default_device() != mx.cpu else "small")
    model = build_model(SHAPES[shape], resolve_dtype("auto"))
    vocab = model.args.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, vocab, args.prompt_tokens).tolist() for _ in range(args.prompts)]
    n_rows = args.prompts * args.group
    sampler = Sampler(RolloutConfig(group_size=args.group))

    def ours(logits, key):
        return sampler(logits, None, mx.random.split(key, n_rows))[0]

    systems = {
        "generate_rollouts": lambda: _time_rollout(model, prompts, args),
        "decode floor (argmax)": lambda: decode_loop(
            model, prompts, args.group, args.new_tokens, lambda x, k: mx.argmax(x, axis=-1)
        ),
        "floor + our sampler": lambda: decode_loop(
            model, prompts, args.group, args.new_tokens, ours
        ),
        "floor + mx.random.categorical": lambda: decode_loop(
            model,
            prompts,
            args.group,
            args.new_tokens,
            lambda x, k: mx.random.categorical(x.astype(mx.float32), key=k),
        ),
    }
    tokens = n_rows * args.new_tokens
    print(
        f"device {mx.default_device()}, shape {shape}, {args.prompts} prompts x group "
        f"{args.group}, {args.prompt_tokens} prompt + {args.new_tokens} new tokens"
    )
    for name, run in systems.items():
        run()  # warm-up
        seconds, build, dispatch = min(run() for _ in range(2))
        host = (
            f"  host: build {1000 * build / args.new_tokens:5.2f} + dispatch "
            f"{1000 * dispatch / args.new_tokens:5.2f} ms/step"
            if build
            else ""
        )
        print(
            f"{name:32s} {seconds:7.3f} s  {tokens / seconds:9.0f} tokens/s  "
            f"{1000 * seconds / args.new_tokens:6.2f} ms/step{host}"
        )


def _time_rollout(model, prompts, args) -> tuple[float, float, float]:
    start = time.perf_counter()
    generate_rollouts(
        model,
        _Tokenizer(),
        prompts,
        RolloutConfig(group_size=args.group, max_new_tokens=args.new_tokens),
    )
    return time.perf_counter() - start, 0.0, 0.0


if __name__ == "__main__":
    main()
