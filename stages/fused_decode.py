"""Fused decode engine: the rollout's forward for mlx-lm's qwen3, llama and qwen3_moe models
with fewer operations per step and the same numbers.

On a GPU the MLX backend is host-bound at rollout sizes (each operation costs host time to
build and dispatch, each matmul more), so a decode step costs about what its operation count
costs. This engine computes exactly what mlx-lm's model computes on its batch KV cache, with:

- fused projections: Q|K|V as one matmul and gate|up as one (4 matmuls a block, not 7), for
  nn.Linear and nn.QuantizedLinear layers alike (quantized weights, scales and biases are
  concatenated along the outputs); each output column of a matmul is its own dot product, so
  the split result equals the separate matmuls bit for bit (tests/test_fused_decode.py checks it
  on real rollouts);
- a KV cache allocated once for the whole rollout and written in place (no growth by
  concatenation, no per-layer position arrays), with mlx-lm's `BatchKVCache` semantics: left
  padding masked with the same boolean mask, `filter` keeping rows and dropping the padding
  columns no kept row needs, as `BatchKVCache.filter` does;
- optionally `mx.compile` on the one-token steps of a block (`COMPILE`), with the weights as
  inputs, so a refresh or a new rollout reuses the traces.

With `fast=True` (rollout.fast_kernels, CUDA) the one-token steps go through
`stages.fast_kernels` instead: the matmuls and the head (the residual adds and the MLP's
silu(gate) * up in their epilogues, the gate|up weight kept interleaved for it), the queries,
keys and values from the fused projection (Qwen3's per-head norms and RoPE) written straight
into the cache, and the attention over it. Not bit-equal to this (other summation orders), hence
the update's importance-sampling correction.

Everything else is mlx-lm's own code, called as modules: embeddings, RoPE, the MoE block, LoRA
adapters (each adapter's update is added to its slice of the fused output as
`LoRALinear.__call__` adds it) and the vocabulary head; the norms are `mx.fast.rms_norm` with the
model's weights, as `nn.RMSNorm` calls it.

The fused weights are copies: `refresh(model)` rebuilds them from the model's current weights
(after an optimizer update) and `nbytes` is their size. Architectures or layers this engine does
not know (other layer types, one input's projections quantized differently, sliding-window
layers, pipeline-parallel models) are reported by `unsupported(model)`; the rollout then uses
mlx-lm's own path.
"""

from __future__ import annotations

from stages import fast_kernels

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_causal_mask
from mlx_lm.tuner.lora import LoRALinear

ARCHITECTURES = ("qwen3", "llama", "qwen3_moe")  # modules of mlx_lm.models this engine runs
# mx.compile the one-token steps of blocks without adapters or experts (rollout.fused_compile).
# On a GPU a step is host-bound and a compiled half-block is one call instead of about a dozen
# operations, but the first rollout of a process traces and builds the kernels (measured on an
# H200: 41 s, against about 3% of a GRPO step after); on CPU compiling measured no gain.
# True/False here override the config (benchmarks' --fused-compile).
COMPILE: bool | None = None


def _architecture(model: nn.Module) -> str:
    """The mlx_lm.models module that defines `model` (e.g. "qwen3"), or its class path."""
    module, prefix = type(model).__module__, "mlx_lm.models."
    if module.startswith(prefix):
        return module[len(prefix) :]
    return f"{module}.{type(model).__name__}"


def _base(projection: nn.Module) -> nn.Module:
    """The layer a projection computes: itself, or the base under a LoRA adapter."""
    return projection.linear if isinstance(projection, LoRALinear) else projection


def _quantization(layer: nn.Module) -> tuple | None:
    """(group_size, bits, mode) of a QuantizedLinear; None for a plain Linear."""
    if isinstance(layer, nn.QuantizedLinear):
        return (layer.group_size, layer.bits, layer.mode)
    return None


def _group_problem(members: list[nn.Module]) -> str | None:
    """Why these projections (read from one input) cannot be one matmul; None if they can."""
    bases = [_base(m) for m in members]
    other = sorted({type(b).__name__ for b in bases} - {"Linear", "QuantizedLinear"})
    if other:
        return f"{'/'.join(other)} projections"
    if len({(type(b), _quantization(b), "bias" in b) for b in bases}) > 1:
        kinds = sorted({f"{type(b).__name__}{_quantization(b) or ''}" for b in bases})
        return f"projections of one input that differ in kind or bias ({', '.join(kinds)})"
    return None


def _groups(layer: nn.Module) -> dict[str, list[nn.Module]]:
    """A block's projections by the input they read: name -> members, in output order."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj]}
    if hasattr(mlp, "gate_proj"):  # a mixture of experts stays mlx-lm's own block
        groups |= {"gate_up": [mlp.gate_proj, mlp.up_proj], "down": [mlp.down_proj]}
    return groups


def unsupported(model: nn.Module) -> str | None:
    """Why `FusedDecoder` cannot run `model`, in words naming the architecture; None if it can."""
    name = _architecture(model)
    model_type = getattr(getattr(model, "args", None), "model_type", None) or name
    if name not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        return f"architecture {model_type!r} ({name}; the fused engine runs {known})"
    backbone = model.model
    if getattr(backbone, "pipeline_size", 1) > 1:
        return f"architecture {model_type!r} split over a pipeline"
    if any(getattr(layer, "use_sliding", False) for layer in model.layers):
        return f"architecture {model_type!r} with sliding-window layers"
    for layer in model.layers:
        for members in _groups(layer).values():
            problem = _group_problem(members)
            if problem is not None:
                return f"architecture {model_type!r} with {problem}"
    return None


def _fuse(members: list[nn.Module]) -> tuple[dict[str, mx.array], int]:
    """The arrays of one matmul computing `members` (layers that read one input), and the bytes
    that were copied to make them: {"weight", "bias"?} for Linear layers, where weight is W.T,
    the transposed view of the (out, in) matrix (not a transposed copy, so the matmul is the
    same BLAS call as nn.Linear's `x @ W.T`); {"weight", "scales", "biases"?, "bias"?} for
    QuantizedLinear layers, concatenated along their outputs. One member: the model's own
    arrays, no copy."""
    bases = [_base(m) for m in members]
    quantized = _quantization(bases[0]) is not None
    arrays = {}
    for name in ["weight", "scales", "biases", "bias"] if quantized else ["weight", "bias"]:
        parts = [b[name] for b in bases if name in b]
        if parts:
            arrays[name] = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
    copied = sum(a.nbytes for a in arrays.values()) if len(bases) > 1 else 0
    if not quantized:
        arrays["weight"] = arrays["weight"].T
    return arrays, copied


class _BlockSpec:
    """What a block computes besides its arrays: head counts, norms' eps, RoPE, and the layout
    of each projection group (quantization, split points, which arrays it has).

    `pre(h, offsets, weights) -> queries, keys, values` and `post(h, attention, weights) -> h`
    read every array from `weights` (name -> array), so their compiled forms take the arrays as
    inputs: a refresh, or another engine on a model of the same shape, reuses the traces. LoRA
    adapters and a MoE block come in `modules` and are never compiled (a trace would freeze the
    arrays those modules read).
    """

    def __init__(self, layer: nn.Module, layout: dict[str, tuple], fast: bool = False):
        attn = layer.self_attn
        self.fast = fast  # one-token matmuls through stages.fast_kernels (rollout.fast_kernels)
        self.n_heads, self.n_kv_heads, self.scale = attn.n_heads, attn.n_kv_heads, attn.scale
        self.head_dim = _base(attn.q_proj).weight.shape[0] // attn.n_heads
        self.rope, self.layout = attn.rope, layout
        norms = {"input_norm": layer.input_layernorm, "post_norm": layer.post_attention_layernorm}
        if hasattr(attn, "q_norm"):
            norms |= {"q_norm": attn.q_norm, "k_norm": attn.k_norm}
        self.eps = {name: norm.eps for name, norm in norms.items()}
        # One-token queries, keys and values in one kernel (fast_kernels.qkv_heads).
        self.fast_heads = (
            fast
            and layout["qkv"][0] is None
            and fast_kernels.heads_supported(self.head_dim, self.rope)
            and self.eps.get("q_norm") == self.eps.get("k_norm")
        )
        self.interleaved = self.interleaves(layout, fast)
        self.compiled_pre = mx.compile(self.pre)
        self.compiled_post = mx.compile(self.post)

    @staticmethod
    def interleaves(layout: dict[str, tuple], fast: bool) -> bool:
        """Whether the block's gate|up weight is kept interleaved by eights for the fast
        kernel's silu(gate) * up epilogue (`fast_kernels.interleave`): fast mode, an unquantized
        gate|up group without bias, its size a multiple of 8."""
        if not fast or "gate_up" not in layout:
            return False
        quantization, splits, arrays = layout["gate_up"]
        return quantization is None and "bias" not in arrays and splits[0] % 8 == 0

    @staticmethod
    def key(layer: nn.Module, layout: dict[str, tuple], fast: bool = False) -> tuple:
        """Blocks with equal keys compute the same function of their arrays."""
        attn, rope = layer.self_attn, layer.self_attn.rope
        if type(rope) is nn.RoPE:
            rope_key = ("RoPE", rope.dims, rope.traditional, rope.base, rope.scale)
        else:  # other RoPEs hold arrays (frequencies) that a trace freezes: one per object
            rope_key = (type(rope).__name__, id(rope))
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if hasattr(attn, "q_norm"):
            norms += [attn.q_norm, attn.k_norm]
        return (
            attn.n_heads,
            attn.n_kv_heads,
            attn.scale,
            tuple(sorted(layout.items())),
            tuple(norm.eps for norm in norms),
            rope_key,
            fast,
        )

    def _linear(self, name: str, x: mx.array, weights: dict, modules: dict) -> list[mx.array]:
        """The group `name` on x (..., in): one matmul as nn.Linear or nn.QuantizedLinear computes
        it, split (a gate|up weight kept `interleaved` for the fast kernel's epilogue: taken
        apart), each adapter's update added to its slice as LoRALinear adds it."""
        _, splits, _ = self.layout[name]
        y = self._project(name, x, weights)
        if name == "gate_up" and self.interleaved:
            parts = list(fast_kernels.deinterleave(y))
        else:
            parts = mx.split(y, list(splits), axis=-1) if splits else [y]
        for i, lora in enumerate(modules.get(name, ())):
            if lora is not None:
                z = (lora.dropout(x) @ lora.lora_a) @ lora.lora_b
                parts[i] = parts[i] + (lora.scale * z).astype(x.dtype)
        return parts

    def _project(self, name: str, x: mx.array, weights: dict) -> mx.array:
        """The group `name`'s one matmul (and bias) on x (..., in), unsplit."""
        quantization, _, _ = self.layout[name]
        weight, bias = weights[name + ".weight"], weights.get(name + ".bias")
        w = self._fast_weight(name, x, weights)
        if w is not None:
            y = fast_kernels.matmul(x, w)
            y = y if bias is None else y + bias
        elif quantization is None:
            y = x @ weight if bias is None else mx.addmm(bias, x, weight)
        else:
            group_size, bits, mode = quantization
            y = mx.quantized_matmul(
                x,
                weight,
                scales=weights[name + ".scales"],
                biases=weights.get(name + ".biases"),
                transpose=True,
                group_size=group_size,
                bits=bits,
                mode=mode,
            )
            y = y if bias is None else y + bias
        return y

    def _fast_weight(
        self, name: str, x: mx.array, weights: dict, modules: dict | None = None, **epilogue
    ) -> mx.array | None:
        """The (out, in) weight of group `name` if its matmul on x takes the fast kernel: fast
        mode, one token, an unquantized weight the kernel supports, and, with an `epilogue`
        (`residual=` or `swiglu=`), no bias or adapters to add in between."""
        if not self.fast or x.shape[-2] != 1 or self.layout[name][0] is not None:
            return None
        if epilogue and (name + ".bias" in weights or (modules or {}).get(name)):
            return None
        w = weights[name + ".weight"].T  # (out, in), row-major again
        supported = fast_kernels.supports(x, w, swiglu=epilogue.get("swiglu", False))
        return w if supported else None

    def _norm(self, name: str, x: mx.array, weights: dict) -> mx.array:
        return mx.fast.rms_norm(x, weights[name], self.eps[name])

    def pre(
        self,
        h: mx.array,
        offsets: mx.array,
        weights: dict,
        modules: dict | None = None,
        cache: tuple | None = None,
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Queries (B, H, L, hd), keys and values (B, Hkv, L, hd) of h (B, L, D), RoPE at
        `offsets` (B,). With `cache` (keys, values, column; only where `_Block.writes_cache`),
        the keys and values are written into the cache arrays at that column and the cache
        arrays come back in their place (`fast_kernels.qkv_heads`)."""
        B, L, _ = h.shape
        x = self._norm("input_norm", h, weights)
        if self.fast_heads and L == 1 and not (modules or {}).get("qkv"):
            norms = (weights["q_norm"], weights["k_norm"]) if "q_norm" in self.eps else None
            return fast_kernels.qkv_heads(
                self._project("qkv", x, weights).reshape(B, -1),
                offsets,
                self.n_heads,
                self.n_kv_heads,
                self.rope,
                norms,
                self.eps.get("q_norm", 0.0),
                cache,
            )
        queries, keys, values = self._linear("qkv", x, weights, modules or {})
        queries = queries.reshape(B, L, self.n_heads, -1)
        keys = keys.reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self.eps:
            queries = self._norm("q_norm", queries, weights)
            keys = self._norm("k_norm", keys, weights)
        queries = self.rope(queries.transpose(0, 2, 1, 3), offset=offsets)
        keys = self.rope(keys.transpose(0, 2, 1, 3), offset=offsets)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return queries, keys, values

    def post(
        self, h: mx.array, attention: mx.array, weights: dict, modules: dict | None = None
    ) -> mx.array:
        """The rest of the block: h (B, L, D), attention output (B, H, L, hd) -> (B, L, D).
        In fast mode the residual adds and silu(gate) * up run in the matmuls' epilogues."""
        B, L, _ = h.shape
        modules = modules or {}
        attention = attention.transpose(0, 2, 1, 3).reshape(B, L, -1)
        h = self._residual("o", attention, h, weights, modules)
        x = self._norm("post_norm", h, weights)
        if "moe" in modules:
            return h + modules["moe"](x)
        w = (
            self._fast_weight("gate_up", x, weights, modules, swiglu=True)
            if self.interleaved
            else None
        )
        if w is not None:
            activation = fast_kernels.matmul(x, w, swiglu=True)
        else:
            activation = swiglu(*self._linear("gate_up", x, weights, modules))
        return self._residual("down", activation, h, weights, modules)

    def _residual(
        self, name: str, x: mx.array, h: mx.array, weights: dict, modules: dict
    ) -> mx.array:
        """h + the group `name` (one output) on x."""
        w = self._fast_weight(name, x, weights, modules, residual=True)
        if w is not None:
            return fast_kernels.matmul(x, w, residual=h)
        return h + self._linear(name, x, weights, modules)[0]


# Shared by every engine, and their compiled traces with them (each engine is built per rollout).
_SPECS: dict[tuple, _BlockSpec] = {}


class _Block:
    """One transformer block: its arrays (`weights`, name -> array: fused copies and the model's
    own), the mlx-lm modules it still calls (`modules`: LoRA adapters per group, the MoE block)
    and its `spec`."""

    def __init__(self, layer: nn.Module, fast: bool = False):
        attn = layer.self_attn
        groups = _groups(layer)
        self.modules: dict = {} if "gate_up" in groups else {"moe": layer.mlp}
        self.weights: dict[str, mx.array] = {}
        self.fused_nbytes = 0
        layout = {}
        for name, members in groups.items():
            arrays, copied = _fuse(members)
            sizes = [_base(m).weight.shape[0] for m in members]
            splits = tuple(np.cumsum(sizes)[:-1].tolist())
            layout[name] = (_quantization(_base(members[0])), splits, tuple(sorted(arrays)))
            if name == "gate_up" and _BlockSpec.interleaves(layout, fast):
                gate, up = (_base(m).weight for m in members)
                arrays["weight"] = fast_kernels.interleave(gate, up).T
            self.weights |= {f"{name}.{array}": value for array, value in arrays.items()}
            self.fused_nbytes += copied
            adapters = [m if isinstance(m, LoRALinear) else None for m in members]
            if any(a is not None for a in adapters):
                self.modules[name] = adapters
        self.weights["input_norm"] = layer.input_layernorm.weight
        self.weights["post_norm"] = layer.post_attention_layernorm.weight
        if hasattr(attn, "q_norm"):
            self.weights["q_norm"], self.weights["k_norm"] = attn.q_norm.weight, attn.k_norm.weight
        key = _BlockSpec.key(layer, layout, fast)
        if key not in _SPECS:
            _SPECS[key] = _BlockSpec(layer, layout, fast)
        self.spec = _SPECS[key]

    def writes_cache(self, length: int) -> bool:
        """Whether `pre` of `length` tokens takes a `cache` to write its keys and values into
        (the fast kernel for one token's heads)."""
        return self.spec.fast_heads and length == 1 and not self.modules.get("qkv")

    def pre(self, h: mx.array, offsets: mx.array, compiled: bool, cache: tuple | None = None):
        if compiled and not self.modules:
            return self.spec.compiled_pre(h, offsets, self.weights, None, cache)
        return self.spec.pre(h, offsets, self.weights, self.modules, cache)

    def post(self, h: mx.array, attention: mx.array, compiled: bool) -> mx.array:
        if compiled and not self.modules:
            return self.spec.compiled_post(h, attention, self.weights)
        return self.spec.post(h, attention, self.weights, self.modules)


class FusedDecoder:
    """The rollout engine of fused weights and a pre-allocated batch KV cache.

    prefill(tokens (P, L) int32 left-padded, padding [P], new_tokens) -> logits (P, V) of each
    prompt's last position; filter(index (n,)) keeps (and repeats) rows of the cache;
    decode(tokens (n,)) -> logits (n, V) of the next position, writing its keys and values.

    Equal to mlx-lm's model on `BatchKVCache` (padded batch: the same boolean mask) or on a
    batch cache with no mask (unpadded batch: `None` for one token, "causal" for a chunk), as
    the rollout builds them: same prefill chunks, same RoPE offsets, same attended columns.
    """

    name = "fused"

    def __init__(
        self,
        model: nn.Module,
        prefill_step: int = 2048,
        compiled: bool | None = None,
        fast: bool = False,
    ):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the fused decode engine does not support {reason}")
        if fast and (reason := fast_kernels.unavailable()) is not None:
            raise ValueError(f"rollout.fast_kernels=true cannot run: {reason}")
        self.prefill_step = prefill_step
        self.compiled = COMPILE if COMPILE is not None else bool(compiled)
        self.fast = fast  # one-token matmuls through stages.fast_kernels (rollout.fast_kernels)
        self.refresh(model)
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []

    def refresh(self, model: nn.Module) -> None:
        """Rebuild the fused weights from `model`'s current weights (after an update)."""
        self.blocks = [_Block(layer, self.fast) for layer in model.layers]
        backbone = model.model
        self.embed = backbone.embed_tokens
        self.norm = (backbone.norm.weight, backbone.norm.eps)
        tied = getattr(model.args, "tie_word_embeddings", False)
        self.head = backbone.embed_tokens.as_linear if tied else model.lm_head
        # The one-token head through the fast kernel: the (V, D) weight of a plain head.
        head = backbone.embed_tokens if tied else model.lm_head
        plain = type(head) in (nn.Embedding, nn.Linear) and "bias" not in head
        self.fast_head = head.weight if self.fast and plain else None
        mx.eval([block.weights for block in self.blocks])

    @property
    def nbytes(self) -> int:
        """Bytes of the fused weight copies (the memory this engine adds to the model's)."""
        return sum(block.fused_nbytes for block in self.blocks)

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the KV cache (allocated for the whole rollout at prefill)."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values) if k is not None)

    # -- cache -------------------------------------------------------------------------------

    def _reset(self, padding: list[int], capacity: int) -> None:
        # Allocated at the first write, in the dtype of the keys and values written.
        self.keys = [None] * len(self.blocks)
        self.values = [None] * len(self.blocks)
        self.capacity = capacity
        self.left_padding = np.array(padding, dtype=np.int64)
        self.padded = bool(self.left_padding.any())
        self.start = 0  # first column any row attends to (BatchKVCache trims the others)
        self.end = 0  # columns written
        self._update_rows()

    def _update_rows(self) -> None:
        """Per-row arrays that change only when the rows do: RoPE offsets and the mask."""
        padding = mx.array(self.left_padding.astype(np.int32))
        self.offsets = self.end - padding  # (n,) int32, BatchKVCache.offset
        # BatchKVCache's decode mask is `left_padding <= column`; kept for every column, one
        # slice a step replaces building it per step.
        columns = mx.arange(self.capacity)
        self.row_mask = padding[:, None, None, None] <= columns if self.padded else None
        self.padding = padding  # (n,) int32, for fast_kernels.decode_attention

    def filter(self, index: mx.array) -> None:
        """Keep rows `index` (n,) of the cache, in that order (BatchKVCache.filter)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.left_padding = self.left_padding[np.array(index)]
        trim = int(self.left_padding.min()) - self.start
        if trim > 0:  # no kept row attends to these columns any more
            self.start += trim
        self._update_rows()

    def _grow(self, length: int) -> None:
        if self.end + length <= self.capacity:
            return
        extra = [(0, 0), (0, 0), (0, self.end + length - self.capacity), (0, 0)]
        self.keys = [mx.pad(k, extra) for k in self.keys]
        self.values = [mx.pad(v, extra) for v in self.values]
        self.capacity = self.end + length
        self._update_rows()

    # -- forward ------------------------------------------------------------------------------

    def _attend(
        self, i: int, queries: mx.array, keys: mx.array, values: mx.array, mask, window=None
    ):
        """Write block i's new keys and values (B, Hkv, L, hd) at the end of its cache and attend
        over the columns the rows use; (B, H, L, hd). With `window` (the step's [start, end) as
        an int32 array) keys and values are block i's whole cache with the new ones written
        already (`_Block.writes_cache`)."""
        end = self.end + queries.shape[2]
        scale = self.blocks[i].spec.scale
        if window is not None:
            self.keys[i], self.values[i] = keys, values
            if fast_kernels.attention_supported(queries, keys):
                return fast_kernels.decode_attention(
                    queries, keys, values, window, self.padding, scale
                )
        else:
            if self.keys[i] is None:
                shape = (keys.shape[0], keys.shape[1], self.capacity, keys.shape[3])
                self.keys[i] = mx.zeros(shape, dtype=keys.dtype)
                self.values[i] = mx.zeros(shape[:3] + values.shape[3:], dtype=values.dtype)
            self.keys[i][..., self.end : end, :] = keys
            self.values[i][..., self.end : end, :] = values
        return mx.fast.scaled_dot_product_attention(
            queries,
            self.keys[i][..., self.start : end, :],
            self.values[i][..., self.start : end, :],
            scale=scale,
            mask=mask,
        )

    def _forward(self, tokens: mx.array) -> mx.array:
        """Hidden states after the final norm: (B, L) -> (B, L, D); advances the cache."""
        L = tokens.shape[1]
        self._grow(L)
        if not self.padded:
            mask = None if L == 1 else "causal"
        elif L == 1:
            mask = self.row_mask[..., self.start : self.end + 1]
        else:
            mask = create_causal_mask(
                L,
                offset=self.end - self.start,
                left_padding=mx.array((self.left_padding - self.start).astype(np.int32)),
            )
        # Compiled only for one-token steps: their shapes repeat, a prefill chunk's do not.
        compiled = self.compiled and L == 1
        h = self.embed(tokens)
        column = window = None  # arrays built once per step, for the blocks that write the cache
        for i, block in enumerate(self.blocks):
            cache = None
            if block.writes_cache(L) and self.keys[i] is not None:
                if column is None:
                    column = mx.array([self.end], dtype=mx.int32)
                    window = mx.array([self.start, self.end + 1], dtype=mx.int32)
                cache = (self.keys[i], self.values[i], column)
            queries, keys, values = block.pre(h, self.offsets, compiled, cache)
            step_window = window if cache is not None else None
            attention = self._attend(i, queries, keys, values, mask, step_window)
            h = block.post(h, attention, compiled)
        self.end += L
        self.offsets = self.offsets + L
        return mx.fast.rms_norm(h, *self.norm)

    def prefill(self, tokens: mx.array, padding: list[int], new_tokens: int) -> mx.array:
        """Run the left-padded prompts (P, L) into a fresh cache with room for `new_tokens`
        more positions; returns the last position's logits (P, V)."""
        P, L = tokens.shape
        self._reset(padding, L + new_tokens)
        for start in range(0, L, self.prefill_step):
            hidden = self._forward(tokens[:, start : start + self.prefill_step])
            if start + self.prefill_step < L:
                mx.eval(self.keys, self.values)
        return self.head(hidden[:, -1, :])

    def _step_head(self, hidden: mx.array) -> mx.array:
        """Logits (n, V) of one position's hidden states (n, D)."""
        w = self.fast_head
        if w is not None and fast_kernels.supports(hidden, w):
            return fast_kernels.matmul(hidden, w)
        return self.head(hidden)

    def decode(self, tokens: mx.array) -> mx.array:
        """One step: tokens (n,) -> logits (n, V) of the next position."""
        return self._step_head(self._forward(tokens[:, None])[:, -1, :])


class RaggedDecoder(FusedDecoder):
    """The fused engine for multi-turn rollouts: rows of one batch at different lengths.

    After the shared prefill every row has its own next cache column (`row_end`): `decode`
    writes each row's token at its own column, with RoPE at the row's own position, and
    `append(rows, tokens)` writes a few rows' tool-result tokens (different counts per row)
    into those rows' next columns while the other rows stay where they are. A row attends to
    its columns from its left padding to its last written one (a mask per row and query), so
    nothing is ever re-prefilled. The last column of the cache is scratch: padding positions of
    an `append` and rows that finished but are still in the batch write there, and no row that
    is still generating reads it.

    prefill(tokens, padding, new_tokens) -> logits (P, V), as FusedDecoder, with room for
    `new_tokens` more tokens per row; filter(index) keeps rows; decode(tokens (n,)) -> logits
    (n, V); append(rows (k,), tokens: k lists) -> logits (k, V) at each row's last new token.
    """

    def prefill(self, tokens: mx.array, padding: list[int], new_tokens: int) -> mx.array:
        logits = super().prefill(tokens, padding, new_tokens + 1)  # + the scratch column
        self.row_end = np.full(tokens.shape[0], self.end, dtype=np.int64)
        return logits

    def filter(self, index: mx.array) -> None:
        super().filter(index)
        self.row_end = self.row_end[np.array(index)]

    @property
    def scratch(self) -> int:
        return self.capacity - 1

    def _ragged_forward(self, tokens: mx.array, columns: np.ndarray, rows: mx.array | None):
        """Hidden states (n, L, D) of `tokens` (n, L) written at cache `columns` (n, L) of the
        batch rows `rows` (None: every row, in order); columns are each row's consecutive
        positions (or the scratch column for padding)."""
        n, L = tokens.shape
        padding = self.left_padding if rows is None else self.left_padding[np.array(rows)]
        first = columns[:, 0]
        # Each query j of row r sees columns [left padding r, first r + j]; the scratch column
        # is past every real one, so a padding query sees its row's real columns and no more.
        last = np.minimum(first[:, None] + np.arange(L)[None, :], self.scratch)
        hi = int(last.max()) + 1
        span = np.arange(self.start, hi)
        mask = (span[None, None, :] >= padding[:, None, None]) & (
            span[None, None, :] <= last[:, :, None]
        )
        mask = mx.array(mask[:, None])  # (n, 1, L, columns)
        offsets = mx.array((first - padding).astype(np.int32))  # RoPE position of token 0
        index = mx.array(np.broadcast_to(columns[:, None, :, None], (n, 1, L, 1)).astype(np.int32))
        compiled = self.compiled and L == 1
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            queries, keys, values = block.pre(h, offsets, compiled)
            if self.keys[i] is None:
                raise RuntimeError("RaggedDecoder.decode/append before prefill")
            cache_k = self.keys[i] if rows is None else self.keys[i][rows]
            cache_v = self.values[i] if rows is None else self.values[i][rows]
            at = mx.broadcast_to(index, keys.shape[:2] + (L, keys.shape[3]))
            cache_k = mx.put_along_axis(cache_k, at, keys, axis=2)
            at = mx.broadcast_to(index, values.shape[:2] + (L, values.shape[3]))
            cache_v = mx.put_along_axis(cache_v, at, values, axis=2)
            if rows is None:
                self.keys[i], self.values[i] = cache_k, cache_v
            else:
                self.keys[i][rows] = cache_k
                self.values[i][rows] = cache_v
            attention = mx.fast.scaled_dot_product_attention(
                queries,
                cache_k[..., self.start : hi, :],
                cache_v[..., self.start : hi, :],
                scale=block.spec.scale,
                mask=mask,
            )
            h = block.post(h, attention, compiled)
        return mx.fast.rms_norm(h, *self.norm)

    def decode(self, tokens: mx.array) -> mx.array:
        """One token per row, each at its own next column: tokens (n,) -> logits (n, V)."""
        columns = np.minimum(self.row_end, self.scratch)[:, None]
        hidden = self._ragged_forward(tokens[:, None], columns, None)
        self.row_end = self.row_end + 1
        return self._step_head(hidden[:, -1, :])

    def append(self, rows: np.ndarray, tokens: list[list[int]]) -> mx.array:
        """Write `tokens[i]` (any number per row) at the next columns of batch row `rows[i]`;
        returns the logits (k, V) after each row's last new token."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        width = int(lengths.max())
        if (self.row_end[rows] + lengths > self.scratch).any():
            raise ValueError("append: the tokens do not fit in the cache allocated at prefill")
        ids = np.zeros((len(rows), width), dtype=np.int32)
        columns = np.full((len(rows), width), self.scratch, dtype=np.int64)
        for i, (row, row_tokens) in enumerate(zip(rows, tokens)):
            ids[i, : len(row_tokens)] = row_tokens
            columns[i, : len(row_tokens)] = self.row_end[row] + np.arange(len(row_tokens))
        hidden = self._ragged_forward(mx.array(ids), columns, mx.array(rows))
        self.row_end[rows] += lengths
        last = mx.array((lengths - 1).astype(np.int32))
        picked = mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return self.head(picked)
