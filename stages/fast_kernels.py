"""Fast kernels for the fused decode engine (`rollout.fast_kernels`, MLX's CUDA backend only).

A decode step on a GPU is host-bound: each operation costs host time to build and dispatch, and
a cuBLAS matmul costs more than most (MLX sets up a cuBLASLt call each time). The kernels here,
hand-written through `mx.fast.cuda_kernel`, do a one-token step's work in fewer, cheaper calls:

- `matmul(x, w, residual=None, swiglu=False)`: `x @ w.T` on tensor cores (PTX `mma.sync` on
  16 x 8 x 16 tiles, float32 accumulation), blocks of up to 64 rows by 32-128 output columns,
  x staged in shared memory and w loaded ahead into registers, the inner dimension split over
  blocks when there are too few column tiles to fill the GPU; optionally with the residual add
  (`residual + x @ w.T`) or the MLP's `silu(gate) * up` (w an `interleave`d gate|up weight) in
  its epilogue.
- `qkv_heads`: the fused Q|K|V projection of one position to the attention's queries, keys and
  values (Qwen3's per-head norms, RoPE, the heads' layout), optionally writing the keys and
  values straight into the KV cache.
- `decode_attention`: one query position's attention over the cache's columns, rows' left
  padding masked.

They add products in another order than cuBLAS and MLX's kernels, so results can differ in the
last bit of bfloat16, and a sampled token can differ from the exact engine's. That is why the
mode is off by default and turns on the update's importance-sampling correction (TRL's
`vllm_importance_sampling_correction`, stages/losses.py): the rollout's own log-probs are those
of the distribution it sampled from, the trainer's are recomputed exactly. `reference`,
`qkv_heads_reference` and `decode_attention_reference` are what each computes, in MLX
operations (the tests' yardsticks, and the kernels' stand-ins on machines without CUDA).

`supports(x, w)`, `heads_supported` and `attention_supported` say whether a call can take a
kernel; the engine keeps MLX's operations for every other one.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu as swiglu_activation

ROWS = 64  # rows of x per block (grid.z runs over row blocks)
WARPS = 4  # warps per block; each computes 8 * NT output columns over the block's slice of K
# Per matmul, NT (8-column tiles per warp) and S (the inner dimension split over S blocks): enough
# blocks for every SM (about TARGET_BLOCKS) while a block still reads its rows of x once per
# WARPS * 8 * NT columns. The S blocks of a tile write float32 partial sums; the last of them to
# finish (a per-tile counter) adds them in a fixed order, so results do not depend on timing.
TARGET_BLOCKS = 256
LARGE_FROM = 16384  # outputs from which a matmul takes NT = 4 (the vocabulary head)
MEDIUM_FROM = 4096  # outputs from which it takes NT = 2 (below: NT = 1)
MAX_SPLIT = 16
MAX_ROW_BLOCKS = 16  # the inner dimension is split only up to this many row blocks (1024 rows)
# What the kernel does with x @ w.T before writing it (the epilogue): nothing, add a residual
# (the attention's and the MLP's output projections: h + o(x)), or the MLP's silu(gate) * up of
# a gate|up weight interleaved by eights (`interleave`), writing half the columns.
PLAIN, RESIDUAL, SWIGLU = 0, 1, 2


def _tiles(n: int, epilogue: int = PLAIN) -> int:
    if n >= LARGE_FROM:
        return 4
    return 2 if n >= MEDIUM_FROM or epilogue == SWIGLU else 1  # SWIGLU pairs tiles: gate, up


def _columns(n: int, epilogue: int = PLAIN) -> int:
    return WARPS * 8 * _tiles(n, epilogue)


def _split(n: int, k: int, epilogue: int = PLAIN) -> int:
    """S for x @ w.T with w (n, k): doubled while there are too few blocks, each split's slice
    of k a multiple of 32."""
    blocks, s = n // _columns(n, epilogue), 1
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

// What the kernel writes for a sum `acc` of output `at`: rounded to T, or (RESIDUAL) added to
// the residual as MLX adds two T arrays.
template <typename T, int EPILOGUE>
__device__ __forceinline__ T epilogue_value(float acc, const T* residual, size_t at) {
  if constexpr (EPILOGUE == 1) {
    const float product = static_cast<float>(static_cast<T>(acc));
    return static_cast<T>(static_cast<float>(residual[at]) + product);
  } else {
    return static_cast<T>(acc);
  }
}

// silu(gate) * up of one output (mlx-lm's swiglu), from the unrounded sums.
template <typename T>
__device__ __forceinline__ T swiglu_value(float gate, float up) {
  const float g = static_cast<float>(static_cast<T>(gate));
  const float u = static_cast<float>(static_cast<T>(up));
  return static_cast<T>(g / (1.0f + expf(-g)) * u);
}
"""

# x (M, K), w (N, K), both row-major; y (M, N) = x @ w.T, or (M, N / 2) for SWIGLU. K, N, NT, S
# and the epilogue are template constants, M is read at run time (rows leave the batch as they
# finish). Grid: (N / COLS column tiles, S slices of K, row blocks of 64). A block walks its slice
# of K in phases of KP: each warp first loads its columns of w for the whole phase into registers
# (CH x NT 16-byte loads in flight per lane), then the block stages the phase's rows of x in
# shared memory (rows padded by 16 bytes against bank conflicts), then every warp runs its mma
# instructions from there. Per 32-wide chunk of K each lane holds 8 consecutive values of a row of
# w and of x; the two mma instructions of the chunk take them as the fragments of "Matrix
# Fragments for mma.m16n8k16" (PTX ISA; g = lane / 4 picks the row or column, q = lane % 4 the
# pair of values) with K permuted the same way in both operands, which leaves the sum unchanged:
# a fragment's k pairs (2q, 2q + 1) and (2q + 8, 2q + 9) are the lane's values (8q + 4j ..
# 8q + 4j + 3) for instruction j. Results are rounded to T where MLX's operations would round
# them (the product before a residual add, gate and up before silu(gate) * up).
_SOURCE = """
    constexpr int COLS = WARPS * 8 * NT, KC = K / S, CH = NT == 4 ? 4 : 8, KP = 32 * CH;
    constexpr int XS = KP + 8, N_OUT = EPILOGUE == 2 ? N / 2 : N;
    __shared__ __align__(16) T xs[ROWS * XS];
    const int M = x_shape[0];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    const int tile = blockIdx.x, m0 = blockIdx.z * ROWS;
    const int n0 = tile * COLS + warp * 8 * NT;  // this warp's first column
    const int k_begin = blockIdx.y * KC;
    const int rows = min(ROWS, M - m0), row_tiles = (rows + 15) / 16;
    float acc[ROWS / 16][NT][4];
    #pragma unroll
    for (int r = 0; r < ROWS / 16; ++r)
        #pragma unroll
        for (int t = 0; t < NT; ++t)
            #pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][t][i] = 0.0f;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    for (int kp = k_begin; kp < k_begin + KC; kp += KP) {
        const int chunks = min(CH, (k_begin + KC - kp) / 32);
        uint4 b[CH][NT];
        #pragma unroll
        for (int c = 0; c < CH; ++c)
            if (c < chunks)
                #pragma unroll
                for (int t = 0; t < NT; ++t)
                    b[c][t] = __ldg(wv + ((size_t)(n0 + 8 * t + g) * K + kp + 32 * c) / 8 + q);
        __syncthreads();  // every warp is done reading the previous phase's x
        const int pieces = 4 * chunks;  // 16-byte pieces of a staged row
        for (int i = threadIdx.x; i < 16 * row_tiles * pieces; i += WARPS * 32) {
            const int r = i / pieces, p = i % pieces;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r < rows) v = __ldg(xv + ((size_t)(m0 + r) * K + kp) / 8 + p);
            *reinterpret_cast<uint4*>(xs + r * XS + 8 * p) = v;
        }
        __syncthreads();
        #pragma unroll
        for (int c = 0; c < CH; ++c) {
            if (c < chunks) {
                #pragma unroll
                for (int r = 0; r < ROWS / 16; ++r) {
                    if (r < row_tiles) {  // the same for the whole block
                        const T* top = xs + (16 * r + g) * XS + 32 * c + 8 * q;
                        const uint4 lo = *reinterpret_cast<const uint4*>(top);
                        const uint4 hi = *reinterpret_cast<const uint4*>(top + 8 * XS);
                        const unsigned a0[4] = {lo.x, hi.x, lo.y, hi.y};
                        const unsigned a1[4] = {lo.z, hi.z, lo.w, hi.w};
                        #pragma unroll
                        for (int t = 0; t < NT; ++t) {
                            const unsigned b0[2] = {b[c][t].x, b[c][t].y};
                            const unsigned b1[2] = {b[c][t].z, b[c][t].w};
                            mma_16816<BF16>(acc[r][t], a0, b0);
                            mma_16816<BF16>(acc[r][t], a1, b1);
                        }
                    }
                }
            }
        }
    }
    if constexpr (S == 1) {
        #pragma unroll
        for (int r = 0; r < ROWS / 16; ++r)
            #pragma unroll
            for (int t = 0; t < NT; t += EPILOGUE == 2 ? 2 : 1)
                #pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int row = m0 + 16 * r + g + 8 * (i / 2);
                    const int col = n0 + 8 * t + 2 * q + i % 2;
                    if (row >= M) continue;
                    if constexpr (EPILOGUE == 2) {
                        y[(size_t)row * N_OUT + 8 * (col / 16) + col % 8] =
                            swiglu_value<T>(acc[r][t][i], acc[r][t + 1][i]);
                    } else {
                        y[(size_t)row * N + col] = epilogue_value<T, EPILOGUE>(
                            acc[r][t][i], residual, (size_t)row * N + col);
                    }
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
        const float* first = ws + (size_t)blockIdx.z * S * ROWS * N;
        if constexpr (EPILOGUE == 2) {
            // Output j of this tile: gate column 16 (j / 8) + j % 8 of the tile, up 8 after it.
            for (int i = threadIdx.x; i < rows * (COLS / 2); i += WARPS * 32) {
                const int row = i / (COLS / 2), j = i % (COLS / 2);
                const int col = tile * COLS + 16 * (j / 8) + j % 8;
                float gate = __ldcg(first + (size_t)row * N + col);
                float up = __ldcg(first + (size_t)row * N + col + 8);
                for (int v = 1; v < S; ++v) {
                    gate += __ldcg(first + ((size_t)v * ROWS + row) * N + col);
                    up += __ldcg(first + ((size_t)v * ROWS + row) * N + col + 8);
                }
                y[(size_t)(m0 + row) * N_OUT + tile * (COLS / 2) + j] = swiglu_value<T>(gate, up);
            }
        } else {
            for (int i = threadIdx.x; i < rows * (COLS / 4); i += WARPS * 32) {
                const int row = i / (COLS / 4), col = tile * COLS + (i % (COLS / 4)) * 4;
                float4 sum = __ldcg(reinterpret_cast<const float4*>(first + (size_t)row * N + col));
                for (int v = 1; v < S; ++v) {
                    const float4 p = __ldcg(reinterpret_cast<const float4*>(
                        first + ((size_t)v * ROWS + row) * N + col));
                    sum.x += p.x; sum.y += p.y; sum.z += p.z; sum.w += p.w;
                }
                const size_t at = (size_t)(m0 + row) * N + col;
                y[at] = epilogue_value<T, EPILOGUE>(sum.x, residual, at);
                y[at + 1] = epilogue_value<T, EPILOGUE>(sum.y, residual, at + 1);
                y[at + 2] = epilogue_value<T, EPILOGUE>(sum.z, residual, at + 2);
                y[at + 3] = epilogue_value<T, EPILOGUE>(sum.w, residual, at + 3);
            }
        }
    }
"""

_kernel = None
_calls: dict[tuple, tuple] = {}  # (dtype, n, k, epilogue) -> (template, split, counters)


def unavailable() -> str | None:
    """Why the fast kernels cannot run here (in words naming the backend); None if they can."""
    if not mx.cuda.is_available():
        backend = "Metal" if mx.metal.is_available() else "CPU"
        return f"this machine runs MLX on {backend}; the fast kernels are CUDA kernels"
    return None


def supports(x: mx.array, w: mx.array, swiglu: bool = False) -> bool:
    """Whether `matmul(x, w, swiglu=swiglu)` runs the kernel: x (..., K) and w (N, K) of one
    half-precision dtype, K a multiple of 32 and N of a block's columns (32, 64 from MEDIUM_FROM
    or with `swiglu`, 128 from LARGE_FROM)."""
    n, k = w.shape
    return (
        x.dtype == w.dtype
        and x.dtype in (mx.bfloat16, mx.float16)
        and x.shape[-1] == k
        and k % 32 == 0
        and n % _columns(n, SWIGLU if swiglu else PLAIN) == 0
    )


def interleave(gate: mx.array, up: mx.array) -> mx.array:
    """The weight (2F, K) whose `matmul(..., swiglu=True)` is silu(x @ gate.T) * (x @ up.T):
    eight rows of gate (F, K), then eight of up, and so on (F a multiple of 8)."""
    f, k = gate.shape
    pairs = mx.concatenate([gate.reshape(f // 8, 1, 8, k), up.reshape(f // 8, 1, 8, k)], axis=1)
    return pairs.reshape(2 * f, k)


def deinterleave(y: mx.array) -> tuple[mx.array, mx.array]:
    """x @ w.T for an `interleave`d w (..., 2F) -> (x @ gate.T, x @ up.T), each (..., F)."""
    pairs = y.reshape(*y.shape[:-1], -1, 2, 8)
    return pairs[..., 0, :].reshape(*y.shape[:-1], -1), pairs[..., 1, :].reshape(*y.shape[:-1], -1)


def reference(
    x: mx.array, w: mx.array, residual: mx.array | None = None, swiglu: bool = False
) -> mx.array:
    """What `matmul` computes, in MLX operations (as the exact engine computes it)."""
    y = x @ w.T
    if swiglu:
        return swiglu_activation(*deinterleave(y))
    return y if residual is None else residual + y


def _template(dtype, n: int, k: int, split: int, epilogue: int) -> list:
    return [
        ("T", dtype),
        ("BF16", dtype == mx.bfloat16),
        ("K", k),
        ("N", n),
        ("ROWS", ROWS),
        ("WARPS", WARPS),
        ("NT", _tiles(n, epilogue)),
        ("S", split),
        ("EPILOGUE", epilogue),
    ]


def matmul(
    x: mx.array, w: mx.array, residual: mx.array | None = None, swiglu: bool = False
) -> mx.array:
    """x (..., K) @ w.T for w (N, K) row-major: (..., N), through the kernel (see `supports`);
    plus `residual` (..., N) if given; with `swiglu`, silu(gate) * up of an `interleave`d
    gate|up weight: (..., N / 2).

    Calls of one shape and epilogue share their per-tile counters, so they must not run at the
    same time: MLX's CUDA graph runs two kernels concurrently only when neither reads the
    other's output, and a model's matmuls each read the last one's."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="grpo_decode_matmul",
            input_names=["x", "w", "counters", "residual"],
            output_names=["y", "ws"],
            source=_SOURCE,
            header=_HEADER,
        )
    n, k = w.shape
    epilogue = SWIGLU if swiglu else RESIDUAL if residual is not None else PLAIN
    n_out = n // 2 if swiglu else n
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    if m == 0:
        return mx.zeros((*x.shape[:-1], n_out), dtype=x.dtype)
    row_blocks = (m + ROWS - 1) // ROWS
    call = _calls.get((x.dtype, n, k, epilogue))
    if call is None:
        split = _split(n, k, epilogue)
        # Per (row block, column tile): blocks of this call that finished. Written by the
        # kernel in place; a call adds S to each, so it starts at a multiple of S.
        counters = mx.zeros((MAX_ROW_BLOCKS * (n // _columns(n, epilogue)),), dtype=mx.uint32)
        mx.eval(counters)
        template = _template(x.dtype, n, k, split, epilogue)
        call = _calls[(x.dtype, n, k, epilogue)] = (template, split, counters)
    template, split, counters = call
    if split > 1 and row_blocks > MAX_ROW_BLOCKS:
        template, split = _template(x.dtype, n, k, 1, epilogue), 1
    y, _ = _kernel(
        inputs=[rows, w, counters, rows if residual is None else residual.reshape(m, n)],
        template=template,
        grid=(n // _columns(n, epilogue) * WARPS * 32, split, row_blocks),
        threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[(m, n_out), (row_blocks, split, ROWS, n) if split > 1 else (1,)],
        output_dtypes=[x.dtype, mx.float32],
    )
    return y.reshape(*x.shape[:-1], n_out)


# One-token queries, keys and values from the fused Q|K|V projection's output (B, (H + 2 Hkv) *
# hd): per head, Qwen3's RMS norm (q_norm, k_norm; none for Llama) and RoPE at the row's offset,
# written as (B, H, 1, hd), (B, Hkv, 1, hd) and (B, Hkv, 1, hd): in MLX operations that is a split,
# two norms, two transposes, two RoPEs and a transpose of the values, about seven kernels a block
# and their host time. With CACHE the keys and values go straight into column `column` of the
# KV cache instead (two slice updates fewer a block; see `qkv_heads`). One warp per head; each
# lane holds P pairs of values that RoPE rotates together ((j, j + hd/2), or (2j, 2j + 1) when
# traditional). As MLX rounds between the operations, the normed values are rounded to T before
# the rotation. Inputs are read through their strides (the kernel is built without copies to
# row-contiguous inputs, so that the cache it writes is the engine's own).
_HEADS_SOURCE = """
    constexpr int HALF = HD / 2, P = HALF / 32, HEADS = H + 2 * HKV;
    const int lane = threadIdx.x % 32;
    const int at = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // (row, head) of this warp
    const int B = qkv_shape[0];
    if (at >= B * HEADS) return;
    const int row = at / HEADS, head = at % HEADS;
    const T* src = qkv + row * qkv_strides[0] + (size_t)head * HD * qkv_strides[1];
    const bool query = head < H, key = !query && head < H + HKV;
    const int kv_head = key ? head - H : head - H - HKV;
    T* dst;
    if (query) {
        dst = queries + ((size_t)row * H + head) * HD;
    } else if (CACHE) {
        dst = const_cast<T*>(key ? keys_cache : values_cache);
        dst += key ? row * keys_cache_strides[0] + kv_head * keys_cache_strides[1] +
                         (int64_t)column[0] * keys_cache_strides[2]
                   : row * values_cache_strides[0] + kv_head * values_cache_strides[1] +
                         (int64_t)column[0] * values_cache_strides[2];
    } else {
        dst = (key ? keys : values) + ((size_t)row * HKV + kv_head) * HD;
    }
    if (!query && !key) {
        for (int j = lane; j < HD; j += 32) dst[j] = src[j * qkv_strides[1]];
        return;
    }
    int ia[P], ib[P];
    float a[P], b[P];
    #pragma unroll
    for (int p = 0; p < P; ++p) {
        const int j = lane + 32 * p;
        ia[p] = TRADITIONAL ? 2 * j : j;
        ib[p] = TRADITIONAL ? 2 * j + 1 : j + HALF;
        a[p] = static_cast<float>(src[ia[p] * qkv_strides[1]]);
        b[p] = static_cast<float>(src[ib[p] * qkv_strides[1]]);
    }
    if constexpr (NORM) {
        float ss = 0.0f;
        #pragma unroll
        for (int p = 0; p < P; ++p) ss += a[p] * a[p] + b[p] * b[p];
        #pragma unroll
        for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffff, ss, o);
        const float inv = rsqrtf(ss / HD + EPS);
        const T* w = query ? q_norm : k_norm;
        const int64_t stride = query ? q_norm_strides[0] : k_norm_strides[0];
        #pragma unroll
        for (int p = 0; p < P; ++p) {
            const float wa = static_cast<float>(w[ia[p] * stride]);
            const float wb = static_cast<float>(w[ib[p] * stride]);
            a[p] = static_cast<float>(static_cast<T>(a[p] * inv * wa));
            b[p] = static_cast<float>(static_cast<T>(b[p] * inv * wb));
        }
    }
    const float position = SCALE * static_cast<float>(offsets[row * offsets_strides[0]]);
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
    cache: tuple[mx.array, mx.array, mx.array] | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Queries (B, H, 1, hd), keys and values (B, Hkv, 1, hd) of one position's fused
    projection `qkv` (B, (H + 2 Hkv) * hd): `norms` (q_norm, k_norm weights, eps `eps`) per
    head if given, then `rope` (see `heads_supported`) at `offsets` (B,) int32.

    With `cache` (keys (B, Hkv, C, hd), values (B, Hkv, C, hd), column (1,) int32) the keys and
    values are written into column `column` of those arrays, in place, and the arrays are
    returned in their place, made to depend on the queries (`mx.depends`): read them only
    through what this returns. On the GPU the write is ordered before a reader by MLX's CUDA
    graph only through the queries, so a reader must take the queries and the cache in one
    kernel without a copy of the cache first (MLX's attention copies only keys or values whose
    last dimension is strided or that are not 16-byte aligned; the cache is neither)."""
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
        # One name per set of constants: MLX keeps one compiled module per kernel name.
        kernel = _heads_kernels[key] = mx.fast.cuda_kernel(
            name=f"grpo_decode_qkv_heads_{len(_heads_kernels)}",
            input_names=[
                "qkv",
                "offsets",
                "q_norm",
                "k_norm",
                "keys_cache",
                "values_cache",
                "column",
            ],
            output_names=["queries", "keys", "values"],
            source=constants + _HEADS_SOURCE,
            ensure_row_contiguous=False,
        )
    q_norm, k_norm = norms if norms is not None else (qkv[:1, :1], qkv[:1, :1])
    heads = n_heads + 2 * n_kv_heads
    warps = B * heads
    if cache is None:
        kv_shapes = [(B, n_kv_heads, 1, head_dim)] * 2
        cache_inputs = [qkv[:1, :1], qkv[:1, :1], offsets[:1].astype(mx.int32)]
    else:
        kv_shapes = [(1,), (1,)]
        cache_inputs = [cache[0], cache[1], cache[2].astype(mx.int32)]
    queries, keys, values = kernel(
        inputs=[qkv.reshape(B, -1), offsets.astype(mx.int32), q_norm, k_norm, *cache_inputs],
        template=[
            ("T", qkv.dtype),
            ("HD", head_dim),
            ("H", n_heads),
            ("HKV", n_kv_heads),
            ("NORM", norms is not None),
            ("TRADITIONAL", bool(rope.traditional)),
            ("CACHE", cache is not None),
        ],
        grid=(((warps + 3) // 4) * 128, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(B, n_heads, 1, head_dim), *kv_shapes],
        output_dtypes=[qkv.dtype] * 3,
    )
    if cache is not None:
        keys, values = mx.depends([cache[0], cache[1]], [queries])
    return queries, keys, values


def qkv_heads_reference(
    qkv: mx.array,
    offsets: mx.array,
    n_heads: int,
    n_kv_heads: int,
    rope,
    norms: tuple[mx.array, mx.array] | None = None,
    eps: float = 0.0,
    cache: tuple[mx.array, mx.array, mx.array] | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """What `qkv_heads` computes, in MLX operations (as the exact engine computes it); with
    `cache`, new cache arrays with the keys and values at `column`."""
    B = qkv.shape[0]
    hd = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    q, k, v = mx.split(qkv.reshape(B, -1), [n_heads * hd, (n_heads + n_kv_heads) * hd], axis=-1)
    q, k = q.reshape(B, 1, n_heads, hd), k.reshape(B, 1, n_kv_heads, hd)
    if norms is not None:
        q, k = mx.fast.rms_norm(q, norms[0], eps), mx.fast.rms_norm(k, norms[1], eps)
    q = rope(q.transpose(0, 2, 1, 3), offset=offsets)
    k = rope(k.transpose(0, 2, 1, 3), offset=offsets)
    v = v.reshape(B, 1, n_kv_heads, hd).transpose(0, 2, 1, 3)
    if cache is None:
        return q, k, v
    column = cache[2].astype(mx.int32)
    keys = mx.slice_update(cache[0], k, column, axes=(2,))
    return q, keys, mx.slice_update(cache[1], v, column, axes=(2,))


# One-token attention over the KV cache (the decode step's `scaled_dot_product_attention`).
# One block per (row, KV head): its G = H / Hkv query heads share the keys and values, read
# once. Columns [start, stop) of the cache (window) in tiles of 128, a row's columns before its
# left padding masked; an online softmax over the tiles in float32: per tile, (1) each thread
# scores one column for the G heads (its key row loaded 16 bytes at a time, the queries from
# shared memory), (2) the block's maximum and the exponentials, (3) each warp adds a quarter of
# the tile's values, each lane holding HD / 32 dimensions, UNROLL columns' values loaded before
# they are added (the loads' latency, not bandwidth, bounds a decode step's attention); at the
# end the warps' sums are added and divided by the softmax's sum.
_ATTENTION_SOURCE = """
    constexpr int G = H / HKV, D = HD / 32, TILE = 128, WARPS = TILE / 32, UNROLL = 8;
    __shared__ float qs[G][HD];
    __shared__ float probs[G][TILE];
    __shared__ float partial[WARPS][G];
    __shared__ float sums[WARPS][G][HD];
    const int b = blockIdx.x / HKV, kv = blockIdx.x % HKV;
    const int t = threadIdx.x, warp = t / 32, lane = t % 32;
    const int start = max(window[0], padding[b]), stop = window[1];
    const T* kbase = keys + b * keys_strides[0] + kv * keys_strides[1];
    const T* vbase = values + b * values_strides[0] + kv * values_strides[1];
    const int64_t kcol = keys_strides[2], vcol = values_strides[2];
    for (int i = t; i < G * HD; i += TILE) {
        const int g = i / HD, d = i % HD;
        const T* q = queries + b * queries_strides[0] + (kv * G + g) * queries_strides[1];
        qs[g][d] = SCALE * static_cast<float>(q[d]);
    }
    float m[G], l[G], acc[G][D];
    #pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        #pragma unroll
        for (int d = 0; d < D; ++d) acc[g][d] = 0.0f;
    }
    __syncthreads();
    for (int c0 = start; c0 < stop; c0 += TILE) {
        // (1) scores of column c0 + t
        const int c = c0 + t;
        float s[G];
        #pragma unroll
        for (int g = 0; g < G; ++g) s[g] = 0.0f;
        if (c < stop) {
            const uint4* krow = reinterpret_cast<const uint4*>(kbase + c * kcol);
            #pragma unroll 16
            for (int j = 0; j < HD / 8; ++j) {
                const uint4 piece = __ldg(krow + j);
                const T* k8 = reinterpret_cast<const T*>(&piece);
                #pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float kval = static_cast<float>(k8[e]);
                    #pragma unroll
                    for (int g = 0; g < G; ++g) s[g] += qs[g][8 * j + e] * kval;
                }
            }
        } else {
            #pragma unroll
            for (int g = 0; g < G; ++g) s[g] = -INFINITY;
        }
        // (2) the tile's maximum per head, the running maximum, the exponentials
        #pragma unroll
        for (int g = 0; g < G; ++g) {
            float x = s[g];
            #pragma unroll
            for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
            if (lane == 0) partial[warp][g] = x;
        }
        __syncthreads();
        float correction[G];
        #pragma unroll
        for (int g = 0; g < G; ++g) {
            float tile_max = partial[0][g];
            #pragma unroll
            for (int w = 1; w < WARPS; ++w) tile_max = fmaxf(tile_max, partial[w][g]);
            const float m_new = fmaxf(m[g], tile_max);
            correction[g] = m[g] == -INFINITY ? 0.0f : expf(m[g] - m_new);
            m[g] = m_new;
            probs[g][t] = c < stop ? expf(s[g] - m_new) : 0.0f;
        }
        __syncthreads();
        // (3) this warp's quarter of the tile's values; every thread keeps the sums l
        const int columns = min(TILE, stop - c0);
        #pragma unroll
        for (int g = 0; g < G; ++g) {
            float tile_sum = 0.0f;
            for (int i = 0; i < columns; ++i) tile_sum += probs[g][i];
            l[g] = l[g] * correction[g] + tile_sum;
            #pragma unroll
            for (int d = 0; d < D; ++d) acc[g][d] *= correction[g];
        }
        for (int i0 = warp; i0 < columns; i0 += UNROLL * WARPS) {
            float v[UNROLL][D];  // UNROLL columns' loads in flight before their sums
            #pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int i = i0 + u * WARPS;
                const T* vrow = vbase + (c0 + min(i, columns - 1)) * vcol + lane * D;
                #pragma unroll
                for (int d = 0; d < D; ++d) v[u][d] = static_cast<float>(vrow[d]);
            }
            #pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int i = i0 + u * WARPS;
                if (i < columns) {
                    #pragma unroll
                    for (int g = 0; g < G; ++g) {
                        const float p = probs[g][i];
                        #pragma unroll
                        for (int d = 0; d < D; ++d) acc[g][d] += p * v[u][d];
                    }
                }
            }
        }
        __syncthreads();  // probs and partial are rewritten by the next tile
    }
    #pragma unroll
    for (int g = 0; g < G; ++g)
        #pragma unroll
        for (int d = 0; d < D; ++d) sums[warp][g][lane * D + d] = acc[g][d];
    __syncthreads();
    for (int i = t; i < G * HD; i += TILE) {
        const int g = i / HD, d = i % HD;
        float total = sums[0][g][d];
        #pragma unroll
        for (int w = 1; w < WARPS; ++w) total += sums[w][g][d];
        out[((size_t)b * H + kv * G + g) * HD + d] = static_cast<T>(total / l[g]);
    }
"""

_attention_kernels: dict[float, object] = {}  # scale -> kernel
MAX_GROUP = 8  # query heads per KV head that `decode_attention` takes


def attention_supported(queries: mx.array, keys: mx.array) -> bool:
    """Whether `decode_attention` runs these: one half-precision query position, head size a
    multiple of 32 up to 256, at most MAX_GROUP query heads per KV head."""
    B, H, L, hd = queries.shape
    return (
        L == 1
        and queries.dtype in (mx.bfloat16, mx.float16)
        and keys.dtype == queries.dtype
        and hd % 32 == 0
        and hd <= 256
        and H % keys.shape[1] == 0
        and H // keys.shape[1] <= MAX_GROUP
    )


def decode_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    window: mx.array,
    padding: mx.array,
    scale: float,
) -> mx.array:
    """softmax(scale q k^T) v of one position's queries (B, H, 1, hd) over columns
    [window[0], window[1]) of a KV cache (B, Hkv, C, hd) each, row b's columns before
    padding[b] masked (mlx-lm's batch cache: left padding), as `scaled_dot_product_attention`
    with that mask computes it: (B, H, 1, hd). window (2,) and padding (B,) are int32 arrays.
    Each array's last dimension must be contiguous (the engine's cache and queries are)."""
    B, H, _, hd = queries.shape
    kernel = _attention_kernels.get(scale)
    if kernel is None:
        kernel = _attention_kernels[scale] = mx.fast.cuda_kernel(
            name=f"grpo_decode_attention_{len(_attention_kernels)}",
            input_names=["queries", "keys", "values", "window", "padding"],
            output_names=["out"],
            source=f"constexpr float SCALE = {_float_literal(scale)};\n" + _ATTENTION_SOURCE,
            ensure_row_contiguous=False,
        )
    n_kv = keys.shape[1]
    return kernel(
        inputs=[queries, keys, values, window, padding],
        template=[("T", queries.dtype), ("HD", hd), ("H", H), ("HKV", n_kv)],
        grid=(B * n_kv * 128, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[queries.shape],
        output_dtypes=[queries.dtype],
    )[0]


def decode_attention_reference(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    window: mx.array,
    padding: mx.array,
    scale: float,
) -> mx.array:
    """What `decode_attention` computes, in MLX operations (as the exact engine computes it)."""
    start, stop = window.tolist()
    mask = padding[:, None, None, None] <= mx.arange(start, stop)
    return mx.fast.scaled_dot_product_attention(
        queries, keys[..., start:stop, :], values[..., start:stop, :], scale=scale, mask=mask
    )
