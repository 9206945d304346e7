"""The fast-kernel decode step with each of its kernels on or off, side by side in one process:
which of `stages.fast_kernels`' kernels pays, measured on the same weights and work.

    python benchmarks/fast_variants.py [--shape 0.6b] [--rounds 3] [--kernels]

CUDA only. Variants of the fused engine's decode floor (`rollout_profile.decode_loop`: prefill,
then one compiled forward per step with a greedy argmax, pipelined one step ahead): the exact
engine; fast kernels with the cache written by MLX's slice updates and MLX's attention; with
`qkv_heads` writing the keys and values into the cache; and with `decode_attention` too (the
default). The variants are switched by replacing `_Block.writes_cache` and
`fast_kernels.attention_supported` for the run. Best of `--rounds` rounds (after one warm-up
round), in ms per step, with the host's build + dispatch time. `--kernels` adds the per-kernel
GPU table (`rollout_profile.kernel_table`, needs torch) of each fast variant.
"""

from __future__ import annotations

import argparse

import stages  # noqa: F401  (before mlx.core: fast CPU BLAS)

# isort: split
from stages import fast_kernels, fused_decode
from stages.rollout import RolloutConfig, make_engine

import mlx.core as mx
import numpy as np
from rollout import SHAPES, build_model  # benchmarks/rollout.py, beside this file
from rollout_profile import decode_loop, kernel_table

VARIANTS = {  # name -> (heads written into the cache, our attention); None: the exact engine
    "exact": None,
    "fast: MLX cache writes + MLX attention": (False, False),
    "fast: qkv_heads writes the cache + MLX attention": (True, False),
    "fast: qkv_heads writes the cache + decode_attention": (True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernels", action="store_true")
    args = parser.parse_args()
    reason = fast_kernels.unavailable()
    if reason is not None:
        raise SystemExit(f"benchmarks/fast_variants.py: {reason}")
    fused_decode.COMPILE = True
    model = build_model(SHAPES[args.shape], mx.bfloat16)
    rng = np.random.default_rng(0)
    vocab = model.args.vocab_size
    prompts = [rng.integers(1, vocab, args.prompt_tokens).tolist() for _ in range(args.prompts)]
    writes_cache, attention_supported = (
        fused_decode._Block.writes_cache,
        fast_kernels.attention_supported,
    )

    def run(variant):
        cache, attention = variant or (True, True)
        fused_decode._Block.writes_cache = writes_cache if cache else lambda block, n: False
        fast_kernels.attention_supported = attention_supported if attention else lambda q, k: False
        cfg = RolloutConfig(
            group_size=args.group, max_new_tokens=args.new_tokens, fast_kernels=bool(variant)
        )
        engine = make_engine(model, cfg)
        return decode_loop(engine, prompts, args.group, args.new_tokens, argmax)

    def argmax(logits, key):
        return mx.argmax(logits, axis=-1)

    print(f"device {mx.default_device()}, shape {args.shape}, {args.prompts * args.group} rows")
    best: dict[str, tuple[float, float, float]] = {}
    for round_ in range(args.rounds + 1):
        for name, variant in VARIANTS.items():
            seconds, _, build, dispatch = run(variant)
            ms = 1000 * seconds / args.new_tokens
            if round_ and ms < best.get(name, (float("inf"),))[0]:
                host = (1000 * build / args.new_tokens, 1000 * dispatch / args.new_tokens)
                best[name] = (ms, *host)
    for name, (ms, build, dispatch) in best.items():
        print(f"  {name:<54}{ms:7.2f} ms/step  host: build {build:5.2f} + dispatch {dispatch:5.2f}")
    if args.kernels:
        for name, variant in VARIANTS.items():
            if variant is not None:
                kernel_table(name, lambda variant=variant: run(variant), args.new_tokens)
    fused_decode._Block.writes_cache = writes_cache
    fast_kernels.attention_supported = attention_supported


if __name__ == "__main__":
    main()
