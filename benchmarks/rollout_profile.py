"""Where a rollout's time goes: the full rollout vs its parts, on the same weights and work.

    python benchmarks/rollout_profile.py [--shape small|0.6b]

Prints, side by side: (1) `generate_rollouts`; (2) the bare decode floor: the same prefill and
KV cache, then one model forward per step with a greedy argmax and nothing else (no sampling, no
host reads); (3) the floor plus our per-row sampler (`Sampler`, per-row keys, inverse-CDF
draw); (4) the floor plus `mx.random.categorical` on the whole batch (mlx-lm's draw). The gaps
between them are the sampler's cost and the host bookkeeping's cost.
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


def decode_loop(model, prompts, group, steps, draw) -> float:
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
    for step in range(1, steps):
        logits = model(token[:, None], cache=caches)[:, -1, :]
        token = draw(logits, keys[step])
        mx.async_eval(token)
    mx.eval(token)
    return time.perf_counter() - start


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
        seconds = min(run() for _ in range(2))
        print(
            f"{name:32s} {seconds:7.3f} s  {tokens / seconds:9.0f} tokens/s  "
            f"{1000 * seconds / args.new_tokens:6.2f} ms/step"
        )


def _time_rollout(model, prompts, args) -> float:
    start = time.perf_counter()
    generate_rollouts(
        model,
        _Tokenizer(),
        prompts,
        RolloutConfig(group_size=args.group, max_new_tokens=args.new_tokens, seed=0),
    )
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
