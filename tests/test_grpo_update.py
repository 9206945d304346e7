from stages import grpo_update
from stages.grpo_update import UpdateConfig, compute_advantages, grpo_loss
from stages.rollout import RolloutConfig, generate_rollouts

import mlx.core as mx
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
        model, tokenizer, prompts, RolloutConfig(group_size=4, max_new_tokens=4, seed=seed)
    )
    rewards = mx.array(np.random.default_rng(seed).random(batch.num_rows).astype(np.float32))
    return batch, compute_advantages(rewards, 4, "group")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_equals_one_big_batch(tiny_path, loss_type):
    from stages.load_weights import load

    results = []
    for micro in (0, 4):
        model, tokenizer = load(tiny_path, dtype="float32")
        batch, advantages = _rollout((model, tokenizer))
        # SGD: the parameter change is the gradient itself (Adam would amplify float noise in
        # near-zero gradients to full-size steps).
        optimizer = optim.SGD(learning_rate=1.0)
        metrics = grpo_update.update_step(
            model,
            optimizer,
            batch,
            advantages,
            UpdateConfig(loss_type=loss_type, micro_batch_size=micro, max_grad_norm=0),
        )
        results.append((dict(tree_flatten(model.parameters())), metrics))
    (full, full_metrics), (accumulated, acc_metrics) = results
    assert full_metrics["grad_norm"] == pytest.approx(acc_metrics["grad_norm"], rel=1e-4)
    for name, value in full.items():
        np.testing.assert_allclose(np.array(accumulated[name]), np.array(value), atol=1e-5)


def test_update_raises_logprob_of_advantaged_completions(tiny):
    model, tokenizer = tiny
    batch, advantages = _rollout(tiny, seed=4)
    packed = grpo_update.pack(batch)

    def weighted_logprob():
        lp = grpo_update.token_logprobs(
            grpo_update.completion_logits(model, packed), packed.completion_ids
        )
        return ((lp * packed.completion_mask).sum(axis=1) * advantages).sum().item()

    before = weighted_logprob()
    optimizer = grpo_update.make_optimizer(1e-3)
    metrics = grpo_update.update_step(model, optimizer, batch, advantages, UpdateConfig())
    assert weighted_logprob() > before
    assert metrics["grad_norm"] > 0 and metrics["entropy"] > 0
    assert set(metrics) >= {
        "loss",
        "grad_norm",
        "learning_rate",
        "entropy",
        "clip_ratio/region_mean",
    }


def test_num_iterations_and_kl_to_reference(tiny_path):
    from stages.load_weights import load

    model, tokenizer = load(tiny_path)
    reference, _ = load(tiny_path)
    reference.freeze()
    batch, advantages = _rollout((model, tokenizer))
    optimizer = grpo_update.make_optimizer(1e-2)
    metrics = grpo_update.update_step(
        model, optimizer, batch, advantages, UpdateConfig(num_iterations=3, beta=0.1), reference
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
