"""GRPO group generation, side by side in one process: our rollout vs mlx-lm vs transformers.

    ./dev python benchmarks/rollout.py [--shape small|0.6b] [--prompts 8] [--group 8]
        [--prompt-tokens 128] [--new-tokens 256] [--rounds 2] [--no-transformers]

The same work through (1) `stages.rollout.generate_rollouts`, (2) mlx-lm's `BatchGenerator`
(every prompt inserted `group` times, one batch of all rows), (3) transformers `generate` with
`num_return_sequences=group` when torch is installed. Random weights of a Qwen3 shape (0.6b:
Qwen3-0.6B's; small: the same structure scaled down), random prompt tokens, temperature 1 with
no filters, and no early stop (no EOS or stop token anywhere), so every system generates exactly
prompts x group x new-tokens tokens. Default shape: 0.6b on a GPU, small on CPU. dtype: float32
on CPU, bfloat16 on GPU. Tokens/s counts generated tokens over the whole call (prefill
included); the MLX systems run alternately `--rounds` times and each reports its best round.
Targets: our rollout >= 2x BatchGenerator on GPU, >= 1.5x on CPU.
"""

from __future__ import annotations

import argparse
import gc
import time

import stages  # noqa: F401  (attach the fast BLAS before mlx.core is imported)

# isort: split
from stages.backend import resolve_dtype  # noqa: E402
from stages.rollout import RolloutConfig, generate_rollouts  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import BatchGenerator  # noqa: E402
from mlx_lm.models import qwen3  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

COMMON = {
    "model_type": "qwen3",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}
SHAPES = {
    "0.6b": {
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "vocab_size": 151936,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 768,
        "vocab_size": 16384,
    },
}


class NoStopTokenizer:
    """Just what generate_rollouts reads: no EOS (no early stop), pad 0, no text."""

    eos_token_ids: set[int] = set()
    pad_token_id = 0

    def decode(self, ids) -> str:
        return ""

    def encode(self, text, add_special_tokens=False) -> list[int]:
        return []


def build_model(shape: dict, dtype):
    args = qwen3.ModelArgs(**COMMON, **shape)
    mx.random.seed(0)
    model = qwen3.Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def run_ours(model, prompts, group, new_tokens) -> int:
    cfg = RolloutConfig(group_size=group, max_new_tokens=new_tokens, temperature=1.0)
    batch = generate_rollouts(model, NoStopTokenizer(), prompts, cfg)
    return int(batch.completion_mask.sum().item())


def run_batch_generator(model, prompts, group, new_tokens) -> int:
    rows = [p for p in prompts for _ in range(group)]
    generator = BatchGenerator(
        model,
        max_tokens=new_tokens,
        sampler=make_sampler(temp=1.0),
        completion_batch_size=len(rows),
        prefill_batch_size=len(rows),
    )
    generator.insert(rows)
    count = 0
    while responses := generator.next_generated():
        count += len(responses)
    generator.close()
    return count


def timed(fn, *args) -> tuple[float, int, float]:
    """(seconds, tokens, peak MLX memory in GiB) of one call."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    tokens = fn(*args)
    seconds = time.perf_counter() - start
    return seconds, tokens, mx.get_peak_memory() / 2**30


def run_transformers(model, shape: dict, prompts, group, new_tokens, warmup_tokens):
    """(seconds, tokens, peak GiB or None) of transformers generate, or None without torch."""
    try:
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError:
        return None
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = Qwen3Config(**{k: v for k, v in COMMON.items() if k != "model_type"}, **shape)
    hf = Qwen3ForCausalLM(config).to(dtype)
    # Same weights as the MLX model (mlx-lm's qwen3 uses HF's parameter names).
    weights = {
        name: torch.from_numpy(np.array(value.astype(mx.float32))).to(dtype)
        for name, value in tree_flatten(model.parameters())
    }
    hf.load_state_dict(weights, strict=False)
    hf = hf.to(device).eval()
    input_ids = torch.tensor(prompts, device=device)

    def generate(n: int) -> int:
        with torch.inference_mode():
            out = hf.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=group,
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=None,
                pad_token_id=0,
            )
        if cuda:
            torch.cuda.synchronize()
        return (out.shape[1] - input_ids.shape[1]) * out.shape[0]

    generate(warmup_tokens)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = generate(new_tokens)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return seconds, tokens, peak


def work_arguments(description: str) -> argparse.ArgumentParser:
    """The rollout work both rollout benchmarks take: shape, prompts, group, lengths."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    return parser


def main() -> None:
    parser = work_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per MLX system")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    gpu = mx.default_device() == mx.gpu
    shape_name = args.shape or ("0.6b" if gpu else "small")
    shape = SHAPES[shape_name]
    dtype = resolve_dtype("auto")
    model = build_model(shape, dtype)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, shape["vocab_size"], (args.prompts, args.prompt_tokens)).tolist()
    work = (args.group, args.new_tokens)
    expected = args.prompts * args.group * args.new_tokens
    print(
        f"device {'gpu' if gpu else 'cpu'}, {dtype}, shape {shape_name} {shape}, "
        f"{args.prompts} prompts x group {args.group}, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens ({expected} generated per system)"
    )

    systems = {"ours (generate_rollouts)": run_ours, "mlx-lm BatchGenerator": run_batch_generator}
    for fn in systems.values():
        fn(model, prompts, args.group, 8)  # warm-up: kernels, allocator
    results = {}
    for round_ in range(args.rounds):  # alternate, keep each system's best (shared machines)
        for name, fn in systems.items():
            seconds, tokens, peak = timed(fn, model, prompts, *work)
            assert tokens == expected, f"{name} generated {tokens} tokens, expected {expected}"
            print(f"  round {round_ + 1}: {name} {seconds:.2f} s", flush=True)
            if name not in results or seconds < results[name][0]:
                results[name] = (seconds, tokens, max(peak, results.get(name, (0, 0, 0))[2]))
    if not args.no_transformers:
        hf = run_transformers(model, shape, prompts, args.group, args.new_tokens, 8)
        if hf is None:
            print("transformers: torch/transformers not installed, skipped")
        else:
            assert hf[1] == expected, f"transformers generated {hf[1]} tokens, not {expected}"
            results["transformers generate"] = hf

    ours = results["ours (generate_rollouts)"]
    print(f"{'system':<26}{'seconds':>9}{'tokens/s':>11}{'peak GiB':>10}{'ours x':>8}")
    for name, (seconds, tokens, peak) in results.items():
        rate = tokens / seconds
        ratio = (ours[1] / ours[0]) / rate
        peak_text = f"{peak:.2f}" if peak is not None else "-"
        print(f"{name:<26}{seconds:>9.2f}{rate:>11.0f}{peak_text:>10}{ratio:>7.2f}x")


if __name__ == "__main__":
    main()
