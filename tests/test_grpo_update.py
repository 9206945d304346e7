from stages import grpo_update, policy
from stages.advantages import compute_advantages, group_advantages
from stages.grpo_update import TrainConfig
from stages.losses import grpo_loss
from stages.rollout import RolloutConfig, generate_rollouts

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten


def _np_advantages(rewards, group_size, scale):
    grouped = rewards.reshape(-1, group_size)
    adv = grouped - grouped.mean(axis=1, keepdims=True)
    if scale == "group":
        adv = adv / (grouped.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (rewards.std(ddof=1) + 1e-4)
    return adv.reshape(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_numpy(scale):
    rewards = np.random.default_rng(0).random(12).astype(np.float32)
    got = compute_advantages(mx.array(rewards), 4, scale)
    np.testing.assert_allclose(
        np.array(got), _np_advantages(rewards, 4, scale), rtol=1e-5, atol=1e-5
    )


def test_equal_rewards_give_zero_advantage():
    got = compute_advantages(mx.array([1.0, 1.0, 0.0, 0.0]), 2, "group")
    assert np.abs(np.array(got)).max() == 0


def test_bad_scale_and_group_size():
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(mx.zeros(4), 2, "groups")
    with pytest.raises(ValueError, match="groups of 3"):
        compute_advantages(mx.zeros(4), 3, "group")


def _np_nanstd(x, axis=None, keepdims=False):
    """TRL's nanstd: variance = nanmean((x - nanmean)^2) * count / (count - 1)."""
    with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        mean = np.nanmean(x, axis=axis, keepdims=True)
        variance = np.nanmean((x - mean) ** 2, axis=axis, keepdims=keepdims)
        count = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims)
        return np.sqrt(variance * count / (count - 1))


def _np_trl_advantages(per_func, weights, group, scale, aggregation):
    """TRL GRPOTrainer._generate_and_score_completions (advantages), transcribed to NumPy."""
    import warnings

    warnings.simplefilter("ignore")
    n, f = per_func.shape
    unscorable = np.isnan(per_func).all(axis=1)
    with np.errstate(all="ignore"):
        if aggregation == "sum_then_normalize":
            rewards = np.nansum(per_func * weights[None], axis=1)
            rewards[unscorable] = np.nan
            mean = np.repeat(np.nanmean(rewards.reshape(-1, group), axis=1), group)
            if scale in ("group", "none"):
                std = np.repeat(_np_nanstd(rewards.reshape(-1, group), axis=1), group)
            else:
                std = np.full(n, _np_nanstd(rewards))
            advantages = rewards - mean
            if scale != "none":
                advantages = advantages / (std + 1e-4)
        else:
            grouped = per_func.reshape(-1, group, f)
            mean_k = np.nanmean(grouped, axis=1, keepdims=True)
            std_k = _np_nanstd(grouped, axis=1, keepdims=True)
            reward_k = ((grouped - mean_k) / (std_k + 1e-4)).reshape(-1, f)
            rewards = np.nansum(reward_k * weights[None], axis=1)
            rewards[unscorable] = np.nan
            std = np.full(n, _np_nanstd(rewards))
            advantages = (rewards - np.nanmean(rewards)) / (std + 1e-4)
    zero_std = np.isclose(std, 0.0)
    return np.nan_to_num(advantages, nan=0.0), zero_std.mean()


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_numpy_transcription_of_trl(aggregation, scale):
    rng = np.random.default_rng(5)
    per_func = rng.integers(0, 3, size=(16, 3)).astype(np.float64)
    per_func[rng.random((16, 3)) < 0.25] = np.nan  # some None
    per_func[3] = np.nan  # unscorable row
    per_func[8:12, 0] = 1.0  # a group where function 0 has no spread
    weights = np.array([1.0, 0.5, 2.0])
    got, metrics = group_advantages(
        mx.array(per_func.astype(np.float32)), weights, 4, scale, aggregation
    )
    expected, frac_zero = _np_trl_advantages(per_func, weights, 4, scale, aggregation)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-4, atol=1e-5)
    assert np.array(got)[3] == 0.0  # all-None row: advantage 0
    assert metrics["frac_reward_zero_std"] == pytest.approx(frac_zero)


def test_unscorable_rows_are_left_out_of_the_group_baseline():
    """Hand-worked: group [1, 0, None, 1]: mean 2/3 over the three scored rows, std of
    [1, 0, 1] = 0.57735; the None row gets 0, not the advantage of a reward of 0."""
    scores = mx.array([[1.0], [0.0], [np.nan], [1.0]])
    got = np.array(group_advantages(scores, [1.0], 4, "group")[0])
    std = np.std([1.0, 0.0, 1.0], ddof=1)
    np.testing.assert_allclose(
        got,
        [(1 / 3) / (std + 1e-4), (-2 / 3) / (std + 1e-4), 0.0, (1 / 3) / (std + 1e-4)],
        rtol=1e-5,
    )


def test_reward_weights_scale_each_function():
    scores = mx.array([[1.0, 0.0], [0.0, 1.0]])
    # weight 3 on the first function: totals 3 and 1 -> advantages +1, -1 before scaling
    got = np.array(group_advantages(scores, [3.0, 1.0], 2, "none")[0])
    np.testing.assert_allclose(got, [1.0, -1.0])
    with pytest.raises(ValueError, match="1 reward weights for 2 reward functions"):
        group_advantages(scores, [1.0], 2, "group")
    with pytest.raises(ValueError, match="multi_objective_aggregation 'mean'"):
        group_advantages(scores, [1.0, 1.0], 2, "group", "mean")


def _np_trl_loss(
    logp,
    old,
    adv,
    mask,
    loss_type,
    eps_low,
    eps_high,
    beta=0.0,
    ref=None,
    max_len=None,
    num_items=None,
    level="token",
    delta=None,
):
    """TRL GRPOTrainer._compute_loss, transcribed to NumPy."""
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1))[:, None]
    coef_1 = np.exp(log_ratio)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = np.minimum(coef_1, delta)
    per_token = -np.minimum(coef_1 * adv[:, None], coef_2 * adv[:, None])
    if beta:
        kl = np.exp(ref - logp) - (ref - logp) - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / max(mask.sum(), 1)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * max_len)
    return (per_token * mask).sum() / (num_items if num_items is not None else mask.sum())


def _case(seed=0, rows=4, steps=6):
    rng = np.random.default_rng(seed)
    logp = -rng.random((rows, steps)).astype(np.float32) * 3
    old = logp + rng.normal(0, 0.3, (rows, steps)).astype(np.float32)
    ref = logp + rng.normal(0, 0.2, (rows, steps)).astype(np.float32)
    adv = rng.normal(0, 1, rows).astype(np.float32)
    mask = (rng.random((rows, steps)) > 0.3).astype(np.float32)
    mask[:, 0] = 1
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_matches_numpy_transcription_of_trl(loss_type, beta, level):
    logp, old, ref, adv, mask = _case()
    kwargs = dict(
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        max_completion_length=8,
        num_items_in_batch=30.0,
        importance_sampling_level=level,
    )
    got, metrics = grpo_loss(
        mx.array(logp),
        mx.array(old),
        mx.array(adv),
        mx.array(mask),
        ref_logprobs=mx.array(ref),
        **kwargs,
    )
    expected = _np_trl_loss(
        logp,
        old,
        adv,
        mask,
        loss_type,
        0.2,
        0.28,
        beta,
        ref,
        max_len=8,
        num_items=30.0,
        level=level,
    )
    assert abs(got.item() - expected) < 1e-5
    assert ("kl" in metrics) == (beta > 0)


def _hand_case():
    # two rows: 2 real tokens with advantage 2, 1 real token with advantage -1; ratio 1
    logp = mx.log(mx.array([[0.5, 0.25, 0.9, 0.9], [0.5, 0.9, 0.9, 0.9]]))
    mask = mx.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    return logp, mx.array([2.0, -1.0]), mask


@pytest.mark.parametrize(
    "loss_type, extra, expected",
    [
        ("grpo", {}, (-2.0 + 1.0) / 2),  # per-row token means, then mean over rows
        ("bnpo", {}, (-2.0 * 2 + 1.0) / 3),  # token mean over the batch
        ("dr_grpo", {"max_completion_length": 4}, (-4.0 + 1.0) / (2 * 4)),
        ("dapo", {"num_items_in_batch": 6.0}, (-4.0 + 1.0) / 6),  # whole generation batch
        ("dapo", {}, (-4.0 + 1.0) / 3),  # defaults to this batch's tokens
    ],
)
def test_each_loss_type_on_a_hand_worked_case(loss_type, extra, expected):
    logp, adv, mask = _hand_case()
    loss, _ = grpo_loss(
        logp, logp, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, **extra
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_clipping_and_delta_on_hand_worked_ratios():
    old = mx.zeros((1, 1))
    kw = dict(loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.28)
    ones = mx.ones((1, 1))
    # ratio 2, A = +1: min(2, 1.28) -> -1.28
    assert grpo_loss(mx.log(2 * ones), old, mx.array([1.0]), ones, **kw)[0].item() == (
        pytest.approx(-1.28)
    )
    # ratio 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> loss 0.8
    assert grpo_loss(mx.log(0.5 * ones), old, mx.array([-1.0]), ones, **kw)[0].item() == (
        pytest.approx(0.8)
    )
    # ratio 2, A = -1: unbounded -> loss 2; delta=1.5 caps it at 1.5
    assert grpo_loss(mx.log(2 * ones), old, mx.array([-1.0]), ones, **kw)[0].item() == (
        pytest.approx(2.0)
    )
    capped = grpo_loss(mx.log(2 * ones), old, mx.array([-1.0]), ones, delta=1.5, **kw)[0]
    assert capped.item() == pytest.approx(1.5)


def test_kl_is_k3_and_added_after_the_entropy_mask():
    logp = mx.log(mx.array([[0.5, 0.2]]))
    ref = mx.log(mx.array([[0.4, 0.3]]))
    mask = mx.ones((1, 2))
    diff = np.log([0.4, 0.3]) - np.log([0.5, 0.2])
    k3 = np.exp(diff) - diff - 1
    loss, metrics = grpo_loss(
        logp,
        logp,
        mx.array([1.0]),
        mask,
        loss_type="bnpo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        beta=0.1,
        ref_logprobs=ref,
        entropy_mask=mx.zeros((1, 2)),
    )
    # the entropy mask zeroes the surrogate but not the KL term (TRL's order)
    assert loss.item() == pytest.approx(0.1 * k3.mean(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(k3.mean(), rel=1e-5)


def test_sequence_level_clip_metrics_are_row_means():
    """TRL's masked_batch_mean: with (B, 1) sequence ratios the clip fraction is over rows."""
    logp = mx.array([[np.log(2.0), np.log(2.0), np.log(2.0)], [0.0, 0.0, 0.0]])
    mask = mx.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    _, metrics = grpo_loss(
        logp,
        mx.zeros((2, 3)),
        mx.array([1.0, 1.0]),
        mask,
        loss_type="grpo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        importance_sampling_level="sequence",
    )
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.5)  # 1 of 2 rows


def test_clip_ratio_metrics_count_clipped_tokens():
    logp = mx.log(mx.array([[2.0, 0.5, 1.0]]))  # ratios vs old=0: 2.0, 0.5, 1.0
    old = mx.zeros((1, 3))
    mask = mx.ones((1, 3))
    _, pos = grpo_loss(
        logp, old, mx.array([1.0]), mask, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2
    )
    _, neg = grpo_loss(
        logp, old, mx.array([-1.0]), mask, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2
    )
    assert pos["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert pos["clip_ratio/low_mean"].item() == 0
    assert neg["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert neg["clip_ratio/region_mean"].item() == pytest.approx(1 / 3)


def test_ratio_one_loss_is_minus_mean_advantage():
    """mu = 1: old = current, ratio 1, grpo loss = -mean(advantages) (TRL's documented value)."""
    logp = mx.array(-np.random.default_rng(1).random((3, 4)).astype(np.float32))
    adv = mx.array([0.5, -1.0, 2.0])
    loss, _ = grpo_loss(
        logp, logp, adv, mx.ones((3, 4)), loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2
    )
    assert loss.item() == pytest.approx(-np.mean([0.5, -1.0, 2.0]), abs=1e-6)


def test_finite_difference_gradient():
    logp, old, _, adv, mask = _case(seed=3, rows=2, steps=3)
    old = logp + 0.05  # inside the clip range, where the loss is smooth

    def loss_of(x):
        return grpo_loss(
            x,
            mx.array(old),
            mx.array(adv),
            mx.array(mask),
            loss_type="dapo",
            epsilon_low=0.2,
            epsilon_high=0.28,
        )[0]

    grad = np.array(mx.grad(loss_of)(mx.array(logp)))
    eps = 1e-3
    for i, j in [(0, 0), (1, 2), (0, 1)]:
        plus, minus = logp.copy(), logp.copy()
        plus[i, j] += eps
        minus[i, j] -= eps
        numeric = (loss_of(mx.array(plus)).item() - loss_of(mx.array(minus)).item()) / (2 * eps)
        assert grad[i, j] == pytest.approx(numeric, abs=2e-3)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type 'ppo'"):
        grpo_loss(
            mx.zeros((1, 1)),
            mx.zeros((1, 1)),
            mx.zeros(1),
            mx.ones((1, 1)),
            loss_type="ppo",
            epsilon_low=0.2,
            epsilon_high=0.2,
        )


def _rollout(tiny, seed=0):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in ["1+2=", "3+4=", "2+2=", "0+1="]]
    batch = generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(group_size=4, max_new_tokens=4), seed=seed
    )
    rewards = mx.array(np.random.default_rng(seed).random(batch.num_rows).astype(np.float32))
    return batch, compute_advantages(rewards, 4, "group")


def _params_after(tiny_path, cfg, seed=0, truncate_rows=(), zero_rows=(), update_seed=0):
    """Parameters and metrics after update_step with SGD(lr=1) on a fixed rollout (the
    parameter change is the gradient itself; Adam would amplify float noise)."""
    from stages.load_weights import load

    model, tokenizer = load(tiny_path, dtype="float32")
    batch, advantages = _rollout((model, tokenizer), seed=seed)
    for row in truncate_rows:
        batch.finish_reasons[row] = "length"
    if zero_rows:
        keep = np.ones(batch.num_rows, dtype=np.float32)
        keep[list(zero_rows)] = 0
        advantages = advantages * mx.array(keep)
    metrics = grpo_update.update_step(
        model, optim.SGD(learning_rate=1.0), batch, advantages, cfg, seed=update_seed
    )
    return dict(tree_flatten(model.parameters())), metrics


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("micro", [4, 5])  # 5: unequal micro-batches (5, 5, 5, 1)
def test_gradient_accumulation_equals_one_big_batch(tiny_path, loss_type, micro):
    base = dict(loss_type=loss_type, max_grad_norm=0)
    full, full_metrics = _params_after(tiny_path, TrainConfig(**base))
    accumulated, acc_metrics = _params_after(tiny_path, TrainConfig(micro_batch_size=micro, **base))
    assert full_metrics["grad_norm"] > 0
    assert acc_metrics["grad_norm"] == pytest.approx(full_metrics["grad_norm"], rel=1e-4)
    assert acc_metrics["loss"] == pytest.approx(full_metrics["loss"], rel=1e-4, abs=1e-7)
    assert acc_metrics["entropy"] == pytest.approx(full_metrics["entropy"], rel=1e-5)
    for name, value in full.items():
        np.testing.assert_allclose(np.array(accumulated[name]), np.array(value), atol=1e-5)


def test_steps_per_generation_matches_trl_buffer_reference(tiny_path):
    """k=2, mu=2: the batch is shuffled once, split in two, and the parts are stepped through
    twice with the generating policy's logprobs held fixed: 4 optimizer steps, reproduced here
    step by step with grpo_loss."""
    from stages.load_weights import load

    cfg = TrainConfig(loss_type="grpo", steps_per_generation=2, num_iterations=2, max_grad_norm=0)
    updated, metrics = _params_after(tiny_path, cfg, seed=2, update_seed=11)

    model, tokenizer = load(tiny_path, dtype="float32")
    batch, advantages = _rollout((model, tokenizer), seed=2)
    packed = policy.pack(batch)

    def logprobs_of(net, rows):
        part = policy.take_rows(packed, rows)
        return policy.token_logprobs(policy.completion_logits(net, part), part.completion_ids)

    every = mx.arange(batch.num_rows)
    old = mx.stop_gradient(logprobs_of(model, every))
    order = np.random.default_rng(11).permutation(batch.num_rows)
    parts = [mx.array(order[:8]), mx.array(order[8:])]
    optimizer = optim.SGD(learning_rate=1.0)
    for _ in range(2):
        for rows in parts:

            def loss_fn(net, rows=rows):
                return grpo_loss(
                    logprobs_of(net, rows),
                    old[rows],
                    advantages[rows],
                    packed.completion_mask[rows],
                    loss_type="grpo",
                    epsilon_low=0.2,
                    epsilon_high=0.28,
                )[0]

            _, grads = nn.value_and_grad(model, loss_fn)(model)
            optimizer.update(model, grads)
            mx.eval(model.parameters())
    assert metrics["optimizer_steps"] == 4
    for name, value in dict(tree_flatten(model.parameters())).items():
        np.testing.assert_allclose(np.array(updated[name]), np.array(value), atol=1e-5)


def test_steps_per_generation_must_divide_the_batch(tiny):
    batch, advantages = _rollout(tiny)
    with pytest.raises(ValueError, match="steps_per_generation=3 does not split"):
        grpo_update.update_step(
            tiny[0], optim.SGD(1.0), batch, advantages, TrainConfig(steps_per_generation=3)
        )


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_mask_truncated_completions_removes_their_gradient(tiny_path, loss_type):
    """grpo averages rows and dapo divides by the batch's tokens (truncated ones included, as
    TRL's num_items_in_batch), so masking rows = giving them advantage 0."""
    cut = (0, 5, 9)
    base = dict(loss_type=loss_type, max_grad_norm=0)
    masked, _ = _params_after(
        tiny_path, TrainConfig(mask_truncated_completions=True, **base), truncate_rows=cut
    )
    zeroed, _ = _params_after(tiny_path, TrainConfig(**base), zero_rows=cut)
    unmasked, _ = _params_after(tiny_path, TrainConfig(**base), truncate_rows=cut)
    name = next(iter(masked))
    for key, value in masked.items():
        np.testing.assert_allclose(np.array(value), np.array(zeroed[key]), atol=1e-6)
    assert not np.allclose(np.array(masked[name]), np.array(unmasked[name]), atol=1e-7)


def test_update_raises_logprob_of_advantaged_completions(tiny):
    model, tokenizer = tiny
    batch, advantages = _rollout(tiny, seed=4)
    packed = policy.pack(batch)

    def weighted_logprob():
        lp = policy.token_logprobs(policy.completion_logits(model, packed), packed.completion_ids)
        return ((lp * packed.completion_mask).sum(axis=1) * advantages).sum().item()

    before = weighted_logprob()
    optimizer = grpo_update.make_optimizer(1e-3)
    metrics = grpo_update.update_step(model, optimizer, batch, advantages, TrainConfig())
    assert weighted_logprob() > before
    assert metrics["grad_norm"] > 0 and metrics["entropy"] > 0
    assert set(metrics) >= {
        "loss",
        "grad_norm",
        "learning_rate",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/low_min",
        "clip_ratio/high_mean",
        "clip_ratio/high_max",
        "clip_ratio/region_mean",
    }


def test_clip_min_max_are_over_micro_batches(tiny_path):
    """After a big first step, later steps clip: low_min / high_max bound the means."""
    cfg = TrainConfig(num_iterations=3, micro_batch_size=4, max_grad_norm=0, loss_type="grpo")
    _, metrics = _params_after(tiny_path, cfg, seed=3)
    assert metrics["clip_ratio/high_max"] > 0 or metrics["clip_ratio/low_mean"] > 0
    assert metrics["clip_ratio/low_min"] <= metrics["clip_ratio/low_mean"]
    assert metrics["clip_ratio/high_max"] >= metrics["clip_ratio/high_mean"]
    assert metrics["optimizer_steps"] == 3


def test_num_iterations_and_kl_to_reference(tiny_path):
    from stages.load_weights import load

    model, tokenizer = load(tiny_path)
    reference, _ = load(tiny_path)
    reference.freeze()
    batch, advantages = _rollout((model, tokenizer))
    optimizer = grpo_update.make_optimizer(1e-2)
    metrics = grpo_update.update_step(
        model, optimizer, batch, advantages, TrainConfig(num_iterations=3, beta=0.1), reference
    )
    # After the first of 3 steps the policy has moved: KL > 0 on average.
    assert metrics["kl"] > 0
    assert optimizer.state["step"].item() == 3


def test_schedules_with_warmup():
    optimizer = grpo_update.make_optimizer(1.0, schedule="cosine", warmup_steps=2, total_steps=6)
    schedule = optimizer._schedulers["learning_rate"]
    values = [schedule(mx.array(s)).item() for s in range(7)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(0.75)
    assert values[2] == pytest.approx(1.0) and values[-1] < 0.2
    with pytest.raises(ValueError, match="lr schedule"):
        grpo_update.make_optimizer(1.0, schedule="step")
