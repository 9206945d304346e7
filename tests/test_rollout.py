from stages import policy, rollout
from stages.rollout import RolloutConfig, Sampler, generate_rollouts, sample_next

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache

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


@pytest.mark.parametrize("texts", [["1+2=", "3+4=", "0+1="], PROMPTS], ids=["equal", "padded"])
def test_chunked_prefill_matches_per_prompt_uncached(tiny, monkeypatch, texts):
    """Prompts prefilled 2 tokens at a time (causal attention over a cached prefix), with and
    without left padding, still decode exactly like the uncached forward."""
    model, tokenizer = tiny
    monkeypatch.setattr(rollout, "PREFILL_STEP", 2)
    prompts = _encode(tokenizer, texts)
    batch = generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(group_size=2, max_new_tokens=6, temperature=0)
    )
    ids, mask = np.array(batch.completion_ids), np.array(batch.completion_mask)
    for row in range(batch.num_rows):
        expected = _greedy_without_cache(model, tokenizer.eos_token_ids, prompts[row // 2], 6)
        assert ids[row][mask[row] > 0].tolist() == expected, f"row {row}"


def test_unpadded_batch_samples_like_the_masked_cache(tiny, monkeypatch):
    """Equal-length prompts take the mask-free cache; its samples and logprobs equal those of
    mlx-lm's BatchKVCache with its explicit mask, also after finished rows are dropped."""
    model, tokenizer = tiny
    prompts = _encode(tokenizer, ["hello", "world", "1+2=3", "abcde"])
    cfg = RolloutConfig(group_size=4, max_new_tokens=10, temperature=1.4, engine="mlx_lm")
    made = []
    real = rollout._make_caches

    def spy(*args):
        made.append(type(real(*args)[0]))
        return real(*args)

    monkeypatch.setattr(rollout, "_make_caches", spy)
    fast = generate_rollouts(model, tokenizer, prompts, cfg, seed=3)
    monkeypatch.setattr(
        rollout, "_make_caches", lambda m, padding, _: [BatchKVCache(padding) for _ in m.layers]
    )
    masked = generate_rollouts(model, tokenizer, prompts, cfg, seed=3)
    assert made == [rollout.UnpaddedBatchKVCache]
    lengths = np.array(fast.completion_mask).sum(axis=1)
    assert lengths.min() < lengths.max()  # rows finished early and were dropped
    assert np.array_equal(np.array(fast.completion_ids), np.array(masked.completion_ids))
    assert np.allclose(np.array(fast.logprobs), np.array(masked.logprobs), atol=1e-5)


def test_shapes_masks_and_padding_after_eos(tiny):
    model, tokenizer = tiny
    batch = generate_rollouts(
        model,
        tokenizer,
        _encode(tokenizer, PROMPTS[:3]),
        RolloutConfig(group_size=4, max_new_tokens=5),
        seed=3,
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
    cfg = RolloutConfig(group_size=4, max_new_tokens=6, temperature=1.5)
    first = generate_rollouts(model, tokenizer, prompts, cfg, seed=11)
    second = generate_rollouts(model, tokenizer, prompts, cfg, seed=11)
    other = generate_rollouts(model, tokenizer, prompts, cfg, seed=12)
    assert first.texts == second.texts
    assert first.texts != other.texts


def test_sampling_logprobs_match_the_training_forward(tiny):
    """With temperature 1 and no filters, the sampled distribution is the model's own."""
    model, tokenizer = tiny
    batch = generate_rollouts(
        model,
        tokenizer,
        _encode(tokenizer, PROMPTS),
        RolloutConfig(group_size=3, max_new_tokens=6),
        seed=5,
    )
    packed = policy.pack(batch)
    recomputed = policy.token_logprobs(
        policy.completion_logits(model, packed), packed.completion_ids
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
        RolloutConfig(group_size=2, max_new_tokens=5, temperature=0.7, top_k=1),
        seed=9,
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


# --- issue 4: sharing, processors, XTC, stop strings, rotating cache, policy logprobs, errors


class _NoEos:
    """The tiny tokenizer with EOS switched off, so completions run to max_new_tokens."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_ids = set()
        self.pad_token_id = tokenizer.pad_token_id

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class _CountingModel:
    """Forwards to the model and records the batch size of every decode call."""

    def __init__(self, model):
        self._model = model
        self.rows = []

    def __call__(self, inputs, cache=None):
        self.rows.append(inputs.shape[0])
        return self._model(inputs, cache=cache)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_group_sharing_equals_unshared_generation_with_the_same_keys(tiny):
    model, tokenizer = tiny
    prompts = _encode(tokenizer, PROMPTS)
    cfg = dict(max_new_tokens=8, temperature=1.3, top_p=0.95, repetition_penalty=1.3)
    shared = generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(group_size=4, **cfg), seed=7
    )
    repeated = [p for p in prompts for _ in range(4)]
    alone = generate_rollouts(
        model, tokenizer, repeated, RolloutConfig(group_size=1, **cfg), seed=7
    )
    assert np.array_equal(np.array(shared.completion_ids), np.array(alone.completion_ids))
    assert np.allclose(np.array(shared.logprobs), np.array(alone.logprobs), atol=1e-5)
    assert len(set(shared.texts)) > 3  # really sampled, not all the same


def test_finished_rows_leave_the_batch(tiny):
    model, tokenizer = tiny
    counting = _CountingModel(model)
    batch = generate_rollouts(
        counting,
        tokenizer,
        _encode(tokenizer, PROMPTS),
        RolloutConfig(group_size=8, max_new_tokens=12, temperature=1.5),
        seed=1,
    )
    lengths = np.array(batch.completion_mask).sum(axis=1)
    assert lengths.min() < lengths.max()  # rows finish at different steps
    assert counting.rows[0] == batch.num_rows
    assert counting.rows[-1] < batch.num_rows  # finished rows were dropped
    assert counting.rows == sorted(counting.rows, reverse=True)


def _rows_of(logits, n):
    return mx.repeat(mx.log(mx.array([logits])), n, axis=0)


def _frequencies(tokens, vocab):
    return np.bincount(np.array(tokens), minlength=vocab) / tokens.size


def _softmax(x):
    e = np.exp(np.array(x) - np.max(x))
    return e / e.sum()


def test_repetition_penalty_per_row_history_and_window_match_hand_computed():
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 4000
    logits = _rows_of(probs, n)
    # first half saw tokens 0 and 2 (in that order); second half saw token 1 only
    history = mx.array([[0, 2]] * (n // 2) + [[1, 1]] * (n // 2))
    cfg = RolloutConfig(repetition_penalty=2.0, repetition_context_size=20)
    tokens, logprobs = sample_next(logits, cfg, mx.random.key(0), history)
    raw = np.log(probs)
    first = raw.copy()
    first[[0, 2]] = first[[0, 2]] * 2.0  # negative logits are multiplied
    second = raw.copy()
    second[1] = second[1] * 2.0
    for half, expected in ((slice(0, n // 2), first), (slice(n // 2, n), second)):
        p = _softmax(expected)
        got = np.array(tokens[half])
        assert np.allclose(np.array(logprobs[half]), np.log(p[got]), atol=1e-5)
        assert np.abs(_frequencies(tokens[half], 4) - p).max() < 0.04
    # positive logits are divided; a window of 1 only sees the last token
    logits = mx.array([[2.0, 1.0, -1.0]])
    cfg = RolloutConfig(temperature=0, repetition_penalty=4.0, repetition_context_size=1)
    _, logprob = sample_next(logits, cfg, mx.random.key(0), mx.array([[1, 0]]))
    expected = _softmax([0.5, 1.0, -1.0])  # token 0 (last) penalised: 2 / 4; token 1 is out
    assert abs(logprob.item() - np.log(expected[1])) < 1e-5


def test_presence_and_frequency_penalties_match_hand_computed():
    logits = mx.array([[1.0, 2.0, 0.0, 0.5]] * 2)
    history = mx.array([[1, 1, 3], [2, 0, 2]])
    presence = RolloutConfig(temperature=0, presence_penalty=0.5)
    frequency = RolloutConfig(temperature=0, frequency_penalty=0.5)
    for cfg, row0, row1 in (
        (presence, [1.0, 1.5, 0.0, 0.0], [0.5, 2.0, -0.5, 0.5]),
        (frequency, [1.0, 1.0, 0.0, 0.0], [0.5, 2.0, -1.0, 0.5]),
    ):
        tokens, logprobs = sample_next(logits, cfg, mx.random.key(0), history)
        for row, expected in enumerate((row0, row1)):
            p = _softmax(expected)
            token = int(tokens[row].item())
            assert token == int(np.argmax(p))
            assert abs(logprobs[row].item() - np.log(p[token])) < 1e-5


def test_short_histories_marker_is_never_penalised():
    """Prompts shorter than the context window: the marker V is not a token."""
    logits = mx.array([[1.0, 2.0, 0.0, 0.5]])
    cfg = RolloutConfig(temperature=0, frequency_penalty=0.5)
    sampler = Sampler(cfg)
    assert sampler.initial_history([[1]], 4).tolist() == [[4] * 19 + [1]]
    _, padded = sampler(logits, mx.array([[4, 4, 1]]), mx.random.split(mx.random.key(0), 1), False)
    _, plain = sampler(logits, mx.array([[1]]), mx.random.split(mx.random.key(0), 1))
    assert abs(padded.item() - plain.item()) < 1e-6


def test_xtc_excludes_top_choices_except_special_tokens():
    probs = [0.4, 0.3, 0.2, 0.1]  # above threshold 0.25: tokens 0 and 1 -> 0 is excluded
    n = 4000
    logits = _rows_of(probs, n)
    keys = mx.random.split(mx.random.key(3), n)
    always = Sampler(RolloutConfig(xtc_probability=1.0, xtc_threshold=0.25))
    tokens, logprobs = always(logits, None, keys)
    expected = np.array([0.0, 0.3, 0.2, 0.1]) / 0.6
    assert np.abs(_frequencies(tokens, 4) - expected).max() < 0.04
    got = np.array(tokens)
    assert np.allclose(np.array(logprobs), np.log(expected[got]), atol=1e-5)
    # a special token is never excluded
    special = Sampler(RolloutConfig(xtc_probability=1.0, xtc_threshold=0.25), special_tokens=[0])
    tokens, _ = special(logits, None, keys)
    assert np.abs(_frequencies(tokens, 4) - np.array(probs)).max() < 0.04
    # probability 0.5: each row flips its own coin
    half = Sampler(RolloutConfig(xtc_probability=0.5, xtc_threshold=0.25))
    tokens, logprobs = half(logits, None, keys)
    assert abs(_frequencies(tokens, 4)[0] - 0.5 * 0.4) < 0.03
    ones = np.array(logprobs)[np.array(tokens) == 1]
    assert np.isclose(ones, np.log(0.3), atol=1e-5).any()
    assert np.isclose(ones, np.log(0.5), atol=1e-5).any()


def test_stop_strings_spanning_tokens_cut_the_text(tiny):
    model, tokenizer = tiny
    no_eos = _NoEos(tokenizer)
    prompts = _encode(tokenizer, PROMPTS)
    cfg = dict(group_size=1, max_new_tokens=12, temperature=0, repetition_penalty=1.5)
    free = generate_rollouts(model, no_eos, prompts, RolloutConfig(**cfg))
    ids = np.array(free.completion_ids)
    full_text = free.texts[0]
    stop = full_text[4:6]  # two characters: two tokens of the character-level tokenizer
    assert len(stop) == 2 and len(tokenizer.encode(stop)) == 2
    stopped = generate_rollouts(model, no_eos, prompts, RolloutConfig(stop_strings=[stop], **cfg))
    got_ids, mask = np.array(stopped.completion_ids), np.array(stopped.completion_mask)
    for row in range(len(prompts)):
        decoded = [tokenizer.decode(ids[row, :k].tolist()) for k in range(1, 13)]
        ends = [k + 1 for k, text in enumerate(decoded) if stop in text]
        if not ends:
            assert stopped.finish_reasons[row] == "length" and stopped.texts[row] == free.texts[row]
            continue
        length = ends[0]
        assert stopped.finish_reasons[row] == "stop"
        assert int(mask[row].sum()) == length
        assert got_ids[row, :length].tolist() == ids[row, :length].tolist()
        assert (got_ids[row, length:] == tokenizer.pad_token_id).all()
        assert stopped.texts[row] == decoded[length - 1].split(stop)[0]
    assert stopped.finish_reasons[0] == "stop" and stopped.texts[0] == full_text[:4]


def test_rotating_cache_matches_mlx_lm_rotating_generation(tiny):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import RotatingKVCache

    model, tokenizer = tiny
    prompts = _encode(tokenizer, PROMPTS)
    size = 16  # every prompt fits; the 12 new tokens wrap the cache
    batch = generate_rollouts(
        model,
        _NoEos(tokenizer),
        prompts,
        RolloutConfig(group_size=1, max_new_tokens=12, temperature=0, max_kv_size=size),
    )
    for row, prompt in enumerate(prompts):
        cache = [RotatingKVCache(max_size=size, keep=0) for _ in model.layers]
        steps = generate_step(mx.array(prompt), model, max_tokens=12, prompt_cache=cache)
        expected = [token for token, _ in steps]
        assert np.array(batch.completion_ids[row]).tolist() == expected, f"row {row}"


def test_policy_logprobs_are_the_training_forward_at_temperature(tiny):
    model, tokenizer = tiny
    prompts = _encode(tokenizer, PROMPTS)
    cfg = dict(group_size=3, max_new_tokens=6, temperature=0.7, top_k=3)
    sampled = generate_rollouts(model, tokenizer, prompts, RolloutConfig(**cfg), seed=4)
    recomputed = generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(logprobs_source="policy", **cfg), seed=4
    )
    assert np.array_equal(np.array(sampled.completion_ids), np.array(recomputed.completion_ids))
    packed = policy.pack(recomputed)
    expected = policy.token_logprobs(
        policy.completion_logits(model, packed, 0.7), packed.completion_ids
    )
    mask = np.array(recomputed.completion_mask)
    assert np.allclose(np.array(recomputed.logprobs), np.array(expected) * mask, atol=1e-4)
    # top_k renormalises over fewer tokens, so the sampler's logprobs are higher
    gap = (np.array(sampled.logprobs) - np.array(recomputed.logprobs))[mask > 0]
    assert (gap >= -1e-5).all() and gap.max() > 1e-3


def test_context_limit_caps_generation_and_long_prompts_fail(tiny):
    model, tokenizer = tiny
    limit = model.args.max_position_embeddings
    near = [5] * (limit - 4)
    batch = generate_rollouts(
        model, _NoEos(tokenizer), [near], RolloutConfig(group_size=2, max_new_tokens=16), seed=0
    )
    assert batch.completion_mask.sum(axis=1).tolist() == [4.0, 4.0]
    assert batch.finish_reasons == ["length", "length"]
    with pytest.raises(
        ValueError, match=r"context of 256 tokens \(max_position_embeddings\): prompt 1: 256 tokens"
    ):
        generate_rollouts(model, tokenizer, [[5, 6], [5] * limit], RolloutConfig())


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_context_size": 0}, "repetition_context_size"),
        ({"xtc_threshold": 0.7}, "xtc_threshold"),
        ({"xtc_probability": 1.5}, "xtc_probability"),
        ({"stop_strings": [""]}, "stop_strings"),
        ({"max_kv_size": -1}, "max_kv_size"),
        ({"logprobs_source": "vllm"}, "logprobs_source"),
    ],
)
def test_bad_new_settings_fail_before_generation(tiny, bad, message):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        generate_rollouts(model, tokenizer, [[1, 2]], RolloutConfig(**bad))


def test_rollout_settings_flow_into_rollout_config():
    from pipelines.config import compose

    cfg = compose(["rollout.stop_strings=[END,'###']", "rollout.xtc_probability=0.5"])
    rollout_cfg = cfg.rollout  # the config node is the stage's own dataclass
    assert type(rollout_cfg) is RolloutConfig
    rollout_cfg.validate()
    assert rollout_cfg.stop_strings == ["END", "###"] and rollout_cfg.xtc_probability == 0.5


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("rollout.group_size=1", "expected >= 2 (advantages compare completions within a group)"),
        ("rollout.repetition_penalty=0", "rollout.repetition_penalty=0.0 is invalid"),
        ("rollout.presence_context_size=0", "rollout.presence_context_size=0 is invalid"),
        ("rollout.xtc_threshold=0.9", "rollout.xtc_threshold=0.9 is invalid"),
        ("rollout.stop_strings=['']", "rollout.stop_strings=[''] is invalid"),
        ("rollout.max_kv_size=-2", "rollout.max_kv_size=-2 is invalid"),
        ("rollout.logprobs_source=vllm", "rollout.logprobs_source='vllm' is invalid"),
    ],
)
def test_bad_rollout_config_is_one_line_naming_the_key(override, fragment):
    from pipelines.config import ConfigError, compose

    with pytest.raises(ConfigError) as error:
        compose([override])
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_rollout_metrics_trl_names_and_values():
    from stages.rollout import RolloutBatch, rollout_metrics

    mask = mx.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=mx.float32)
    batch = RolloutBatch(
        prompt_ids=[[1]] * 4,
        completion_ids=mx.zeros((4, 4), dtype=mx.int32),
        completion_mask=mask,
        logprobs=mx.zeros((4, 4)),
        finish_reasons=["stop", "length", "stop", "stop"],
        prompt_texts=[""] * 4,
        texts=[""] * 4,
        group_size=2,
    )
    metrics = rollout_metrics(batch)
    assert metrics["completions/mean_length"] == pytest.approx(2.5)
    assert metrics["completions/min_length"] == 1 and metrics["completions/max_length"] == 4
    assert metrics["completions/clipped_ratio"] == pytest.approx(0.25)
    assert metrics["completions/mean_terminated_length"] == pytest.approx(2.0)
    assert metrics["completions/min_terminated_length"] == 1
    assert metrics["completions/max_terminated_length"] == 3


def test_a_share_of_the_batch_draws_like_its_rows_of_the_whole_batch(tiny):
    """Data parallel: rank r's prompts with row_offset/total_rows sample what one process does."""
    model, tokenizer = tiny
    prompts = _encode(tokenizer, PROMPTS)
    assert len(prompts) >= 2
    cfg = RolloutConfig(group_size=4, max_new_tokens=6, temperature=1.5)
    whole = generate_rollouts(model, tokenizer, prompts, cfg, seed=11)
    total = len(prompts) * 4
    second = generate_rollouts(
        model, tokenizer, prompts[1:2], cfg, seed=11, row_offset=4, total_rows=total
    )
    alone = generate_rollouts(model, tokenizer, prompts[1:2], cfg, seed=11)
    assert second.texts == whole.texts[4:8]
    assert alone.texts != whole.texts[4:8]  # without the offset it draws other samples
    with pytest.raises(ValueError, match="total_rows"):
        generate_rollouts(
            model,
            tokenizer,
            prompts[1:2],
            cfg,
            seed=11,
            row_offset=total,
            total_rows=total,
        )


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.3),
        dict(temperature=0.8, top_p=0.9, min_p=0.05, top_k=20, xtc_probability=0.5),
        dict(temperature=0, repetition_penalty=1.3, presence_penalty=0.2),
    ],
    ids=["plain", "filters", "greedy-penalties"],
)
def test_compiled_sampler_draws_what_the_plain_one_draws(settings):
    """The sampler compiled (the GPU default) gives the same tokens and logprobs as run op by
    op, with and without a token history, and while histories still hold the marker."""
    vocab, rows = 50, 64
    cfg = RolloutConfig(**settings)
    logits = mx.random.normal((rows, vocab), key=mx.random.key(1)) * 3
    keys = mx.random.split(mx.random.key(2), rows)
    plain, compiled = Sampler(cfg, [0], compiled=False), Sampler(cfg, [0], compiled=True)
    full = [list(range(i % 7, i % 7 + 30)) for i in range(rows)]
    cases = [(None, True)]
    if plain.context_size:  # a full history, and one where a short prompt leaves markers
        cases += [(plain.initial_history(full, vocab), True)]
        cases += [(plain.initial_history(full[:-1] + [[3]], vocab), False)]
    for history, filled in cases:
        want = plain(logits, history, keys, filled=filled)
        got = compiled(logits, history, keys, filled=filled)
        assert np.array_equal(np.array(got[0]), np.array(want[0]))
        assert np.allclose(np.array(got[1]), np.array(want[1]), atol=1e-5)
