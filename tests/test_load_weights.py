import json
import shutil

from stages.load_weights import load

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten


def test_builtin_loads_as_hf_directory(tiny_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_path / name).exists()
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    model, tokenizer = load("builtin:tiny_qwen3")
    assert tokenizer.decode(tokenizer.encode("3+4=7\nabc")) == "3+4=7\nabc"
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {mx.float32}  # CPU default


def test_dtype_override(tiny_path):
    model, _ = load(tiny_path, dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}


def test_sharded_checkpoint_with_index_loads_the_same(tiny_path, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_path, sharded)
    weights = mx.load(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    (sharded / "model.safetensors.index.json").unlink(missing_ok=True)
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, keys in shards.items():
        mx.save_safetensors(str(sharded / file), {k: weights[k] for k in keys})
        weight_map.update({k: file for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    original, tokenizer = load(tiny_path)
    model, _ = load(sharded)
    tokens = mx.array([tokenizer.encode("1+2=3")])
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(original(tokens)))

    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are missing"):
        load(sharded)


def test_missing_directory_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model directory {tmp_path / 'nope'} does not"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown built-in model 'huge'"):
        load("builtin:huge")
