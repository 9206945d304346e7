"""Parity with transformers (golden fixtures), cached decoding and saved checkpoints.

tests/fixtures/<name>/ were made by scripts/make_golden_fixtures.py with transformers; the logits
it recorded are compared here without torch.
"""

from pathlib import Path

from stages import checkpoint
from stages.load_weights import load

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = ["qwen3_tiny", "qwen3_moe_tiny"]


def _golden(name):
    directory = FIXTURES / name
    return (
        directory,
        np.load(directory / "golden_input_ids.npy"),
        np.load(directory / "golden_logits.npy"),
    )


@pytest.mark.parametrize("name", GOLDEN)
def test_logits_match_transformers(name):
    directory, input_ids, expected = _golden(name)
    model, _ = load(directory, dtype="float32")
    got = np.array(model(mx.array(input_ids)))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("name", GOLDEN)
def test_saved_checkpoint_reloads_to_same_logits(name, tmp_path):
    directory, input_ids, expected = _golden(name)
    model, tokenizer = load(directory, dtype="float32")
    saved = checkpoint.save(model, tokenizer, tmp_path / "ckpt")
    reloaded, _ = load(saved, dtype="float32")
    got = np.array(reloaded(mx.array(input_ids)))
    np.testing.assert_array_equal(got, np.array(model(mx.array(input_ids))))
    assert np.abs(got - expected).max() <= 1e-4


def _assert_close_same_argmax(got, expected):
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("name", [*GOLDEN, "builtin"])
def test_incremental_decoding_matches_full_forward(name, tiny_path):
    directory = tiny_path if name == "builtin" else FIXTURES / name
    model, _ = load(directory, dtype="float32")
    tokens = mx.array(np.random.default_rng(1).integers(4, 50, size=(1, 14)), dtype=mx.int32)
    full = np.array(model(tokens))
    cache = make_prompt_cache(model)
    prefill = 5
    steps = [np.array(model(tokens[:, :prefill], cache=cache))]
    for position in range(prefill, tokens.shape[1]):
        steps.append(np.array(model(tokens[:, position : position + 1], cache=cache)))
    _assert_close_same_argmax(np.concatenate(steps, axis=1), full)


@pytest.mark.parametrize("name", [*GOLDEN, "builtin"])
def test_left_padded_batch_decoding_matches_each_sequence(name, tiny_path):
    """BatchKVCache with left padding: every row's logits equal its own unpadded forward."""
    directory = tiny_path if name == "builtin" else FIXTURES / name
    model, _ = load(directory, dtype="float32")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(4, 50, size=n).tolist() for n in (3, 7, 5)]
    continuation = rng.integers(4, 50, size=(3, 6))
    width = max(map(len, prompts))
    padding = [width - len(p) for p in prompts]
    padded = mx.array([[0] * pad + p for p, pad in zip(prompts, padding)], dtype=mx.int32)

    cache = [BatchKVCache(padding) for _ in model.layers]
    prefill = np.array(model(padded, cache=cache))
    steps = []
    for t in range(continuation.shape[1]):
        step_tokens = mx.array(continuation[:, t : t + 1], dtype=mx.int32)
        steps.append(np.array(model(step_tokens, cache=cache))[:, 0])
    for row, prompt in enumerate(prompts):
        sequence = mx.array([prompt + continuation[row].tolist()], dtype=mx.int32)
        full = np.array(model(sequence))[0]
        got = np.concatenate([prefill[row, padding[row] :], np.stack([s[row] for s in steps])])
        _assert_close_same_argmax(got, full)
