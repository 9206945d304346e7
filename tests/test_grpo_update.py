from stages import grpo_update
from stages.advantages import compute_advantages, group_advantages
from stages.grpo_update import TrainConfig
from stages.rollout import RolloutConfig, generate_rollouts

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from trl_reference import (
    trl_loss,
    trl_loss_grad,
    trl_split_generation_batch,
    trl_truncation_and_num_items,
    trl_vllm_importance_sampling,
)


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


def test_informative_groups_are_those_whose_rewards_differ():
    from stages.advantages import informative_groups

    scores = mx.array(
        [
            [1.0, 0.0], [1.0, 0.0],  # equal totals: no gradient
            [1.0, 0.0], [0.0, 0.0],  # differ
            [1.0, np.nan], [np.nan, 1.0],  # weighted totals 1 and 2: differ
            [np.nan, np.nan], [1.0, 0.0],  # one scored row only
            [0.0, 2.0], [1.0, 0.0],  # 1*0 + 0.5*2 = 1 = 1*1: equal under the weights
        ]
    )  # fmt: skip
    got = informative_groups(scores, [1.0, 2.0], 2)
    assert got.tolist() == [False, True, True, False, True]
    got = informative_groups(scores, [1.0, 0.5], 2)
    assert got.tolist() == [False, True, True, False, False]
    # the same groups group_advantages gives a zero advantage
    advantages = np.array(group_advantages(scores, [1.0, 0.5], 2)[0]).reshape(-1, 2)
    assert (np.abs(advantages).max(axis=1) > 0).tolist() == got.tolist()


def test_reward_weights_scale_each_function():
    scores = mx.array([[1.0, 0.0], [0.0, 1.0]])
    # weight 3 on the first function: totals 3 and 1 -> advantages +1, -1 before scaling
    got = np.array(group_advantages(scores, [3.0, 1.0], 2, "none")[0])
    np.testing.assert_allclose(got, [1.0, -1.0])
    with pytest.raises(ValueError, match="1 reward weights for 2 reward functions"):
        group_advantages(scores, [1.0], 2, "group")
    with pytest.raises(ValueError, match="multi_objective_aggregation 'mean'"):
        group_advantages(scores, [1.0, 1.0], 2, "group", "mean")


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


# -- the update against TRL's optimizer loop ---------------------------------------------------


def _plain_forward(model, batch, rows, temperature):
    """(len(rows), T) log-probs and entropies of each completion token at `temperature`, one
    row at a time through the model's full logits over its whole prompt and completion (tool
    tokens included; no packing, no gathered head): an independent forward for the reference.
    0 past each completion."""
    mask = np.array(batch.completion_mask)
    width = mask.shape[1]
    logprobs, entropies = [], []
    for row in rows:
        prompt, n = batch.prompt_ids[row], int(mask[row].sum())
        ids = np.array(batch.completion_ids[row])[:n].tolist()
        logits = model(mx.array([prompt + ids]))[0, len(prompt) - 1 : len(prompt) - 1 + n]
        logp = nn.log_softmax(logits.astype(mx.float32) / temperature, axis=-1)
        picked = mx.take_along_axis(logp, mx.array(ids)[:, None], axis=-1)[:, 0]
        entropy = -(mx.exp(logp) * logp).sum(-1)
        pad = mx.zeros(width - n)
        logprobs.append(mx.concatenate([picked, pad]))
        entropies.append(mx.concatenate([entropy, pad]))
    return mx.stack(logprobs), mx.stack(entropies)


def _trl_reference_update(model, batch, advantages, cfg, *, ref_model=None, seed=0):
    """TRL 1.16's optimizer loop over one generation batch, built from tests/trl_reference.py:
    the rows shuffled and split into TRL's micro-batches (steps_per_generation x accumulation
    steps), each micro-batch's d loss / d log-probs from the NumPy transcription of
    `_compute_loss` (trl_loss_grad), back-propagated through `_plain_forward`, SGD(lr=1), no
    clipping. Returns (parameters, metrics as TRL logs them: micro-step values averaged)."""
    temperature = batch.temperature or 1.0
    n = batch.num_rows
    every = np.arange(n)
    mask = np.array(batch.completion_mask, dtype=np.float64)
    tool_mask = None if batch.tool_mask is None else np.array(batch.tool_mask, dtype=np.float64)
    truncated = np.array([r == "length" for r in batch.finish_reasons])
    mask, tool_mask, num_items = trl_truncation_and_num_items(
        mask,
        is_truncated=truncated,
        tool_mask=tool_mask,
        mask_truncated_completions=cfg.mask_truncated_completions,
    )
    if tool_mask is not None:  # TRL's loss mask: completion_mask * tool_mask (T:3027)
        mask = mask * tool_mask
    parts = cfg.steps_per_generation
    accumulation = (n // parts) // (cfg.micro_batch_size or n // parts)
    trl_steps_per_generation = parts * accumulation  # TRL's unit: micro-batches
    order = np.random.default_rng(seed).permutation(n) if parts > 1 else every
    micro = trl_split_generation_batch(n, trl_steps_per_generation, permutation=order)
    correction = bool(cfg.vllm_importance_sampling_correction)

    def values(net, rows):
        logprobs, entropies = _plain_forward(net, batch, rows, temperature)
        return np.array(logprobs, dtype=np.float64), np.array(entropies, dtype=np.float64)

    old = values(model, every)[0] if cfg.num_iterations * parts > 1 or correction else None
    ref = values(ref_model, every)[0] if cfg.beta else None
    ratio, sampling = None, {}
    if correction:
        ratio, sampling = trl_vllm_importance_sampling(
            old,
            np.array(batch.logprobs, dtype=np.float64),
            mask,
            mode=cfg.vllm_importance_sampling_mode,
            clip_min=cfg.vllm_importance_sampling_clip_min,
            clip_max=cfg.sampler_clip_max,
        )
    adv = np.array(advantages, dtype=np.float64)
    knobs = dict(
        loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        beta=cfg.beta,
        delta=cfg.delta,
        importance_sampling_level=cfg.importance_sampling_level,
        num_items_in_batch=num_items,
        max_completion_length=mask.shape[1],
        top_entropy_quantile=cfg.top_entropy_quantile,
        use_bias_correction_kl=cfg.use_bias_correction_kl,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=trl_steps_per_generation,
    )
    optimizer = optim.SGD(learning_rate=1.0)
    logged, losses = [], []
    for _ in range(cfg.num_iterations):
        for step in range(parts):
            grads, step_loss = None, 0.0
            for m in range(accumulation):
                rows = micro[step * accumulation + m][0]
                logprobs, entropies = values(model, rows)
                inputs = dict(
                    entropies=entropies,
                    ref_logprobs=None if ref is None else ref[rows],
                    importance_sampling_ratio=None if ratio is None else ratio[rows],
                )
                args = (logprobs, None if old is None else old[rows], adv[rows], mask[rows])
                loss, metrics = trl_loss(*args, **inputs, **knobs)
                cotangent = mx.array(trl_loss_grad(*args, **inputs, **knobs).astype(np.float32))

                def linear(net, rows=rows, cotangent=cotangent):
                    return (_plain_forward(net, batch, rows, temperature)[0] * cotangent).sum()

                _, micro_grads = nn.value_and_grad(model, linear)(model)
                if grads is not None:
                    micro_grads = tree_map(lambda a, b: a + b, grads, micro_grads)
                grads = micro_grads
                step_loss += loss
                logged.append(metrics)
            optimizer.update(model, grads)
            mx.eval(model.parameters())
            losses.append(step_loss)
    metrics = {"loss": float(np.mean(losses)), **sampling}
    for name in logged[0]:
        finite = [m[name] for m in logged if m[name] is not None and not np.isnan(m[name])]
        metrics[name] = float(np.mean(finite)) if finite else float("nan")
    return dict(tree_flatten(model.parameters())), metrics


REFERENCE_CASES = {
    # dapo with two optimizer steps per generation batch: each divides by half the tokens
    "dapo-spg2": dict(loss_type="dapo", steps_per_generation=2),
    "dapo-spg2-mu2-micro4": dict(
        loss_type="dapo", steps_per_generation=2, num_iterations=2, micro_batch_size=4
    ),
    "grpo-spg2-mu2": dict(loss_type="grpo", steps_per_generation=2, num_iterations=2),
    # bnpo under accumulation: the mean of each micro-batch's token mean
    "bnpo-micro4": dict(loss_type="bnpo", micro_batch_size=4, num_iterations=2),
    "dr_grpo-spg2-micro4": dict(loss_type="dr_grpo", steps_per_generation=2, micro_batch_size=4),
    # truncated completions masked: dapo counts its tokens after masking
    "dapo-truncated": dict(loss_type="dapo", mask_truncated_completions=True, num_iterations=2),
    # the high-entropy mask through the update, its quantile per micro-batch
    "dapo-entropy-micro8": dict(
        loss_type="dapo", top_entropy_quantile=0.3, micro_batch_size=8, num_iterations=2
    ),
    # KL to a reference, bias-corrected, after the policy moved
    "grpo-beta-mu3": dict(loss_type="grpo", beta=0.1, num_iterations=3),
    "dapo-beta-uncorrected": dict(
        loss_type="dapo", beta=0.1, num_iterations=2, use_bias_correction_kl=False
    ),
    "grpo-delta-mu3-micro4": dict(
        loss_type="grpo", delta=1.05, num_iterations=3, micro_batch_size=4, epsilon_high=0.28
    ),
    "cispo-spg2-mu2": dict(
        loss_type="cispo", epsilon_high=1.1, steps_per_generation=2, num_iterations=2
    ),
    "sapo-mu2": dict(loss_type="sapo", num_iterations=2),
    "luspo-sequence-mu2": dict(
        loss_type="luspo", importance_sampling_level="sequence", num_iterations=2
    ),
    "vespo-spg2-mu2": dict(loss_type="vespo", steps_per_generation=2, num_iterations=2),
    # the sampler importance-sampling correction (the rollout's own log-probs)
    "dapo-is-token_truncate": dict(
        loss_type="dapo",
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_max=1.1,
        vllm_importance_sampling_clip_min=0.95,
    ),
    "grpo-is-sequence_mask-mu2": dict(
        loss_type="grpo",
        num_iterations=2,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_cap=1.3,
    ),
    "vespo-is-token_mask": dict(
        loss_type="vespo",
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode="token_mask",
        vllm_importance_sampling_clip_max=1.1,
    ),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_update_matches_trl_optimizer_loop(tiny_path, case):
    from stages.load_weights import load

    cfg = TrainConfig(max_grad_norm=0, **REFERENCE_CASES[case])
    truncate = (0, 5, 9) if cfg.mask_truncated_completions else ()

    def fresh():
        model, tokenizer = load(tiny_path, dtype="float32")
        batch, advantages = _rollout((model, tokenizer), seed=2)
        for row in truncate:
            batch.finish_reasons[row] = "length"
        if cfg.vllm_importance_sampling_correction:
            # an engine that rounds differently: its log-probs off by up to +-0.1 per token
            noise = np.random.default_rng(3).uniform(-0.1, 0.1, size=batch.logprobs.shape)
            batch.logprobs = batch.logprobs + mx.array(noise.astype(np.float32))
        return model, batch, advantages

    reference = load(tiny_path, dtype="float32")[0] if cfg.beta else None
    model, batch, advantages = fresh()
    got = grpo_update.update_step(
        model, optim.SGD(learning_rate=1.0), batch, advantages, cfg, reference, seed=11
    )
    ours = dict(tree_flatten(model.parameters()))
    model, batch, advantages = fresh()
    want_params, want = _trl_reference_update(
        model, batch, advantages, cfg, ref_model=reference, seed=11
    )
    for name, value in want_params.items():
        np.testing.assert_allclose(np.array(ours[name]), np.array(value), atol=2e-5, err_msg=name)
    assert got["optimizer_steps"] == cfg.num_iterations * cfg.steps_per_generation
    assert set(want) <= set(got)
    for name, value in want.items():
        if np.isnan(value):
            assert np.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    moved = max(np.abs(np.array(ours[k]) - np.array(v)).max() for k, v in _start(tiny_path).items())
    assert moved > 1e-3  # the update did something: the comparison is not vacuous


def _start(tiny_path):
    from stages.load_weights import load

    return dict(tree_flatten(load(tiny_path, dtype="float32")[0].parameters()))


@pytest.mark.parametrize(
    "loss_type", ["grpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
)
@pytest.mark.parametrize("micro", [4, 5])  # 5: unequal micro-batches (5, 5, 5, 1)
def test_gradient_accumulation_equals_one_big_batch(tiny_path, loss_type, micro):
    """Every loss type but bnpo (TRL's bnpo is a mean of micro-batch token means, above)."""
    base = dict(loss_type=loss_type, max_grad_norm=0, num_iterations=2)
    full, full_metrics = _params_after(tiny_path, TrainConfig(**base))
    accumulated, acc_metrics = _params_after(tiny_path, TrainConfig(micro_batch_size=micro, **base))
    assert full_metrics["grad_norm"] > 1e-3
    assert acc_metrics["grad_norm"] == pytest.approx(full_metrics["grad_norm"], rel=1e-4)
    assert acc_metrics["loss"] == pytest.approx(full_metrics["loss"], rel=1e-4, abs=1e-7)
    for name, value in full.items():
        np.testing.assert_allclose(np.array(accumulated[name]), np.array(value), atol=1e-5)


def test_steps_per_generation_must_divide_the_batch(tiny):
    batch, advantages = _rollout(tiny)
    with pytest.raises(ValueError, match="steps_per_generation=3 does not split"):
        grpo_update.update_step(
            tiny[0], optim.SGD(1.0), batch, advantages, TrainConfig(steps_per_generation=3)
        )


def test_mask_truncated_completions_hand_worked(tiny_path):
    """Masking rows is giving them advantage 0, and dapo then divides by the tokens that are
    left (TRL counts num_items_in_batch after masking): with SGD(lr=1) the change of the weights
    is the gradient, so masked = zeroed x (all tokens / tokens left). grpo averages over rows,
    masked or not: masked = zeroed."""
    from stages.load_weights import load

    cut = (0, 5, 9)
    start = _start(tiny_path)
    batch, _ = _rollout(load(tiny_path, dtype="float32"), seed=0)
    lengths = np.array(batch.completion_mask).sum(axis=1)
    kept_share = lengths.sum() / np.delete(lengths, cut).sum()
    for loss_type, factor in (("dapo", kept_share), ("grpo", 1.0)):
        base = dict(loss_type=loss_type, max_grad_norm=0)
        masked, _ = _params_after(
            tiny_path, TrainConfig(mask_truncated_completions=True, **base), truncate_rows=cut
        )
        zeroed, _ = _params_after(tiny_path, TrainConfig(**base), zero_rows=cut)
        for key, value in masked.items():
            np.testing.assert_allclose(
                np.array(value) - np.array(start[key]),
                factor * (np.array(zeroed[key]) - np.array(start[key])),
                atol=1e-6,
                err_msg=f"{loss_type} {key}",
            )
    assert kept_share > 1.2  # the masked rows hold a real share of the tokens


def test_update_logs_trl_metric_names(tiny_path):
    cases = {
        "dapo": {"clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean",
                 "clip_ratio/high_max", "clip_ratio/region_mean"},
        "cispo": {"cispo_clip_ratio"},
        "vespo": {"vespo/phi_seq_mean"},
        "sapo": set(),
    }  # fmt: skip
    common = {"loss", "grad_norm", "learning_rate", "entropy", "optimizer_steps"}
    for loss_type, names in cases.items():
        _, metrics = _params_after(tiny_path, TrainConfig(loss_type=loss_type))
        assert set(metrics) == common | names, loss_type
    _, metrics = _params_after(tiny_path, TrainConfig(vllm_importance_sampling_correction=True))
    assert {name for name in metrics if name.startswith("sampling/")} == {
        "sampling/sampling_logp_difference/mean",
        "sampling/sampling_logp_difference/max",
        "sampling/importance_sampling_ratio/min",
        "sampling/importance_sampling_ratio/mean",
        "sampling/importance_sampling_ratio/max",
    }


def test_num_iterations_steps_the_optimizer_each_time(tiny_path):
    from stages.load_weights import load

    model, tokenizer = load(tiny_path)
    batch, advantages = _rollout((model, tokenizer))
    optimizer = grpo_update.make_optimizer(1e-2)
    metrics = grpo_update.update_step(
        model, optimizer, batch, advantages, TrainConfig(num_iterations=3)
    )
    assert optimizer.state["step"].item() == 3 and metrics["optimizer_steps"] == 3


def test_adamw_corrects_its_bias_as_torch():
    """Hand-worked first step of torch's AdamW: m = (1 - b1) g, v = (1 - b2) g^2, bias-corrected
    to g and g^2, so the step is lr * g / (|g| + eps): lr in the direction of each sign."""
    optimizer = grpo_update.make_optimizer(0.1, weight_decay=0.0)
    params = {"w": mx.array([1.0, -2.0, 3.0])}
    grads = {"w": mx.array([0.5, -0.01, 4.0])}
    updated = optimizer.apply_gradients(grads, params)
    g = np.array([0.5, -0.01, 4.0])
    np.testing.assert_allclose(
        np.array(updated["w"]), np.array([1.0, -2.0, 3.0]) - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-6
    )


def test_schedules_with_warmup():
    optimizer = grpo_update.make_optimizer(1.0, schedule="cosine", warmup_steps=2, total_steps=6)
    schedule = optimizer._schedulers["learning_rate"]
    values = [schedule(mx.array(s)).item() for s in range(7)]
    # warmup from lr / 2 to lr over 2 steps, then cosine over the 4 left
    cosine = [0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(5)]
    np.testing.assert_allclose(values, [0.5, 0.75, *cosine], atol=1e-6)
    with pytest.raises(ValueError, match="lr schedule"):
        grpo_update.make_optimizer(1.0, schedule="step")


# -- micro_batch_size=auto --------------------------------------------------------------------


def test_plan_micro_batch_fits_the_budget_and_undoes_its_probes(tiny_path):
    """The planned micro-batch's real update stays within the budget, one more row would not
    fit by the plan's own measure, and the probe steps leave weights and optimizer as they were."""
    from stages.load_weights import load

    model, _ = load(tiny_path, dtype="float32")
    optimizer = optim.AdamW(learning_rate=1e-2)
    cfg = TrainConfig(micro_batch_size="auto")
    before = _start(tiny_path)
    kwargs = dict(max_rows=64, prompt_tokens=12, completion_tokens=400)
    probe = grpo_update.plan_micro_batch(model, optimizer, cfg, budget_bytes=1 << 40, **kwargs)
    assert probe.rows == 64  # a huge budget: capped at the rows there are
    assert probe.per_row_bytes > 0 and probe.tokens == 412
    for name, value in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(before[name]))
    assert all(
        float(mx.abs(v).max()) == 0
        for k, v in tree_flatten(optimizer.state)
        if k.endswith(".m") or k.endswith(".v")
    )

    usable = probe.fixed_bytes + 5 * probe.per_row_bytes + probe.per_row_bytes // 2
    budget = int(usable / 0.9) + 1  # a tenth is kept for the run's second part in flight
    plan = grpo_update.plan_micro_batch(model, optimizer, cfg, budget_bytes=budget, **kwargs)
    assert 3 <= plan.rows <= 7  # about 5: peaks are measured, not exact
    assert plan.fixed_bytes + plan.rows * plan.per_row_bytes <= 0.9 * budget
    assert plan.fixed_bytes + (plan.rows + 1) * plan.per_row_bytes > 0.9 * budget
    assert f"{plan.rows} rows per micro-batch" in plan.describe()


def test_plan_micro_batch_refuses_a_budget_below_one_row(tiny):
    model, _ = tiny
    with pytest.raises(grpo_update.MemoryBudgetError, match="cannot hold one row of 36 tokens"):
        grpo_update.plan_micro_batch(
            model,
            optim.AdamW(learning_rate=1e-2),
            TrainConfig(micro_batch_size="auto"),
            max_rows=8,
            prompt_tokens=12,
            completion_tokens=24,
            budget_bytes=1000,
        )


def test_micro_batch_size_auto_is_checked_and_planned_first(tiny):
    assert TrainConfig(micro_batch_size="auto").validate() is None
    for bad in ("all", -1, 1.5, True):
        with pytest.raises(ValueError, match="micro_batch_size"):
            TrainConfig(micro_batch_size=bad).validate()
    with pytest.raises(ValueError, match="memory_budget_gb"):
        TrainConfig(memory_budget_gb=0).validate()
    batch, advantages = _rollout(tiny)
    with pytest.raises(ValueError, match="plan_micro_batch"):
        grpo_update.update_step(
            tiny[0],
            optim.SGD(learning_rate=1.0),
            batch,
            advantages,
            TrainConfig(micro_batch_size="auto"),
        )


@pytest.fixture(params=[True, False], ids=["scalars-outside", "traced"])
def adamw_form(request, monkeypatch):
    """make_optimizer's FusedAdamW in each of its two forms (the CPU's default: the step's
    scalars passed in; a GPU's: AdamW.apply_single traced)."""

    class Form(grpo_update.FusedAdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, scalars_outside=request.param, **kwargs)

    monkeypatch.setattr(grpo_update, "FusedAdamW", Form)
    return request.param


def test_the_cpu_passes_the_scalars_in():
    optimizer = grpo_update.make_optimizer(1e-3)
    assert optimizer.scalars_outside == (mx.default_device() == mx.cpu)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_fused_adamw_is_mlx_adamw(dtype, monkeypatch, adamw_form):
    """The compiled per-array update gives MLX AdamW's numbers through a warmup and cosine
    schedule (the learning rate changes every step without a retrace) and weight decay: bit for
    bit on CPU; on a GPU the fused kernel may contract multiply-adds, so within a few units of
    the last place (measured on an H200: not bit-equal in float32). Without a compiler for CPU
    kernels the plain update runs."""
    exact = mx.default_device() == mx.cpu

    def same(a, b):
        if exact:
            return mx.array_equal(a, b).item()
        # The unfused reference rounds every elementwise step to the dtype, the fused kernel
        # does not: where m's two terms cancel the difference is of the terms' size, so the
        # tolerance is relative to the array's scale (a few bfloat16 ulps).
        rtol = 1e-5 if dtype == mx.float32 else 2e-2
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        return mx.allclose(a, b, rtol=rtol, atol=rtol * mx.abs(b).max().item()).item()

    optimizer = grpo_update.make_optimizer(
        1e-3, schedule="cosine", warmup_steps=2, total_steps=6, weight_decay=0.1
    )
    assert optimizer._new_parameter is not None
    reference = optim.AdamW(
        learning_rate=optimizer._schedulers["learning_rate"],
        betas=[0.9, 0.999],
        eps=1e-8,
        weight_decay=0.1,
        bias_correction=True,
    )
    mx.random.seed(0)
    ours = {
        "w": mx.random.normal((40, 24)).astype(dtype),
        "b": mx.random.normal((7,)).astype(dtype),
    }
    theirs, start = dict(ours), dict(ours)
    for _ in range(6):
        grads = {k: mx.random.normal(v.shape).astype(dtype) for k, v in ours.items()}
        ours = optimizer.apply_gradients(grads, ours)
        theirs = reference.apply_gradients(grads, theirs)
        mx.eval(ours, theirs, optimizer.state, reference.state)
        for key in ours:
            assert same(ours[key], theirs[key])
            assert same(optimizer.state[key]["m"], reference.state[key]["m"])
            assert same(optimizer.state[key]["v"], reference.state[key]["v"])
    assert not mx.array_equal(ours["w"], start["w"])
    if mx.default_device() == mx.cpu:
        monkeypatch.setattr(grpo_update.shutil, "which", lambda name: None)
        assert grpo_update.make_optimizer(1e-3)._new_parameter is None


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_fused_adamw_scales_the_gradients_as_clip_grad_norm(dtype, adamw_form):
    """update(..., gradient_scale=s) inside the compiled kernels gives MLX AdamW applied to
    optim.clip_grad_norm's clipped gradients (bit for bit on CPU)."""
    optimizer = grpo_update.make_optimizer(1e-3, weight_decay=0.1)
    reference = optim.AdamW(learning_rate=1e-3, weight_decay=0.1, bias_correction=True)
    mx.random.seed(1)
    ours, theirs = nn.Linear(24, 40), nn.Linear(24, 40)
    ours.set_dtype(dtype)
    theirs.update(ours.parameters())
    for _ in range(3):
        grads = tree_map(lambda p: 5 * mx.random.normal(p.shape).astype(dtype), ours.parameters())
        clipped, norm = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(ours, grads, gradient_scale=mx.minimum(1.0 / (norm + 1e-6), 1.0))
        reference.update(theirs, clipped)
        mx.eval(ours.parameters(), theirs.parameters(), optimizer.state, reference.state)
        for (name, a), (_, b) in zip(
            tree_flatten(ours.parameters()), tree_flatten(theirs.parameters())
        ):
            if mx.default_device() == mx.cpu:
                assert mx.array_equal(a, b).item(), name
            else:
                assert mx.allclose(a, b, rtol=2e-2, atol=1e-6).item(), name


def test_a_clipped_update_writes_in_place():
    """The parameters, then the moments, updated in place with clipping: no gradient-sized
    copy (the scaled gradients) is held between the two evaluations. (The device's own form of
    FusedAdamW: on an H200 the CPU's form held one more buffer per moment.)"""
    optimizer = grpo_update.make_optimizer(1e-3)
    model = nn.Linear(1024, 1024, bias=False)  # 4 MiB of float32
    size = model.weight.nbytes
    for _ in range(2):  # the first step creates the moments
        grads = {"weight": mx.random.normal(model.weight.shape)}
        mx.eval(grads, model.parameters(), optimizer.state)
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        optimizer.update(model, grads, gradient_scale=mx.array(0.5))
        grpo_update.eval_by_block(model.parameters())
        between = mx.get_active_memory()
        grpo_update.eval_by_block(optimizer.state)
    assert between - before < size // 2
    assert mx.get_peak_memory() - before < size // 2


def test_global_norm_squares_a_slab_at_a_time(monkeypatch):
    """The global norm (as optim.clip_grad_norm's, within float32 summation error), with at
    most NORM_SLAB squares in memory at once."""
    monkeypatch.setattr(grpo_update, "NORM_SLAB", 1 << 16)
    mx.random.seed(3)
    grads = {"a": mx.random.normal((1024, 512)), "b": [mx.random.normal((7,)), mx.array(2.0)]}
    mx.eval(grads)
    want = np.sqrt(sum((np.array(g, dtype=np.float64) ** 2).sum() for _, g in tree_flatten(grads)))
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    got = grpo_update.global_norm(grads)
    mx.eval(got)
    assert mx.get_peak_memory() - before <= 2 * (1 << 16) * 4  # a slab's squares (float32)
    assert got.item() == pytest.approx(want, rel=2e-5)
    assert got.item() == pytest.approx(optim.clip_grad_norm(grads, 1.0)[1].item(), rel=2e-4)


@pytest.mark.parametrize("checkpointing", [False, True, "mlp", "elementwise"])
def test_checkpointing_keeps_one_part_in_flight(tiny, monkeypatch, checkpointing):
    """With gradient checkpointing of blocks or MLPs (asked for to save memory) the staged
    evaluation keeps one part in flight; without, or with "elementwise" (no matmul recomputed),
    the default two on a GPU; on the CPU always one. The setting is restored afterwards."""
    from stages.policy import StagedEval

    seen = []
    run = StagedEval.run
    monkeypatch.setattr(
        StagedEval, "run", lambda self: seen.append(StagedEval.in_flight) or run(self)
    )
    batch, advantages = _rollout(tiny)
    cfg = TrainConfig(gradient_checkpointing=checkpointing)
    grpo_update.update_step(tiny[0], optim.SGD(learning_rate=0.1), batch, advantages, cfg)
    on_cpu = mx.default_device() == mx.cpu  # one part there whatever the checkpointing
    assert seen and set(seen) == {1 if checkpointing in (True, "mlp") or on_cpu else 2}
    assert StagedEval.in_flight == 2
