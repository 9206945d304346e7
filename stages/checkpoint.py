"""Checkpoints: an HF-format model directory plus the trainer state needed to resume exactly.

Layout of one checkpoint directory:
    config.json, generation_config.json, model.safetensors or model-0000i-of-0000n.safetensors
    + model.safetensors.index.json (HF tensor names and layout: MoE experts un-stacked to
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight), tokenizer files
                                         -> opens with mlx_lm.load and transformers
    adapters.safetensors, adapter_config.json (LoRA runs: mlx-lm's adapter format, instead of
    the full weights)                    -> mlx_lm.load(base, adapter_path=checkpoint)
    trainer_state.json                   -> step, data position, seeds, anything JSON
    optimizer.safetensors                -> optimizer state (AdamW moments, step)
    manifest.json                        -> size of every file, to detect truncation
A checkpoint is written into a temporary sibling directory and renamed into place, so a crash
never leaves a half-written checkpoint under a real name. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from stages import lora
from stages.hf_format import MAX_SHARD_BYTES, hf_weights, model_config, save_weights
from stages.settings import check, setting

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import save_config

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass
class CheckpointConfig:
    """`checkpoint.*`: how often to save and how many checkpoints to keep."""

    every: int = setting(20, "save every N steps (and always at the end)")
    keep_last: int = setting(3, "keep the newest N checkpoints; 0 keeps all")

    def validate(self) -> None:
        check(self.every >= 1, "every", self.every, ">= 1")
        check(self.keep_last >= 0, "keep_last", self.keep_last, ">= 0 (0 keeps all)")


def save(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    *,
    state: dict | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write `model` (HF names and layout), its config, `tokenizer` and `state` to `path`.

    A model with LoRA adapters (stages.lora.apply) is saved as its adapters only, in mlx-lm's
    format (adapters.safetensors + adapter_config.json), with the base model's config.json.
    state: JSON-serialisable values, except an optional "optimizer" entry holding a tree of
    arrays (e.g. `optimizer.state`), which goes to optimizer.safetensors.
    Returns the final path. Replaces an existing checkpoint at `path` only once the new one is
    complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    if lora.has_adapters(model):
        lora.save_adapters(model, staging)
    else:
        save_weights(staging, hf_weights(model), max_shard_bytes=max_shard_bytes)
    config = model_config(model)
    save_config(dict(config), staging / "config.json")
    tokenizer.save_pretrained(str(staging))
    generation = dict(getattr(model, "generation_config", None) or {})
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if generation.get(key) is None and config.get(key) is not None:
            generation[key] = config[key]
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))

    state = dict(state or {})
    optimizer_state = state.pop("optimizer", None)
    if optimizer_state is not None:
        flat = dict(tree_flatten(optimizer_state))
        mx.save_safetensors(str(staging / OPTIMIZER_FILE), flat)
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    sizes = {f.name: f.stat().st_size for f in sorted(staging.iterdir()) if f.is_file()}
    (staging / MANIFEST_FILE).write_text(json.dumps(sizes, indent=2))
    for file in staging.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())

    if path.exists():
        retired = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(retired)
        staging.rename(path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(path)
    return path


def load_state(path: str | Path) -> dict:
    """The trainer state saved with a checkpoint; "optimizer" holds the array tree if saved."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise FileNotFoundError(f"checkpoint {path} has no {STATE_FILE}")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint {state_file} is not valid JSON: {error}") from None
    optimizer_file = path / OPTIMIZER_FILE
    if optimizer_file.exists():
        state["optimizer"] = tree_unflatten(list(mx.load(str(optimizer_file)).items()))
    return state


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all). Returns the deleted."""
    found = list_checkpoints(root)
    doomed = found[:-keep] if keep > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file is unreadable (bad header, truncated), or None."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                return f"{file.name} is truncated (header says {header_len} bytes, file {size})"
            header = json.loads(handle.read(header_len))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return f"{file.name} has no valid safetensors header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    if needed != size:
        return f"{file.name} is truncated or padded ({size} bytes, its header needs {needed})"
    return None


def validate(path: str | Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (one line), or None if it looks complete.

    Checks the manifest's file sizes (if there is one), that every JSON file parses and that
    every safetensors file has a valid header covering exactly its data. Reads headers only.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    manifest_file = path / MANIFEST_FILE
    if manifest_file.exists():
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError:
            return f"{MANIFEST_FILE} is not valid JSON"
        for name, size in manifest.items():
            file = path / name
            if not file.exists():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, {size} were written"
    for name in (STATE_FILE, "config.json"):
        if not (path / name).exists():
            return f"{name} is missing"
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{file.name} is not valid JSON"
    weights = sorted(path.glob("*.safetensors"))
    if not any(f.name != OPTIMIZER_FILE for f in weights):
        return "no model *.safetensors file"
    for file in weights:
        problem = _safetensors_problem(file)
        if problem:
            return problem
    return None


def latest_valid(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under `root` that passes `validate`, and the newer ones that did
    not, each with the reason (newest first)."""
    rejected = []
    for candidate in reversed(list_checkpoints(root)):
        problem = validate(candidate)
        if problem is None:
            return candidate, rejected
        rejected.append((candidate, problem))
    return None, rejected


def set_aside(path: str | Path) -> Path:
    """Rename a bad checkpoint to `.corrupt-<name>` so listing, pruning and resuming skip it
    (kept for inspection, never deleted). Returns the new path."""
    path = Path(path)
    target = path.with_name(f".corrupt-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)
    return target
