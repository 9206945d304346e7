from stages import grpo_update
from stages.rollout import RolloutConfig, generate_rollouts, sample_next

import mlx.core as mx
import numpy as np
import pytest

PROMPTS = ["1+2=", "3+4=", "2+2=7+1=", "0+", "4+4=hello 1+1="]


def _encode(tokenizer, texts):
    return [tokenizer.encode(t) for t in texts]


def _greedy_without_cache(model, eos_ids, prompt, max_new):
    sequence, out = list(prompt), []
    for _ in range(max_new):
        token = mx.argmax(model(mx.array([sequence]))[0, -1]).item()
        out.append(token)
        if token in eos_ids:
            break
        sequence.append(token)
    return out


def test_greedy_batched_left_padded_matches_per_prompt_uncached(tiny):
    model, tokenizer = tiny
    prompts = _encode(tokenizer, PROMPTS)
    assert len({len(p) for p in prompts}) > 1  # really exercises left padding
    batch = generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(group_size=2, max_new_tokens=6, temperature=0)
    )
    ids, mask = np.array(batch.completion_ids), np.array(batch.completion_mask)
    for row in range(batch.num_rows):
        expected = _greedy_without_cache(model, tokenizer.eos_token_ids, prompts[row // 2], 6)
        got = ids[row][mask[row] > 0].tolist()
        assert got == expected, f"row {row}: {got} != {expected}"


def test_shapes_masks_and_padding_after_eos(tiny):
    model, tokenizer = tiny
    batch = generate_rollouts(
        model,
        tokenizer,
        _encode(tokenizer, PROMPTS[:3]),
        RolloutConfig(group_size=4, max_new_tokens=5, seed=3),
    )
    n = 3 * 4
    assert batch.completion_ids.shape[0] == n and batch.logprobs.shape == batch.completion_ids.shape
    ids, mask = np.array(batch.completion_ids), np.array(batch.completion_mask)
    logprobs = np.array(batch.logprobs)
    eos = tokenizer.eos_token_ids
    for row in range(n):
        length = int(mask[row].sum())
        assert (mask[row, :length] == 1).all() and (mask[row, length:] == 0).all()
        assert (ids[row, length:] == tokenizer.pad_token_id).all()  # finished rows: padding only
        assert (logprobs[row, length:] == 0).all() and (logprobs[row, :length] <= 0).all()
        if batch.finish_reasons[row] == "stop":
            assert ids[row, length - 1] in eos and not set(ids[row, : length - 1]) & eos
        else:
            assert length == 5
    assert batch.prompt_texts[0] == PROMPTS[0] and batch.prompt_texts[4] == PROMPTS[1]


def test_same_seed_same_samples_and_other_seed_differs(tiny):
    model, tokenizer = tiny
    prompts = _encode(tokenizer, PROMPTS)
    cfg = RolloutConfig(group_size=4, max_new_tokens=6, temperature=1.5, seed=11)
    first = generate_rollouts(model, tokenizer, prompts, cfg)
    second = generate_rollouts(model, tokenizer, prompts, cfg)
    other = generate_rollouts(
        model,
        tokenizer,
        prompts,
        RolloutConfig(group_size=4, max_new_tokens=6, temperature=1.5, seed=12),
    )
    assert first.texts == second.texts
    assert first.texts != other.texts


def test_sampling_logprobs_match_the_training_forward(tiny):
    """With temperature 1 and no filters, the sampled distribution is the model's own."""
    model, tokenizer = tiny
    batch = generate_rollouts(
        model,
        tokenizer,
        _encode(tokenizer, PROMPTS),
        RolloutConfig(group_size=3, max_new_tokens=6, seed=5),
    )
    packed = grpo_update.pack(batch)
    recomputed = grpo_update.token_logprobs(
        grpo_update.completion_logits(model, packed), packed.completion_ids
    )
    diff = mx.abs(recomputed - batch.logprobs) * batch.completion_mask
    assert diff.max().item() < 1e-4


def test_top_k_one_is_greedy(tiny):
    model, tokenizer = tiny
    prompts = _encode(tokenizer, PROMPTS)
    greedy = generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(group_size=2, max_new_tokens=5, temperature=0)
    )
    top1 = generate_rollouts(
        model,
        tokenizer,
        prompts,
        RolloutConfig(group_size=2, max_new_tokens=5, temperature=0.7, top_k=1, seed=9),
    )
    assert greedy.texts == top1.texts
    # Only one token survives, so its sampling logprob is 0.
    assert mx.abs(top1.logprobs).max().item() < 1e-6


def test_filters_match_hand_computed_distribution():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    counts = np.zeros(4)
    cfg = RolloutConfig(temperature=1.0, top_p=0.8)
    keys = mx.random.split(mx.random.key(0), 2000)
    tokens = []
    for key in keys:
        token, logprob = sample_next(logits, cfg, key)
        tokens.append(token.item())
        if token.item() == 0:
            assert abs(logprob.item() - np.log(0.5 / 0.8)) < 1e-5
    counts = np.bincount(tokens, minlength=4) / len(tokens)
    assert counts[2] == 0 and counts[3] == 0  # outside the 0.8 nucleus
    assert abs(counts[0] - 0.5 / 0.8) < 0.04
    # min_p 0.4: keep tokens with p >= 0.4 * 0.5 = 0.2 -> tokens 0 and 1
    _, logprob = sample_next(logits, RolloutConfig(min_p=0.4), mx.random.key(1))
    assert min(abs(logprob.item() - np.log([0.5 / 0.8, 0.3 / 0.8]))) < 1e-5
    # temperature 2 flattens: p ~ sqrt(p)
    _, logprob = sample_next(logits, RolloutConfig(temperature=2.0, top_k=2), mx.random.key(2))
    expected = np.sqrt([0.5, 0.3]) / np.sqrt([0.5, 0.3]).sum()
    assert min(abs(logprob.item() - np.log(expected))) < 1e-5


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"group_size": 0}, "group_size"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_sampling_settings_fail_before_generation(tiny, bad, message):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        generate_rollouts(model, tokenizer, [[1, 2]], RolloutConfig(**bad))


def test_empty_prompt_is_an_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate_rollouts(model, tokenizer, [[5, 6], []], RolloutConfig())
