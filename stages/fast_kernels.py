"""Fast kernels for the fused decode engine (`rollout.fast_kernels`, MLX's CUDA backend only).

A decode step on a GPU is host-bound: each operation costs host time to build and dispatch, and
a cuBLAS matmul costs more than most (MLX sets up a cuBLASLt call each time). `matmul(x, w)`
here computes `x @ w.T` for the one-token steps of a rollout with one hand-written kernel
through `mx.fast.cuda_kernel`: tensor cores (PTX `mma.sync` on 16 x 8 x 16 tiles, float32
accumulation), each block up to 64 rows by 16 output columns (its eight warps splitting the
inner dimension, their partial sums added in shared memory) or, for the vocabulary head, by 128
columns (four warps of 32 columns each).

The kernel adds the products in another order than cuBLAS, so its results can differ in the
last bit of bfloat16, and a sampled token can differ from the exact engine's. That is why the
mode is off by default and turns on the update's importance-sampling correction (TRL's
`vllm_importance_sampling_correction`, stages/losses.py): the rollout's own log-probs are those
of the distribution it sampled from, the trainer's are recomputed exactly.

`supports(x, w)` says whether a matmul can take this path (bfloat16 or float16, the inner size a
multiple of 16, the outputs a multiple of a block's columns); the engine keeps the exact matmul for
every other one.
"""

from __future__ import annotations

import mlx.core as mx

ROWS = 64  # rows of x per block (grid.y runs over row blocks)
# Per matmul, (k_split, column_groups, tiles): a block has k_split * column_groups warps; each
# warp computes 8 * tiles columns of its column group over every k_split-th 16-wide slice of
# the inner dimension, and the k_split partial sums are added in shared memory. Few outputs
# (a block's projections): split the inner dimension for enough warps. Many (the vocabulary
# head): each warp its own columns over the whole inner dimension, so x is read once per 128
# columns and no partial sums are kept.
SMALL = (8, 1, 2)
LARGE = (1, 4, 4)
LARGE_FROM = 16384  # outputs from which a matmul takes LARGE


def _layout(n: int) -> tuple[int, int, int]:
    return LARGE if n >= LARGE_FROM else SMALL


def _columns(layout: tuple[int, int, int]) -> int:
    _, groups, tiles = layout
    return groups * 8 * tiles


# One tensor-core instruction per 16 x 8 x 16 tile (PTX mma.sync, sm_80+; inline assembly, so
# the kernel needs no CUDA header beyond what MLX's JIT already includes).
_HEADER = """
template <bool BF16>
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
"""

# x (M, K), w (N, K), both row-major; y (M, N) = x @ w.T. K and N are template constants, M is
# read at run time (rows leave the batch as they finish). Fragment layouts: PTX ISA,
# "Matrix Fragments for mma.m16n8k16" (g = lane / 4 picks the row or column, q = lane % 4 the
# pair of values).
_SOURCE = """
    constexpr int RT = ROWS / 16, COLS = GROUPS * 8 * TILES;
    __shared__ float partial[KSPLIT > 1 ? KSPLIT : 1][KSPLIT > 1 ? ROWS * COLS : 1];
    const int M = x_shape[0];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int split = warp / GROUPS, group = warp % GROUPS;
    const int g = lane / 4, q = lane % 4;
    const int n0 = blockIdx.x * COLS + group * 8 * TILES;  // this warp's first column
    const int m0 = blockIdx.y * ROWS;
    float acc[RT][TILES][4];
    for (int r = 0; r < RT; ++r)
        for (int t = 0; t < TILES; ++t)
            for (int i = 0; i < 4; ++i) acc[r][t][i] = 0.0f;
    const unsigned* xw = reinterpret_cast<const unsigned*>(x);  // pairs of values
    const unsigned* ww = reinterpret_cast<const unsigned*>(w);
    #pragma unroll 2
    for (int k0 = split * 16; k0 < K; k0 += KSPLIT * 16) {
        unsigned b[TILES][2];
        for (int t = 0; t < TILES; ++t) {
            const size_t at = (size_t)(n0 + 8 * t + g) * K + k0 + 2 * q;
            b[t][0] = ww[at / 2];
            b[t][1] = ww[at / 2 + 4];
        }
        for (int r = 0; r < RT; ++r) {
            if (m0 + 16 * r >= M) break;  // the same for the whole warp
            const int top = m0 + 16 * r + g;
            unsigned a[4] = {0, 0, 0, 0};
            const size_t at = (size_t)top * K + k0 + 2 * q;
            if (top < M) { a[0] = xw[at / 2]; a[2] = xw[at / 2 + 4]; }
            if (top + 8 < M) { a[1] = xw[(at + 8 * K) / 2]; a[3] = xw[(at + 8 * K) / 2 + 4]; }
            for (int t = 0; t < TILES; ++t) mma_16816<BF16>(acc[r][t], a, b[t]);
        }
    }
    if constexpr (KSPLIT == 1) {
        for (int r = 0; r < RT; ++r)
            for (int t = 0; t < TILES; ++t)
                for (int i = 0; i < 4; ++i) {
                    const int row = m0 + 16 * r + g + 8 * (i / 2);
                    if (row < M) y[(size_t)row * N + n0 + 8 * t + 2 * q + i % 2] = T(acc[r][t][i]);
                }
    } else {
        const int c0 = group * 8 * TILES;
        for (int r = 0; r < RT; ++r)
            for (int t = 0; t < TILES; ++t)
                for (int i = 0; i < 4; ++i) {
                    const int row = 16 * r + g + 8 * (i / 2), col = c0 + 8 * t + 2 * q + i % 2;
                    partial[split][row * COLS + col] = acc[r][t][i];
                }
        __syncthreads();
        for (int i = threadIdx.x; i < ROWS * COLS; i += KSPLIT * GROUPS * 32) {
            const int r = i / COLS, c = i % COLS;
            if (m0 + r < M) {
                float s = 0.0f;
                for (int v = 0; v < KSPLIT; ++v) s += partial[v][i];
                y[(size_t)(m0 + r) * N + blockIdx.x * COLS + c] = T(s);
            }
        }
    }
"""

_kernel = None
_calls: dict[tuple, tuple] = {}  # (dtype, n, k) -> (template, columns of the grid, block)


def unavailable() -> str | None:
    """Why the fast kernels cannot run here (in words naming the backend); None if they can."""
    if not mx.cuda.is_available():
        backend = "Metal" if mx.metal.is_available() else "CPU"
        return f"this machine runs MLX on {backend}; the fast kernels are CUDA kernels"
    return None


def supports(x: mx.array, w: mx.array) -> bool:
    """Whether `matmul(x, w)` runs the kernel: x (..., K) and w (N, K) of one half-precision
    dtype, K a multiple of 16 and N of the block's columns (16, or 128 from LARGE_FROM on)."""
    n, k = w.shape
    return (
        x.dtype == w.dtype
        and x.dtype in (mx.bfloat16, mx.float16)
        and x.shape[-1] == k
        and k % 16 == 0
        and n % _columns(_layout(n)) == 0
    )


def matmul(x: mx.array, w: mx.array) -> mx.array:
    """x (..., K) @ w.T for w (N, K) row-major: (..., N), through the kernel (see `supports`)."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="grpo_decode_matmul",
            input_names=["x", "w"],
            output_names=["y"],
            source=_SOURCE,
            header=_HEADER,
        )
    n, k = w.shape
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    call = _calls.get((x.dtype, n, k))
    if call is None:
        layout = _layout(n)
        k_split, groups, tiles = layout
        template = [
            ("T", x.dtype),
            ("BF16", x.dtype == mx.bfloat16),
            ("K", k),
            ("N", n),
            ("ROWS", ROWS),
            ("KSPLIT", k_split),
            ("GROUPS", groups),
            ("TILES", tiles),
        ]
        threads = k_split * groups * 32
        call = _calls[(x.dtype, n, k)] = (template, n // _columns(layout) * threads, threads)
    template, width, threads = call
    (y,) = _kernel(
        inputs=[rows, w],
        template=template,
        grid=(width, (m + ROWS - 1) // ROWS, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[x.dtype],
    )
    return y.reshape(*x.shape[:-1], n)
