"""stages/losses.py against TRL 1.16: every loss type, the KL, the high-entropy mask and the
sampler importance-sampling correction, each checked against the NumPy transcription of TRL's
code (tests/trl_reference.py: values, metrics and gradients) and on hand-worked cases."""

import math

from stages.losses import LOSS_TYPES, grpo_loss, sampler_importance_ratio, vespo_weights

import mlx.core as mx
import numpy as np
import pytest
from trl_reference import (
    LOSS_TYPES as TRL_LOSS_TYPES,
)
from trl_reference import (
    trl_loss,
    trl_loss_grad,
    trl_vllm_importance_sampling,
)


def test_every_trl_loss_type_is_a_row():
    assert tuple(LOSS_TYPES) == TRL_LOSS_TYPES


def _case(seed=0, rows=6, steps=5):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, steps + 1, size=rows)
    lengths[-1] = 0 if rows > 4 else lengths[-1]  # a row with no real token
    mask = (np.arange(steps)[None, :] < lengths[:, None]).astype(np.float64)
    logp = -rng.uniform(0.05, 2.5, size=(rows, steps)) * mask
    old = (logp + rng.normal(0, 0.35, size=(rows, steps))) * mask
    ref = (logp + rng.normal(0, 0.3, size=(rows, steps))) * mask
    sampler = (old + rng.normal(0, 0.2, size=(rows, steps))) * mask
    adv = rng.normal(0, 1, rows)
    adv[1] = 0.0  # sapo's and vespo's sign splits see A = 0
    entropies = rng.uniform(0, 3, size=(rows, steps)) * mask
    return logp, old, ref, sampler, adv, mask, entropies


def _f32(x):
    return x if isinstance(x, mx.array) else mx.array(np.asarray(x, dtype=np.float32))


def _ours(logp, old, adv, mask, **kwargs):
    arrays = {k: _f32(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    return grpo_loss(_f32(logp), _f32(old), _f32(adv), _f32(mask), **arrays)


def _trl_kwargs(loss_type, level, beta, ref, epsilon_high):
    return dict(
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=epsilon_high,
        beta=beta,
        ref_logprobs=ref,
        importance_sampling_level=level,
        num_items_in_batch=11.0,
        max_completion_length=7,
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_metrics_and_gradient_match_trl(loss_type, level, beta):
    logp, old, ref, _, adv, mask, _ = _case()
    epsilon_high = 5.0 if loss_type == "cispo" else 0.28
    expected, expected_metrics = trl_loss(
        logp, old, adv, mask, **_trl_kwargs(loss_type, level, beta, ref, epsilon_high)
    )
    kwargs = dict(
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=epsilon_high,
        importance_sampling_level=level,
        beta=beta,
        ref_logprobs=ref,
        num_items_in_batch=11.0,
        max_completion_length=7,
    )
    loss, metrics = _ours(logp, old, adv, mask, **kwargs)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    trl_names = {k for k in expected_metrics if k != "entropy"}
    assert set(metrics) == trl_names
    for name in trl_names:
        want = expected_metrics[name]
        got = metrics[name].item()
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-5), name

    # the gradient w.r.t. the log-probs, with TRL's detaches (cispo's weight, vespo's phi, the
    # differentiable ratio in the bias-corrected KL)
    def loss_of(x):
        return _ours(x, old, adv, mask, **kwargs)[0]

    got_grad = np.array(mx.grad(loss_of)(_f32(logp)))
    want_grad = trl_loss_grad(
        logp, old, adv, mask, **_trl_kwargs(loss_type, level, beta, ref, epsilon_high)
    )
    np.testing.assert_allclose(got_grad * mask, want_grad * mask, atol=2e-5)


def test_epsilon_high_none_is_epsilon_low():
    logp, old, _, _, adv, mask, _ = _case(seed=1)
    kwargs = dict(loss_type="dapo", epsilon_low=0.2)
    symmetric, _ = _ours(logp, old, adv, mask, epsilon_high=0.2, **kwargs)
    default, _ = _ours(logp, old, adv, mask, epsilon_high=None, **kwargs)
    wider, _ = _ours(logp, old, adv, mask, epsilon_high=0.28, **kwargs)
    assert default.item() == symmetric.item()
    assert wider.item() != symmetric.item()  # the case has ratios above 1.2 with A > 0


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
        ("luspo", {}, (-4.0 + 1.0) / 2),  # each row's summed loss, mean over rows
        # sapo at ratio 1: -(4 / tau) sigmoid(0) A = -2 A / tau; tau 1 for A > 0, 1.05 else
        ("sapo", {}, (-2.0 * 2 + (2.0 / 1.05) * 1.0) / 2),
        # cispo: -min(r, cap) A log p, r = 1: -A log p summed / tokens
        (
            "cispo",
            {"epsilon_high": 5.0},
            (-2 * (math.log(0.5) + math.log(0.25)) + math.log(0.5)) / 3,
        ),
        # vespo at ratio 1: phi(1) = 1, so -A log p summed / tokens, as cispo
        ("vespo", {}, (-2 * (math.log(0.5) + math.log(0.25)) + math.log(0.5)) / 3),
    ],
)
def test_each_loss_type_on_a_hand_worked_case(loss_type, extra, expected):
    logp, adv, mask = _hand_case()
    kwargs = {"epsilon_low": 0.2, "epsilon_high": 0.28, **extra}
    loss, _ = grpo_loss(logp, logp, adv, mask, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_off_policy_hand_worked_ratios_for_the_new_loss_types():
    """One token, old log p = 0, so the ratio is p; A = +1 unless said otherwise."""
    one = mx.ones((1, 1))
    old = mx.zeros((1, 1))
    kw = dict(epsilon_low=0.2, epsilon_high=0.28)

    def loss(loss_type, p, a=1.0, **extra):
        result = grpo_loss(
            mx.log(p * one), old, mx.array([a]), one, loss_type=loss_type, **kw | extra
        )
        return result[0].item(), {k: v.item() for k, v in result[1].items()}

    # cispo, cap 1.5: ratio 2 is capped to 1.5 (detached): loss -1.5 * log 2, clipped fraction 1
    value, metrics = loss("cispo", 2.0, epsilon_high=1.5)
    assert value == pytest.approx(-1.5 * math.log(2.0), rel=1e-6)
    assert metrics == {"cispo_clip_ratio": 1.0}
    # sapo, ratio 2, A = -1 (tau 1.05): -(4 / 1.05) sigmoid(1.05) (-1)
    value, metrics = loss("sapo", 2.0, a=-1.0)
    assert value == pytest.approx(4 / 1.05 / (1 + math.exp(-1.05)), rel=1e-6)
    assert metrics == {}
    # vespo, ratio w = 2, A = +1 (k 2, lambda 3): phi = e^3 * 4 * e^-6; loss -phi log 2
    value, metrics = loss("vespo", 2.0)
    phi = math.exp(3) * 4 * math.exp(-6)
    assert value == pytest.approx(-phi * math.log(2.0), rel=1e-5)
    assert metrics["vespo/phi_seq_mean"] == pytest.approx(phi, rel=1e-5)
    # luspo is the clipped surrogate: ratio 2, A = +1, clipped at 1.28, one token
    value, metrics = loss("luspo", 2.0)
    assert value == pytest.approx(-1.28)
    assert metrics["clip_ratio/high_mean"] == 1.0 and metrics["clip_ratio/high_max"] == 1.0


def test_vespo_weight_is_one_on_policy_and_folds_in_the_sampler_ratio():
    mask = mx.array([[1.0, 1.0, 0.0]])
    knobs = __import__("stages.losses", fromlist=["LossKnobs"]).LossKnobs()
    assert vespo_weights(mx.array([1.0]), mx.zeros((1, 3)), mask, None, knobs).item() == 1.0
    # sampler ratio 2 on one token: w = 2 as if the policy ratio were 2
    folded = vespo_weights(
        mx.array([1.0]), mx.zeros((1, 3)), mask, mx.array([[2.0, 1.0, 1.0]]), knobs
    )
    direct = vespo_weights(
        mx.array([1.0]), mx.array([[math.log(2.0), 0.0, 0.0]]), mask, None, knobs
    )
    assert folded.item() == pytest.approx(direct.item(), rel=1e-6)


def test_kl_is_bias_corrected_and_added_after_the_entropy_mask():
    logp = mx.log(mx.array([[0.5, 0.2]]))
    old = mx.log(mx.array([[0.4, 0.25]]))
    ref = mx.log(mx.array([[0.4, 0.3]]))
    mask = mx.ones((1, 2))
    diff = np.log([0.4, 0.3]) - np.log([0.5, 0.2])
    k3 = np.exp(diff) - diff - 1
    ratio = np.array([0.5 / 0.4, 0.2 / 0.25])
    kwargs = dict(
        loss_type="bnpo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        beta=0.1,
        ref_logprobs=ref,
        entropy_mask=mx.zeros((1, 2)),
    )
    loss, metrics = grpo_loss(logp, old, mx.array([1.0]), mask, **kwargs)
    # the entropy mask zeroes the surrogate but not the KL term (TRL's order); KL x ratio
    assert loss.item() == pytest.approx(0.1 * (k3 * ratio).mean(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx((k3 * ratio).mean(), rel=1e-5)
    plain, metrics = grpo_loss(
        logp, old, mx.array([1.0]), mask, use_bias_correction_kl=False, **kwargs
    )
    assert plain.item() == pytest.approx(0.1 * k3.mean(), rel=1e-5)


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


def test_clip_metrics_per_token_and_per_sequence_extremes():
    # ratios vs old = 0: row 0: 2.0, 0.5, 1.0; row 1: 1.0, 2.0 (and padding)
    logp = mx.log(mx.array([[2.0, 0.5, 1.0], [1.0, 2.0, 1.0]]))
    mask = mx.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    old = mx.zeros((2, 3))
    kw = dict(loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2)
    _, pos = grpo_loss(logp, old, mx.array([1.0, 1.0]), mask, **kw)
    _, neg = grpo_loss(logp, old, mx.array([-1.0, -1.0]), mask, **kw)
    assert pos["clip_ratio/high_mean"].item() == pytest.approx(2 / 5)
    assert pos["clip_ratio/high_max"].item() == pytest.approx(1 / 2)  # row 1: 1 of 2 tokens
    assert pos["clip_ratio/low_mean"].item() == 0 and pos["clip_ratio/low_min"].item() == 0
    assert neg["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert neg["clip_ratio/low_min"].item() == 0  # row 1 has no low-clipped token
    assert neg["clip_ratio/region_mean"].item() == pytest.approx(1 / 5)


def test_sequence_level_clip_metrics_are_row_means():
    """TRL's global_masked_mean: with (B, 1) sequence ratios the clip fraction is over rows."""
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
    assert metrics["clip_ratio/high_max"].item() == 1.0


def test_ratio_one_loss_is_minus_mean_advantage():
    """mu = 1: old = current, ratio 1, grpo loss = -mean(advantages) (TRL's documented value)."""
    logp = mx.array(-np.random.default_rng(1).random((3, 4)).astype(np.float32))
    adv = mx.array([0.5, -1.0, 2.0])
    loss, _ = grpo_loss(
        logp, logp, adv, mx.ones((3, 4)), loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2
    )
    assert loss.item() == pytest.approx(-np.mean([0.5, -1.0, 2.0]), abs=1e-6)


def test_unknown_loss_type_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        grpo_loss(
            mx.zeros((1, 1)),
            mx.zeros((1, 1)),
            mx.zeros(1),
            mx.ones((1, 1)),
            loss_type="ppo",
            epsilon_low=0.2,
            epsilon_high=0.2,
        )
    assert str(error.value) == (
        "loss_type 'ppo' is not one of grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo"
    )


# -- the sampler importance-sampling correction (TRL's vLLM correction) ------------------------


@pytest.mark.parametrize(
    "mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
)
@pytest.mark.parametrize("bounds", [(None, 3.0), (0.8, 1.25)])
def test_sampler_ratio_and_metrics_match_trl(mode, bounds):
    _, old, _, sampler, _, mask, _ = _case(seed=4)
    sampler = sampler.copy()
    sampler[0, 0] = np.nan  # the engine gave no log-prob there: ratio 1, left out of the gap
    clip_min, clip_max = bounds
    want_ratio, want_metrics = trl_vllm_importance_sampling(
        old, sampler, mask, mode=mode, clip_min=clip_min, clip_max=clip_max
    )
    ratio, metrics = sampler_importance_ratio(
        mx.array(old.astype(np.float32)),
        mx.array(sampler.astype(np.float32)),
        mx.array(mask.astype(np.float32)),
        mode=mode,
        clip_min=clip_min,
        clip_max=clip_max,
    )
    np.testing.assert_allclose(np.array(ratio), want_ratio, rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(want_metrics)
    for name, want in want_metrics.items():
        assert metrics[name].item() == pytest.approx(want, rel=1e-5, abs=1e-6), name


def test_sampler_ratio_on_a_hand_worked_case():
    # row 0: old - sampler = [0.5, -0.2]; row 1: [1.5, (pad)]
    old = mx.array([[-1.0, -1.2], [-0.5, 0.0]])
    sampler = mx.array([[-1.5, -1.0], [-2.0, 0.0]])
    mask = mx.array([[1.0, 1.0], [1.0, 0.0]])
    ratio, metrics = sampler_importance_ratio(
        old, sampler, mask, mode="token_truncate", clip_max=2.0
    )
    np.testing.assert_allclose(
        np.array(ratio), [[math.exp(0.5), math.exp(-0.2)], [2.0, 1.0]], rtol=1e-6
    )
    assert metrics["sampling/sampling_logp_difference/mean"].item() == pytest.approx(2.2 / 3)
    assert metrics["sampling/sampling_logp_difference/max"].item() == pytest.approx(1.5)
    assert metrics["sampling/importance_sampling_ratio/max"].item() == pytest.approx(2.0)
    ratio, metrics = sampler_importance_ratio(
        old, sampler, mask, mode="sequence_mask", clip_max=2.0
    )
    # sums 0.3 and 1.5: exp(0.3) kept, exp(1.5) = 4.48 > 2 masked to 0
    np.testing.assert_allclose(np.array(ratio), [[math.exp(0.3)], [0.0]], rtol=1e-6)
    assert metrics["sampling/importance_sampling_ratio/min"].item() == 0.0
    assert metrics["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(
        math.exp(0.3) / 2
    )


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo"])
def test_the_sampler_ratio_weights_the_loss_as_trl(loss_type):
    logp, old, ref, sampler, adv, mask, _ = _case(seed=6)
    want, _ = trl_loss(
        logp,
        old,
        adv,
        mask,
        loss_type=loss_type,
        epsilon_high=0.28,
        beta=0.04,
        ref_logprobs=ref,
        num_items_in_batch=11.0,
        sampling_logprobs=sampler,
        vllm_is_mode="token_truncate",
        vllm_is_clip_max=1.5,
    )
    ratio, _ = sampler_importance_ratio(
        mx.array(old.astype(np.float32)),
        mx.array(sampler.astype(np.float32)),
        mx.array(mask.astype(np.float32)),
        mode="token_truncate",
        clip_max=1.5,
    )
    loss, _ = _ours(
        logp,
        old,
        adv,
        mask,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=0.04,
        ref_logprobs=ref,
        num_items_in_batch=11.0,
        sampler_ratio=ratio,
    )
    assert loss.item() == pytest.approx(want, rel=1e-5)
    unweighted, _ = _ours(
        logp, old, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
        beta=0.04, ref_logprobs=ref, num_items_in_batch=11.0,
    )  # fmt: skip
    assert unweighted.item() != pytest.approx(want, rel=1e-5)  # the ratio mattered
