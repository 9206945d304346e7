"""Load a causal LM and its tokenizer through mlx-lm.

`path` is an HF-format directory (config.json, model.safetensors or shards with
model.safetensors.index.json, tokenizer files) or `builtin:<name>` for a model the project builds
itself (see stages/tiny_model.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

from stages import tiny_model
from stages.backend import resolve_dtype

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as mlx_lm_load

BUILTIN_PREFIX = "builtin:"


def resolve_path(path: str | Path) -> Path:
    """A model directory for `path`, building a built-in model on first use."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        return tiny_model.builtin_path(text[len(BUILTIN_PREFIX) :])
    return Path(text).expanduser()


def check_model_dir(model_dir: Path) -> dict:
    """Fail early, naming the path, when `model_dir` is not a loadable HF model directory."""
    if not model_dir.exists():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise NotADirectoryError(f"model path {model_dir} is not a directory")
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.exists():
        shards = set(json.loads(index_file.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (model_dir / s).exists())
        if missing:
            raise FileNotFoundError(f"{index_file} names shards that are missing: {missing}")
    elif not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"model directory {model_dir} has no *.safetensors weights")
    return config


def load(path: str | Path, *, dtype=None) -> tuple[nn.Module, TokenizerWrapper]:
    """Load (model, tokenizer) from an HF directory or `builtin:<name>`.

    dtype: an mx.Dtype, a name ("float32", "bfloat16", "float16"), or None/"auto" for the
    backend default (float32 on CPU, bfloat16 on GPU/Metal). Quantized weights keep their dtype.
    """
    model_dir = resolve_path(path)
    check_model_dir(model_dir)
    model, tokenizer, config = mlx_lm_load(str(model_dir), return_config=True)
    # Kept so stages.checkpoint.save writes the checkpoint's own config.json back. A read-only
    # mapping, because nn.Module would treat a plain dict attribute as parameters.
    model.hf_config = MappingProxyType(dict(config))
    if not isinstance(dtype, mx.Dtype):
        dtype = resolve_dtype(dtype)
    # set_dtype only touches floating-point parameters, so quantized weights stay packed.
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, tokenizer
