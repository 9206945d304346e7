"""The log-prob head's CUDA kernels (stages/logprob_kernels.py) against the MLX operations they
stand for: each block's statistics and its logit gradient, for every dtype, block widths that
take vector loads and ones that do not, temperatures and chosen tokens inside and outside the
block. Elsewhere than on CUDA the MLX operations run: the head's own tests (test_policy.py)
cover them."""

from stages import logprob_kernels

import mlx.core as mx
import numpy as np
import pytest

cuda = pytest.mark.skipif(
    not mx.cuda.is_available(), reason="needs an NVIDIA GPU (MLX's CUDA backend)"
)


def _block(rows: int, width: int, dtype, seed: int = 0):
    key = mx.random.key(seed)
    logits = (4 * mx.random.normal((rows, width), key=key)).astype(dtype)
    # Chosen tokens inside the block, before it (negative) and after it (>= width).
    ids = np.random.default_rng(seed).integers(-width // 2, width + width // 2, rows)
    ids[:3] = [0, width - 1, -1]
    return logits, mx.array(ids.astype(np.int32))


def _numpy(values) -> np.ndarray:
    if isinstance(values, mx.array):
        values = values.astype(mx.float32)  # NumPy has no bfloat16
    return np.asarray(values, dtype=np.float64)


def _close(got, want, rel):
    got, want = _numpy(got), _numpy(want)
    assert got.shape == want.shape
    return np.abs(got - want).max() <= rel * np.abs(want).max()


def test_off_cuda_the_mlx_operations_run(monkeypatch):
    """Where the kernels are not available the functions are the reference operations."""
    monkeypatch.setattr(logprob_kernels, "available", lambda logits: False)
    logits, ids = _block(6, 40, mx.float32)
    tau = mx.array(0.7)
    stats = logprob_kernels.block_stats(logits, tau, ids)
    z = np.asarray(logits, dtype=np.float64) / 0.7
    top = z.max(axis=1)
    weights = np.exp(z - top[:, None])
    assert _close(stats[0], top, 1e-6)
    assert _close(stats[1], weights.sum(1), 1e-5)
    assert _close(stats[2], (weights * z).sum(1), 1e-5)
    ids_np = np.asarray(ids)
    inside = (ids_np >= 0) & (ids_np < 40)
    picked = np.where(inside, z[np.arange(6), np.clip(ids_np, 0, 39)], 0.0)
    assert _close(stats[3], picked, 1e-6)


def test_the_cpu_device_takes_the_operations_on_a_cuda_host_too():
    """The kernels run on the GPU only: with the CPU as the default device (a CUDA host too)
    the functions are the reference operations and run there."""
    default = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        logits, ids = _block(6, 40, mx.float32)
        assert not logprob_kernels.available(logits)
        got = logprob_kernels.block_stats(logits, mx.array(0.7), ids)
        want = logprob_kernels.block_stats_reference(logits, mx.array(0.7), ids)
        np.testing.assert_array_equal(np.array(got), np.array(want))
    finally:
        mx.set_default_device(default)


@cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("width", [4096, 448, 37])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_block_stats_kernel_equals_the_operations(dtype, width, temperature):
    logits, ids = _block(64, width, dtype)
    tau = mx.array(temperature, dtype=mx.float32)
    got = logprob_kernels.block_stats(logits, tau, ids)
    want = logprob_kernels.block_stats_reference(logits, tau, ids)
    assert got.shape == want.shape == (4, 64) and got.dtype == mx.float32
    for i in range(4):  # max, sums (added in another order), the chosen token's z
        assert _close(got[i], want[i], 1e-5), i


@cuda
@pytest.mark.parametrize(
    "dtype, rel", [(mx.bfloat16, 1e-2), (mx.float16, 2e-3), (mx.float32, 1e-5)]
)
@pytest.mark.parametrize("width", [4096, 448, 37])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_block_grad_kernel_equals_the_operations(dtype, rel, width, temperature):
    logits, ids = _block(64, width, dtype, seed=1)
    tau = mx.array(temperature, dtype=mx.float32)
    stats = logprob_kernels.block_stats_reference(logits, tau, ids)
    normaliser = stats[0] + mx.log(stats[1])
    grad = mx.random.normal((64,), key=mx.random.key(2))
    got = logprob_kernels.block_grad(logits, tau, ids, normaliser, grad)
    want = logprob_kernels.block_grad_reference(logits, tau, ids, normaliser, grad)
    assert got.shape == want.shape == logits.shape and got.dtype == dtype
    # Rounded to the dtype from float32 values that differ in their last bits (exp).
    assert _close(got, want, rel)
    # The chosen token's entry carries the +grad / temperature: its sign flips.
    ids_np, g = np.asarray(ids), np.asarray(grad)
    rows = np.flatnonzero((ids_np >= 0) & (ids_np < width))
    chosen = np.asarray(got.astype(mx.float32))[rows, ids_np[rows]]
    assert np.all(np.sign(chosen) == np.sign(g[rows]))
