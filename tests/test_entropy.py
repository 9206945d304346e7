from stages.entropy import high_entropy_mask, token_entropy

import mlx.core as mx
import numpy as np
import pytest


def test_token_entropy_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(np.array(token_entropy(mx.array(logits))), expected, rtol=1e-5)
    uniform = token_entropy(mx.zeros((1, 1, 8))).item()
    assert uniform == pytest.approx(np.log(8), rel=1e-6)


@pytest.mark.parametrize("quantile", [1.0, 0.8, 0.5, 0.2, 0.0])
def test_high_entropy_mask_matches_numpy_quantile(quantile):
    rng = np.random.default_rng(1)
    entropies = rng.random((3, 5)).astype(np.float32)
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    real = entropies[mask > 0]
    threshold = np.quantile(real, 1 - quantile)  # linear interpolation, as torch.quantile
    expected = ((entropies >= threshold) & (mask > 0)).astype(np.float32)
    got = np.array(high_entropy_mask(mx.array(entropies), mx.array(mask), quantile))
    np.testing.assert_array_equal(got, expected)
    if quantile == 1.0:
        np.testing.assert_array_equal(got, mask)


def test_padding_never_selected_and_bad_quantile():
    entropies = mx.array([[5.0, 0.1, 9.0]])
    mask = mx.array([[1.0, 1.0, 0.0]])
    assert np.array(high_entropy_mask(entropies, mask, 0.5)).tolist() == [[1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        high_entropy_mask(entropies, mask, 1.5)


@pytest.mark.parametrize("quantile", [0.8, 0.3, 0.0])
def test_pooled_quantile_matches_trl_gathered_entropies(quantile):
    """TRL takes the threshold over the micro-batch of every process (pad, gather, drop pads):
    the mask of this process's rows with the pool of two processes' rows."""
    from trl_reference import trl_high_entropy_mask

    rng = np.random.default_rng(2)
    entropies = rng.random((4, 5)).astype(np.float32)
    mask = (rng.random((4, 5)) > 0.3).astype(np.float32)
    other_entropies = (rng.random((4, 5)) * 3).astype(np.float32)  # another process's, higher
    other_mask = (rng.random((4, 5)) > 0.5).astype(np.float32)
    gathered = np.concatenate([entropies[mask > 0], other_entropies[other_mask > 0]])
    expected = trl_high_entropy_mask(entropies, mask, quantile, gathered_entropies=gathered)
    pool = (
        mx.array(np.concatenate([entropies, other_entropies])),
        mx.array(np.concatenate([mask, other_mask])),
    )
    got = high_entropy_mask(mx.array(entropies), mx.array(mask), quantile, pool=pool)
    np.testing.assert_array_equal(np.array(got), expected.astype(np.float32))
    alone = high_entropy_mask(mx.array(entropies), mx.array(mask), quantile)
    assert not np.array_equal(np.array(alone), np.array(got))  # the pool moved the threshold
