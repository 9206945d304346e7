"""stages/lean_activations.py: swiglu and tiled attention keep less for the backward pass and give
MLX autograd's values and gradients; the update with them equals the update without."""

from __future__ import annotations

from stages import grpo_update, lean_activations
from stages.grpo_update import TrainConfig
from stages.load_weights import load
from stages.rollout import RolloutBatch

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import activations, qwen3, switch_layers

_SDPA = mx.fast.scaled_dot_product_attention
_RMS_NORM = mx.fast.rms_norm


def _random(shape, seed, dtype=mx.float32):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


@pytest.fixture(autouse=True)
def lean_at_any_size(monkeypatch):
    """The lean operations at these tests' small sizes too (MIN_ELEMENTS: below it, MLX's own)."""
    monkeypatch.setattr(lean_activations, "MIN_ELEMENTS", 0)


@pytest.fixture
def on_cpu():
    """The test on the CPU device, where the tiled attention and rms_norm are used (on a CUDA
    host too; there MLX's fused attention is left alone and picks kernels by shape)."""
    default = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(default)


def test_small_inputs_take_mlx_own_operations(monkeypatch, on_cpu):
    """On the CPU, where all three are lean (on a GPU rms_norm is MLX's own)."""
    monkeypatch.setattr(lean_activations, "MIN_ELEMENTS", 1000)
    lean = []
    tiles, norm_with = lean_activations._tiles, lean_activations._rms_norm_with

    def recorded(name, fn):
        return lambda *args: lean.append(name) or fn(*args)

    monkeypatch.setattr(lean_activations, "_lean_swiglu", recorded("swiglu", activations.swiglu))
    monkeypatch.setattr(lean_activations, "_rms_norm_with", recorded("norm", norm_with))
    monkeypatch.setattr(lean_activations, "_tiles", recorded("attention", tiles))
    small, weight = _random((4, 249), 0), mx.ones((249,))  # 996 elements
    lean_activations.swiglu(small, small)
    lean_activations.rms_norm(small, weight, 1e-5)
    q, kv = _random((1, 2, 15, 8), 2), _random((1, 2, 33, 8), 3)  # 990 scores
    lean_activations.attention(q, kv, kv, scale=0.3)
    assert lean == []
    large, weight = _random((4, 250), 0), mx.ones((250,))  # 1000
    lean_activations.swiglu(large, large)
    lean_activations.rms_norm(large, weight, 1e-5)
    lean_activations.attention(_random((1, 2, 16, 8), 2), kv, kv, scale=0.3)  # 1056 scores
    assert lean == ["swiglu", "norm", "attention"]


def _grads(fn, inputs, seed=99):
    """fn's output and the gradients of <fn(inputs), R> for a random R, in float64 NumPy."""
    out = fn(*inputs)
    weights = _random(out.shape, seed, mx.float32)

    def loss(*args):
        return (fn(*args).astype(mx.float32) * weights).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(inputs))))(*inputs)
    return np.array(out.astype(mx.float32)), [np.array(g.astype(mx.float32)) for g in grads]


@pytest.mark.parametrize("dtype, tol", [(mx.float32, 1e-6), (mx.bfloat16, 2e-2)])
def test_swiglu_equals_mlx_lm_values_and_gradients(dtype, tol):
    gate, up = _random((3, 7, 96), 0, dtype) * 3, _random((3, 7, 96), 1, dtype)
    out, grads = _grads(lean_activations.swiglu, [gate, up])
    ref_out, ref_grads = _grads(lambda g, u: activations.swiglu(g, u), [gate, up])
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert all(
        g.dtype == dtype
        for g in mx.grad(lambda g, u: lean_activations.swiglu(g, u).sum(), argnums=(0, 1))(gate, up)
    )


@pytest.mark.skipif(not mx.cuda.is_available(), reason="needs an NVIDIA GPU (MLX's CUDA backend)")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_swiglu_runs_one_cuda_kernel_each_way(dtype):
    lean_activations._swiglu_kernels.clear()
    gate, up = _random((3, 7, 97), 0, dtype) * 3, _random((3, 7, 97), 1, dtype)  # 2037: odd
    out, grads = _grads(lean_activations.swiglu, [gate, up])
    assert set(lean_activations._swiglu_kernels) == {"grpo_swiglu_forward", "grpo_swiglu_backward"}
    wide = [gate.astype(mx.float32), up.astype(mx.float32)]  # the kernels compute in float32
    ref_out, ref_grads = _grads(lambda g, u: nn.silu(g) * u, wide)
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(mx.float32, 1e-5), (mx.bfloat16, 3e-2)])
def test_rms_norm_equals_mlx_values_and_gradients(dtype, tol):
    x, weight = _random((3, 5, 4, 32), 0, dtype) * 2, 1 + _random((32,), 1, dtype) * 0.1
    out, grads = _grads(lambda a, w: lean_activations.rms_norm(a, w, 1e-5), [x, weight])
    ref_out, ref_grads = _grads(lambda a, w: _RMS_NORM(a, w, 1e-5), [x, weight])
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * abs(want).max())
    plain = lean_activations.rms_norm(x, None, 1e-5).astype(mx.float32)  # no weight: MLX's own
    np.testing.assert_array_equal(
        np.array(plain), np.array(_RMS_NORM(x, None, 1e-5).astype(mx.float32))
    )


def test_tiles_cover_rows_and_heads_once(monkeypatch):
    for tile_bytes, rows, kv_heads, scores in [
        (2**30, 5, 4, 100),  # everything in one tile
        (4 * 100 * 8, 5, 4, 100),  # two rows a tile
        (4 * 100 * 3, 5, 4, 100),  # three heads a tile, within a row
        (1, 3, 2, 100),  # smaller than one (row, head): one each
    ]:
        monkeypatch.setattr(lean_activations, "TILE_BYTES", tile_bytes)
        tiles = lean_activations._tiles(rows, kv_heads, scores)
        covered = [(r, h) for r0, r1, h0, h1 in tiles for r in range(r0, r1) for h in range(h0, h1)]
        assert sorted(covered) == [(r, h) for r in range(rows) for h in range(kv_heads)]
        per_tile = max(tile_bytes // (4 * scores), 1)
        assert all((r1 - r0) * (h1 - h0) <= per_tile for r0, r1, h0, h1 in tiles)


def _masks(rows, heads, length):
    causal = np.tril(np.ones((length, length), dtype=bool))
    padded = np.broadcast_to(causal, (rows, 1, length, length)).copy()
    padded[1, :, :, :2] = False  # row 1 left-padded by two
    padded[1, :, :2, 0] = True  # (the padding's own queries see something)
    additive = np.where(padded, 0.0, -1e9).astype(np.float32)
    per_head = np.broadcast_to(causal, (rows, heads, length, length)).copy()
    per_head[:, 1::2, :, 1] = False
    per_head[:, :, :2, 0] = True
    return {
        "none": None,
        "causal": "causal",
        "bool rows": mx.array(padded),
        "additive rows": mx.array(additive),
        "bool heads": mx.array(per_head),
        "2d": mx.array(causal),
    }


@pytest.mark.parametrize("tile_bytes", [2**30, 4 * 2 * 9 * 9 * 2, 1])  # 1 tile; 2-head; (1, 1)
@pytest.mark.parametrize(
    "mask", ["none", "causal", "bool rows", "additive rows", "bool heads", "2d"]
)
def test_tiled_attention_equals_mlx(monkeypatch, tile_bytes, mask, on_cpu):
    monkeypatch.setattr(lean_activations, "TILE_BYTES", tile_bytes)
    rows, heads, kv_heads, length, dim = 3, 8, 4, 9, 16  # GQA: two query heads a KV head
    mask_value = _masks(rows, heads, length)[mask]
    q = _random((rows, heads, length, dim), 0)
    k = _random((rows, kv_heads, length, dim), 1)
    v = _random((rows, kv_heads, length, dim), 2)

    def ours(q, k, v):
        return lean_activations.attention(q, k, v, scale=0.25, mask=mask_value)

    def mlx(q, k, v):
        return _SDPA(q, k, v, scale=0.25, mask=mask_value)

    out, grads = _grads(ours, [q, k, v])
    ref_out, ref_grads = _grads(mlx, [q, k, v])
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attention_hands_what_it_cannot_tile_to_mlx():
    q, k, v = _random((2, 4, 1, 8), 0), _random((2, 2, 5, 8), 1), _random((2, 2, 5, 8), 2)
    np.testing.assert_array_equal(  # one query (decode): MLX's own
        np.array(lean_activations.attention(q, k, v, scale=0.5)),
        np.array(_SDPA(q, k, v, scale=0.5)),
    )
    q = _random((2, 4, 3, 8), 3)
    sinks = _random((4,), 4)
    np.testing.assert_array_equal(
        np.array(lean_activations.attention(q, k[:, :, :3], v[:, :, :3], scale=0.5, sinks=sinks)),
        np.array(_SDPA(q, k[:, :, :3], v[:, :, :3], scale=0.5, sinks=sinks)),
    )


def _small_qwen3(blocks: int) -> nn.Module:
    """A Qwen3 of `blocks` small blocks (hidden 128, 4 heads / 2 KV heads of 32), seed 0."""
    config = dict(
        model_type="qwen3", hidden_size=128, num_hidden_layers=blocks, intermediate_size=384,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        vocab_size=64, max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=True,
    )  # fmt: skip
    mx.random.seed(0)
    return qwen3.Model(qwen3.ModelArgs.from_dict(config))


def _block_peak(lean: bool) -> int:
    """Peak memory over the resident arrays of one Qwen3 block's forward and backward pass
    (8 rows x 64 tokens, float32)."""
    model = _small_qwen3(1)
    block = model.layers[0]
    x, weights = _random((8, 64, 128), 1) * 0.1, _random((8, 64, 128), 2)
    mx.eval(block.parameters(), x, weights)

    def loss(params, x):
        block.update(params)
        return (block(x, "causal", None) * weights).sum()

    gradient = mx.grad(loss, argnums=(0, 1))
    with lean_activations.enabled(model, lean):
        mx.eval(gradient(block.trainable_parameters(), x))  # warm-up (compiled kernels)
        mx.synchronize()
        resident = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(gradient(block.trainable_parameters(), x))
        mx.synchronize()
    return mx.get_peak_memory() - resident


def test_a_block_backward_holds_less_with_lean_activations(on_cpu):
    plain, lean = _block_peak(False), _block_peak(True)  # all three swapped on the CPU
    assert lean < 0.85 * plain, (plain, lean)


class _NormsAndMlp(nn.Module):
    """An rms_norm feeding three linear layers (one with a bias, one frozen), then a swiglu
    feeding one: the patterns `gradient_checkpointing: elementwise` recomputes."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(64)
        self.q, self.k, self.frozen = (
            nn.Linear(64, 96),
            nn.Linear(64, 96, bias=True),
            nn.Linear(64, 96),
        )
        self.down = nn.Linear(96, 64)
        self.frozen.freeze()

    def __call__(self, x):
        normed = self.norm(x)
        gate, up = self.q(normed), self.k(normed) + self.frozen(normed)
        return self.down(lean_activations.swiglu(gate, up)) + normed


def _plain_and_elementwise(module, loss, x):
    """(loss, parameter gradients by name, input gradient) of `loss(params, x)` without and
    with gradient_checkpointing "elementwise"."""
    results = []
    for checkpointing in (False, "elementwise"):
        with lean_activations.enabled(module, checkpointing=checkpointing):
            value, (d_params, d_x) = mx.value_and_grad(loss, argnums=(0, 1))(
                module.trainable_parameters(), x
            )
            results.append((value, dict(tree_flatten(d_params)), d_x))
    return results


@pytest.mark.parametrize("device", ["cpu", "default"])
def test_elementwise_recomputation_equals_mlx_values_and_gradients(device, monkeypatch):
    default = mx.default_device()
    mx.set_default_device(mx.cpu if device == "cpu" else default)
    try:
        mx.random.seed(0)
        module = _NormsAndMlp()
        x, weights = _random((3, 5, 64), 1), _random((3, 5, 64), 2)
        made = []
        linear_of = lean_activations._linear_of
        monkeypatch.setattr(
            lean_activations,
            "_linear_of",
            lambda function, *a: made.append(function) or linear_of(function, *a),
        )

        def loss(params, x):
            module.update(params)
            return (module(x) * weights).sum()

        results = _plain_and_elementwise(module, loss, x)
        # q and k on the norm, down on the swiglu; not the frozen layer, nothing without it
        assert len(made) == 3 and made[0] is made[1] and made[2] is lean_activations._lean_swiglu
        (v0, g0, x0), (v1, g1, x1) = results
        assert v1.item() == pytest.approx(v0.item(), rel=1e-6)
        assert sorted(g1) == sorted(g0) and "frozen.weight" not in g0
        tol = 1e-5 if mx.default_device() == mx.cpu else 1e-2  # CUDA: TF32 float32 matmuls
        for name in g0:
            np.testing.assert_allclose(
                np.array(g1[name]),
                np.array(g0[name]),
                rtol=tol,
                atol=tol * abs(np.array(g0[name])).max(),
            )
        np.testing.assert_allclose(
            np.array(x1), np.array(x0), rtol=tol, atol=tol * abs(np.array(x0)).max()
        )
        assert lean_activations._recent == [None]  # nothing held after the block
    finally:
        mx.set_default_device(default)


@pytest.mark.parametrize("device", ["cpu", "default"])
def test_elementwise_attention_equals_mlx_lm_values_and_gradients(device, monkeypatch):
    """Qwen3's attention between the projections and o_proj as one recomputed function: the
    same loss and gradients as mlx-lm's; with a KV cache (a rollout) mlx-lm's own call."""
    from mlx_lm.models.cache import make_prompt_cache

    default = mx.default_device()
    mx.set_default_device(mx.cpu if device == "cpu" else default)
    try:
        model = _small_qwen3(3)
        x, weights = _random((4, 40, 128), 1) * 0.5, _random((4, 40, 128), 2)
        cores = []
        core = lean_activations._attention_core
        monkeypatch.setattr(
            lean_activations, "_attention_core", lambda *a: cores.append(1) or core(*a)
        )

        def loss(params, x):
            model.update(params)
            for layer in model.layers:
                x = layer(x, "causal", None)
            return (x * weights).sum()

        results = _plain_and_elementwise(model, loss, x)
        assert len(cores) == 3
        (v0, g0, x0), (v1, g1, x1) = results
        assert v1.item() == pytest.approx(v0.item(), rel=1e-6)
        tol = 1e-5 if mx.default_device() == mx.cpu else 1e-2  # CUDA: TF32 float32 matmuls
        for name in ["x", *g0]:
            want, got = (x0, x1) if name == "x" else (g0[name], g1[name])
            want, got = np.array(want), np.array(got)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * abs(want).max())
        tokens = mx.array([[5, 9, 3, 17, 2]])
        plain = model(tokens, cache=make_prompt_cache(model))
        with lean_activations.enabled(model, checkpointing="elementwise"):
            cached = model(tokens, cache=make_prompt_cache(model))
        np.testing.assert_array_equal(np.array(cached), np.array(plain))
        assert len(cores) == 3
    finally:
        mx.set_default_device(default)


def _random_rollouts(rows: int, prompt: int, completion: int) -> RolloutBatch:
    """`rows` rollouts (groups of 2) of random tokens of the small Qwen3's vocabulary, seed 0."""
    rng = np.random.default_rng(0)
    return RolloutBatch(
        prompt_ids=[list(rng.integers(3, 64, size=prompt)) for _ in range(rows)],
        completion_ids=mx.array(rng.integers(3, 64, size=(rows, completion)), dtype=mx.int32),
        completion_mask=mx.ones((rows, completion)),
        logprobs=mx.zeros((rows, completion)),
        finish_reasons=["length"] * rows,
        prompt_texts=[""] * rows,
        texts=[""] * rows,
        group_size=2,
    )


def test_elementwise_recomputes_the_mlp_input_behind_the_update_tap(monkeypatch):
    """In the update each block's MLP input is tapped (StagedEval.tap_middle): the gate and up
    projections still take it as the post-attention norm's output and recompute it."""
    from stages import grad_checkpoint
    from stages.policy import StagedEval

    model = _small_qwen3(2)
    linears = []
    linear_of = lean_activations._linear_of
    monkeypatch.setattr(
        lean_activations, "_linear_of", lambda *a: linears.append(a[0]) or linear_of(*a)
    )
    x = _random((2, 16, 128), 1)
    for split in (False, True):
        linears.clear()
        stages = StagedEval()
        with (
            lean_activations.enabled(model, checkpointing="elementwise"),
            grad_checkpoint.staged(model, stages, split, lean_activations.recorded_as),
        ):
            h = x
            for layer in model.layers:
                h = layer(h, "causal", None)
        assert len(stages.middle_grads) == 0  # filled by a backward pass
        # per block: q, k, v on the input norm; gate, up on the post-attention norm; down on
        # the swiglu
        assert len(linears) == 12, (split, len(linears))
    # and so in the update, which splits each block's backward there
    linears.clear()
    batch = _random_rollouts(2, 4, 6)
    cfg = TrainConfig(gradient_checkpointing="elementwise")
    grpo_update.update_step(model, optim.SGD(learning_rate=1e-3), batch, mx.array([1.0, -1.0]), cfg)
    swiglu_fed = sum(f is lean_activations._lean_swiglu for f in linears)
    assert swiglu_fed >= 2 and len(linears) == 6 * swiglu_fed


def _update_peak(checkpointing) -> int:
    """Peak memory over the resident arrays of one update step (SGD) of an 8-block Qwen3 on
    4 rows x 96 tokens, float32, the CPU: the forward and backward evaluated block by block as
    the update does (one evaluation of a whole gradient keeps every forward array)."""
    model = _small_qwen3(8)
    mx.eval(model.parameters())
    batch = _random_rollouts(4, 16, 80)
    advantages = mx.array([1.0, -1.0, 0.5, -0.5])
    cfg = TrainConfig(gradient_checkpointing=checkpointing)
    optimizer = optim.SGD(learning_rate=1e-3)
    grpo_update.update_step(model, optimizer, batch, advantages, cfg)  # warm-up
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    grpo_update.update_step(model, optimizer, batch, advantages, cfg)
    return mx.get_peak_memory() - resident


def test_the_down_projection_input_is_freed_before_the_swiglu_backward(on_cpu, monkeypatch):
    """The update taps each MLP's down projection input (StagedEval.tap_down) and evaluates its
    backward first: the swiglu's product that the down projection kept is freed before the
    swiglu's backward builds its temporaries. Peak memory of an update of a one-block Qwen3
    whose MLP dominates (4 rows x 256 tokens, intermediate 1,024), with the tap and without
    (the down projection not found)."""
    from stages import grad_checkpoint

    config = dict(
        model_type="qwen3", hidden_size=64, num_hidden_layers=1, intermediate_size=1024,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
        vocab_size=64, max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=True,
    )  # fmt: skip

    def update_peak() -> int:
        mx.random.seed(0)
        model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
        mx.eval(model.parameters())
        batch, advantages = _random_rollouts(4, 64, 192), mx.array([1.0, -1.0, 0.5, -0.5])
        optimizer = optim.SGD(learning_rate=1e-3)
        grpo_update.update_step(model, optimizer, batch, advantages, TrainConfig())  # warm-up
        resident = mx.get_active_memory()
        mx.reset_peak_memory()
        grpo_update.update_step(model, optimizer, batch, advantages, TrainConfig())
        return mx.get_peak_memory() - resident

    tapped = update_peak()
    monkeypatch.setattr(grad_checkpoint, "DOWN_NAME", "no_such_projection")
    untapped = update_peak()
    product = 4 * 256 * 1024 * 4  # the swiglu's product, float32
    assert tapped <= untapped - 0.75 * product, (tapped, untapped)  # 1.3 products measured


def test_elementwise_recomputation_holds_less(on_cpu):
    kept, recomputed = _update_peak(False), _update_peak("elementwise")
    # 8 blocks x 384 tokens keep about 1,000 of about 2,100 values a token less (the normed
    # inputs of the projections, the swiglu's product, the normed and rotated queries and keys,
    # the attention's output)
    assert recomputed < 0.8 * kept, (kept, recomputed)  # 0.69 measured


def test_enabled_swaps_mlx_lm_functions_for_the_block_only(tiny):
    model, _ = tiny
    assert qwen3.swiglu is activations.swiglu
    with lean_activations.enabled(model):
        assert qwen3.swiglu is lean_activations.swiglu
        assert switch_layers.swiglu is activations.swiglu  # not one of this model's modules
        unfused = mx.default_device() == mx.cpu or not mx.cuda.is_available()  # CPU, Metal
        attention = lean_activations.attention if unfused else _SDPA
        assert mx.fast.scaled_dot_product_attention is attention
        on_cpu = mx.default_device() == mx.cpu
        assert mx.fast.rms_norm is (lean_activations.rms_norm if on_cpu else _RMS_NORM)
    assert qwen3.swiglu is activations.swiglu
    assert mx.fast.scaled_dot_product_attention is _SDPA and mx.fast.rms_norm is _RMS_NORM
    with lean_activations.enabled(model, on=False):
        assert qwen3.swiglu is activations.swiglu
        assert mx.fast.scaled_dot_product_attention is _SDPA and mx.fast.rms_norm is _RMS_NORM
    for checkpointing in (True, "mlp"):  # the MLP is recomputed: swiglu stays mlx-lm's
        with lean_activations.enabled(model, checkpointing=checkpointing):
            assert qwen3.swiglu is activations.swiglu
            assert mx.fast.scaled_dot_product_attention is attention
    with pytest.raises(RuntimeError), lean_activations.enabled(model):
        raise RuntimeError("restored on errors too")
    assert qwen3.swiglu is activations.swiglu and mx.fast.scaled_dot_product_attention is _SDPA


def _batch(tokenizer, rows=4, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [tokenizer.encode(t) for t in ["1+2=", "3+4=", "12+30=", "2+2="]][:rows]
    completion = rng.integers(3, 20, size=(rows, 6))
    mask = np.ones((rows, 6), dtype=np.float32)
    mask[1, 4:] = 0  # a finished row
    return RolloutBatch(
        prompt_ids=prompts,
        completion_ids=mx.array(completion, dtype=mx.int32),
        completion_mask=mx.array(mask),
        logprobs=mx.zeros((rows, 6)),
        finish_reasons=["length", "stop", "length", "length"][:rows],
        prompt_texts=[""] * rows,
        texts=[""] * rows,
        group_size=2,
    )


@pytest.mark.parametrize("model_name", ["tiny_qwen3", "tiny_qwen3_moe"])
@pytest.mark.parametrize(
    "tile_bytes, checkpointing", [(2**30, False), (1, False), (2**30, "elementwise")]
)
def test_update_with_lean_activations_equals_update_without(
    model_name, tile_bytes, checkpointing, monkeypatch
):
    from stages.load_weights import resolve_path

    monkeypatch.setattr(lean_activations, "TILE_BYTES", tile_bytes)
    path = resolve_path(f"builtin:{model_name}")
    results = []
    for lean in (False, True):
        model, tokenizer = load(path, dtype="float32")
        optimizer = optim.SGD(learning_rate=1.0)  # the update is the (clipped) gradient
        advantages = mx.array([1.0, -1.0, 0.5, -0.5])
        cfg = TrainConfig(
            lean_activations=lean,
            gradient_checkpointing=checkpointing if lean else False,
            beta=0.04,
            micro_batch_size=2,
        )
        reference, _ = load(path, dtype="float32")
        metrics = grpo_update.update_step(
            model, optimizer, _batch(tokenizer), advantages, cfg, ref_model=reference
        )
        results.append((metrics, dict(tree_flatten(model.parameters()))))
    (m0, p0), (m1, p1) = results
    # On CUDA float32 matmuls and the experts' gradient sums round (and order) differently run
    # to run: there the two updates agree to about 1e-3 of the largest step.
    tol = 1e-4 if mx.default_device() == mx.cpu else 2e-2
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5, abs=1e-7)
    start = dict(tree_flatten(load(path, dtype="float32")[0].parameters()))
    moved = 0
    for name, value in p0.items():
        before = np.array(start[name])
        step, lean_step = np.array(value) - before, np.array(p1[name]) - before
        rounding = 2 * np.spacing(np.abs(before).max())  # of `after - before` near 1 (norms)
        np.testing.assert_allclose(
            lean_step, step, rtol=tol, atol=rounding + tol / 10 * abs(step).max()
        )
        moved += bool(abs(step).max() > 0)
    assert moved > len(p0) // 2  # the step trained


def test_lean_activations_takes_a_bool():
    TrainConfig(lean_activations=False).validate()
    with pytest.raises(ValueError, match="lean_activations=.*true | false"):
        TrainConfig(lean_activations="yes").validate()
