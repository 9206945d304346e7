"""The fast-kernel matmul (stages/fast_kernels.py) against MLX's own matmul (cuBLAS), side by side
in one process: accuracy on the decode shapes of a model, and the time of a decode step's
matmuls dispatched one after another.

    python benchmarks/fast_kernels.py [--shape 0.6b] [--rows 64] [--steps 50]

CUDA only. Accuracy: for each projection of the shape (fused QKV, O, fused gate/up, down, the
vocabulary head) and several row counts (1, a partial tile, a full tile, more than one tile),
the largest difference of each system from a float32 reference computed from the same
bfloat16 inputs, relative to the reference's largest value. Speed: one "step" is every
projection of every block plus the head, in order on one stream (each reads a fixed input of
its size), evaluated once, as Python builds it and compiled (`mx.compile`, as
`rollout.fused_compile` runs a block); the best of `--rounds` runs of `--steps` steps per system,
alternating, with the part of it spent building the graph in Python. (These matmuls read
fixed inputs, so MLX's CUDA graph may run some of them at once; the kernel's split-K counters
are shared by calls of one shape, so their outputs are timed here, not checked.)
"""

from __future__ import annotations

import argparse
import time

import stages  # noqa: F401  (before mlx.core: fast CPU BLAS)
from stages import fast_kernels

import mlx.core as mx
from rollout import SHAPES  # benchmarks/rollout.py, beside this file


def projections(shape: dict) -> dict[str, tuple[int, int]]:
    """name -> (inputs K, outputs N) of one block's fused projections, and the head."""
    d, hd = shape["hidden_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    f = shape["intermediate_size"]
    return {
        "qkv": (d, q + 2 * kv),
        "o": (q, d),
        "gate_up": (d, 2 * f),
        "down": (f, d),
        "head": (d, shape["vocab_size"]),
    }


def accuracy(shape: dict) -> None:
    print(f"{'matmul':<9}{'rows':>6}{'kernel err':>13}{'cuBLAS err':>13}{'kernel=cuBLAS':>15}")
    for name, (k, n) in projections(shape).items():
        w = (mx.random.normal((n, k)) / k**0.5).astype(mx.bfloat16)
        for m in (1, 37, 64, 130):
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            reference = x.astype(mx.float32) @ w.astype(mx.float32).T
            scale = mx.abs(reference).max()
            ours = fast_kernels.matmul(x, w).astype(mx.float32)
            blas = (x @ w.T).astype(mx.float32)
            ours_err = (mx.abs(ours - reference).max() / scale).item()
            blas_err = (mx.abs(blas - reference).max() / scale).item()
            same = (ours == blas).mean().item()
            print(f"{name:<9}{m:>6}{ours_err:>13.2e}{blas_err:>13.2e}{100 * same:>14.1f}%")
            assert ours_err < 4 * max(blas_err, 2**-8), f"{name} rows={m}: kernel error {ours_err}"


def step_time(shape: dict, rows: int, steps: int, rounds: int) -> None:
    layers = shape["num_hidden_layers"]
    sizes = projections(shape)

    def weight(k: int, n: int) -> mx.array:
        return (mx.random.normal((n, k)) / k**0.5).astype(mx.bfloat16)

    blocks = [{name: weight(*sizes[name]) for name in ("qkv", "o", "gate_up", "down")}]
    blocks *= layers  # the same arrays per block: the time is dispatch-bound, not cache-bound
    head = weight(*sizes["head"])
    inputs = {k: mx.random.normal((rows, k)).astype(mx.bfloat16) for k, _ in sizes.values()}
    mx.eval(blocks, head, inputs)

    def blas(x, w):
        return x @ w.T

    def step(matmul, xs: dict) -> list[mx.array]:
        outs = [matmul(xs[w.shape[1]], w) for block in blocks for w in block.values()]
        return outs + [matmul(xs[head.shape[1]], head)]

    systems = {}
    for label, fn in {"MLX matmul (cuBLAS)": blas, "fast kernel": fast_kernels.matmul}.items():
        systems[label] = lambda xs, fn=fn: step(fn, xs)
        systems[f"{label}, compiled"] = mx.compile(lambda xs, fn=fn: step(fn, xs))
    for fn in systems.values():
        mx.eval(fn(inputs))
    best = {}  # label -> (ms per step, ms of it building the graph)
    for _ in range(rounds):
        for label, fn in systems.items():
            mx.synchronize()
            build = 0.0
            start = time.perf_counter()
            for _ in range(steps):
                t0 = time.perf_counter()
                outs = fn(inputs)
                build += time.perf_counter() - t0
                mx.eval(outs)
            ms = 1000 * (time.perf_counter() - start) / steps
            if ms < best.get(label, (float("inf"),))[0]:
                best[label] = (ms, 1000 * build / steps)
    calls = 4 * layers + 1
    base = best["MLX matmul (cuBLAS)"][0]
    print(f"one decode step's {calls} matmuls, {rows} rows (best of {rounds} x {steps} steps):")
    print(f"  {'system':<30}{'ms/step':>9}{'building':>10}{'us/matmul':>11}{'speed-up':>10}")
    for label, (ms, build) in best.items():
        per_call = 1000 * ms / calls
        print(f"  {label:<30}{ms:>9.3f}{build:>10.3f}{per_call:>11.1f}{base / ms:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    reason = fast_kernels.unavailable()
    if reason is not None:
        raise SystemExit(f"benchmarks/fast_kernels.py: {reason}")
    shape = SHAPES[args.shape]
    print(f"device {mx.default_device()}, shape {args.shape}")
    accuracy(shape)
    step_time(shape, args.rows, args.steps, args.rounds)


if __name__ == "__main__":
    main()
