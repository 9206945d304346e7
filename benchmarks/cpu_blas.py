"""MLX vs NumPy fp32 matmul on the CPU, side by side, in one process.

    ./dev python benchmarks/cpu_blas.py [--sizes 256 512 1024 2048] [--repeats 10] [--elementwise]

MLX runs on whatever BLAS `stages.backend` attached (MKL from the `cpu` extra on Linux x86-64,
a system OpenBLAS, or the slow reference BLAS bundled with mlx-cpu). Run once more with
MLX_GRPO_BLAS=reference to see the bundled BLAS for comparison. Target: MLX >= 0.8x NumPy.

`--elementwise` also times the exponentials a training step runs outside the BLAS (attention's
softmax, SiLU's sigmoid, the log-softmax over the vocabulary) on 2M float32 values, MLX against
NumPy: on a small model these, not the matmuls, bound a CPU step.
"""

import argparse
import time

import stages  # noqa: F401  (must come before mlx.core)
from stages.backend import blas

import mlx.core as mx
import numpy as np


def gflops(fn, n: int, repeats: int, trials: int = 5) -> float:
    """Best of `trials` timings of `repeats` calls. The pause first lets the other library's
    BLAS threads stop spinning; on a 2-core machine they would otherwise steal a core."""
    time.sleep(0.3)
    fn()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--elementwise", action="store_true", help="also exp, sigmoid, softmax")
    args = parser.parse_args()
    mx.set_default_device(mx.cpu)
    try:
        from threadpoolctl import threadpool_info

        numpy_blas = ", ".join(
            f"{i['internal_api']} {i.get('version')}"
            for i in threadpool_info()
            if i["user_api"] == "blas"
        )
    except ImportError:
        numpy_blas = "numpy's bundled BLAS"
    print(f"MLX BLAS: {blas()}   NumPy BLAS: {numpy_blas}")
    print(f"{'n':>6} {'MLX GFLOP/s':>12} {'NumPy GFLOP/s':>14} {'MLX/NumPy':>10}")
    for n in args.sizes:
        a_np = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        b_np = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
        a, b = mx.array(a_np), mx.array(b_np)
        mlx_rate = gflops(lambda a=a, b=b: mx.eval(a @ b), n, args.repeats)
        numpy_rate = gflops(lambda a=a_np, b=b_np: a @ b, n, args.repeats)
        print(f"{n:>6} {mlx_rate:>12.1f} {numpy_rate:>14.1f} {mlx_rate / numpy_rate:>9.2f}x")
    if args.elementwise:
        elementwise(args.repeats)


def elementwise(repeats: int) -> None:
    """MLX vs NumPy ms per call on a (32, 4, 124, 124) float32 array: the attention scores of a
    tiny model's batch (2M values)."""
    x_np = np.random.default_rng(2).standard_normal((32, 4, 124, 124), dtype=np.float32)
    x = mx.array(x_np)

    def ms(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3

    def np_softmax(a):
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    rows = [
        ("exp", lambda: mx.eval(mx.exp(x)), lambda: np.exp(x_np)),
        ("sigmoid", lambda: mx.eval(mx.sigmoid(x)), lambda: 1 / (1 + np.exp(-x_np))),
        ("softmax", lambda: mx.eval(mx.softmax(x, axis=-1)), lambda: np_softmax(x_np)),
        ("add (for scale)", lambda: mx.eval(x + 1), lambda: x_np + 1),
    ]
    print(f"{'op on 2M float32':>18} {'MLX ms':>8} {'NumPy ms':>9} {'MLX/NumPy time':>15}")
    for name, ours, theirs in rows:
        a, b = ms(ours), ms(theirs)
        print(f"{name:>18} {a:>8.2f} {b:>9.2f} {a / b:>14.1f}x")


if __name__ == "__main__":
    main()
