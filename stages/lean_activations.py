"""Leaner activations for the update's backward pass: the same gradients, fewer values kept.

Some of the operations mlx-lm's models are built from keep more for the backward pass than their
gradients need, or build large temporaries in it:

- `swiglu(gate, up) = silu(gate) * up` (every Qwen3, Llama and Qwen3-MoE MLP): MLX's autograd
  keeps intermediates of the silu besides the gate and the up projection (about two more
  intermediate-sized arrays a token, measured; MLX does not compile inside a gradient, so
  mlx-lm's compiled swiglu runs there as one kernel per operation). `swiglu` here keeps only the
  gate and the up projection and recomputes the sigmoid in its backward pass (elementwise, no
  matmul); on CUDA each way is one elementwise kernel (`mx.fast.cuda_kernel`, float32 inside).
- `mx.fast.scaled_dot_product_attention` where MLX trains with its unfused attention (the CPU
  always; Metal, which routes training to the unfused kernels): the whole (rows, heads,
  queries, keys) score matrix is built at once and kept, and its backward builds several more
  (for 16 rows x 384 tokens in float32, 150 MB each). `attention` here computes the same
  attention in tiles of rows and key-value heads (at most `TILE_BYTES` of scores each), keeps
  only the queries, keys and values, and recomputes each tile's scores in the backward pass,
  one tile after another. On CUDA MLX's attention backward is fused (cuDNN): left alone.
- `mx.fast.rms_norm` on the CPU, where MLX computes it as a composite of operations and keeps
  their intermediates: `rms_norm` here keeps only its input and weight (on a GPU MLX's own
  kernel and backward already do: the one used there).

With `gradient_checkpointing: elementwise`, also the linear layers fed by a norm (the
attention's query, key and value projections, the MLP's gate and up projections) or by the
swiglu (the MLP's down projection): MLX keeps each matmul's input for its weight gradient, so a
block keeps the normed inputs beside the norms' own inputs, and the swiglu's product beside the
gate and the up projection (5k of a Qwen3-0.6B block's 22.5k values a token). A trainable
`nn.Linear` called on the output of `rms_norm` or `swiglu` here (the same array object, the last
one made) recomputes that output in its backward pass (elementwise; no matmul is recomputed), so
only the operation's inputs are kept. And mlx-lm's Qwen3 and Qwen3-MoE attention (per-head query
and key norms, RoPE, attention, the output projection): the normed and rotated queries and keys
were kept beside their projections, and the attention's output for the output projection; with
"elementwise" the part from the projections' outputs to the output projection's is one function
that keeps its inputs and recomputes the rest in its backward pass (the norms, RoPE and the
attention's forward; only the output projection's matmul is not). The default on a GPU
(`gradient_checkpointing: auto`); it costs some speed (benchmarks/RESULTS.md).

`enabled(model)` swaps them in for the duration of the block (the update's gradient pass); the
rollout runs mlx-lm's own. Values and gradients equal MLX's within rounding
(tests/test_lean_activations.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, partial

from stages.grad_checkpoint import wrapped_calls

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations

TILE_BYTES = 32 * 2**20  # float32 scores of one attention tile
# Below this many elements (the swiglu's and rms_norm's inputs, the attention's scores) MLX's
# own operation is used: the memory at stake is small and the lean one's extra operations cost
# more than they save there (tiny models' updates: 42 ms against 33-37 ms on this CPU).
MIN_ELEMENTS = 1 << 20


@mx.compile
def _swiglu_forward_mlx(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


@mx.compile
def _swiglu_backward_mlx(gate: mx.array, up: mx.array, cotangent: mx.array):
    # In this order each step can write over its first operand (MLX donates a temporary's
    # buffer): inside a gradient, where this runs uncompiled, one intermediate-sized
    # temporary fewer is alive at once (302 against 377 MB for 6,144 x 3,072 float32).
    sigmoid = mx.sigmoid(gate)
    d_gate = (1 + gate * (1 - sigmoid)) * sigmoid * cotangent * up
    d_up = cotangent * gate * sigmoid
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


# On CUDA, one elementwise kernel each way: MLX does not compile inside a gradient, so the MLX
# operations above run one kernel per operation there (each writing an intermediate).
_SWIGLU_FORWARD = """
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= gate_shape[0]) return;
    const float g = static_cast<float>(gate[i]);
    out[i] = static_cast<T>(g / (1.0f + expf(-g)) * static_cast<float>(up[i]));
"""
_SWIGLU_BACKWARD = """
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= gate_shape[0]) return;
    const float g = static_cast<float>(gate[i]);
    const float c = static_cast<float>(cotangent[i]);
    const float s = 1.0f / (1.0f + expf(-g));
    d_gate[i] = static_cast<T>(c * static_cast<float>(up[i]) * s * (1.0f + g * (1.0f - s)));
    d_up[i] = static_cast<T>(c * g * s);
"""
_swiglu_kernels: dict[str, object] = {}


def _cuda_elementwise(name: str, source: str, inputs: list[mx.array], outputs: int):
    kernel = _swiglu_kernels.get(name)
    if kernel is None:
        names = ["gate", "up", "cotangent"][: len(inputs)]
        kernel = _swiglu_kernels[name] = mx.fast.cuda_kernel(
            name=name,
            input_names=names,
            output_names=["out"] if outputs == 1 else ["d_gate", "d_up"],
            source=source,
        )
    flat = [a.reshape(-1) for a in inputs]
    n = flat[0].size
    results = kernel(
        inputs=flat,
        template=[("T", inputs[0].dtype)],
        grid=(n, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(n,)] * outputs,
        output_dtypes=[inputs[0].dtype] * outputs,
    )
    return [r.reshape(inputs[0].shape) for r in results]


def _on_cuda(*arrays: mx.array) -> bool:
    return (
        mx.cuda.is_available()
        and mx.default_device() == mx.gpu
        and len({a.dtype for a in arrays}) == 1
        and len({a.shape for a in arrays}) == 1
    )


def _swiglu_forward(gate: mx.array, up: mx.array) -> mx.array:
    if _on_cuda(gate, up):
        return _cuda_elementwise("grpo_swiglu_forward", _SWIGLU_FORWARD, [gate, up], 1)[0]
    return _swiglu_forward_mlx(gate, up)


def _swiglu_backward(gate: mx.array, up: mx.array, cotangent: mx.array):
    if _on_cuda(gate, up, cotangent):
        return tuple(
            _cuda_elementwise("grpo_swiglu_backward", _SWIGLU_BACKWARD, [gate, up, cotangent], 2)
        )
    return _swiglu_backward_mlx(gate, up, cotangent)


@mx.custom_function
def _lean_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu_forward(gate, up)


@_lean_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    return _swiglu_backward(gate, up, cotangent)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, keeping only `gate` and `up` for the backward pass (below MIN_ELEMENTS,
    mlx-lm's own)."""
    if gate.size < MIN_ELEMENTS:
        return activations.swiglu(gate, up)
    return _recorded(_lean_swiglu(gate, up), _lean_swiglu, (gate, up))


_SDPA = mx.fast.scaled_dot_product_attention  # MLX's own, called tile by tile


def _tiles(rows: int, kv_heads: int, tile_scores: int) -> list[tuple[int, int, int, int]]:
    """(row start, row stop, kv-head start, kv-head stop) covering rows x kv heads, each tile
    holding at most TILE_BYTES of float32 scores (`tile_scores`: scores of one row and one kv
    head), rows split before heads."""
    per_tile = max(TILE_BYTES // (4 * tile_scores), 1)
    if per_tile >= kv_heads:
        step = per_tile // kv_heads
        return [(r, min(r + step, rows), 0, kv_heads) for r in range(0, rows, step)]
    return [
        (r, r + 1, h, min(h + per_tile, kv_heads))
        for r in range(rows)
        for h in range(0, kv_heads, per_tile)
    ]


def _mask_tile(mask, rows: int, heads: int, tile, group: int):
    """The part of `mask` (None, "causal" or an array broadcast to (rows, heads, L, S)) that
    applies to `tile`."""
    if mask is None or isinstance(mask, str) or mask.ndim < 3:
        return mask
    r0, r1, h0, h1 = tile
    if mask.ndim == 4 and mask.shape[0] == rows:
        mask = mask[r0:r1]
    if mask.shape[-3] == heads:
        mask = mask[..., h0 * group : h1 * group, :, :]
    return mask


def attention(queries, keys, values, *, scale: float, mask=None, sinks=None, **kwargs):
    """mx.fast.scaled_dot_product_attention in tiles, its scores recomputed in the backward pass
    (module docstring). Calls it cannot tile (attention sinks, other keyword arguments, one
    query) or with fewer than MIN_ELEMENTS scores go to MLX's own."""
    small = queries.size * keys.shape[-2] // max(queries.shape[-1], 1) < MIN_ELEMENTS  # scores
    if small or sinks is not None or kwargs or queries.ndim != 4 or queries.shape[2] == 1:
        return _SDPA(queries, keys, values, scale=scale, mask=mask, sinks=sinks, **kwargs)
    rows, heads, length, _ = queries.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    tiles = _tiles(rows, kv_heads, group * length * keys.shape[2])

    def parts(q, k, v, tile):
        r0, r1, h0, h1 = tile
        return (
            q[r0:r1, h0 * group : h1 * group],
            k[r0:r1, h0:h1],
            v[r0:r1, h0:h1],
            _mask_tile(mask, rows, heads, tile, group),
        )

    def attend(q, k, v, tile_mask):
        return _SDPA(q, k, v, scale=scale, mask=tile_mask)

    def assemble(pieces: list[mx.array], like: mx.array) -> mx.array:
        """Tile results written into one (rows, heads, ...) array, in place one tile after
        another (a concatenation would hold every tile and the whole result at once)."""
        if len(pieces) == 1:
            return pieces[0]
        whole = mx.zeros(like.shape, dtype=pieces[0].dtype)
        per_head = like.shape[1] // kv_heads
        for (r0, r1, h0, h1), piece in zip(tiles, pieces):
            whole[r0:r1, h0 * per_head : h1 * per_head] = piece
        return whole

    @mx.custom_function
    def tiled(q, k, v):
        return assemble([attend(*parts(q, k, v, tile)) for tile in tiles], q)

    @tiled.vjp
    def tiled_vjp(primals, cotangent, output):
        q, k, v = primals
        grads: list[tuple[mx.array, mx.array, mx.array]] = []
        for tile in tiles:
            q_t, k_t, v_t, m_t = parts(q, k, v, tile)
            r0, r1, h0, h1 = tile
            d_out = cotangent[r0:r1, h0 * group : h1 * group]
            if grads:  # one tile's scores at a time: this tile waits for the previous one's
                q_t, k_t, v_t, d_out = mx.depends([q_t, k_t, v_t, d_out], list(grads[-1]))
            _, tile_grads = mx.vjp(
                lambda a, b, c, m=m_t: attend(a, b, c, m), [q_t, k_t, v_t], [d_out]
            )
            grads.append(tuple(tile_grads))
        return tuple(assemble([g[i] for g in grads], like) for i, like in enumerate(primals))

    return tiled(queries, keys, values)


_RMS_NORM = mx.fast.rms_norm  # MLX's own: the forward


@partial(mx.compile, shapeless=True)
def _rms_norm_backward(x, weight, cotangent, eps):
    """(dx, g * x * n): one row-sized temporary at a time besides the outputs (the mean of
    squares, then the mean of g * w * x), so MLX's unfused CPU reductions stay small."""
    g, w = cotangent.astype(mx.float32), weight.astype(mx.float32)
    xf = x.astype(mx.float32)
    n = mx.rsqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps)
    s = mx.mean(g * w * xf, axis=-1, keepdims=True) * (n * n)
    dx = n * (g * w - xf * s)
    return dx.astype(x.dtype), g * xf * n


@cache
def _rms_norm_with(eps: float):
    @mx.custom_function
    def norm(x, weight):
        return _RMS_NORM(x, weight, eps)

    @norm.vjp
    def norm_vjp(primals, cotangent, output):
        x, weight = primals
        dx, dw = _rms_norm_backward(x, weight, cotangent, eps)
        return dx, dw.reshape(-1, x.shape[-1]).sum(axis=0).astype(weight.dtype)

    return norm


def rms_norm(x, weight, eps):
    """mx.fast.rms_norm keeping only `x` and `weight` for the backward pass (on the CPU MLX's
    rms_norm is its composite of operations, each intermediate kept; on a GPU, MLX's own),
    recorded for the linear layers it feeds (`_linear_call`); below MIN_ELEMENTS, and without a
    weight, MLX's own."""
    if weight is None or x.size < MIN_ELEMENTS:
        return _RMS_NORM(x, weight, eps)
    norm = _rms_norm_of(float(eps))
    return _recorded(norm(x, weight), norm, (x, weight))


# With gradient_checkpointing "elementwise" (`_recording`), the last output of `rms_norm` or
# `swiglu` above with what made it: (output, function, inputs).
_recent: list[tuple | None] = [None]
_recording = [False]


def _recorded(output: mx.array, function, inputs: tuple) -> mx.array:
    if _recording[0]:
        _recent[0] = (output, function, inputs)
    return output


def recorded_as(x: mx.array, same: mx.array) -> mx.array:
    """`same` (x's value under another array, such as a tap's identity), recorded in x's place
    when x is the last recorded output, so the linear layers `same` feeds still recompute it."""
    recent = _recent[0]
    if recent is not None and recent[0] is x:
        _recent[0] = (same, *recent[1:])
    return same


@cache
def _linear_of(function, inputs: int, bias: bool):
    """An nn.Linear's matmul (with its bias or not) on `y = function(*sources)`, called as
    `linear(y, *sources, weight[, bias])` with the sources behind `mx.stop_gradient`: its
    backward recomputes `y` from the sources for the weight's gradient (elementwise; the matmul
    is not recomputed) and hands `y` its cotangent, so autograd runs `function`'s own backward
    once for all of `y`'s consumers and nothing keeps `y`."""

    def matmul(x, weight, *bias_):
        return mx.addmm(bias_[0], x, weight.T) if bias_ else x @ weight.T

    @mx.custom_function
    def linear(y, *args):
        return matmul(y, *args[inputs:])

    @linear.vjp
    def linear_vjp(primals, cotangent, output):
        sources, params = primals[1 : 1 + inputs], primals[1 + inputs :]
        # Recomputed once the cotangent is there, not ahead of the backward pass (it depends
        # on the sources only, which the forward made).
        sources = mx.depends(list(sources), [cotangent])
        _, (d_y, *d_params) = mx.vjp(matmul, [function(*sources), *params], [cotangent])
        return (d_y, *[mx.zeros_like(a) for a in sources], *d_params)

    return linear


def _plain_rms_norm(x, weight, eps):
    """What mx.fast.rms_norm is within `enabled` (`rms_norm`), not recorded: the CPU's lean
    one at MIN_ELEMENTS and above, MLX's own otherwise."""
    if mx.default_device() == mx.cpu and weight is not None and x.size >= MIN_ELEMENTS:
        return _rms_norm_with(float(eps))(x, weight)
    return _RMS_NORM(x, weight, eps)


@cache
def _rms_norm_of(eps: float):
    """`_plain_rms_norm` with this eps, one function per eps (`_linear_of`'s cache key)."""
    return lambda x, weight: _plain_rms_norm(x, weight, eps)


# mlx-lm's attention classes `_attention_call` restructures: their call is q/k/v projections,
# per-head rms_norm of queries and keys, RoPE, mlx-lm's scaled_dot_product_attention, o_proj.
QK_NORM_ATTENTION = ("mlx_lm.models.qwen3", "mlx_lm.models.qwen3_moe")


def _attention_core(attn: nn.Module, mask, rows: int, length: int):
    """mlx-lm's Qwen3 attention from the projections' outputs to o_proj's (a bias-free weight),
    as one function of (queries, keys, values, q_norm weight, k_norm weight, o_proj weight) that
    keeps its inputs and recomputes the rest in its backward pass."""
    heads, kv_heads, scale, rope = attn.n_heads, attn.n_kv_heads, attn.scale, attn.rope
    q_eps, k_eps = attn.q_norm.eps, attn.k_norm.eps

    def forward(queries, keys, values, q_weight, k_weight, o_weight):
        q = _plain_rms_norm(queries.reshape(rows, length, heads, -1), q_weight, q_eps)
        k = _plain_rms_norm(keys.reshape(rows, length, kv_heads, -1), k_weight, k_eps)
        v = values.reshape(rows, length, kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = rope(q.transpose(0, 2, 1, 3)), rope(k.transpose(0, 2, 1, 3))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(rows, length, -1) @ o_weight.T

    @mx.custom_function
    def core(*primals):
        return forward(*primals)

    @core.vjp
    def core_vjp(primals, cotangent, output):
        primals = mx.depends(list(primals), [cotangent])  # recomputed in the backward pass
        return tuple(mx.vjp(forward, primals, [cotangent])[1])

    return core


def _attention_call(call):
    """A QK_NORM_ATTENTION class's __call__ for the update: without a cache and with a
    trainable bias-free nn.Linear o_proj, `_attention_core` between the projections and o_proj;
    anything else is `call` (mlx-lm's)."""

    def lean_attention(self, x, mask=None, cache=None):
        o_proj = self.o_proj
        if (
            cache is not None
            or type(o_proj) is not nn.Linear
            or "bias" in o_proj
            or "weight" not in o_proj.trainable_parameters()
        ):
            return call(self, x, mask, cache)
        rows, length, _ = x.shape
        core = _attention_core(self, mask, rows, length)
        projections = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return core(*projections, self.q_norm.weight, self.k_norm.weight, o_proj.weight)

    return lean_attention


def _linear_call(call):
    """nn.Linear.__call__ for the update: a trainable layer called on the output of `rms_norm`
    or `swiglu` (the same array object, the last one made) is `_linear_of` that operation;
    anything else is `call`."""

    def lean_linear(self, x):
        recent = _recent[0]
        if recent is None or x is not recent[0] or "weight" not in self.trainable_parameters():
            return call(self, x)
        _, function, inputs = recent
        params = [self["weight"]] + ([self["bias"]] if "bias" in self else [])
        sources = [mx.stop_gradient(a) for a in inputs]
        return _linear_of(function, len(inputs), len(params) == 2)(x, *sources, *params)

    return lean_linear


def _trains_unfused() -> bool:
    """Whether MLX trains with its unfused attention here (CPU, Metal), not CUDA's fused one."""
    return mx.default_device() == mx.cpu or not mx.cuda.is_available()


@contextmanager
def enabled(
    model: nn.Module, on: bool = True, checkpointing: bool | str = False
) -> Iterator[nn.Module]:
    """Within the block, mlx-lm's swiglu in the modules that define `model`'s layers is
    `swiglu` above, mx.fast's attention is `attention` where MLX trains with unfused attention,
    mx.fast's rms_norm is `rms_norm` on the CPU (and with "elementwise" below); all restored
    after.
    With gradient `checkpointing` (true or "mlp") the MLP's activations are recomputed, not
    kept, and swiglu stays mlx-lm's (0.15 GB less on an H200 with the lean one, for no speed
    gain measured); with "elementwise" nn.Linear's call is `_linear_call`'s."""
    if not on:
        yield model
        return
    namespaces = {sys.modules.get(type(module).__module__) for _, module in model.named_modules()}
    patched = [
        ns
        for ns in namespaces
        if checkpointing in (False, "elementwise")
        and getattr(ns, "swiglu", None) is activations.swiglu
    ]
    sdpa, norm = mx.fast.scaled_dot_product_attention, mx.fast.rms_norm
    try:
        for ns in patched:
            ns.swiglu = swiglu
        if _trains_unfused():
            mx.fast.scaled_dot_product_attention = attention
        elementwise = checkpointing == "elementwise"
        if mx.default_device() == mx.cpu or elementwise:
            mx.fast.rms_norm = rms_norm
        _recording[0] = elementwise
        attention_classes = {
            type(layer.self_attn)
            for layer in getattr(model, "layers", [])
            if type(getattr(layer, "self_attn", None)).__module__ in QK_NORM_ATTENTION
        }
        with (
            wrapped_calls({nn.Linear}, _linear_call if elementwise else (lambda call: call)),
            wrapped_calls(attention_classes if elementwise else set(), _attention_call),
        ):
            yield model
    finally:
        _recent[0], _recording[0] = None, False
        for ns in patched:
            ns.swiglu = activations.swiglu
        mx.fast.scaled_dot_product_attention, mx.fast.rms_norm = sdpa, norm
