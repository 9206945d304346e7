"""Peak memory and throughput of one GRPO update step: full fine-tune vs LoRA, with and without
gradient checkpointing (of whole blocks, of the MLPs only, or of the elementwise outputs the linear
layers take), side by side in one process.

    ./dev python benchmarks/update_memory.py                 # GPU: 16 x 512 tokens, 28 blocks
    ./dev python benchmarks/update_memory.py --layers 4 --rows 4 --seq-len 128   # CPU-sized

The model is Qwen3-0.6B-shaped (hidden 1024, 16 heads / 8 KV heads of 128, MLP 3072, vocab
151936, tied embeddings) with random weights, built by mlx-lm's qwen3 (nothing is downloaded);
`--layers` shrinks the depth only. Each variant gets a fresh model, one warm-up update, then one
timed update (stages.grpo_update.update_step, AdamW, dapo loss) on a synthetic rollout batch:
`--rows` rows of `--prompt-len` prompt tokens + the rest completion. Peak memory is
mx.get_peak_memory() over the timed step (weights, optimizer state and activations); tokens/s
counts prompt + completion tokens. LoRA: rank 8 on every linear layer of every block. "full"
and "lora" run the default `train.gradient_checkpointing: auto` (elementwise on a GPU, nothing
recomputed on the CPU); "full (all kept)" recomputes nothing anywhere.
`--phases` also prints the peak of each phase of the step (the forward and head, the backward,
the parameters' and the moments' update): where the peak memory goes.
Needs only mlx, mlx-lm and numpy.
"""

from __future__ import annotations

import argparse
import gc
import time

import stages  # noqa: F401  (attach the fast CPU BLAS before mlx.core)

# isort: split
from stages import grpo_update, lora  # noqa: E402
from stages.advantages import compute_advantages  # noqa: E402
from stages.backend import resolve_dtype  # noqa: E402
from stages.policy import StagedEval  # noqa: E402
from stages.rollout import RolloutBatch  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen3  # noqa: E402

QWEN3_0_6B = {
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
}


def synthetic_batch(rows: int, seq_len: int, prompt_len: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    completion = seq_len - prompt_len
    prompts = rng.integers(0, vocab, size=(rows, prompt_len)).tolist()
    return RolloutBatch(
        prompt_ids=prompts,
        completion_ids=mx.array(rng.integers(0, vocab, size=(rows, completion)), dtype=mx.int32),
        completion_mask=mx.ones((rows, completion), dtype=mx.float32),
        logprobs=mx.zeros((rows, completion), dtype=mx.float32),
        finish_reasons=["length"] * rows,
        prompt_texts=[""] * rows,
        texts=[""] * rows,
        group_size=rows,
    )


def run_variant(args, use_lora: bool, checkpointing: bool | str, lean: bool = True) -> dict:
    config = dict(QWEN3_0_6B, num_hidden_layers=args.layers)
    mx.random.seed(0)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    model.set_dtype(resolve_dtype(args.dtype))
    mx.eval(model.parameters())
    if use_lora:
        lora.apply(model, lora.LoraConfig(rank=8))
    batch = synthetic_batch(args.rows, args.seq_len, args.prompt_len, config["vocab_size"])
    rewards = mx.array(np.random.default_rng(1).random(args.rows).astype(np.float32))
    advantages = compute_advantages(rewards, args.rows, "group")
    optimizer = grpo_update.make_optimizer(1e-5)
    if args.plain_adamw:  # MLX's AdamW as it is: each array's update uncompiled
        optimizer._new_parameter = None
    cfg = grpo_update.TrainConfig(
        micro_batch_size=args.micro_batch_size,
        gradient_checkpointing=checkpointing,
        lean_activations=lean,
    )
    grpo_update.update_step(model, optimizer, batch, advantages, cfg)  # warm-up, optimizer init
    mx.synchronize()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    _PHASE_PEAKS.clear()
    start = time.perf_counter()
    grpo_update.update_step(model, optimizer, batch, advantages, cfg)
    mx.synchronize()
    seconds = time.perf_counter() - start
    peak = max([mx.get_peak_memory(), *_PHASE_PEAKS])  # --phases resets the peak per phase
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    del model, optimizer
    gc.collect()
    mx.clear_cache()
    return {
        "peak_gb": peak / 1e9,
        "resident_gb": resident / 1e9,
        "tokens_per_s": args.rows * args.seq_len / seconds,
        "seconds": seconds,
        "trainable_m": trainable / 1e6,
    }


VARIANTS = {  # name: (LoRA, gradient_checkpointing)
    "full": (False, "auto"),  # the default: elementwise on a GPU, nothing recomputed on the CPU
    "full (all kept)": (False, False),
    "full + mlp ckpt": (False, "mlp"),
    "full + elementwise": (False, "elementwise"),
    "full + ckpt": (False, True),
    "lora": (True, "auto"),
    "lora + ckpt": (True, True),
}

_PHASE_PEAKS: list[int] = []


def _phase(name: str, fn):
    """fn, printing the active memory before and after it and the peak during it (GB)."""

    def timed(*args, **kwargs):
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        out = fn(*args, **kwargs)
        mx.synchronize()
        _PHASE_PEAKS.append(mx.get_peak_memory())
        print(
            f"  {name}: before {before / 1e9:.2f} peak {mx.get_peak_memory() / 1e9:.2f} "
            f"after {mx.get_active_memory() / 1e9:.2f}",
            flush=True,
        )
        return out

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on GPU")
    parser.add_argument(
        "--in-flight",
        type=int,
        choices=(1, 2),
        default=2,
        help="parts of the update evaluated at once (StagedEval.in_flight): 1 is leaner, 2 "
        "faster on a GPU; updates with checkpointing, and every update on the CPU, use 1",
    )
    parser.add_argument(
        "--plain-adamw",
        action="store_true",
        help="MLX's AdamW uncompiled (the comparison for grpo_update.FusedAdamW)",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also print each phase's peak: the forward and head (StagedEval.run), the "
        "backward, the parameters' and the moments' update (grpo_update.eval_by_block)",
    )
    parser.add_argument(
        "--lean",
        choices=("on", "off", "both"),
        default="on",
        help="train.lean_activations (stages/lean_activations.py); both: each variant without "
        "it first, then with it",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    StagedEval.in_flight = args.in_flight
    if args.phases:
        StagedEval.run = _phase("forward + head", StagedEval.run)
        grpo_update.eval_by_block = _phase("eval_by_block", grpo_update.eval_by_block)
    if not 1 <= args.prompt_len < args.seq_len:
        parser.error("--prompt-len must be in [1, --seq-len)")
    print(
        f"device {mx.default_device()}, dtype {resolve_dtype(args.dtype)}, Qwen3-0.6B shape with "
        f"{args.layers} blocks, {args.rows} x {args.seq_len} tokens ({args.prompt_len} prompt), "
        f"{args.in_flight} part(s) in flight (1 with checkpointing and on the CPU), "
        f"{'plain' if args.plain_adamw else 'fused (compiled)'} AdamW"
    )
    header = (
        f"{'variant':<24}{'trainable M':>12}{'peak GB':>10}{'resident GB':>13}"
        f"{'tokens/s':>10}{'step s':>8}"
    )
    print(header)
    results = {}
    leans = {"on": [True], "off": [False], "both": [False, True]}[args.lean]
    for variant in args.variants.split(","):
        use_lora, checkpointing = VARIANTS[variant]
        for lean in leans:
            name = variant + (" (lean)" if lean and args.lean == "both" else "")
            r = run_variant(args, use_lora, checkpointing, lean)
            results[name] = r
            print(
                f"{name:<24}{r['trainable_m']:>12.1f}{r['peak_gb']:>10.2f}"
                f"{r['resident_gb']:>13.2f}{r['tokens_per_s']:>10.0f}{r['seconds']:>8.2f}",
                flush=True,
            )
    first = next(iter(results))
    base = results[first]
    for name, r in results.items():
        if name != first:
            print(
                f"{name} vs {first}: peak memory x{r['peak_gb'] / base['peak_gb']:.2f}, "
                f"tokens/s x{r['tokens_per_s'] / base['tokens_per_s']:.2f}"
            )


if __name__ == "__main__":
    main()
