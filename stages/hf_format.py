"""Hugging Face layout: tensor names, shards and config key spellings.

mlx-lm's parameter names are HF's, with two differences this module bridges in both directions:
MoE models hold each layer's experts stacked (`mlp.switch_mlp.{gate,up,down}_proj.weight`, one
(E, out, in) tensor) where HF stores one tensor per expert, and transformers >= 5 writes some
config.json keys under newer names than mlx-lm reads. Used by checkpoints (write), the loader
(read) and the built-in models (write).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# transformers' default shard limit (save_pretrained(max_shard_size="5GB")).
MAX_SHARD_BYTES = 5 * 10**9
_DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}
# mlx-lm stacks the experts of these architectures into one SwitchGLU ("switch_mlp"); HF stores
# one tensor per expert under "experts.E".
_STACKED_EXPERTS = {"qwen3_moe", "qwen2_moe", "olmoe"}
_SWITCH = re.compile(r"^(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def mlx_lm_overrides(config: dict) -> dict:
    """Config keys mlx-lm expects under older names than transformers >= 5 writes.

    transformers 5 saves `rope_parameters` (with rope_theta inside) and, for Qwen3-MoE,
    `num_local_experts`; mlx-lm's qwen3_moe reads `rope_theta` and `num_experts`.
    """
    overrides = {}
    rope = config.get("rope_parameters") or {}
    if config.get("rope_theta") is None and rope.get("rope_theta") is not None:
        overrides["rope_theta"] = rope["rope_theta"]
    if "num_experts" not in config and "num_local_experts" in config:
        overrides["num_experts"] = config["num_local_experts"]
    return overrides


def hf_weights(model: nn.Module) -> dict[str, mx.array]:
    """The model's parameters under HF names and in HF layout.

    MoE experts stacked as `...mlp.switch_mlp.{gate,up,down}_proj.weight` (E, out, in) become
    `...mlp.experts.{e}.{gate,up,down}_proj.weight` (out, in) per expert. Quantized models keep
    mlx-lm's layout (transformers cannot open mlx-lm's quantization anyway).
    """
    weights = dict(tree_flatten(model.parameters()))
    model_type = getattr(getattr(model, "args", None), "model_type", None)
    if model_type not in _STACKED_EXPERTS or any(n.endswith(".scales") for n in weights):
        return weights
    hf = {}
    for name, value in weights.items():
        match = _SWITCH.match(name)
        if match is None:
            hf[name] = value
            continue
        prefix, projection = match.groups()
        for expert in range(value.shape[0]):
            hf[f"{prefix}.experts.{expert}.{projection}.weight"] = value[expert]
    return hf


def save_weights(
    directory: Path, weights: dict[str, mx.array], *, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
    """Write `weights` as HF safetensors: one model.safetensors, or shards of at most
    `max_shard_bytes` (a bigger tensor gets a shard of its own) named
    model-0000i-of-0000n.safetensors plus model.safetensors.index.json. Returns the files."""
    shards: list[dict[str, mx.array]] = []
    size = 0
    for name in sorted(weights):
        value = weights[name]
        if not shards or size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    count = len(shards)
    files = (
        ["model.safetensors"]
        if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    weight_map = {}
    for file, shard in zip(files, shards):
        # Contiguous copies: an expert slice of a stacked tensor is a view.
        shard = {name: mx.contiguous(value) for name, value in shard.items()}
        mx.save_safetensors(str(directory / file), shard, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    if count > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def model_config(model: nn.Module) -> dict:
    """The HF config.json to write for `model`: the loaded checkpoint's own config (else the
    model's args), with both key spellings so mlx-lm (older names) and transformers >= 5 (either)
    read it, and the dtype of its floating-point weights."""
    source = getattr(model, "hf_config", None)
    config = dict(source) if source is not None else asdict(model.args)
    config.update(mlx_lm_overrides(config))
    floating = [
        v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)
    ]
    if floating:
        config["torch_dtype"] = _DTYPE_NAMES.get(floating[0], "float32")
        config["dtype"] = config["torch_dtype"]
    return config
