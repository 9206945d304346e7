"""LoRA and QLoRA on mlx-lm's layers: what trains, adapters on disk, the reference, fusing."""

import contextlib
import json
from pathlib import Path

from stages import checkpoint, grad_checkpoint, grpo_update, lora
from stages.advantages import compute_advantages
from stages.grpo_update import TrainConfig
from stages.load_weights import load
from stages.rollout import RolloutConfig, generate_rollouts

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENS = mx.array([[5, 9, 14, 3, 22, 7], [8, 8, 30, 41, 12, 6]])


def _params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _rollout(model, tokenizer, seed=0):
    prompts = [tokenizer.encode(t) for t in ["1+2=", "3+4=", "2+2="]]
    batch = generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(group_size=4, max_new_tokens=4), seed=seed
    )
    rewards = mx.array(np.random.default_rng(seed).random(batch.num_rows).astype(np.float32))
    return batch, compute_advantages(rewards, 4, "group")


def _train(model, tokenizer, steps=2, ref_model=None, **update):
    optimizer = optim.Adam(learning_rate=1e-2)
    metrics = {}
    for step in range(steps):
        batch, advantages = _rollout(model, tokenizer, seed=step)
        metrics = grpo_update.update_step(
            model, optimizer, batch, advantages, TrainConfig(**update), ref_model
        )
    return metrics


def _quantized(tiny_path, bits):
    from mlx_lm.utils import quantize_model

    model, tokenizer = load(tiny_path, dtype="float32")
    model, config = quantize_model(model, dict(model.hf_config), group_size=32, bits=bits)
    from types import MappingProxyType

    model.hf_config = MappingProxyType(config)
    return model, tokenizer


def test_apply_freezes_base_and_targets_by_suffix(tiny):
    model, _ = tiny
    settings = lora.LoraConfig(rank=4, target_modules=["q_proj", "mlp.down_proj"])
    config = lora.apply(model, settings)
    assert config["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj"]
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 blocks x 2 modules x (A, B)
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert not isinstance(model.layers[0].self_attn.k_proj, LoRALinear)
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.apply(load(FIXTURES / "qwen3_tiny")[0], lora.LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="num_layers=5 is invalid"):
        lora.apply(load(FIXTURES / "qwen3_tiny")[0], lora.LoraConfig(num_layers=5))


def test_only_adapters_train_and_reference_is_the_base(tiny, tiny_path):
    model, tokenizer = tiny
    base_before = _params(model)
    lora.apply(model, lora.LoraConfig(rank=4, scale=10.0, num_layers=1))
    metrics = _train(model, tokenizer, steps=3, beta=0.1, ref_model=model)
    after = _params(model)
    for name, value in base_before.items():
        lora_name = name.replace("q_proj.weight", "q_proj.linear.weight")
        for candidate in (name, lora_name, name.replace(".weight", ".linear.weight")):
            if candidate in after:
                np.testing.assert_array_equal(after[candidate], value)
                break
        else:
            raise AssertionError(f"{name} vanished")
    adapters = lora.adapter_weights(model)
    assert any(np.abs(np.array(v)).max() > 0 for k, v in adapters.items() if "lora_b" in k)
    assert metrics["kl"] > 0  # the adapted policy moved away from its base
    # The reference (adapters off) is exactly the untouched base.
    fresh, _ = load(tiny_path, dtype="float32")
    with lora.adapters_disabled(model):
        np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(fresh(TOKENS)))
    assert np.abs(np.array(model(TOKENS)) - np.array(fresh(TOKENS))).max() > 1e-4
    with pytest.raises(ValueError, match="needs a model with LoRA adapters"):
        with lora.adapters_disabled(fresh):
            pass


def test_adapters_save_in_mlx_lm_format(tiny, tiny_path, tmp_path):
    import mlx_lm

    model, tokenizer = tiny
    lora.apply(model, lora.LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    _train(model, tokenizer, steps=2)
    saved = checkpoint.save(model, tokenizer, tmp_path / "ckpt", state={"step": 2})
    assert (saved / "adapters.safetensors").exists() and (saved / "adapter_config.json").exists()
    assert not list(saved.glob("model*.safetensors"))  # adapters only
    reopened, _ = mlx_lm.load(str(tiny_path), adapter_path=str(saved))
    np.testing.assert_allclose(np.array(reopened(TOKENS)), np.array(model(TOKENS)), atol=1e-6)
    ours, _ = load(tiny_path, dtype="float32")
    lora.load_adapters(ours, saved)
    np.testing.assert_array_equal(np.array(ours(TOKENS)), np.array(model(TOKENS)))


def test_fuse_saves_plain_hf_weights_transformers_opens(tiny, tmp_path):
    import torch  # the dev extra installs it
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    lora.apply(model, lora.LoraConfig(rank=4))
    _train(model, tokenizer, steps=2)
    adapted = np.array(model(TOKENS))
    lora.fuse(model)
    assert not lora.has_adapters(model)
    # W + scale * (A B)^T in one matrix rounds differently from the two-path sum.
    np.testing.assert_allclose(np.array(model(TOKENS)), adapted, atol=1e-4)
    saved = checkpoint.save(model, tokenizer, tmp_path / "fused")
    hf_model = AutoModelForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        hf_logits = hf_model(torch.from_numpy(np.array(TOKENS).astype(np.int64))).logits.numpy()
    assert np.abs(hf_logits - adapted).max() <= 1e-4


def test_moe_lora_on_switch_layers(tmp_path):
    import mlx_lm

    model, tokenizer = load(FIXTURES / "qwen3_moe_tiny", dtype="float32")
    lora.apply(model, lora.LoraConfig(rank=2, target_modules=["switch_mlp.up_proj", "o_proj"]))
    assert isinstance(model.layers[0].mlp.switch_mlp.up_proj, LoRASwitchLinear)
    # Give the adapters a value, as training would.
    for _, layer in lora.lora_layers(model):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    adapted = np.array(model(TOKENS))
    saved = lora.save_adapters(model, tmp_path / "adapters")
    # The fixture's config.json has transformers 5's names (num_local_experts, rope_parameters),
    # which mlx-lm 0.32 does not read by itself; our loader passes them as overrides.
    from stages.load_weights import mlx_lm_overrides

    config = json.loads((FIXTURES / "qwen3_moe_tiny" / "config.json").read_text())
    reopened, _ = mlx_lm.load(
        str(FIXTURES / "qwen3_moe_tiny"),
        adapter_path=str(saved),
        model_config=mlx_lm_overrides(config),
    )
    np.testing.assert_allclose(np.array(reopened(TOKENS)), adapted, atol=1e-5)
    lora.fuse(model)
    np.testing.assert_allclose(np.array(model(TOKENS)), adapted, atol=1e-5)
    fused = checkpoint.save(model, tokenizer, tmp_path / "fused")
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in mx.load(
        str(fused / "model.safetensors")
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_adapters_over_packed_weights(tiny_path, tmp_path, bits):
    model, tokenizer = _quantized(tiny_path, bits)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    packed_before = {k: v for k, v in _params(model).items() if v.dtype == np.uint32}
    assert packed_before
    base_dir = checkpoint.save(model, tokenizer, tmp_path / "base")  # mlx-lm quantized layout
    reloaded, _ = load(base_dir, dtype="float32")
    np.testing.assert_array_equal(np.array(reloaded(TOKENS)), np.array(model(TOKENS)))

    lora.apply(model, lora.LoraConfig(rank=4))
    _train(model, tokenizer, steps=2, beta=0.05, ref_model=model)
    after = _params(model)
    for name, value in packed_before.items():
        wrapped = name.replace(".weight", ".linear.weight")  # inside a LoRA layer
        np.testing.assert_array_equal(after[wrapped if wrapped in after else name], value)
    adapted = np.array(model(TOKENS))
    with lora.adapters_disabled(model):
        np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(reloaded(TOKENS)))

    import mlx_lm

    adapters = checkpoint.save(model, tokenizer, tmp_path / "adapters")
    reopened, _ = mlx_lm.load(str(base_dir), adapter_path=str(adapters))
    np.testing.assert_allclose(np.array(reopened(TOKENS)), adapted, atol=1e-5)

    lora.fuse(model, dequantize=True)
    assert not [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    np.testing.assert_allclose(np.array(model(TOKENS)), adapted, atol=1e-4)
    fused = checkpoint.save(model, tokenizer, tmp_path / "fused")
    assert "quantization" not in (fused / "config.json").read_text()
    fused_weights = mx.load(str(fused / "model.safetensors"))
    assert fused_weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.float32


@pytest.mark.parametrize("mode", [True, "mlp"])
def test_gradient_checkpointing_gives_the_same_update(tiny_path, mode):
    results = []
    for checkpointing in (False, mode):
        model, tokenizer = load(tiny_path, dtype="float32")
        # Both with MLX's own swiglu (with checkpointing the lean one is off; it rounds
        # differently, and Adam's first step magnifies that: tests/test_lean_activations.py).
        metrics = _train(
            model,
            tokenizer,
            steps=1,
            gradient_checkpointing=checkpointing,
            lean_activations=False,
        )
        results.append((metrics, _params(model)))
    (m0, p0), (m1, p1) = results
    assert m0["loss"] == pytest.approx(m1["loss"], abs=1e-6)
    start = _params(load(tiny_path, dtype="float32")[0])
    for name in p0:
        np.testing.assert_allclose(p1[name], p0[name], atol=1e-6)
    assert any(not np.array_equal(p1[name], start[name]) for name in p0)  # the step trained
    # Patched for the update only: rollouts afterwards use the plain classes.
    layer = load(tiny_path)[0].layers[0]
    patched = type(layer.mlp) if mode == "mlp" else type(layer)
    other = type(layer) if mode == "mlp" else type(layer.mlp)
    assert patched.__call__.__qualname__.endswith(f"{patched.__name__}.__call__")
    with grad_checkpoint.enabled(model, mode):
        assert patched.__call__.__name__ == "checkpointed_fn"
        assert other.__call__.__name__ != "checkpointed_fn"
    assert patched.__call__.__qualname__.endswith(f"{patched.__name__}.__call__")


def test_gradient_checkpointing_takes_auto_true_false_mlp_or_elementwise():
    for good in ("auto", True, False, "mlp", "elementwise"):
        TrainConfig(gradient_checkpointing=good).validate()
    for bad in ("attention", 1, "true"):
        with pytest.raises(
            ValueError, match="gradient_checkpointing=.* auto | true | false | mlp | elementwise"
        ):
            TrainConfig(gradient_checkpointing=bad).validate()
    with pytest.raises(ValueError, match="elementwise needs train.lean_activations=true"):
        TrainConfig(gradient_checkpointing="elementwise", lean_activations=False).validate()


def test_auto_checkpointing_is_elementwise_on_a_gpu_and_off_on_the_cpu():
    """The default, "auto": elementwise where the default device is a GPU (with
    lean_activations), nothing recomputed on the CPU; a set value is kept everywhere."""
    assert TrainConfig().gradient_checkpointing == "auto"
    default = mx.default_device()
    try:
        mx.set_default_device(mx.cpu)
        assert TrainConfig().checkpointing() is False
        if mx.metal.is_available() or mx.cuda.is_available():
            mx.set_default_device(mx.gpu)
            assert TrainConfig().checkpointing() == "elementwise"
            assert TrainConfig(lean_activations=False).checkpointing() is False
        for value in (True, False, "mlp", "elementwise"):
            assert TrainConfig(gradient_checkpointing=value).checkpointing() == value
    finally:
        mx.set_default_device(default)


def _lora_bf16(tiny_path):
    model, tokenizer = load(tiny_path, dtype="bfloat16")
    lora.apply(model, lora.LoraConfig(rank=8))
    for _, layer in lora.lora_layers(model):  # non-zero B, so the adapters change the output
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape, key=mx.random.key(1))
    mx.eval(model.parameters())
    return model, tokenizer


def test_adapters_compute_in_the_activation_dtype_with_float32_masters(tiny_path):
    """A bfloat16 model's float32 adapters: within adapters_in_activation_dtype the adapter path
    runs in bfloat16 (no float32 copies of its activations: less peak memory), the loss and the
    float32 gradients of the adapters agree with mlx-lm's float32 path to bfloat16 precision, and
    the classes are restored afterwards."""
    model, _ = _lora_bf16(tiny_path)
    assert {a.dtype for _, a in tree_flatten(model.trainable_parameters())} == {mx.float32}
    tokens = mx.random.randint(0, 64, (16, 128), key=mx.random.key(2))

    def loss(net):
        return net(tokens).astype(mx.float32).square().mean()

    results = {}
    for cast in (False, True):
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        with lora.adapters_in_activation_dtype(model) if cast else contextlib.nullcontext():
            value, grads = nn.value_and_grad(model, loss)(model)
            mx.eval(value, grads)
        results[cast] = (value.item(), dict(tree_flatten(grads)), mx.get_peak_memory() - before)
        del value, grads
    (plain, plain_grads, plain_peak), (cast, cast_grads, cast_peak) = results[False], results[True]
    assert cast == pytest.approx(plain, rel=2e-2)
    for name, g in plain_grads.items():
        assert cast_grads[name].dtype == mx.float32
        scale = float(mx.abs(g).max())
        assert scale > 0 and float(mx.abs(cast_grads[name] - g).max()) <= 0.1 * scale, name
    assert cast_peak < 0.8 * plain_peak, (cast_peak, plain_peak)
    assert LoRALinear.__call__.__qualname__ == "LoRALinear.__call__"


def test_the_update_uses_the_activation_dtype_and_keeps_float32_adapters(tiny_path, monkeypatch):
    model, tokenizer = _lora_bf16(tiny_path)
    entered = []
    real = lora.adapters_in_activation_dtype

    def spy(net):
        entered.append(net)
        return real(net)

    monkeypatch.setattr(lora, "adapters_in_activation_dtype", spy)
    before = {
        k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.trainable_parameters())
    }
    _train(model, tokenizer, steps=1)
    assert entered == [model]
    after = dict(tree_flatten(model.trainable_parameters()))
    assert {a.dtype for a in after.values()} == {mx.float32}
    assert any(not np.array_equal(np.array(after[k]), v) for k, v in before.items())
