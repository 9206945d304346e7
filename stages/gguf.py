"""GGUF (llama.cpp's one-file model format) as a model input, converted once to an HF directory.

`convert(gguf_file, out_dir)` writes what stages.load_weights reads from any HF checkpoint:
config.json (LlamaForCausalLM), model.safetensors (HF tensor names, float32), tokenizer.json +
tokenizer_config.json (vocabulary, merges, special tokens and chat template from the file's
metadata) and generation_config.json. `converted_path(gguf_file)` converts into the cache
($MLX_GRPO_CACHE, else ~/.cache/mlx-grpo) under a key of the file's content, so a second load only
hashes the file; stages.load_weights.resolve_path calls it for every `*.gguf` path.
    python -m stages.gguf convert model.gguf out_dir      # the same conversion, to a directory

What is read, and how:
- header: parsed here (magic, version, every tensor's type and extent) before MLX sees the file,
  so a truncated or foreign file, an architecture or a tensor type we cannot use is one line
  naming the problem, not a crash or a silently short tensor list inside `mx.load`.
- weights: `mx.load`. MLX keeps Q4_0, Q4_1 and Q8_0 packed (weight, scales, biases; groups of
  32), which we dequantise exactly in float32; it reads F32/F16 as they are and turns BF16, Q2_K
  and Q6_K into float16 itself. Every other type (TYPES_READ) is refused: MLX cannot read it, or
  (Q4_K) reads it wrongly.
- llama.cpp's converter interleaves the rows of Q and K per head for its RoPE (`permute` in
  convert_hf_to_gguf.py); `unpermute_rows` undoes it exactly.
- tokenizer: transformers' own GGUF tokenizer builders (transformers.integrations.gguf, no torch),
  fed with the metadata MLX returns; saved with `save_pretrained`, so mlx-lm reads it as usual.
Only general.architecture "llama" (Llama, Mistral, SmolLM, TinyLlama, ...) is converted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from stages.hf_format import save_weights
from stages.tiny_model import cache_root

import mlx.core as mx
import numpy as np
from mlx_lm.utils import save_config

ARCHITECTURES = ("llama",)
# Bump when the conversion's output changes, so stale cached conversions are not reused.
CONVERTER_VERSION = 1
MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 counted in 32 bits and is gone from the wild
DEFAULT_ALIGNMENT = 32
GROUP_SIZE = 32  # elements per block of Q4_0, Q4_1 and Q8_0: MLX's group size for them

# ggml's tensor type ids (ggml.h), for naming them in errors.
TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}  # fmt: skip
# The types MLX reads correctly as weights: id -> (elements per block, bytes per block).
TYPES_READ = {
    0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34),
    10: (256, 84), 14: (256, 210),
}  # fmt: skip
# Of those, the ones MLX turns into float16 (BF16 can overflow there: checked after loading).
TYPES_VIA_FLOAT16 = {30, 10, 14}
# Q4_K (12) MLX reads without complaint but wrongly: its GGUF reader (gguflib) gives each odd
# 32-value sub-block the scale and min of the even one before it (tests/test_gguf.py shows it).

# Metadata value types (gguf.md): fixed-size scalars, then string (8) and array (9).
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9

# llama.cpp tensor names -> HF (LlamaForCausalLM) names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the one-line message names the file and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major, as MLX and HF hold it (ggml lists dimensions reversed)
    type_id: int
    offset: int  # bytes from the start of the data section
    nbytes: int | None  # None for a type MLX cannot read

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type_id, f"type {self.type_id}")


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    scalars: dict  # metadata key -> int | float | bool | str (arrays are left out)
    tensors: list[TensorInfo]
    data_start: int  # byte offset of the first tensor

    @property
    def architecture(self) -> str | None:
        return self.scalars.get("general.architecture")


class _Cursor:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, path: Path, data):
        self.path, self.data, self.offset = path, data, 0

    def take(self, size: int) -> int:
        start = self.offset
        if size < 0 or start + size > len(self.data):
            raise GGUFError(
                f"{self.path} is truncated or corrupt: its header needs byte {start + size:,} "
                f"but the file has {len(self.data):,}; download or export it again"
            )
        self.offset += size
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        size = self.unpack("<Q")
        start = self.take(size)
        return bytes(self.data[start : start + size]).decode("utf-8", errors="replace")

    def value(self, value_type: int):
        """One metadata value; arrays are skipped (returned as None)."""
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALAR_FORMATS:
                self.take(count * struct.calcsize(_SCALAR_FORMATS[item_type]))
            elif item_type == _STRING:
                for _ in range(count):
                    self.take(self.unpack("<Q"))
            else:
                raise GGUFError(f"{self.path} is corrupt: array of value type {item_type}")
            return None
        raise GGUFError(f"{self.path} is corrupt: metadata value type {value_type}")


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and check a GGUF file's header without reading any tensor.

    Raises GGUFError (one line) for a foreign file, an unsupported version, a header or tensor
    that runs past the end of the file, an architecture other than ARCHITECTURES, or a tensor
    type MLX does not read correctly; FileNotFoundError for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist (or is not a file)")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 4 or head[:4] != MAGIC:
            raise GGUFError(
                f"{path} is not a GGUF file (it starts with {head[:4]!r}, not {MAGIC!r}); "
                "pass a llama.cpp .gguf model or an HF model directory"
            )
        if size < 24:
            raise GGUFError(f"{path} is truncated ({size} bytes); download or export it again")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            header = _parse(path, data)
    _check_usable(path, header, size)
    return header


def _parse(path: Path, data) -> GGUFHeader:
    cursor = _Cursor(path, data)
    cursor.take(4)
    version = cursor.unpack("<I")
    if version not in VERSIONS:
        raise GGUFError(
            f"{path} is GGUF version {version}; versions {VERSIONS} are supported: export it "
            "again with a current llama.cpp (convert_hf_to_gguf.py)"
        )
    n_tensors, n_values = cursor.unpack("<Q"), cursor.unpack("<Q")
    scalars = {}
    for _ in range(n_values):
        key = cursor.string()
        value = cursor.value(cursor.unpack("<I"))
        if value is not None:
            scalars[key] = value
    tensors = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{path} is corrupt: tensor {name} has {n_dims} dimensions")
        dims = [cursor.unpack("<Q") for _ in range(n_dims)]
        type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        block = TYPES_READ.get(type_id)
        nbytes = None if block is None else math.prod(dims) // block[0] * block[1]
        if block is not None and dims[0] % block[0]:
            raise GGUFError(
                f"{path} is corrupt: tensor {name} has rows of {dims[0]} values, not a "
                f"multiple of {TYPE_NAMES[type_id]}'s block of {block[0]}"
            )
        if any(d >= 2**31 for d in dims):  # MLX holds dimensions as int32
            raise GGUFError(f"{path} is corrupt: tensor {name} has dimensions {dims}")
        tensors.append(TensorInfo(name, tuple(reversed(dims)), type_id, offset, nbytes))
    alignment = scalars.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFError(f"{path} is corrupt: general.alignment is {alignment!r}")
    data_start = -(-cursor.offset // alignment) * alignment
    return GGUFHeader(version, scalars, tensors, data_start)


def _check_usable(path: Path, header: GGUFHeader, size: int) -> None:
    architecture = header.architecture
    if architecture not in ARCHITECTURES:
        raise GGUFError(
            f"{path}: general.architecture {architecture!r} is not supported (supported: "
            f"{', '.join(ARCHITECTURES)}); use an HF-format directory of this model instead"
        )
    unreadable = [t for t in header.tensors if t.nbytes is None]
    if unreadable:
        names = sorted({t.type_name for t in unreadable})
        readable = ", ".join(TYPE_NAMES[t] for t in TYPES_READ)
        raise GGUFError(
            f"{path}: {len(unreadable)} tensors (e.g. {unreadable[0].name}) are "
            f"{'/'.join(names)}, which MLX {mx.__version__} does not read correctly (it reads "
            f"{readable}); use a Q8_0, Q4_0, Q4_1 or F16 GGUF of this model (llama-quantize "
            "makes one from its F16 GGUF)"
        )
    for tensor in header.tensors:
        end = header.data_start + tensor.offset + tensor.nbytes
        if end > size:
            raise GGUFError(
                f"{path} is truncated: tensor {tensor.name} ends at byte {end:,} but the file "
                f"has {size:,}; download or export it again"
            )


def unpermute_rows(weight: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's RoPE row interleave of a Q or K projection, (rows, ...) -> same shape.

    llama.cpp writes each head's rows as (2, rows/head/2) swapped to (rows/head/2, 2), i.e.
    `w.reshape(n_heads, 2, d, ...).swapaxes(1, 2)`; this is the inverse. `n_heads`: the query
    heads for Q, the key-value heads for K.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    split = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def _number(value):
    """A metadata scalar as a Python number (MLX returns them as 0-d arrays)."""
    return value.item() if isinstance(value, mx.array) else value


def _float32_text(value) -> float:
    """The shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(_number(value))))


def hf_config(metadata: dict, path: Path) -> dict:
    """config.json (LlamaForCausalLM) from a llama GGUF's metadata (as `mx.load` returns it)."""
    arch = metadata["general.architecture"]

    def key(name, default=None):
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{path} has no {arch}.{name} metadata; export it again with llama.cpp")
        return _number(value)

    if key("expert_count", 0):
        raise GGUFError(
            f"{path} is a mixture-of-experts {arch} (Mixtral-style), which is not supported; "
            "use an HF-format directory of this model instead"
        )
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{path}: RoPE on part of each head is not supported for {arch}")
    tokens = metadata["tokenizer.ggml.tokens"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": key("vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": _float32_text(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_text(key("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": _float32_text(key("rope.scaling.factor")),
        }
    elif scaling != "none":
        raise GGUFError(
            f"{path}: rope scaling {scaling!r} is not supported (none, linear); "
            "use an HF-format directory of this model instead"
        )
    for name in ("bos", "eos", "padding"):
        value = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[f"{name.replace('padding', 'pad')}_token_id"] = _number(value)
    return config


def _dequantized(arrays: dict, name: str) -> mx.array:
    """Tensor `name` in float32. MLX returns Q4_0/Q4_1/Q8_0 as `name` (uint32, packed) plus
    `<base>.scales` and `<base>.biases` (float16) per group of 32."""
    base = name.removesuffix(".weight")
    scales = arrays.get(f"{base}.scales")
    value = arrays[name]
    if scales is None:
        return value.astype(mx.float32)
    bits = value.shape[-1] // scales.shape[-1]  # uint32 words per group of 32 = bits
    # float32 scales and biases: llama.cpp's (and transformers') dequantisation is d * q + m in
    # float32, which this then matches bit for bit.
    return mx.dequantize(
        value,
        scales.astype(mx.float32),
        arrays[f"{base}.biases"].astype(mx.float32),
        group_size=GROUP_SIZE,
        bits=bits,
        dtype=mx.float32,
    )


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    block = {
        "self_attn.q_proj": (q_rows, hidden),
        "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden),
        "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
    }
    for layer in range(config["num_hidden_layers"]):
        for name, shape in block.items():
            shapes[f"model.layers.{layer}.{name}.weight"] = shape
    return shapes


def hf_weights(arrays: dict, header: GGUFHeader, config: dict, path: Path) -> dict[str, mx.array]:
    """The GGUF's tensors under HF names, float32, Q and K rows back in HF order (lazy arrays).

    Sets config["tie_word_embeddings"] (no `output.weight`: the head is the embedding).
    """
    hf_names, unknown = {}, []  # GGUF name -> HF name
    for tensor in header.tensors:
        name = tensor.name
        if name in _GLOBAL_NAMES:
            hf_names[name] = _GLOBAL_NAMES[name]
        elif (match := _BLOCK_TENSOR.match(name)) and match[2] in _BLOCK_NAMES:
            hf_names[name] = f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.weight"
        elif name == "rope_freqs.weight":
            raise GGUFError(
                f"{path} has rope_freqs (Llama 3.1-style RoPE scaling), which is not supported; "
                "use an HF-format directory of this model instead"
            )
        else:
            unknown.append(name)
    if unknown:
        raise GGUFError(
            f"{path} has tensors a Llama model does not ({', '.join(unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''}); use an HF-format directory of it instead"
        )
    config["tie_word_embeddings"] = "output.weight" not in hf_names
    # Shapes before any reshape, so an inconsistent file is one line naming the tensor.
    shapes = {hf_names[t.name]: t.shape for t in header.tensors}
    expected = _expected_shapes(config)
    for name in sorted(expected.keys() | shapes.keys()):
        if shapes.get(name) != expected.get(name):
            raise GGUFError(
                f"{path}: tensor for {name} is {shapes.get(name) or 'missing'}, its metadata "
                f"implies {expected.get(name) or 'none'}; the file is inconsistent, export it again"
            )
    weights = {}
    for name, hf_name in hf_names.items():
        value = _dequantized(arrays, name)
        if name.endswith(".attn_q.weight"):
            value = unpermute_rows(value, config["num_attention_heads"])
        elif name.endswith(".attn_k.weight"):
            value = unpermute_rows(value, config["num_key_value_heads"])
        weights[hf_name] = value
    return weights


def build_tokenizer(metadata: dict):
    """A transformers fast tokenizer from a GGUF's tokenizer.* metadata (as `mx.load` returns
    it), built by transformers' GGUF converters; chat template and special tokens included."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    def plain(value):
        return value.tolist() if isinstance(value, mx.array) else value

    groups = {
        group: {
            name: plain(metadata[f"tokenizer.{key}"])
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS for a sentencepiece vocabulary whose file does not say otherwise
        # (transformers' get_gguf_tokenizer does the same).
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for special, id_key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unk_token_id"),
        ("pad_token", "pad_token_id"),
    ):
        token_id = tokenizer_dict.get(id_key)
        tokenizer_config[special] = tokens[token_id] if token_id is not None else None
    try:
        backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    except ValueError as error:  # an unknown tokenizer.ggml.model: one line, as transformers says
        raise GGUFError(f"tokenizer: {' '.join(str(error).split())}") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)


def convert(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write GGUF `gguf_file` as an HF-format model directory `out_dir` (float32 weights).

    `out_dir` must not exist or be empty; it is written beside itself and renamed into place, so
    it is complete or absent. Raises GGUFError (bad input, one line) or FileExistsError.
    """
    gguf_file, out_dir = Path(gguf_file).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new directory")
    header = read_header(gguf_file)
    arrays, metadata = mx.load(str(gguf_file), format="gguf", return_metadata=True)
    config = hf_config(metadata, gguf_file)
    weights = hf_weights(arrays, header, config, gguf_file)
    for tensor in header.tensors:
        if tensor.type_id in TYPES_VIA_FLOAT16 and not mx.isfinite(arrays[tensor.name]).all():
            raise GGUFError(
                f"{gguf_file}: tensor {tensor.name} ({tensor.type_name}) has values beyond "
                "float16's range once MLX reads it (MLX reads BF16 through float16); use an "
                "F32, F16 or Q8_0 GGUF of this model"
            )
    tokenizer = build_tokenizer(metadata)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_weights(staging, weights)
        save_config(dict(config), staging / "config.json")
        tokenizer.save_pretrained(str(staging))
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = {k: config[k] for k in ids if k in config}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        if out_dir.exists():
            out_dir.rmdir()  # it was empty
        staging.rename(out_dir)
    except OSError:  # another process wrote out_dir meanwhile
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(f"{out_dir} was written by another process meanwhile") from None
    return out_dir


def content_digest(gguf_file: Path) -> str:
    """16 hex digits of sha256(converter version, file bytes): the cache key of a conversion."""
    digest = hashlib.sha256(f"mlx-grpo gguf converter {CONVERTER_VERSION}\n".encode())
    with open(gguf_file, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def converted_path(gguf_file: str | Path) -> Path:
    """The HF directory converted from `gguf_file`, converting it into the cache on first use.

    Keyed by the file's content: a changed file converts again, a renamed one does not.
    """

    gguf_file = Path(gguf_file).expanduser()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist (or is not a file)")
    target = cache_root() / f"gguf-{content_digest(gguf_file)}"
    if (target / "config.json").exists():
        return target
    try:
        convert(gguf_file, target)
    except FileExistsError:
        if not (target / "config.json").exists():
            raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.gguf",
        description="Convert a llama.cpp GGUF model to an HF-format directory (float32).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("convert", help="GGUF file -> HF model directory")
    command.add_argument("gguf_file", help="a .gguf file (general.architecture llama)")
    command.add_argument("out_dir", help="a new (or empty) directory to write")
    args = parser.parse_args(argv)
    try:
        out_dir = convert(args.gguf_file, args.out_dir)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
