"""Fused decode engine: the rollout's forward for mlx-lm's qwen3, llama and qwen3_moe models
with fewer operations per step and the same numbers.

On a GPU the MLX backend is host-bound at rollout sizes (each operation costs host time to
build and dispatch, each matmul more), so a decode step costs about what its operation count
costs. This engine computes exactly what mlx-lm's model computes on its batch KV cache, with:

- fused projections: Q|K|V as one matmul and gate|up as one (4 matmuls a block, not 7); each
  output column of a matmul is its own dot product, so the split result equals the separate
  matmuls bit for bit (tests/test_fused_decode.py checks it on real rollouts);
- a KV cache allocated once for the whole rollout and written in place (no growth by
  concatenation, no per-layer position arrays), with mlx-lm's `BatchKVCache` semantics: left
  padding masked with the same boolean mask, `filter` keeping rows and dropping the padding
  columns no kept row needs, as `BatchKVCache.filter` does;
- optionally `mx.compile` on the shape-stable parts of a block (see `FusedDecoder`).

Everything else is mlx-lm's own code, called as modules: embeddings, RoPE, the MoE block,
LoRA adapters (each adapter's update is added to its slice of the fused output as
`LoRALinear.__call__` adds it), the final norm and the vocabulary head.

The fused weights are copies: `refresh(model)` rebuilds them from the model's current weights
(after an optimizer update) and `nbytes` is their size. Architectures or layers this engine does
not know (quantized projections, sliding-window layers, pipeline-parallel models) are reported
by `unsupported(model)`; the rollout then uses mlx-lm's own path.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_causal_mask
from mlx_lm.tuner.lora import LoRALinear

ARCHITECTURES = ("qwen3", "llama", "qwen3_moe")  # modules of mlx_lm.models this engine runs


def _architecture(model: nn.Module) -> str:
    """The mlx_lm.models module that defines `model` (e.g. "qwen3"), or its class path."""
    module, prefix = type(model).__module__, "mlx_lm.models."
    if module.startswith(prefix):
        return module[len(prefix) :]
    return f"{module}.{type(model).__name__}"


def _base_linear(module: nn.Module) -> nn.Linear | None:
    """The plain nn.Linear a projection computes (under a LoRA adapter), or None."""
    base = module.linear if isinstance(module, LoRALinear) else module
    return base if type(base) is nn.Linear else None


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
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        if hasattr(mlp, "gate_proj"):
            projections += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        kinds = {type(_base_linear(p) or p).__name__ for p in projections}
        if any(_base_linear(p) is None for p in projections):
            return f"architecture {model_type!r} with {'/'.join(sorted(kinds))} projections"
    return None


class _Projection:
    """Linear layers that read the same input, computed as one matmul and split.

    `__call__(x (..., in)) -> [y_i (..., out_i)]`. Members are nn.Linear or LoRALinear over
    nn.Linear; a member's adapter update is added to its slice exactly as LoRALinear does.
    """

    def __init__(self, members: list[nn.Module]):
        bases = [_base_linear(m) for m in members]
        self.adapters = [m if isinstance(m, LoRALinear) else None for m in members]
        weights = [b.weight for b in bases]
        biases = [b.bias for b in bases if "bias" in b]
        if len(members) == 1:
            weight, self.fused_nbytes = weights[0], 0  # the model's own array: no copy
            bias = biases[0] if biases else None
        else:
            weight = mx.concatenate(weights, axis=0)
            bias = mx.concatenate(biases) if biases else None
            self.fused_nbytes = weight.nbytes + (bias.nbytes if bias is not None else 0)
        # x @ W.T as nn.Linear computes it (the transposed view, not a transposed copy, so the
        # matmul is the same BLAS call as mlx-lm's).
        self.weight_t = weight.T
        self.bias = bias
        sizes = [w.shape[0] for w in weights]
        self.splits = np.cumsum(sizes)[:-1].tolist()

    def arrays(self) -> list[mx.array]:
        return [self.weight_t] + ([self.bias] if self.bias is not None else [])

    def __call__(self, x: mx.array) -> list[mx.array]:
        if self.bias is not None:
            y = mx.addmm(self.bias, x, self.weight_t)
        else:
            y = x @ self.weight_t
        parts = mx.split(y, self.splits, axis=-1) if self.splits else [y]
        for i, lora in enumerate(self.adapters):
            if lora is not None:
                z = (lora.dropout(x) @ lora.lora_a) @ lora.lora_b
                parts[i] = parts[i] + (lora.scale * z).astype(x.dtype)
        return parts


class _Block:
    """One transformer block's fused weights and its mlx-lm submodules."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.n_heads, self.n_kv_heads, self.scale = attn.n_heads, attn.n_kv_heads, attn.scale
        self.qkv = _Projection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = _Projection([attn.o_proj])
        self.head_dim = _base_linear(attn.q_proj).weight.shape[0] // attn.n_heads
        qk_norm = hasattr(attn, "q_norm")
        self.q_norm = (attn.q_norm.weight, attn.q_norm.eps) if qk_norm else None
        self.k_norm = (attn.k_norm.weight, attn.k_norm.eps) if qk_norm else None
        self.rope = attn.rope
        self.input_norm = (layer.input_layernorm.weight, layer.input_layernorm.eps)
        self.post_norm = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
        if hasattr(mlp, "gate_proj"):
            self.gate_up = _Projection([mlp.gate_proj, mlp.up_proj])
            self.down = _Projection([mlp.down_proj])
            self.moe = None
        else:  # a mixture of experts: mlx-lm's own block
            self.gate_up = self.down = None
            self.moe = mlp

    @property
    def fused_nbytes(self) -> int:
        parts = [self.qkv] + ([self.gate_up] if self.gate_up is not None else [])
        return sum(p.fused_nbytes for p in parts)

    def arrays(self) -> list[mx.array]:
        parts = [self.qkv, self.o_proj] + ([self.gate_up, self.down] if self.moe is None else [])
        return [a for p in parts for a in p.arrays()]

    def mlp(self, h: mx.array) -> mx.array:
        """h + MLP(post_norm(h)); (B, L, D) -> (B, L, D)."""
        x = mx.fast.rms_norm(h, *self.post_norm)
        if self.moe is not None:
            return h + self.moe(x)
        gate, up = self.gate_up(x)
        return h + self.down(swiglu(gate, up))[0]


class FusedDecoder:
    """The rollout engine of fused weights and a pre-allocated batch KV cache.

    prefill(tokens (P, L) int32 left-padded, padding [P], new_tokens) -> logits (P, V) of each
    prompt's last position; filter(index (n,)) keeps (and repeats) rows of the cache;
    decode(tokens (n,)) -> logits (n, V) of the next position, writing its keys and values.

    Equal to mlx-lm's model on `BatchKVCache` (padded batch: the same boolean mask) or on a
    batch cache with no mask (unpadded batch: `None` for one token, "causal" for a chunk), as
    the rollout builds them: same prefill chunks, same RoPE offsets, same attended columns.
    """

    def __init__(self, model: nn.Module, prefill_step: int = 2048):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the fused decode engine does not support {reason}")
        self.prefill_step = prefill_step
        self.refresh(model)
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []

    def refresh(self, model: nn.Module) -> None:
        """Rebuild the fused weights from `model`'s current weights (after an update)."""
        self.blocks = [_Block(layer) for layer in model.layers]
        backbone = model.model
        self.embed = backbone.embed_tokens
        self.norm = (backbone.norm.weight, backbone.norm.eps)
        tied = getattr(model.args, "tie_word_embeddings", False)
        self.head = backbone.embed_tokens.as_linear if tied else model.lm_head
        mx.eval([block.arrays() for block in self.blocks])

    @property
    def nbytes(self) -> int:
        """Bytes of the fused weight copies (the memory this engine adds to the model's)."""
        return sum(block.fused_nbytes for block in self.blocks)

    @property
    def cache_nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    # -- cache -------------------------------------------------------------------------------

    def _reset(self, padding: list[int], capacity: int, dtype) -> None:
        n = len(padding)
        self.keys = [
            mx.zeros((n, b.n_kv_heads, capacity, b.head_dim), dtype=dtype) for b in self.blocks
        ]
        self.values = [mx.zeros_like(k) for k in self.keys]
        self.left_padding = np.array(padding, dtype=np.int64)
        self.padded = bool(self.left_padding.any())
        self.start = 0  # first column any row attends to (BatchKVCache trims the others)
        self.end = 0  # columns written
        self._update_rows()

    def _update_rows(self) -> None:
        """Per-row arrays that change only when the rows do: RoPE offsets and the mask."""
        padding = mx.array(self.left_padding.astype(np.int32))
        self.offsets = self.end - padding  # (n,) int32, BatchKVCache.offset
        capacity = self.keys[0].shape[2]
        # BatchKVCache's decode mask is `left_padding <= column`; kept for every column, one
        # slice a step replaces building it per step.
        self.row_mask = padding[:, None, None, None] <= mx.arange(capacity) if self.padded else None

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
        capacity = self.keys[0].shape[2]
        if self.end + length <= capacity:
            return
        extra = self.end + length - capacity
        self.keys = [mx.pad(k, [(0, 0), (0, 0), (0, extra), (0, 0)]) for k in self.keys]
        self.values = [mx.pad(v, [(0, 0), (0, 0), (0, extra), (0, 0)]) for v in self.values]
        self._update_rows()

    # -- forward ------------------------------------------------------------------------------

    def _attention(self, i: int, block: _Block, h: mx.array, mask) -> mx.array:
        """h + attention(input_norm(h)) for block i, writing its keys and values."""
        B, L, _ = h.shape
        x = mx.fast.rms_norm(h, *block.input_norm)
        queries, keys, values = block.qkv(x)
        queries = queries.reshape(B, L, block.n_heads, -1)
        keys = keys.reshape(B, L, block.n_kv_heads, -1)
        if block.q_norm is not None:
            queries = mx.fast.rms_norm(queries, *block.q_norm)
            keys = mx.fast.rms_norm(keys, *block.k_norm)
        queries = block.rope(queries.transpose(0, 2, 1, 3), offset=self.offsets)
        keys = block.rope(keys.transpose(0, 2, 1, 3), offset=self.offsets)
        values = values.reshape(B, L, block.n_kv_heads, -1).transpose(0, 2, 1, 3)
        end = self.end + L
        self.keys[i][..., self.end : end, :] = keys
        self.values[i][..., self.end : end, :] = values
        out = mx.fast.scaled_dot_product_attention(
            queries,
            self.keys[i][..., self.start : end, :],
            self.values[i][..., self.start : end, :],
            scale=block.scale,
            mask=mask,
        )
        return h + block.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))[0]

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
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            h = block.mlp(self._attention(i, block, h, mask))
        self.end += L
        self.offsets = self.offsets + L
        return mx.fast.rms_norm(h, *self.norm)

    def prefill(self, tokens: mx.array, padding: list[int], new_tokens: int) -> mx.array:
        """Run the left-padded prompts (P, L) into a fresh cache with room for `new_tokens`
        more positions; returns the last position's logits (P, V)."""
        P, L = tokens.shape
        self._reset(padding, L + new_tokens, self.blocks[0].qkv.weight_t.dtype)
        for start in range(0, L, self.prefill_step):
            hidden = self._forward(tokens[:, start : start + self.prefill_step])
            if start + self.prefill_step < L:
                mx.eval(self.keys, self.values)
        return self.head(hidden[:, -1, :])

    def decode(self, tokens: mx.array) -> mx.array:
        """One step: tokens (n,) -> logits (n, V) of the next position."""
        return self.head(self._forward(tokens[:, None]))[:, -1, :]
