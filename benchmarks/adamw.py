"""AdamW's update of one large array: ours (stages.grpo_update.FusedAdamW) beside MLX's AdamW.

    ./dev python benchmarks/adamw.py                   # Qwen3-0.6B's embedding: 151,936 x 1024
    python benchmarks/adamw.py --rows 4096 --steps 20  # smaller

One array of `--rows` x `--cols` values (float32 on CPU, bf16 on a GPU), random gradients, bias
correction and weight decay as make_optimizer sets them; one warm-up step (the moments are
created), then `--steps` timed steps each: apply the gradients, evaluate the parameter, then the
moments (as the update does). Prints the median seconds per step and whether the two agree bit
for bit after the steps. Needs only mlx, mlx-lm and numpy.
"""

from __future__ import annotations

import argparse
import time

import stages  # noqa: F401  (attach the fast CPU BLAS before mlx.core)

# isort: split
from stages import grpo_update  # noqa: E402
from stages.backend import resolve_dtype  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402


def run(optimizer, weight: mx.array, grads: list[mx.array]) -> tuple[float, mx.array]:
    params = {"w": weight}
    times = []
    for i, gradient in enumerate(grads):
        start = time.perf_counter()
        params = optimizer.apply_gradients({"w": gradient}, params)
        mx.eval(params)
        mx.eval(optimizer.state)
        if i:  # the first step creates the moments
            times.append(time.perf_counter() - start)
    return float(np.median(times)), params["w"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=151936)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on GPU")
    args = parser.parse_args()
    dtype = resolve_dtype(args.dtype)
    mx.random.seed(0)
    weight = (0.02 * mx.random.normal((args.rows, args.cols))).astype(dtype)
    grads = [
        (1e-3 * mx.random.normal(weight.shape, key=mx.random.key(i))).astype(dtype)
        for i in range(args.steps + 1)
    ]
    mx.eval(weight, grads)
    ours = grpo_update.make_optimizer(1e-4, weight_decay=0.01)
    mlx_adamw = optim.AdamW(learning_rate=1e-4, weight_decay=0.01, bias_correction=True)
    print(
        f"device={mx.default_device()} array {args.rows} x {args.cols} {dtype}, "
        f"{args.steps} timed steps"
    )
    seconds_ours, w_ours = run(ours, weight, grads)
    seconds_mlx, w_mlx = run(mlx_adamw, weight, grads)
    compiled = "compiled" if ours._new_parameter is not None else "plain: no compiler here"
    print(f"FusedAdamW ({compiled}): {seconds_ours:.3f} s per step")
    print(f"MLX AdamW:               {seconds_mlx:.3f} s per step")
    print(f"ours / MLX: {seconds_ours / seconds_mlx:.2f}x the time")
    print(f"bit-identical parameters after the steps: {mx.array_equal(w_ours, w_mlx).item()}")


if __name__ == "__main__":
    main()
