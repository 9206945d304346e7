"""LoRA on mlx-lm's layers: apply, save/load adapters in mlx-lm's format, disable, fuse.

Everything here wraps mlx-lm's tuner (`linear_to_lora_layers`, `LoRALinear`,
`LoRASwitchLinear`, `load_adapters`, each layer's `fuse`); nothing re-implements LoRA. The base
may be quantized (mlx-lm 4/8-bit): LoRA then trains over the packed weights (QLoRA).

Adapters are saved as mlx-lm saves them (`adapters.safetensors` + `adapter_config.json` with
`fine_tune_type`, `num_layers` and `lora_parameters`), so
`mlx_lm.load(base_dir, adapter_path=checkpoint_dir)` opens them.

The GRPO reference policy of a LoRA run is the base model: `adapters_disabled(model)` sets every
adapter's scale to 0 for the duration, so the same weights serve both (no second copy).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from stages.grad_checkpoint import wrapped_calls
from stages.settings import check, setting

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
_LORA_TYPES = (LoRALinear, LoRASwitchLinear, LoRAEmbedding)
_TARGET_TYPES = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


@dataclass
class LoraConfig:
    """`model.lora.*`: LoRA adapters on mlx-lm's layers (QLoRA on an mlx-lm 4/8-bit base)."""

    enabled: bool = setting(
        False, "true: freeze the model, train only adapters; beta > 0 uses the base as reference"
    )
    rank: int = setting(8, "adapter rank")
    scale: float = setting(20.0, "mlx-lm's scale: update = scale * x @ A @ B (PEFT's alpha / rank)")
    dropout: float = setting(0.0, "on the adapter input, in the update's forward pass only")
    target_modules: list[str] = setting(
        factory=list,
        help="module names in a block, by suffix (q_proj, mlp.down_proj); []: every linear",
    )
    num_layers: int = setting(-1, "adapt the last N blocks; -1: all")

    def validate(self) -> None:
        check(self.rank >= 1, "rank", self.rank, ">= 1")
        check(self.scale > 0, "scale", self.scale, "> 0")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        check(
            self.num_layers == -1 or self.num_layers >= 1,
            "num_layers",
            self.num_layers,
            ">= 1, or -1 for all blocks",
        )


def _block_keys(model: nn.Module, target_modules: list[str]) -> list[str]:
    """The module paths (relative to a block) that get adapters, as mlx-lm's `keys`."""
    found = set()
    for block in model.layers:
        for path, module in block.named_modules():
            if not isinstance(module, _TARGET_TYPES):
                continue
            if not target_modules or any(
                path == t or path.endswith("." + t) for t in target_modules
            ):
                found.add(path)
    if target_modules and not found:
        names = sorted(
            {p for b in model.layers for p, m in b.named_modules() if isinstance(m, _TARGET_TYPES)}
        )
        raise ValueError(
            f"model.lora.target_modules={list(target_modules)} match no linear layer of a block; "
            f"the block's linear layers are {names}"
        )
    return sorted(found)


def apply(model: nn.Module, settings: LoraConfig) -> dict:
    """Freeze `model` and add LoRA adapters (mlx-lm's layers) in place; only they train.

    Returns the adapter config (mlx-lm's adapter_config.json content), also kept on the model
    for stages.checkpoint.save.
    """
    total = len(model.layers)
    num_layers = total if settings.num_layers < 0 else settings.num_layers
    if not 1 <= num_layers <= total:
        raise ValueError(
            f"model.lora.num_layers={settings.num_layers} is invalid: the model has {total} "
            "blocks (use -1 for all)"
        )
    parameters = {
        "rank": settings.rank,
        "scale": settings.scale,
        "dropout": settings.dropout,
        "keys": _block_keys(model, settings.target_modules),
    }
    model.freeze()
    linear_to_lora_layers(model, num_layers, parameters)
    adapter_config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": parameters,
    }
    model.lora_config = MappingProxyType(adapter_config)
    mx.eval(model.parameters())
    return adapter_config


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _LORA_TYPES)]


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """name -> array of the trainable adapter matrices (lora_a, lora_b)."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write adapters.safetensors + adapter_config.json (mlx-lm's format) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters (stages.lora.apply was not called)")
    mx.save_safetensors(str(directory / ADAPTER_FILE), adapter_weights(model))
    serialisable = json.loads(json.dumps(dict(config), default=dict))
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(serialisable, indent=2))
    return directory


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Add the adapters saved in `directory` to a freshly loaded base `model` (mlx-lm's loader)."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG_FILE).exists():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG_FILE}")
    config = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    model.freeze()
    mlx_lm_load_adapters(model, str(directory))
    model.lora_config = MappingProxyType(config)
    mx.eval(model.parameters())
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes its base: every adapter's scale is 0.

    LoRA layers compute `base(x) + scale * (x @ A @ B)`; with scale 0 the sum is the base output
    exactly. Raises ValueError for a model without adapters (it would silently be its own
    reference).
    """
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError("adapters_disabled needs a model with LoRA adapters")
    scales = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield model
    finally:
        for m, scale in zip(layers, scales):
            m.scale = scale


def fuse(model: nn.Module, *, dequantize: bool = True) -> nn.Module:
    """Merge every adapter into its base layer (each mlx-lm LoRA layer's `fuse`), in place.

    dequantize=True also turns every remaining quantized layer back into a full-precision one
    and drops the quantization from the model's HF config, so the result saves as plain HF
    weights that transformers opens.
    """
    from mlx_lm.utils import dequantize_model

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in lora_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
        config = getattr(model, "hf_config", None)
        if config is not None:
            plain = {
                k: v for k, v in config.items() if k not in ("quantization", "quantization_config")
            }
            model.hf_config = MappingProxyType(plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    model.unfreeze()
    mx.eval(model.parameters())
    return model


@contextmanager
def adapters_in_activation_dtype(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, each LoRA layer of `model` (mlx-lm's LoRALinear and LoRASwitchLinear)
    multiplies its input by its adapters cast to the input's dtype; the adapters stay float32
    master weights and their gradients float32 (the cast's gradient), as under torch's
    autocast.

    mlx-lm's LoRALinear computes `x @ lora_a` with bfloat16 x and float32 adapters, so MLX
    promotes: every adapter's input, its output and their gradients become float32 copies, kept
    for the backward pass (about 10k float32 values per token and Qwen3 block: more than the
    whole bfloat16 block's own). mlx-lm's forward is called as it is, with the cast adapters in
    place of its own for the duration of the call. Where the dtypes already agree (float32 on
    CPU) nothing changes. The update uses it for every forward pass it makes (the loss, the old
    and the reference log-probs), so its ratios compare like with like.
    """
    classes = {type(m) for _, m in lora_layers(model)} & {LoRALinear, LoRASwitchLinear}

    def cast(call):
        def cast_call(self, x, *args, **kwargs):
            a, b = self.lora_a, self.lora_b
            if a.dtype == x.dtype or not mx.issubdtype(x.dtype, mx.floating):
                return call(self, x, *args, **kwargs)
            self.lora_a, self.lora_b = a.astype(x.dtype), b.astype(x.dtype)
            try:
                return call(self, x, *args, **kwargs)
            finally:
                self.lora_a, self.lora_b = a, b

        return cast_call

    with wrapped_calls(classes, cast):
        yield model
