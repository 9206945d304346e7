"""One full GRPO step, timed per stage: rollout, rewards, advantages, update.

    ./dev python benchmarks/grpo_step.py                 # small shape (CPU default)
    python benchmarks/grpo_step.py --shape 0.6b          # Qwen3-0.6B shape (GPU default)
    ./dev python benchmarks/grpo_step.py --load 2        # CPU: idle, then beside 2 busy processes

Work (issue 7): random weights, 8 prompts x 8 generations x 256 new tokens, prompt 128 tokens, no
early stop (EOS is never a stop token here), dapo, beta = 0, no gradient checkpointing. Needs only
mlx, mlx-lm and numpy, so it runs unchanged on the GPU machine. The anchor to compare with, measured
on an H200 with the same work: TRL 1.16 GRPOTrainer without vLLM, 8.27 s per step (7.44-9.51).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import stages  # noqa: F401  (before mlx.core: fast CPU BLAS)
from stages import distributed, fused_decode, grpo_update, rewards
from stages.advantages import compute_advantages
from stages.backend import resolve_dtype
from stages.rollout import RolloutConfig, generate_rollouts

import mlx.core as mx
import numpy as np
from rollout import SHAPES, build_model  # benchmarks/rollout.py, beside this file


class NumberTokenizer:
    """Enough of a tokenizer for the benchmark: no EOS can stop generation early."""

    eos_token_ids = {-1}
    pad_token_id = 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def token_count_reward(prompts, completions, **_):
    """A cheap reward with spread, so advantages are non-zero."""
    return [float(len(set(c.split())) % 7) / 7 for c in completions]


def _busy() -> None:
    """A competing CPU load: one process that never sleeps (as other jobs on a shared box)."""
    value = 0
    while True:
        value = (value * 1103515245 + 12345) % 2147483648


class CompetingLoad:
    """`count` busy processes beside the benchmark, for the duration of a `with` block."""

    def __init__(self, count: int):
        self.count = count
        self.processes: list = []

    def __enter__(self):
        context = multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=_busy, daemon=True) for _ in range(self.count)]
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16, help="rows per backward pass")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument(
        "--engine", default="auto", help="rollout.engine: auto | mlx_lm | fused (stages/rollout.py)"
    )
    parser.add_argument(
        "--fused-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="fused_decode.COMPILE: auto (on a GPU), on, off",
    )
    parser.add_argument(
        "--fast-kernels",
        choices=("off", "on", "both"),
        default="off",
        help="rollout.fast_kernels (CUDA) with the importance-sampling correction; both: the "
        "exact steps first, then the fast-kernel steps, side by side",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        choices=("auto", "false", "true", "mlp", "elementwise"),
        default="auto",
        help="train.gradient_checkpointing for the update (memory; same work); auto, the "
        "default: elementwise on a GPU, false on the CPU",
    )
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        help="also time the steps beside this many busy processes (a shared CPU), side by side",
    )
    args = parser.parse_args()
    # Under `mlx.launch -n N` every process runs --prompts prompts: the global batch is N times
    # larger (weak scaling), and the update averages gradients over processes.
    fused_decode.COMPILE = {"auto": None, "on": True, "off": False}[args.fused_compile]
    world = distributed.init()
    on_gpu = mx.default_device() != mx.cpu
    shape = args.shape or ("0.6b" if on_gpu else "small")
    dtype = resolve_dtype("auto")

    model = build_model(SHAPES[shape], dtype)
    model_args = model.args
    tokenizer = NumberTokenizer()
    rng = np.random.default_rng(0)
    prompts = [
        rng.integers(1, model_args.vocab_size, args.prompt_tokens).tolist()
        for _ in range(args.prompts * world.size)
    ][world.rank * args.prompts : (world.rank + 1) * args.prompts]
    local_rows = args.prompts * args.group_size
    optimizer = grpo_update.make_optimizer(1e-6)
    checkpointing = {"false": False, "true": True}.get(
        args.gradient_checkpointing, args.gradient_checkpointing
    )
    update_cfg = grpo_update.TrainConfig(
        loss_type="dapo",
        beta=0.0,
        micro_batch_size=args.micro_batch,
        gradient_checkpointing=checkpointing,
    )

    say = print if world.is_main else (lambda *a, **k: None)
    say(
        f"device={mx.default_device()} shape={shape} dtype={dtype} processes={world.size} "
        f"engine={args.engine} micro-batch={args.micro_batch} "
        f"gradient-checkpointing={args.gradient_checkpointing} "
        f"work per process={args.prompts}x{args.group_size}x{args.new_tokens} new tokens, "
        f"prompt {args.prompt_tokens}"
    )

    def timed_steps(condition: str, fast: bool = False) -> dict:
        step_cfg = update_cfg.with_sampler_correction(fast)
        timings = []
        for step in range(args.steps + 1):
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            batch = generate_rollouts(
                model,
                tokenizer,
                prompts,
                RolloutConfig(
                    group_size=args.group_size,
                    max_new_tokens=args.new_tokens,
                    engine=args.engine,
                    fast_kernels=fast,
                ),
                seed=step,
                row_offset=world.rank * local_rows,
                total_rows=world.size * local_rows,
            )
            t1 = time.perf_counter()
            scores = rewards.score(batch, [token_count_reward], [1.0])
            t2 = time.perf_counter()
            every_score = distributed.all_gather(scores, world)  # advantages: the global batch
            advantages = compute_advantages(
                rewards.combine(every_score, [1.0]), args.group_size, "group"
            )[world.rank * local_rows : (world.rank + 1) * local_rows]
            mx.eval(advantages)
            t3 = time.perf_counter()
            grpo_update.update_step(model, optimizer, batch, advantages, step_cfg, world=world)
            t4 = time.perf_counter()
            generated = int(batch.completion_mask.sum().item())
            assert generated == args.prompts * args.group_size * args.new_tokens, "early stop"
            row = dict(
                rollout=t1 - t0,
                rewards=t2 - t1,
                advantages=t3 - t2,
                update=t4 - t3,
                step=t4 - t0,
                peak_gb=mx.get_peak_memory() / 1e9,
            )
            label = "warm-up" if step == 0 else f"step {step}"
            say(
                f"{condition} {label:>8}: "
                + "  ".join(
                    f"{k} {v:.3f}" + ("" if k == "peak_gb" else "s") for k, v in row.items()
                ),
                flush=True,
            )
            if step:
                timings.append(row)
        mean = {k: sum(r[k] for r in timings) / len(timings) for k in timings[0]}
        say(f"{condition} {'mean':>8}: " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items()))
        return mean

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.fast_kernels]
    means = {}
    for fast in modes:
        label = "fast kernels" if fast else "exact"
        mean = means[label] = timed_steps("idle" if len(modes) == 1 else label, fast)
        tokens_per_s = world.size * local_rows * args.new_tokens / mean["step"]
        say(
            f"{label}: global tokens/s: {tokens_per_s:.0f} "
            f"(generated tokens of all processes per step time)"
        )
        if on_gpu:
            say(
                f"{label}: anchor: TRL 1.16 GRPOTrainer (no vLLM), H200, same work: 8.27 s/step; "
                f"ours / TRL = {mean['step'] / 8.27:.2f} (meaningful for --shape 0.6b on an H200)"
            )
    if len(means) == 2:
        exact, fast = means["exact"], means["fast kernels"]
        say(
            f"fast kernels / exact, same process: step {fast['step'] / exact['step']:.2f}x, "
            f"rollout {fast['rollout'] / exact['rollout']:.2f}x"
        )
    if args.load:
        with CompetingLoad(args.load):
            loaded = timed_steps(f"load {args.load}")
        threads = os.environ.get("MKL_NUM_THREADS", "default")
        say(
            f"step under a load of {args.load} busy processes: {loaded['step']:.3f} s vs idle "
            f"{mean['step']:.3f} s: x{loaded['step'] / mean['step']:.2f} "
            f"(MKL_NUM_THREADS={threads}, {os.cpu_count()} CPUs)"
        )


if __name__ == "__main__":
    main()
