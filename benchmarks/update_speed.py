"""The GRPO update's speed beside PyTorch doing the same work, in one script.

    python benchmarks/update_speed.py                    # GPU: Qwen3-0.6B shape, 64 x 384
    python benchmarks/update_speed.py --cuda-kernels     # + where the GPU time goes, by kernel
    ./dev python benchmarks/update_speed.py --layers 2 --rows 8 --micro-batch 4 --no-torch  # CPU

Work (issue 13, the update of benchmarks/grpo_step.py): a Qwen3-0.6B-shaped model (mlx-lm's
qwen3, random weights; `--layers` shrinks the depth only), bf16 on a GPU, `--rows` rows of
`--prompt-len` prompt tokens + completion tokens up to `--seq-len`, micro-batches of
`--micro-batch` rows accumulated into one AdamW step. Ours: `stages.grpo_update.update_step`
(dapo, beta = 0, no gradient checkpointing), one warm-up, then `--steps` timed updates; the
median is printed. PyTorch (`--no-torch` to skip; needs torch and transformers, as on the GPU
machine): transformers' Qwen3ForCausalLM of the same shape (SDPA attention), per micro-batch the
completion tokens' log-softmax from float32 logits, the policy-gradient loss, backward, then
gradient clipping and fused AdamW: the same work without the memory-lean head. Needs only mlx,
mlx-lm and numpy for ours.
"""

from __future__ import annotations

import argparse
import time

import stages  # noqa: F401  (attach the fast CPU BLAS before mlx.core)

# isort: split
from stages import grpo_update  # noqa: E402
from stages.advantages import compute_advantages  # noqa: E402
from stages.backend import resolve_dtype  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models import qwen3  # noqa: E402
from update_memory import QWEN3_0_6B, synthetic_batch  # noqa: E402  (beside this file)


def _median(values: list[float]) -> float:
    return float(np.median(values))


def mlx_update(args) -> tuple[float, list[float], callable]:
    """Median seconds of our update over `args.steps`, the times, and a one-update callable."""
    config = dict(QWEN3_0_6B, num_hidden_layers=args.layers)
    mx.random.seed(0)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    model.set_dtype(resolve_dtype(args.dtype))
    mx.eval(model.parameters())
    batch = synthetic_batch(args.rows, args.seq_len, args.prompt_len, config["vocab_size"])
    rewards = mx.array(np.random.default_rng(1).random(args.rows).astype(np.float32))
    advantages = compute_advantages(rewards, min(8, args.rows), "group")
    optimizer = grpo_update.make_optimizer(1e-6)
    cfg = grpo_update.TrainConfig(loss_type="dapo", beta=0.0, micro_batch_size=args.micro_batch)

    def once() -> float:
        mx.synchronize()
        start = time.perf_counter()
        grpo_update.update_step(model, optimizer, batch, advantages, cfg)
        mx.synchronize()
        return time.perf_counter() - start

    once()  # warm-up: optimizer state, kernels
    times = [once() for _ in range(args.steps)]
    return _median(times), times, once


def torch_update(args) -> tuple[float, list[float], float]:
    """The same work in PyTorch: median seconds, the times, peak memory (GB)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    shape = {k: v for k, v in QWEN3_0_6B.items() if k != "model_type"}
    config = Qwen3Config(**dict(shape, num_hidden_layers=args.layers))
    config._attn_implementation = "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Qwen3ForCausalLM(config).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda")
    ids = torch.randint(0, config.vocab_size, (args.rows, args.seq_len), device=device)
    advantages = torch.randn(args.rows, device=device)
    prompt, completion = args.prompt_len, args.seq_len - args.prompt_len

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for first in range(0, args.rows, args.micro_batch):
            rows = ids[first : first + args.micro_batch]
            logits = model(rows).logits[:, prompt - 1 : -1].float()
            logprobs = torch.log_softmax(logits, -1).gather(-1, rows[:, prompt:, None])[..., 0]
            ratio = torch.exp(logprobs - logprobs.detach())
            adv = advantages[first : first + args.micro_batch, None]
            loss = -(ratio * adv).sum() / (args.rows * completion)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    once()
    times = [once() for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
    return _median(times), times, peak


def kernel_table(once, rows: int = 25) -> None:
    """GPU time of one update by kernel (CUPTI through torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = once()
    times: dict[str, list[float]] = {}
    spans = []
    for event in prof.events():
        if event.device_type.name != "CUDA" or event.time_range.elapsed_us() <= 0:
            continue
        name = event.name if len(event.name) < 80 else event.name[:77] + "..."
        times.setdefault(name, []).append(event.time_range.elapsed_us())
        spans.append((event.time_range.start, event.time_range.end))
    spans.sort()
    busy, end = 0.0, float("-inf")  # the union of the kernels' spans (they may overlap)
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    total = sum(sum(t) for t in times.values())
    print(
        f"one update under the profiler: {wall * 1000:.0f} ms, "
        f"{sum(len(t) for t in times.values())} kernels, {total / 1000:.1f} ms of kernel time, "
        f"GPU busy {busy / 1000:.1f} ms"
    )
    print(f"  {'kernel':<80}{'calls':>7}{'us each':>9}{'ms':>8}{'share':>7}")
    for name, t in sorted(times.items(), key=lambda item: -sum(item[1]))[:rows]:
        print(
            f"  {name:<80}{len(t):>7}{sum(t) / len(t):>9.1f}{sum(t) / 1000:>8.2f}"
            f"{100 * sum(t) / total:>6.1f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--cuda-kernels", action="store_true", help="+ ours, kernel by kernel")
    args = parser.parse_args()
    tokens = args.rows * args.seq_len
    print(
        f"device={mx.default_device()} layers={args.layers} rows={args.rows} "
        f"seq_len={args.seq_len} (prompt {args.prompt_len}) micro-batch={args.micro_batch}"
    )
    ours, times, once = mlx_update(args)
    peak = mx.get_peak_memory() / 1e9
    print(
        f"ours (MLX):    {ours:.3f} s per update ({min(times):.3f}-{max(times):.3f}), "
        f"{tokens / ours:,.0f} tokens/s, peak {peak:.1f} GB",
        flush=True,
    )
    if args.cuda_kernels:
        kernel_table(once)
    if not args.no_torch:
        theirs, times, peak = torch_update(args)
        print(
            f"PyTorch:       {theirs:.3f} s per update ({min(times):.3f}-{max(times):.3f}), "
            f"{tokens / theirs:,.0f} tokens/s, peak {peak:.1f} GB"
        )
        print(f"ours / PyTorch: {ours / theirs:.2f}x the time")


if __name__ == "__main__":
    main()
