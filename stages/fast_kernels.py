"""Fast kernels for the fused decode engine (`rollout.fast_kernels`, MLX's CUDA backend only).

A decode step on a GPU is host-bound: each operation costs host time to build and dispatch, and
a cuBLAS matmul costs more than most (MLX sets up a cuBLASLt call each time). `matmul(x, w)`
here computes `x @ w.T` for the one-token steps of a rollout with one hand-written kernel
through `mx.fast.cuda_kernel`: tensor cores (PTX `mma.sync` on 16 x 8 x 16 tiles, float32
accumulation), 16-byte loads of x and w, each block up to 64 rows by 64 output columns (four
warps of 16; 128 columns for the vocabulary head), the inner dimension split over several blocks
when there are too few column tiles to fill the GPU (a block's projections to 1024 outputs).
`qkv_heads` turns the fused Q|K|V projection of one position into the attention's queries, keys
and values (Qwen3's per-head norms, RoPE, the heads' layout) in one kernel.

The kernel adds the products in another order than cuBLAS, so its results can differ in the
last bit of bfloat16, and a sampled token can differ from the exact engine's. That is why the
mode is off by default and turns on the update's importance-sampling correction (TRL's
`vllm_importance_sampling_correction`, stages/losses.py): the rollout's own log-probs are those
of the distribution it sampled from, the trainer's are recomputed exactly.

`supports(x, w)` says whether a matmul can take this path (bfloat16 or float16, the inner size a
multiple of 32, the outputs a multiple of a block's columns); the engine keeps the exact matmul for
every other one.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ROWS = 64  # rows of x per block (grid.z runs over row blocks)
WARPS = 4  # warps per block; each computes 8 * NT output columns over the block's slice of K
# Per matmul, NT (8-column tiles per warp) and S (the inner dimension split over S blocks): enough
# blocks for every SM (about TARGET_BLOCKS) while a block still reads its rows of x once per
# WARPS * 8 * NT columns. The S blocks of a tile write float32 partial sums; the last of them to
# finish (a per-tile counter) adds them in a fixed order, so results do not depend on timing.
# The vocabulary head has blocks enough unsplit and takes NT = 4.
TARGET_BLOCKS = 256
LARGE_FROM = 16384  # outputs from which a matmul takes NT = 4
MAX_SPLIT = 16
MAX_ROW_BLOCKS = 16  # the inner dimension is split only up to this many row blocks (1024 rows)


def _tiles(n: int) -> int:
    return 4 if n >= LARGE_FROM else 2


def _columns(n: int) -> int:
    return WARPS * 8 * _tiles(n)


def _split(n: int, k: int) -> int:
    """S for x @ w.T with w (n, k): doubled while there are too few blocks, each split's slice
    of k a multiple of 32."""
    blocks, s = n // _columns(n), 1
    while blocks * s < TARGET_BLOCKS and s < MAX_SPLIT and k % (64 * s) == 0:
        s *= 2
    return s


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

# x (M, K), w (N, K), both row-major; y (M, N) = x @ w.T. K, N, NT and S are template constants,
# M is read at run time (rows leave the batch as they finish). Grid: (N / COLS column tiles, S
# slices of K, row blocks of 64). Each lane loads 8 consecutive values (16 bytes) of a row of w
# and of x per 32-wide step of K; the two mma instructions of the step take them as the
# fragments of "Matrix Fragments for mma.m16n8k16" (PTX ISA; g = lane / 4 picks the row or
# column, q = lane % 4 the pair of values) with K permuted the same way in both operands, which
# leaves the sum unchanged: a fragment's k pairs (2q, 2q + 1) and (2q + 8, 2q + 9) are the
# lane's values (8q + 4j .. 8q + 4j + 3) for instruction j.
_SOURCE = """
    constexpr int COLS = WARPS * 8 * NT, KC = K / S;
    const int M = x_shape[0];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    const int tile = blockIdx.x, m0 = blockIdx.z * ROWS;
    const int n0 = tile * COLS + warp * 8 * NT;  // this warp's first column
    const int k_begin = blockIdx.y * KC;
    const int row_tiles = min(ROWS / 16, (M - m0 + 15) / 16);
    float acc[ROWS / 16][NT][4];
    #pragma unroll
    for (int r = 0; r < ROWS / 16; ++r)
        #pragma unroll
        for (int t = 0; t < NT; ++t)
            #pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][t][i] = 0.0f;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    #pragma unroll 4
    for (int k0 = k_begin; k0 < k_begin + KC; k0 += 32) {
        uint4 b[NT];
        #pragma unroll
        for (int t = 0; t < NT; ++t) b[t] = __ldg(wv + ((size_t)(n0 + 8 * t + g) * K + k0) / 8 + q);
        #pragma unroll
        for (int r = 0; r < ROWS / 16; ++r) {
            if (r < row_tiles) {  // the same for the whole warp
                const int top = m0 + 16 * r + g;
                uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
                if (top < M) lo = __ldg(xv + ((size_t)top * K + k0) / 8 + q);
                if (top + 8 < M) hi = __ldg(xv + ((size_t)(top + 8) * K + k0) / 8 + q);
                const unsigned a0[4] = {lo.x, hi.x, lo.y, hi.y};
                const unsigned a1[4] = {lo.z, hi.z, lo.w, hi.w};
                #pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const unsigned b0[2] = {b[t].x, b[t].y};
                    const unsigned b1[2] = {b[t].z, b[t].w};
                    mma_16816<BF16>(acc[r][t], a0, b0);
                    mma_16816<BF16>(acc[r][t], a1, b1);
                }
            }
        }
    }
    if constexpr (S == 1) {
        #pragma unroll
        for (int r = 0; r < ROWS / 16; ++r)
            #pragma unroll
            for (int t = 0; t < NT; ++t)
                #pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int row = m0 + 16 * r + g + 8 * (i / 2);
                    if (row < M) y[(size_t)row * N + n0 + 8 * t + 2 * q + i % 2] = T(acc[r][t][i]);
                }
    } else {
        // This block's partial sums: ws (row blocks, S, ROWS, N) float32.
        float* part = ws + ((size_t)blockIdx.z * S + blockIdx.y) * ROWS * N;
        #pragma unroll
        for (int r = 0; r < ROWS / 16; ++r)
            #pragma unroll
            for (int t = 0; t < NT; ++t)
                #pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = 16 * r + g + 8 * h;
                    if (m0 + row < M)
                        *reinterpret_cast<float2*>(part + (size_t)row * N + n0 + 8 * t + 2 * q) =
                            make_float2(acc[r][t][2 * h], acc[r][t][2 * h + 1]);
                }
        __threadfence();
        __syncthreads();
        __shared__ bool last;
        if (threadIdx.x == 0) {
            // The counters only ever grow, by S per call and tile (S divides 2^32).
            unsigned* counter = const_cast<unsigned*>(counters) + blockIdx.z * gridDim.x + tile;
            last = atomicAdd(counter, 1u) % S == S - 1;
        }
        __syncthreads();
        if (!last) return;
        __threadfence();
        const int rows = min(ROWS, M - m0);
        const float* first = ws + (size_t)blockIdx.z * S * ROWS * N;
        for (int i = threadIdx.x; i < rows * (COLS / 4); i += WARPS * 32) {
            const int row = i / (COLS / 4), col = tile * COLS + (i % (COLS / 4)) * 4;
            float4 sum = __ldcg(reinterpret_cast<const float4*>(first + (size_t)row * N + col));
            for (int v = 1; v < S; ++v) {
                const float4 p = __ldcg(
                    reinterpret_cast<const float4*>(first + ((size_t)v * ROWS + row) * N + col));
                sum.x += p.x; sum.y += p.y; sum.z += p.z; sum.w += p.w;
            }
            T* out = y + (size_t)(m0 + row) * N + col;
            out[0] = T(sum.x); out[1] = T(sum.y); out[2] = T(sum.z); out[3] = T(sum.w);
        }
    }
"""

_kernel = None
_calls: dict[tuple, tuple] = {}  # (dtype, n, k) -> (template, split, counters)


def unavailable() -> str | None:
    """Why the fast kernels cannot run here (in words naming the backend); None if they can."""
    if not mx.cuda.is_available():
        backend = "Metal" if mx.metal.is_available() else "CPU"
        return f"this machine runs MLX on {backend}; the fast kernels are CUDA kernels"
    return None


def supports(x: mx.array, w: mx.array) -> bool:
    """Whether `matmul(x, w)` runs the kernel: x (..., K) and w (N, K) of one half-precision
    dtype, K a multiple of 32 and N of a block's columns (64, or 128 from LARGE_FROM on)."""
    n, k = w.shape
    return (
        x.dtype == w.dtype
        and x.dtype in (mx.bfloat16, mx.float16)
        and x.shape[-1] == k
        and k % 32 == 0
        and n % _columns(n) == 0
    )


def _template(dtype, n: int, k: int, split: int) -> list:
    return [
        ("T", dtype),
        ("BF16", dtype == mx.bfloat16),
        ("K", k),
        ("N", n),
        ("ROWS", ROWS),
        ("WARPS", WARPS),
        ("NT", _tiles(n)),
        ("S", split),
    ]


def matmul(x: mx.array, w: mx.array) -> mx.array:
    """x (..., K) @ w.T for w (N, K) row-major: (..., N), through the kernel (see `supports`)."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="grpo_decode_matmul",
            input_names=["x", "w", "counters"],
            output_names=["y", "ws"],
            source=_SOURCE,
            header=_HEADER,
        )
    n, k = w.shape
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    if m == 0:
        return mx.zeros((*x.shape[:-1], n), dtype=x.dtype)
    row_blocks = (m + ROWS - 1) // ROWS
    call = _calls.get((x.dtype, n, k))
    if call is None:
        split = _split(n, k)
        # Per (row block, column tile): blocks of this call that finished. Written by the
        # kernel in place; a call adds S to each, so it starts at a multiple of S.
        counters = mx.zeros((MAX_ROW_BLOCKS * (n // _columns(n)),), dtype=mx.uint32)
        mx.eval(counters)
        call = _calls[(x.dtype, n, k)] = (_template(x.dtype, n, k, split), split, counters)
    template, split, counters = call
    if split > 1 and row_blocks > MAX_ROW_BLOCKS:
        template, split = _template(x.dtype, n, k, 1), 1
    y, _ = _kernel(
        inputs=[rows, w, counters],
        template=template,
        grid=(n // _columns(n) * WARPS * 32, split, row_blocks),
        threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[(m, n), (row_blocks, split, ROWS, n) if split > 1 else (1,)],
        output_dtypes=[x.dtype, mx.float32],
    )
    return y.reshape(*x.shape[:-1], n)


# One-token queries, keys and values from the fused Q|K|V projection's output (B, (H + 2 Hkv) *
# hd): per head, Qwen3's RMS norm (q_norm, k_norm; none for Llama) and RoPE at the row's offset,
# written as (B, H, 1, hd), (B, Hkv, 1, hd) and (B, Hkv, 1, hd): in MLX operations that is a split,
# two norms, two transposes, two RoPEs and a transpose of the values, about seven kernels a block
# and their host time. One warp per head; each lane holds P pairs of values that RoPE rotates
# together ((j, j + hd/2), or (2j, 2j + 1) when traditional). As MLX rounds between the
# operations, the normed values are rounded to T before the rotation.
_HEADS_SOURCE = """
    constexpr int HALF = HD / 2, P = HALF / 32, HEADS = H + 2 * HKV;
    const int lane = threadIdx.x % 32;
    const int at = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // (row, head) of this warp
    const int B = qkv_shape[0];
    if (at >= B * HEADS) return;
    const int row = at / HEADS, head = at % HEADS;
    const T* src = qkv + (size_t)at * HD;
    if (head >= H + HKV) {
        T* dst = values + ((size_t)row * HKV + head - H - HKV) * HD;
        for (int j = lane; j < HD; j += 32) dst[j] = src[j];
        return;
    }
    const bool query = head < H;
    T* dst = query ? queries + ((size_t)row * H + head) * HD
                   : keys + ((size_t)row * HKV + head - H) * HD;
    int ia[P], ib[P];
    float a[P], b[P];
    #pragma unroll
    for (int p = 0; p < P; ++p) {
        const int j = lane + 32 * p;
        ia[p] = TRADITIONAL ? 2 * j : j;
        ib[p] = TRADITIONAL ? 2 * j + 1 : j + HALF;
        a[p] = static_cast<float>(src[ia[p]]);
        b[p] = static_cast<float>(src[ib[p]]);
    }
    if constexpr (NORM) {
        float ss = 0.0f;
        #pragma unroll
        for (int p = 0; p < P; ++p) ss += a[p] * a[p] + b[p] * b[p];
        #pragma unroll
        for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffff, ss, o);
        const float inv = rsqrtf(ss / HD + EPS);
        const T* w = query ? q_norm : k_norm;
        #pragma unroll
        for (int p = 0; p < P; ++p) {
            a[p] = static_cast<float>(static_cast<T>(a[p] * inv * static_cast<float>(w[ia[p]])));
            b[p] = static_cast<float>(static_cast<T>(b[p] * inv * static_cast<float>(w[ib[p]])));
        }
    }
    const float position = SCALE * static_cast<float>(offsets[row]);
    #pragma unroll
    for (int p = 0; p < P; ++p) {
        const int j = lane + 32 * p;
        const float theta = position * exp2f(-static_cast<float>(j) / HALF * LOG2_BASE);
        const float c = cosf(theta), s = sinf(theta);
        dst[ia[p]] = static_cast<T>(a[p] * c - b[p] * s);
        dst[ib[p]] = static_cast<T>(a[p] * s + b[p] * c);
    }
"""

_heads_kernels: dict[tuple, object] = {}  # (eps, log2 base, scale) -> kernel


def _float_literal(value: float) -> str:
    """A float32 value as an exact CUDA literal."""
    return float(mx.array(value, dtype=mx.float32).item()).hex() + "f"


def heads_supported(head_dim: int, rope) -> bool:
    """Whether `qkv_heads` computes this attention's RoPE: MLX's plain `nn.RoPE` over the whole
    head (head_dim a multiple of 64)."""
    return type(rope) is nn.RoPE and rope.dims == head_dim and head_dim % 64 == 0


def qkv_heads(
    qkv: mx.array,
    offsets: mx.array,
    n_heads: int,
    n_kv_heads: int,
    rope,
    norms: tuple[mx.array, mx.array] | None = None,
    eps: float = 0.0,
) -> tuple[mx.array, mx.array, mx.array]:
    """Queries (B, H, 1, hd), keys and values (B, Hkv, 1, hd) of one position's fused
    projection `qkv` (B, (H + 2 Hkv) * hd): `norms` (q_norm, k_norm weights, eps `eps`) per
    head if given, then `rope` (see `heads_supported`) at `offsets` (B,) int32."""
    B = qkv.shape[0]
    head_dim = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    key = (eps, rope.base, rope.scale)
    kernel = _heads_kernels.get(key)
    if kernel is None:
        constants = (
            f"constexpr float EPS = {_float_literal(eps)};\n"
            f"constexpr float LOG2_BASE = {_float_literal(float(np.log2(rope.base)))};\n"
            f"constexpr float SCALE = {_float_literal(rope.scale)};\n"
        )
        kernel = _heads_kernels[key] = mx.fast.cuda_kernel(
            name="grpo_decode_qkv_heads",
            input_names=["qkv", "offsets", "q_norm", "k_norm"],
            output_names=["queries", "keys", "values"],
            source=constants + _HEADS_SOURCE,
        )
    q_norm, k_norm = norms if norms is not None else (qkv[:1, :1], qkv[:1, :1])
    heads = n_heads + 2 * n_kv_heads
    warps = B * heads
    return tuple(
        kernel(
            inputs=[qkv.reshape(B, -1), offsets.astype(mx.int32), q_norm, k_norm],
            template=[
                ("T", qkv.dtype),
                ("HD", head_dim),
                ("H", n_heads),
                ("HKV", n_kv_heads),
                ("NORM", norms is not None),
                ("TRADITIONAL", bool(rope.traditional)),
            ],
            grid=(((warps + 3) // 4) * 128, 1, 1),
            threadgroup=(128, 1, 1),
            output_shapes=[(B, n_heads, 1, head_dim)] + [(B, n_kv_heads, 1, head_dim)] * 2,
            output_dtypes=[qkv.dtype] * 3,
        )
    )


def qkv_heads_reference(
    qkv: mx.array,
    offsets: mx.array,
    n_heads: int,
    n_kv_heads: int,
    rope,
    norms: tuple[mx.array, mx.array] | None = None,
    eps: float = 0.0,
) -> tuple[mx.array, mx.array, mx.array]:
    """What `qkv_heads` computes, in MLX operations (as the exact engine computes it)."""
    B = qkv.shape[0]
    hd = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    q, k, v = mx.split(qkv.reshape(B, -1), [n_heads * hd, (n_heads + n_kv_heads) * hd], axis=-1)
    q, k = q.reshape(B, 1, n_heads, hd), k.reshape(B, 1, n_kv_heads, hd)
    if norms is not None:
        q, k = mx.fast.rms_norm(q, norms[0], eps), mx.fast.rms_norm(k, norms[1], eps)
    q = rope(q.transpose(0, 2, 1, 3), offset=offsets)
    k = rope(k.transpose(0, 2, 1, 3), offset=offsets)
    return q, k, v.reshape(B, 1, n_kv_heads, hd).transpose(0, 2, 1, 3)
