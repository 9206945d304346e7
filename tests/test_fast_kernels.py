"""rollout.fast_kernels: the fused engine's one-token matmuls through a hand-written CUDA kernel,
with the update's importance-sampling correction on.

The kernel itself runs only on MLX's CUDA backend; those tests are skipped elsewhere with the
missing accelerator named. Everything around it (the config, which matmuls take the kernel, the
rollout's own log-probs reaching the correction) is tested on every machine with the kernel
replaced by a float16 emulation that rounds differently from the trainer, as the kernel does.
"""

from collections import Counter

from stages import fast_kernels, fused_decode, grpo_update
from stages.load_weights import load
from stages.lora import LoraConfig, apply
from stages.rollout import RolloutConfig, generate_rollouts, uses_fused

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from test_fused_decode import _NoEos  # the tokenizer with EOS off: full-length completions

CUDA = fast_kernels.unavailable() is None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU (MLX's CUDA backend)")
PROMPTS = ["1+2=", "3+4=", "2+2=7+1=", "0+", "4+4=hello 1+1="]


@pytest.fixture
def emulated(monkeypatch):
    """fast_kernels as if present (on any machine): its matmul x @ w.T rounded through float16
    (another rounding than the trainer's float32), counting the calls by (inputs, outputs); its
    qkv_heads is `qkv_heads_reference` (MLX's operations)."""
    calls = []

    def matmul(x, w):
        calls.append(tuple(w.shape[::-1]))
        return (x.astype(mx.float16) @ w.astype(mx.float16).T).astype(x.dtype)

    monkeypatch.setattr(fast_kernels, "unavailable", lambda: None)
    monkeypatch.setattr(fast_kernels, "supports", lambda x, w: x.shape[-1] == w.shape[1])
    monkeypatch.setattr(fast_kernels, "matmul", matmul)
    monkeypatch.setattr(fast_kernels, "qkv_heads", fast_kernels.qkv_heads_reference)
    return calls


def test_off_cuda_the_setting_is_a_one_line_error_naming_the_backend(tiny):
    if CUDA:
        assert RolloutConfig(fast_kernels=True).validate() is None
        return
    from pipelines.config import ConfigError, compose

    with pytest.raises(ConfigError) as error:
        compose(["rollout.fast_kernels=true"])
    message = str(error.value)
    assert "rollout.fast_kernels=True is invalid" in message and "CUDA" in message
    assert "CPU" in message or "Metal" in message
    assert "\n" not in message
    model, _ = tiny
    with pytest.raises(ValueError, match="rollout.fast_kernels=true cannot run: this machine"):
        fused_decode.FusedDecoder(model, fast=True)


def test_fast_kernels_need_the_fused_engine(tiny, emulated):
    with pytest.raises(ValueError, match="false with engine=mlx_lm"):
        RolloutConfig(fast_kernels=True, engine="mlx_lm").validate()
    model, _ = tiny
    cfg = RolloutConfig(fast_kernels=True, max_kv_size=64)  # no rotating cache in the engine
    with pytest.raises(ValueError, match="fast_kernels=true needs the fused engine.*max_kv_size"):
        uses_fused(model, cfg)


@pytest.mark.parametrize("setting", [None, True, False])
@pytest.mark.parametrize("fast", [False, True])
def test_fused_compile_null_compiles_exactly_with_fast_kernels(tiny, emulated, setting, fast):
    """The kernel pays only compiled (its Python call costs more host time than a matmul's):
    fused_compile null follows fast_kernels; true or false is kept. Both engines take it."""
    from stages import multiturn, rollout

    model, _ = tiny
    cfg = RolloutConfig(fast_kernels=fast, fused_compile=setting)
    want = fast if setting is None else setting
    assert cfg.compiles_fused is want
    assert rollout.make_engine(model, cfg).compiled is want
    assert multiturn.make_engine(model, cfg).compiled is want


def test_supports_needs_half_precision_and_tile_sizes():
    w = mx.zeros((64, 32), dtype=mx.bfloat16)
    assert fast_kernels.supports(mx.zeros((3, 32), dtype=mx.bfloat16), w)
    assert fast_kernels.supports(mx.zeros((3, 1, 32), dtype=mx.float16), w.astype(mx.float16))
    assert not fast_kernels.supports(mx.zeros((3, 32)), w.astype(mx.float32))  # float32
    assert not fast_kernels.supports(mx.zeros((3, 32), dtype=mx.float16), w)  # mixed
    assert not fast_kernels.supports(
        mx.zeros((3, 24), dtype=mx.bfloat16), mx.zeros((64, 24), dtype=mx.bfloat16)
    )  # K not a multiple of 16
    assert not fast_kernels.supports(
        mx.zeros((3, 32), dtype=mx.bfloat16), mx.zeros((40, 32), dtype=mx.bfloat16)
    )  # N not a multiple of 16


def test_only_one_token_steps_take_the_kernel_and_the_correction_sees_the_difference(
    tiny, emulated
):
    """A rollout with fast kernels: prefill stays exact, every decode step runs each fused group
    and the head through the kernel, the sampled log-probs differ from the trainer's a little
    (another rounding), and the update's correction reports that gap."""
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in PROMPTS]
    steps, group = 6, 2
    settings = dict(group_size=group, max_new_tokens=steps, temperature=1.0)
    exact = generate_rollouts(model, _NoEos(tokenizer), prompts, RolloutConfig(**settings), seed=1)
    emulated.clear()
    # Not compiled: a compiled step would call the emulation once per trace, not per step.
    cfg = RolloutConfig(fast_kernels=True, fused_compile=False, **settings)
    fast = generate_rollouts(model, _NoEos(tokenizer), prompts, cfg, seed=1)
    assert fast.engine == "fused"
    # The emulation counted (K, N) of qkv, o, gate_up, down and the head, decode steps only.
    blocks, decodes = len(model.layers), steps - 1
    vocab, hidden = model.model.embed_tokens.weight.shape
    attn = model.layers[0].self_attn
    q = attn.q_proj.weight.shape[0]
    kv = attn.k_proj.weight.shape[0]
    f = model.layers[0].mlp.gate_proj.weight.shape[0]
    want = Counter({(hidden, q + 2 * kv): blocks, (q, hidden): blocks})
    want += Counter({(hidden, 2 * f): blocks, (f, hidden): blocks, (hidden, vocab): 1})
    assert Counter(emulated) == Counter({s: c * decodes for s, c in want.items()})
    # Another rounding: close to the exact engine's log-probs, not equal to them.
    mask = np.array(fast.completion_mask) > 0
    same_tokens = np.array(fast.completion_ids) == np.array(exact.completion_ids)
    gap = np.abs(np.array(fast.logprobs) - np.array(exact.logprobs))[mask & same_tokens]
    assert gap.max() > 0 and gap.max() < 0.05
    # The update, with the correction the setting turns on, measures the same gap.
    cfg = grpo_update.TrainConfig(loss_type="dapo", beta=0.0).with_sampler_correction(True)
    advantages = mx.array(np.random.default_rng(0).normal(size=len(prompts) * group), mx.float32)
    metrics = grpo_update.update_step(model, optim.Adam(1e-4), fast, advantages, cfg)
    assert 0 < metrics["sampling/sampling_logp_difference/max"] < 0.05
    ratio_min = metrics["sampling/importance_sampling_ratio/min"]
    ratio_max = metrics["sampling/importance_sampling_ratio/max"]
    assert ratio_min < 1 < ratio_max or ratio_min != ratio_max


def test_the_pipeline_turns_the_correction_on_with_fast_kernels():
    train = grpo_update.TrainConfig()
    assert train.with_sampler_correction(True).vllm_importance_sampling_correction is True
    assert train.with_sampler_correction(False).vllm_importance_sampling_correction is False
    forced_off = grpo_update.TrainConfig(vllm_importance_sampling_correction=False)
    assert forced_off.with_sampler_correction(True).vllm_importance_sampling_correction is False


# -- the kernel itself (CUDA) ----------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 15, 64, 65, 130])
@pytest.mark.parametrize("k,n", [(64, 128), (192, 64), (1024, 4096), (3072, 1024), (256, 16384)])
def test_kernel_equals_a_float32_matmul_within_half_precision(k, n, rows, dtype):
    mx.random.seed(rows + k)
    x = mx.random.normal((rows, k)).astype(dtype)
    w = (mx.random.normal((n, k)) / k**0.5).astype(dtype)
    reference = x.astype(mx.float32) @ w.astype(mx.float32).T
    got = fast_kernels.matmul(x, w)
    assert got.shape == (rows, n) and got.dtype == dtype
    blas = (x @ w.T).astype(mx.float32)
    scale = mx.abs(reference).max().item()
    ours = mx.abs(got.astype(mx.float32) - reference).max().item() / scale
    theirs = mx.abs(blas - reference).max().item() / scale
    assert ours <= 2 * max(theirs, 2.0**-8), (ours, theirs)
    # Three dimensions (B, 1, K), as the engine calls it; and the same bits on a second call
    # (the split's partial sums are added in a fixed order).
    assert mx.array_equal(fast_kernels.matmul(x[:, None], w)[:, 0], got)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,norm,traditional",
    [(16, 8, 128, True, False), (9, 3, 64, False, False), (4, 4, 128, True, True)],
    ids=["qwen3", "llama", "traditional"],
)
def test_qkv_heads_equal_mlx_operations_within_one_rounding(
    heads, kv_heads, head_dim, norm, traditional, dtype
):
    import mlx.nn as nn

    rows = 37
    mx.random.seed(heads + head_dim)
    qkv = (3 * mx.random.normal((rows, (heads + 2 * kv_heads) * head_dim))).astype(dtype)
    offsets = mx.arange(0, 5 * rows, 5, dtype=mx.int32)
    rope = nn.RoPE(head_dim, traditional=traditional, base=1e6 if norm else 1e4)
    norms = None
    if norm:
        norms = tuple((1 + 0.1 * mx.random.normal((head_dim,))).astype(dtype) for _ in "qk")
    args = (qkv, offsets, heads, kv_heads, rope, norms, 1e-6)
    got = fast_kernels.qkv_heads(*args)
    want = fast_kernels.qkv_heads_reference(*args)
    eps = 2.0**-7 if dtype == mx.bfloat16 else 2.0**-10
    for ours, theirs in zip(got, want):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        gap = mx.abs(ours.astype(mx.float32) - theirs.astype(mx.float32)).max().item()
        assert gap <= 2 * eps * mx.abs(theirs.astype(mx.float32)).max().item()
        assert (ours == theirs).mean().item() > 0.5
    assert mx.array_equal(got[2], want[2])  # the values are only laid out


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_fast_engine_in_bfloat16_stays_close_to_the_exact_engine(compiled, lora, tiny_path):
    model, tokenizer = load(tiny_path, dtype="bfloat16")
    if lora:
        apply(model, LoraConfig(rank=4, scale=2.0))
        rng = np.random.default_rng(0)
        updates = [
            (name, mx.array(rng.normal(0, 0.05, value.shape), mx.bfloat16))
            for name, value in tree_flatten(model.trainable_parameters())
            if name.endswith("lora_b")
        ]
        model.update(tree_unflatten(updates))
    prompts = [tokenizer.encode(t) for t in PROMPTS]
    settings = dict(group_size=2, max_new_tokens=12, temperature=0, fused_compile=compiled)
    exact = generate_rollouts(model, _NoEos(tokenizer), prompts, RolloutConfig(**settings))
    fast = generate_rollouts(
        model, _NoEos(tokenizer), prompts, RolloutConfig(fast_kernels=True, **settings)
    )
    same = np.array(fast.completion_ids) == np.array(exact.completion_ids)
    assert same.mean() > 0.9
    agree = same.cumprod(axis=1).astype(bool)  # positions before any divergence
    gap = np.abs(np.array(fast.logprobs) - np.array(exact.logprobs))[agree]
    assert gap.max() < 0.1
