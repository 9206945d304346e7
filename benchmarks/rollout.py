"""GRPO group generation, side by side in one process: our rollout on each decode engine vs
mlx-lm's BatchGenerator vs transformers.

    ./dev python benchmarks/rollout.py [--shape small|0.6b] [--prompts 8] [--group 8]
        [--prompt-tokens 128] [--new-tokens 256] [--rounds 2] [--no-transformers]
        [--fused-compile auto|on|off|both]

The same work through (1) `stages.rollout.generate_rollouts` with engine=fused (fused QKV and
gate/up weights, pre-allocated cache; `--fused-compile` picks `fused_decode.COMPILE`, `both`
runs it compiled and not), (2) the same with engine=mlx_lm (mlx-lm's model and batch caches),
(3) mlx-lm's `BatchGenerator` (every prompt inserted `group` times, one batch of all rows),
(4) transformers `generate` with `num_return_sequences=group` when torch is installed. Random
weights of a Qwen3 shape (0.6b: Qwen3-0.6B's; small: the same structure scaled down), random
prompt tokens, temperature 1 with no filters, and no early stop (no EOS or stop token anywhere),
so every system generates exactly prompts x group x new-tokens tokens. Default shape: 0.6b on a
GPU, small on CPU. dtype: float32 on CPU, bfloat16 on GPU. Tokens/s counts generated tokens
over the whole call (prefill and, for engine=fused, building its fused weights included); the
MLX systems run alternately `--rounds` times and each reports its best round. Also prints what
building the fused weights (`FusedDecoder.refresh`, once per rollout) costs and their size.
Targets: engine=fused >= 1.4x BatchGenerator on GPU, >= 1.5x on CPU; both engines give the
same tokens.
"""

from __future__ import annotations

import argparse
import gc
import time

import stages  # noqa: F401  (attach the fast BLAS before mlx.core is imported)

# isort: split
from stages import fast_kernels, fused_decode  # noqa: E402
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


def ours(engine: str, compile_fused: bool | None = None, fast: bool = False):
    """Our rollout on `engine`; for fused, compiled as `compile_fused` says (None: default),
    with rollout.fast_kernels = `fast`."""

    def run(model, prompts, group, new_tokens) -> int:
        fused_decode.COMPILE = compile_fused
        cfg = RolloutConfig(
            group_size=group,
            max_new_tokens=new_tokens,
            temperature=1.0,
            engine=engine,
            fast_kernels=fast,
        )
        batch = generate_rollouts(model, NoStopTokenizer(), prompts, cfg)
        assert batch.engine == engine, f"asked for engine={engine}, ran {batch.engine}"
        return int(batch.completion_mask.sum().item())

    return run


def refresh_cost(model, repeats: int = 5) -> tuple[float, int]:
    """(best seconds to build the fused weights from the model's, their bytes)."""
    engine = fused_decode.FusedDecoder(model)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        engine.refresh(model)  # evaluates the fused weights before returning
        best = min(best, time.perf_counter() - start)
    return best, engine.nbytes


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


def timed(fn, *args) -> tuple[float, int, float, float]:
    """(seconds, tokens, peak MLX memory in GiB, CPU seconds of this process) of one call.

    CPU seconds (all threads) are the steadier measure on a CPU shared with other work, where
    wall time includes the time other processes hold the cores."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = fn(*args)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, tokens, mx.get_peak_memory() / 2**30, cpu


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
    parser.add_argument(
        "--fused-compile",
        choices=("auto", "on", "off", "both"),
        default="auto",
        help="fused engine with mx.compile: auto (its default for this device), on, off, both",
    )
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

    compile_choices = {"auto": [None], "on": [True], "off": [False], "both": [True, False]}
    systems = {}
    for choice in compile_choices[args.fused_compile]:
        label = {None: "", True: ", compiled", False: ", not compiled"}[choice]
        systems[f"ours engine=fused{label}"] = ours("fused", choice)
        if fast_kernels.unavailable() is None:
            systems[f"ours fused{label}, fast kernels"] = ours("fused", choice, fast=True)
    systems["ours engine=mlx_lm"] = ours("mlx_lm")
    systems["mlx-lm BatchGenerator"] = run_batch_generator
    for fn in systems.values():
        fn(model, prompts, args.group, 8)  # warm-up: kernels, allocator
    results = {}  # name -> (best seconds, tokens, peak GiB, best CPU seconds or None)
    for round_ in range(args.rounds):  # alternate, keep each system's best (shared machines)
        for name, fn in systems.items():
            seconds, tokens, peak, cpu = timed(fn, model, prompts, *work)
            assert tokens == expected, f"{name} generated {tokens} tokens, expected {expected}"
            print(f"  round {round_ + 1}: {name} {seconds:.2f} s, CPU {cpu:.2f} s", flush=True)
            best = results.get(name, (seconds, tokens, peak, cpu))
            results[name] = (min(best[0], seconds), tokens, max(best[2], peak), min(best[3], cpu))
    if not args.no_transformers:
        hf = run_transformers(model, shape, prompts, args.group, args.new_tokens, 8)
        if hf is None:
            print("transformers: torch/transformers not installed, skipped")
        else:
            assert hf[1] == expected, f"transformers generated {hf[1]} tokens, not {expected}"
            results["transformers generate"] = (*hf, None)

    seconds, nbytes = refresh_cost(model)
    print(
        f"fused weights: {nbytes / 2**20:.1f} MiB, built (refresh) in {1000 * seconds:.2f} ms "
        f"({100 * seconds / results['ours engine=mlx_lm'][0]:.2f}% of an engine=mlx_lm rollout)"
    )
    base_seconds, _, _, base_cpu = results["mlx-lm BatchGenerator"]
    print(
        f"{'system':<32}{'seconds':>9}{'tokens/s':>10}{'peak GiB':>10}{'CPU s':>8}"
        f"{'vs BatchGenerator: wall':>25}{'CPU':>7}"
    )
    for name, (seconds, tokens, peak, cpu) in results.items():
        peak_text = f"{peak:.2f}" if peak is not None else "-"
        cpu_text = f"{cpu:.2f}" if cpu is not None else "-"
        cpu_ratio = f"{base_cpu / cpu:.2f}x" if cpu is not None else "-"
        print(
            f"{name:<32}{seconds:>9.2f}{tokens / seconds:>10.0f}{peak_text:>10}{cpu_text:>8}"
            f"{base_seconds / seconds:>24.2f}x{cpu_ratio:>7}"
        )


if __name__ == "__main__":
    main()
