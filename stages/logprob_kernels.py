"""CUDA kernels for the chunked log-prob head's per-block work (stages/policy.py).

The update computes each completion token's log-prob and entropy over blocks of the vocabulary
(`policy.completion_logprobs`): per block, a few numbers per position from the block's logits
(`block_stats`), and in the backward pass the block's logit gradient (`block_grad`). Written as
MLX operations these are a dozen elementwise and reduction kernels over a (positions, block)
float32 array each: MLX does not compile inside a gradient, so they run one kernel per
operation there, each writing a full-size intermediate (a division by the temperature, the
exponentials, a one-hot mask cast to float32, ...). Measured on an H200 (Qwen3-0.6B shape, 64 x
384 tokens, micro-batches of 16): about a fifth of the update's GPU time.

On CUDA each is one kernel here (`mx.fast.cuda_kernel`, float32 inside), reading the block's
logits once or twice and writing only what is asked for. Elsewhere (CPU, Metal) the MLX
operations run (`block_stats_reference`, `block_grad_reference`, compiled: outside a gradient
MLX fuses them). Results equal the operations' within float32 rounding
(tests/test_logprob_kernels.py).
"""

from __future__ import annotations

import mlx.core as mx

THREADS = 256  # per block of `block_stats` (one position each)


@mx.compile
def block_stats_reference(logits: mx.array, temperature: mx.array, local_ids: mx.array):
    """One vocabulary block's share of each row's log-prob and entropy, (4, R) float32: the
    block max m, sum exp(z - m), sum exp(z - m) z, and the chosen token's z where it is in the
    block (0 elsewhere); z = logits / temperature in float32."""
    z = logits.astype(mx.float32) / temperature
    width = z.shape[1]
    inside = (local_ids >= 0) & (local_ids < width)
    picked = mx.take_along_axis(z, mx.clip(local_ids, 0, width - 1)[:, None], axis=-1)[:, 0]
    top = z.max(axis=-1)
    weights = mx.exp(z - top[:, None])
    return mx.stack([top, weights.sum(-1), (weights * z).sum(-1), mx.where(inside, picked, 0.0)])


@mx.compile
def block_grad_reference(logits, temperature, local_ids, normaliser, grad) -> mx.array:
    """d loss / d logits of one block, (R, width) in the logits' dtype: grad_r (onehot -
    softmax) / temperature, softmax = exp(z - normaliser_r)."""
    z = logits.astype(mx.float32) / temperature
    probs = mx.exp(z - normaliser[:, None])
    chosen = mx.arange(z.shape[1])[None, :] == local_ids[:, None]
    d_logits = (grad / temperature)[:, None] * (chosen.astype(mx.float32) - probs)
    return d_logits.astype(logits.dtype)


# One block of THREADS per position (row): the row's maximum of z = logit / temperature, then
# sum exp(z - max) and sum exp(z - max) z, each thread over a strided share of the row (VEC
# values a load when the row's width allows), then across the block; thread 0 writes the four
# numbers and the chosen token's z.
_STATS_SOURCE = """
    constexpr int VEC = 16 / sizeof(T), WARPS = THREADS / 32;
    __shared__ float shared[3][WARPS];
    const int r = blockIdx.x, R = logits_shape[0], W = logits_shape[1];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const T* row = logits + (size_t)r * W;
    const float tau = temperature[0];
    const bool vectors = W % VEC == 0;
    float top = -INFINITY;
    if (vectors) {
        for (int j = threadIdx.x * VEC; j < W; j += THREADS * VEC) {
            const uint4 piece = *reinterpret_cast<const uint4*>(row + j);
            const T* values = reinterpret_cast<const T*>(&piece);
            #pragma unroll
            for (int e = 0; e < VEC; ++e) top = fmaxf(top, static_cast<float>(values[e]) / tau);
        }
    } else {
        for (int j = threadIdx.x; j < W; j += THREADS)
            top = fmaxf(top, static_cast<float>(row[j]) / tau);
    }
    #pragma unroll
    for (int o = 16; o > 0; o /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, o));
    if (lane == 0) shared[0][warp] = top;
    __syncthreads();
    top = shared[0][0];
    #pragma unroll
    for (int w = 1; w < WARPS; ++w) top = fmaxf(top, shared[0][w]);
    float total = 0.0f, weighted = 0.0f;
    if (vectors) {
        for (int j = threadIdx.x * VEC; j < W; j += THREADS * VEC) {
            const uint4 piece = *reinterpret_cast<const uint4*>(row + j);
            const T* values = reinterpret_cast<const T*>(&piece);
            #pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float z = static_cast<float>(values[e]) / tau;
                const float p = expf(z - top);
                total += p;
                weighted += p * z;
            }
        }
    } else {
        for (int j = threadIdx.x; j < W; j += THREADS) {
            const float z = static_cast<float>(row[j]) / tau;
            const float p = expf(z - top);
            total += p;
            weighted += p * z;
        }
    }
    #pragma unroll
    for (int o = 16; o > 0; o /= 2) {
        total += __shfl_xor_sync(0xffffffff, total, o);
        weighted += __shfl_xor_sync(0xffffffff, weighted, o);
    }
    if (lane == 0) {
        shared[1][warp] = total;
        shared[2][warp] = weighted;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        total = shared[1][0];
        weighted = shared[2][0];
        #pragma unroll
        for (int w = 1; w < WARPS; ++w) {
            total += shared[1][w];
            weighted += shared[2][w];
        }
        const int id = local_ids[r];
        stats[r] = top;
        stats[R + r] = total;
        stats[2 * R + r] = weighted;
        stats[3 * R + r] = id >= 0 && id < W ? static_cast<float>(row[id]) / tau : 0.0f;
    }
"""

# Elementwise over the block, VEC values a thread (the width a multiple of VEC) or one: grad_r /
# temperature * ([column is the chosen token] - exp(z - normaliser_r)), rounded to T.
_GRAD_SOURCE = """
    const int W = logits_shape[1];
    const size_t first = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (first >= (size_t)logits_shape[0] * W) return;
    const int r = first / W, c0 = first % W;
    const float tau = temperature[0];
    const float scale = grad[r] / tau, norm = normaliser[r];
    const int id = local_ids[r];
    __align__(16) T values[VEC];
    __align__(16) T out[VEC];
    if constexpr (VEC == 1) {
        values[0] = logits[first];
    } else {
        *reinterpret_cast<uint4*>(values) = *reinterpret_cast<const uint4*>(logits + first);
    }
    #pragma unroll
    for (int e = 0; e < VEC; ++e) {
        const float z = static_cast<float>(values[e]) / tau;
        const float chosen = c0 + e == id ? 1.0f : 0.0f;
        out[e] = static_cast<T>(scale * (chosen - expf(z - norm)));
    }
    if constexpr (VEC == 1) {
        d_logits[first] = out[0];
    } else {
        *reinterpret_cast<uint4*>(d_logits + first) = *reinterpret_cast<const uint4*>(out);
    }
"""

_kernels: dict[str, object] = {}


def _kernel(name: str, inputs: list[str], outputs: list[str], source: str):
    if name not in _kernels:
        _kernels[name] = mx.fast.cuda_kernel(
            name=f"grpo_head_{name}", input_names=inputs, output_names=outputs, source=source
        )
    return _kernels[name]


def available(logits: mx.array) -> bool:
    """Whether the kernels run for these logits: MLX on CUDA with the GPU as the default device
    (a CUDA host running on the CPU device takes the operations), a floating dtype."""
    return (
        mx.cuda.is_available()
        and mx.default_device() == mx.gpu
        and logits.dtype in (mx.bfloat16, mx.float16, mx.float32)
    )


def _ids(local_ids: mx.array) -> mx.array:
    return local_ids if local_ids.dtype == mx.int32 else local_ids.astype(mx.int32)


def block_stats(logits: mx.array, temperature: mx.array, local_ids: mx.array) -> mx.array:
    """What `block_stats_reference` computes: through one kernel where `available`."""
    if not available(logits):
        return block_stats_reference(logits, temperature, local_ids)
    rows = logits.shape[0]
    kernel = _kernel("stats", ["logits", "temperature", "local_ids"], ["stats"], _STATS_SOURCE)
    return kernel(
        inputs=[logits, temperature.astype(mx.float32).reshape(1), _ids(local_ids)],
        template=[("T", logits.dtype), ("THREADS", THREADS)],
        grid=(rows * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(4, rows)],
        output_dtypes=[mx.float32],
    )[0]


def block_grad(logits, temperature, local_ids, normaliser, grad) -> mx.array:
    """What `block_grad_reference` computes: through one kernel where `available`."""
    if not available(logits):
        return block_grad_reference(logits, temperature, local_ids, normaliser, grad)
    rows, width = logits.shape
    vec = 16 // logits.itemsize if width % (16 // logits.itemsize) == 0 else 1
    threads = (rows * width + vec - 1) // vec
    kernel = _kernel(
        "grad",
        ["logits", "temperature", "local_ids", "normaliser", "grad"],
        ["d_logits"],
        _GRAD_SOURCE,
    )
    return kernel(
        inputs=[
            logits,
            temperature.astype(mx.float32).reshape(1),
            _ids(local_ids),
            normaliser.astype(mx.float32),
            grad.astype(mx.float32),
        ],
        template=[("T", logits.dtype), ("VEC", vec)],
        grid=((threads + 255) // 256 * 256, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[logits.shape],
        output_dtypes=[logits.dtype],
    )[0]
