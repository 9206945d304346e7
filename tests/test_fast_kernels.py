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
    """fast_kernels as if present (on any machine): its matmul is `reference` with x and w
    rounded through float16 (another rounding than the trainer's float32), counting the calls by
    (inputs, outputs, epilogue); its qkv_heads is `qkv_heads_reference` (MLX's operations)."""
    calls = []

    def matmul(x, w, residual=None, swiglu=False):
        epilogue = "swiglu" if swiglu else "residual" if residual is not None else "plain"
        calls.append((w.shape[1], w.shape[0], epilogue))
        y = fast_kernels.reference(x.astype(mx.float16), w.astype(mx.float16), swiglu=swiglu)
        y = y.astype(x.dtype)
        return y if residual is None else residual + y

    monkeypatch.setattr(fast_kernels, "unavailable", lambda: None)
    monkeypatch.setattr(
        fast_kernels, "supports", lambda x, w, swiglu=False: x.shape[-1] == w.shape[1]
    )
    monkeypatch.setattr(fast_kernels, "matmul", matmul)
    monkeypatch.setattr(fast_kernels, "qkv_heads", fast_kernels.qkv_heads_reference)
    # The reference computes any head size: the tiny model's heads (16) take the path too.
    monkeypatch.setattr(fast_kernels, "heads_supported", lambda head_dim, rope: True)
    monkeypatch.setattr(fast_kernels, "attention_supported", lambda queries, keys: True)
    monkeypatch.setattr(fast_kernels, "decode_attention", fast_kernels.decode_attention_reference)
    monkeypatch.setattr(fused_decode, "_SPECS", {})  # specs built with the patched functions
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
    )  # K not a multiple of 32
    x = mx.zeros((3, 32), dtype=mx.bfloat16)
    assert not fast_kernels.supports(x, mx.zeros((40, 32), dtype=mx.bfloat16))  # N % 32
    # silu(gate) * up pairs a warp's tiles: blocks of 64 columns below MEDIUM_FROM, not 32.
    assert fast_kernels.supports(x, mx.zeros((96, 32), dtype=mx.bfloat16))
    assert not fast_kernels.supports(x, mx.zeros((96, 32), dtype=mx.bfloat16), swiglu=True)
    assert fast_kernels.supports(x, mx.zeros((128, 32), dtype=mx.bfloat16), swiglu=True)


def test_interleaved_gate_up_comes_apart_into_gate_and_up():
    gate, up = mx.random.normal((24, 32)), mx.random.normal((24, 32))
    x = mx.random.normal((5, 1, 32))
    w = fast_kernels.interleave(gate, up)
    assert w.shape == (48, 32) and mx.array_equal(w[8:16], up[:8])
    got_gate, got_up = fast_kernels.deinterleave(x @ w.T)
    assert mx.allclose(got_gate, x @ gate.T) and mx.allclose(got_up, x @ up.T)
    want = fast_kernels.swiglu_activation(x @ gate.T, x @ up.T)
    assert mx.allclose(fast_kernels.reference(x, w, swiglu=True), want)
    assert mx.allclose(
        fast_kernels.reference(x, gate, residual=x[..., :24]), x[..., :24] + x @ gate.T
    )


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
    # The emulation counted (K, N, epilogue) of qkv, o (+ residual), gate_up (silu(gate) * up),
    # down (+ residual) and the head, decode steps only.
    blocks, decodes = len(model.layers), steps - 1
    vocab, hidden = model.model.embed_tokens.weight.shape
    attn = model.layers[0].self_attn
    q = attn.q_proj.weight.shape[0]
    kv = attn.k_proj.weight.shape[0]
    f = model.layers[0].mlp.gate_proj.weight.shape[0]
    want = Counter({(hidden, q + 2 * kv, "plain"): blocks, (q, hidden, "residual"): blocks})
    want += Counter({(hidden, 2 * f, "swiglu"): blocks, (f, hidden, "residual"): blocks})
    want += Counter({(hidden, vocab, "plain"): 1})
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


def test_heads_written_into_the_cache_equal_the_separate_writes(tiny_path, emulated, monkeypatch):
    """The fast engine writes one token's keys and values into the KV cache from the heads'
    kernel (`_Block.writes_cache`) and attends through `decode_attention` over the step's
    window and the rows' left padding: the same logits, step after step and after rows are
    filtered, as the engine's own slice updates and attention with its mask."""
    model, _ = load(tiny_path, dtype="float16")
    prompts = mx.array([[5, 6, 7, 8], [0, 0, 9, 10]], dtype=mx.int32)

    def run() -> list[np.ndarray]:
        engine = fused_decode.FusedDecoder(model, fast=True, compiled=False)
        logits = [engine.prefill(prompts, [0, 2], 6)]
        engine.filter(mx.array([0, 1, 1, 0]))
        tokens = mx.array([3, 4, 5, 6])
        for _ in range(5):
            logits.append(engine.decode(tokens))
            tokens = mx.argmax(logits[-1], axis=-1)
        return [np.array(x.astype(mx.float32)) for x in logits]

    with monkeypatch.context() as patched:
        patched.setattr(fused_decode._Block, "writes_cache", lambda block, length: False)
        separate = run()
    fused_decode._SPECS.clear()
    written = run()
    assert fused_decode._Block.writes_cache(fused_decode._Block(model.layers[0], fast=True), 1)
    for a, b in zip(written, separate):
        np.testing.assert_array_equal(a, b)


def test_multi_turn_rollouts_take_the_kernels_between_tool_rounds(tools_path, emulated):
    """The ragged engine of multi-turn rollouts in fast mode: its one-token steps take the
    matmul with its epilogues and the heads' kernel (appends of tool results stay exact); the
    tool rounds run and the log-probs stay close to the exact engine's until the tokens part."""
    from stages import multiturn
    from stages.data import tool_arithmetic_rows

    model, tokenizer = load(tools_path, dtype="float32")
    rows = tool_arithmetic_rows(2, seed=4)
    settings = dict(group_size=2, max_new_tokens=48, max_completion_length=96, tools=["add"])

    def run(cfg):
        turns = multiturn.setup(cfg, tokenizer)
        return multiturn.generate(model, tokenizer, rows, cfg, turns, seed=3)

    exact = run(RolloutConfig(**settings))
    emulated.clear()
    fast = run(RolloutConfig(fast_kernels=True, fused_compile=False, **settings))
    assert fast.engine == "fused"
    epilogues = Counter(epilogue for _, _, epilogue in emulated)
    blocks = len(model.layers)
    assert epilogues["swiglu"] > 0 and epilogues["residual"] == 2 * epilogues["swiglu"]
    assert epilogues["swiglu"] % blocks == 0
    assert any(message["role"] == "tool" for c in fast.conversations for message in c)
    same = np.array(fast.completion_ids) == np.array(exact.completion_ids)
    agree = same.cumprod(axis=1).astype(bool) & (np.array(fast.completion_mask) > 0)
    gap = np.abs(np.array(fast.logprobs) - np.array(exact.logprobs))[agree]
    assert agree.sum() > 20 and gap.max() < 0.05


@needs_cuda
def test_multi_turn_rollouts_with_the_kernels_on_a_gpu(tools_path):
    """Greedy tool rollouts of the tools model in bfloat16, fast kernels (plain and compiled)
    against the exact engine: the tool rounds run, the tokens are the same, and the log-probs
    are close (the first run on a fresh GPU spends about 50 s compiling kernels)."""
    from stages import multiturn
    from stages.data import tool_arithmetic_rows

    model, tokenizer = load(tools_path, dtype="bfloat16")
    rows = tool_arithmetic_rows(2, seed=4)
    settings = dict(
        group_size=2, max_new_tokens=48, max_completion_length=96, tools=["add"], temperature=0
    )

    def run(cfg):
        return multiturn.generate(model, tokenizer, rows, cfg, multiturn.setup(cfg, tokenizer))

    exact = run(RolloutConfig(**settings))
    for compiled in (False, True):
        fast = run(RolloutConfig(fast_kernels=True, fused_compile=compiled, **settings))
        assert any(message["role"] == "tool" for c in fast.conversations for message in c)
        same = np.array(fast.completion_ids) == np.array(exact.completion_ids)
        assert same.mean() > 0.9
        agree = same.cumprod(axis=1).astype(bool) & (np.array(fast.completion_mask) > 0)
        gap = np.abs(np.array(fast.logprobs) - np.array(exact.logprobs))[agree]
        assert agree.sum() > 20 and 0 < gap.max() < 0.1  # the kernels ran, and round close


def test_the_pipeline_turns_the_correction_on_with_fast_kernels():
    train = grpo_update.TrainConfig()
    assert train.with_sampler_correction(True).vllm_importance_sampling_correction is True
    assert train.with_sampler_correction(False).vllm_importance_sampling_correction is False
    forced_off = grpo_update.TrainConfig(vllm_importance_sampling_correction=False)
    assert forced_off.with_sampler_correction(True).vllm_importance_sampling_correction is False


# -- the kernel itself (CUDA) ----------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("epilogue", ["plain", "residual", "swiglu"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 15, 64, 65, 130])
@pytest.mark.parametrize("k,n", [(64, 128), (192, 64), (1024, 4096), (3072, 1024), (256, 16384)])
def test_kernel_equals_a_float32_matmul_within_half_precision(k, n, rows, dtype, epilogue):
    """The kernel against MLX's operations in float32 on the same half-precision inputs (the
    residual added and silu(gate) * up taken in float32 too), no further from it than twice
    MLX's own matmul in that precision."""
    mx.random.seed(rows + k)
    x = mx.random.normal((rows, k)).astype(dtype)
    w = (mx.random.normal((n, k)) / k**0.5).astype(dtype)
    residual = mx.random.normal((rows, n)).astype(dtype) if epilogue == "residual" else None
    swiglu = epilogue == "swiglu"
    as32 = (None if residual is None else residual.astype(mx.float32),)
    reference = fast_kernels.reference(x.astype(mx.float32), w.astype(mx.float32), *as32, swiglu)
    got = fast_kernels.matmul(x, w, residual, swiglu)
    assert got.shape == (rows, n // 2 if swiglu else n) and got.dtype == dtype
    blas = fast_kernels.reference(x, w, residual, swiglu).astype(mx.float32)
    scale = mx.abs(reference).max().item()
    ours = mx.abs(got.astype(mx.float32) - reference).max().item() / scale
    theirs = mx.abs(blas - reference).max().item() / scale
    assert ours <= 2 * max(theirs, 2.0**-8), (ours, theirs)
    # Three dimensions (B, 1, K), as the engine calls it; and the same bits on a second call
    # (the split's partial sums are added in a fixed order).
    again = fast_kernels.matmul(
        x[:, None], w, None if residual is None else residual[:, None], swiglu
    )
    assert mx.array_equal(again[:, 0], got)


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
    # Written into column 3 of a cache in place: the same bits, every other column untouched.
    caches = [mx.random.normal((rows, kv_heads, 6, head_dim)).astype(dtype) for _ in "kv"]
    mx.eval(caches)
    before = [np.array(c.astype(mx.float32)) for c in caches]
    column = mx.array([3], dtype=mx.int32)
    queries, keys, values = fast_kernels.qkv_heads(*args, cache=(*caches, column))
    assert mx.array_equal(queries, got[0])
    for cache, old, new, written in zip(caches, before, got[1:], (keys, values)):
        after = np.array(written.astype(mx.float32))
        assert np.array_equal(after[:, :, 3], np.array(new[:, :, 0].astype(mx.float32)))
        assert np.array_equal(np.delete(after, 3, axis=2), np.delete(old, 3, axis=2))
        assert np.array_equal(np.array(cache.astype(mx.float32)), after)  # in place


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


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim", [(16, 8, 128), (9, 3, 64), (4, 4, 128), (16, 2, 256)]
)
@pytest.mark.parametrize("window", [(0, 1), (5, 290), (0, 300)])
def test_decode_attention_equals_mlx_attention_within_half_precision(
    heads, kv_heads, head_dim, window, dtype
):
    """The kernel against MLX's attention in float32 on the same half-precision inputs (rows'
    left padding masked), no further from it than twice MLX's own attention in that precision."""
    rows, columns = 37, 300
    mx.random.seed(heads + head_dim + window[1])
    queries = mx.random.normal((rows, heads, 1, head_dim)).astype(dtype)
    keys, values = (
        mx.random.normal((rows, kv_heads, columns, head_dim)).astype(dtype) for _ in "kv"
    )
    # Left padding below the window's end: every row keeps a column.
    padding = mx.array(np.random.default_rng(0).integers(0, window[1], rows), dtype=mx.int32)
    span = mx.array(window, dtype=mx.int32)
    scale = head_dim**-0.5
    got = fast_kernels.decode_attention(queries, keys, values, span, padding, scale)
    assert got.shape == queries.shape and got.dtype == dtype
    as32 = [a.astype(mx.float32) for a in (queries, keys, values)]
    reference = fast_kernels.decode_attention_reference(*as32, span, padding, scale)
    mlx = fast_kernels.decode_attention_reference(queries, keys, values, span, padding, scale)
    size = mx.abs(reference).max().item()
    ours = mx.abs(got.astype(mx.float32) - reference).max().item() / size
    theirs = mx.abs(mlx.astype(mx.float32) - reference).max().item() / size
    assert ours <= 2 * max(theirs, 2.0**-8), (ours, theirs)
