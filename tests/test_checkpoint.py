import json

from stages import checkpoint, grpo_update
from stages.load_weights import load

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten


def _params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_save_load_round_trip_with_state(tiny, tmp_path):
    model, tokenizer = tiny
    optimizer = grpo_update.make_optimizer(1e-3)
    optimizer.init(model.trainable_parameters())
    path = checkpoint.save(
        model,
        tokenizer,
        tmp_path / "step-00000003",
        state={"step": 3, "data_position": 24, "optimizer": optimizer.state},
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    loaded, loaded_tokenizer = load(path)
    original, restored = _params(model), _params(loaded)
    assert original.keys() == restored.keys()
    for name in original:
        np.testing.assert_array_equal(restored[name], original[name])
    assert loaded_tokenizer.encode("2+2=") == tokenizer.encode("2+2=")
    state = checkpoint.load_state(path)
    assert state["step"] == 3 and state["data_position"] == 24
    saved_optimizer = dict(tree_flatten(state["optimizer"]))
    assert saved_optimizer.keys() == dict(tree_flatten(optimizer.state)).keys()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["torch_dtype"] == "float32"


def test_transformers_opens_checkpoint_with_same_logits(tiny, tmp_path):
    import torch  # the dev extra installs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = tiny
    path = checkpoint.save(model, tokenizer, tmp_path / "ckpt")
    hf_model = AutoModelForCausalLM.from_pretrained(path).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    ids = hf_tokenizer("3+4=12", return_tensors="pt").input_ids
    assert ids[0].tolist() == tokenizer.encode("3+4=12")
    with torch.no_grad():
        expected = hf_model(ids).logits.numpy()
    got = np.array(model(mx.array(ids.numpy())))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_mlx_lm_opens_checkpoint(tiny, tmp_path):
    import mlx_lm

    model, tokenizer = tiny
    path = checkpoint.save(model, tokenizer, tmp_path / "ckpt")
    reopened, _ = mlx_lm.load(str(path))
    tokens = mx.array([tokenizer.encode("1+1=")])
    np.testing.assert_allclose(np.array(reopened(tokens)), np.array(model(tokens)), atol=1e-6)


def test_latest_prune_and_overwrite(tiny, tmp_path):
    model, tokenizer = tiny
    for step in (5, 10, 15):
        checkpoint.save(model, tokenizer, checkpoint.step_dir(tmp_path, step), state={"step": step})
    (tmp_path / ".step-00000020.tmp-1").mkdir()  # an interrupted save is never "latest"
    assert checkpoint.latest(tmp_path).name == "step-00000015"
    deleted = checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-00000005"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-00000010",
        "step-00000015",
    ]
    checkpoint.save(model, tokenizer, checkpoint.step_dir(tmp_path, 15), state={"step": 99})
    assert checkpoint.load_state(checkpoint.step_dir(tmp_path, 15))["step"] == 99


def test_load_state_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no trainer_state.json"):
        checkpoint.load_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        checkpoint.load_state(tmp_path)


# --- HF layout: round trips of transformers-made checkpoints (tests/fixtures) ---------------

FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures"
_MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _hf_copy(name, target, *, dtype="float32", tied=False, shards=1):
    """A copy of fixture `name` as an HF checkpoint stored in `dtype`, optionally with tied
    embeddings (no lm_head tensor) and split into `shards` files with an index."""
    import shutil

    shutil.copytree(FIXTURES / name, target)
    weights = mx.load(str(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    weights = {k: v.astype(_MX_DTYPES[dtype]) for k, v in weights.items()}
    config = json.loads((target / "config.json").read_text())
    config["dtype"] = dtype
    if tied:
        weights.pop("lm_head.weight")
        config["tie_word_embeddings"] = True
    (target / "config.json").write_text(json.dumps(config))
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(target / "model.safetensors"), weights, {"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: weights[k] for k in names[i::shards]}
            mx.save_safetensors(str(target / file), part, {"format": "pt"})
            weight_map.update({k: file for k in part})
        (target / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return target


def _stored(directory):
    """name -> (dtype, raw bytes) of every tensor in a checkpoint directory."""
    tensors = {}
    for file in sorted(directory.glob("model*.safetensors")):
        for name, value in mx.load(str(file)).items():
            tensors[name] = (value.dtype, np.array(value.view(mx.uint8)).tobytes())
    return tensors


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_moe_tiny"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_hf_round_trip_is_bit_exact(name, dtype, tmp_path):
    source = _hf_copy(name, tmp_path / "src", dtype=dtype, shards=2)
    model, tokenizer = load(source, dtype="checkpoint")
    saved = checkpoint.save(model, tokenizer, tmp_path / "out")
    original, written = _stored(source), _stored(saved)
    assert written.keys() == original.keys()
    for tensor in original:
        assert written[tensor] == original[tensor], tensor
    config = json.loads((saved / "config.json").read_text())
    assert config["torch_dtype"] == dtype and config["dtype"] == dtype
    assert config["model_type"] == json.loads((source / "config.json").read_text())["model_type"]
    generation = json.loads((saved / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 3 and "transformers_version" in generation


def test_moe_experts_saved_unstacked_with_tied_embeddings(tmp_path):
    source = _hf_copy("qwen3_moe_tiny", tmp_path / "src", tied=True)
    model, tokenizer = load(source, dtype="checkpoint")
    assert "lm_head" not in model  # tied: mlx-lm uses embed_tokens.as_linear
    assert model.model.layers[0].mlp.switch_mlp.up_proj.weight.shape == (8, 16, 32)
    saved = checkpoint.save(model, tokenizer, tmp_path / "out")
    names = set(_stored(saved))
    assert names == set(_stored(source))
    assert "lm_head.weight" not in names
    assert {f"model.layers.0.mlp.experts.{e}.gate_proj.weight" for e in range(8)} <= names
    assert not [n for n in names if "switch_mlp" in n]
    assert not [n for n in names if n.startswith("model.layers.1.mlp.experts")]  # dense block


def test_save_shards_above_the_limit_with_index(tmp_path):
    model, tokenizer = load(FIXTURES / "qwen3_moe_tiny", dtype="float32")
    saved = checkpoint.save(model, tokenizer, tmp_path / "out", max_shard_bytes=60_000)
    files = sorted(p.name for p in saved.glob("model*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    sizes = [sum(v.nbytes for v in mx.load(str(saved / f)).values()) for f in files]
    assert max(sizes) <= 60_000
    assert index["metadata"]["total_size"] == sum(sizes)
    reloaded, _ = load(saved, dtype="float32")
    tokens = mx.array([[5, 9, 14, 3]])
    np.testing.assert_array_equal(np.array(reloaded(tokens)), np.array(model(tokens)))


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_moe_tiny"])
def test_transformers_and_mlx_lm_open_saved_fixture(name, tmp_path):
    import mlx_lm
    import torch  # the dev extra installs it
    from transformers import AutoModelForCausalLM

    model, tokenizer = load(FIXTURES / name, dtype="float32")
    saved = checkpoint.save(model, tokenizer, tmp_path / "out", max_shard_bytes=100_000)
    input_ids = np.load(FIXTURES / name / "golden_input_ids.npy")
    expected = np.array(model(mx.array(input_ids)))
    hf_model = AutoModelForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        hf_logits = hf_model(torch.from_numpy(input_ids.astype(np.int64))).logits.numpy()
    assert np.abs(hf_logits - expected).max() <= 1e-4
    reopened, _ = mlx_lm.load(str(saved))
    np.testing.assert_allclose(np.array(reopened(mx.array(input_ids))), expected, atol=1e-6)


def test_quantized_moe_saves_in_mlx_lm_layout_and_reloads(tmp_path):
    from types import MappingProxyType

    from mlx_lm.utils import quantize_model

    model, tokenizer = load(FIXTURES / "qwen3_moe_tiny", dtype="float32")
    # The router is 32 wide, below qwen3_moe's own router group size (64): keep it unquantized.
    model, config = quantize_model(
        model,
        dict(model.hf_config),
        group_size=32,
        bits=4,
        quant_predicate=lambda path, _: not path.endswith("mlp.gate"),
    )
    model.hf_config = MappingProxyType(config)
    saved = checkpoint.save(model, tokenizer, tmp_path / "q4")
    names = set(_stored(saved))
    assert "model.layers.0.mlp.switch_mlp.up_proj.scales" in names  # packed stacks stay stacked
    reloaded, _ = load(saved, dtype="float32")
    tokens = mx.array([[5, 9, 14, 3, 22, 7]])
    np.testing.assert_array_equal(np.array(reloaded(tokens)), np.array(model(tokens)))
