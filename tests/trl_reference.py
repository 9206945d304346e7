# ruff: noqa: E501  (verbatim quotes of TRL's code keep TRL's line lengths)
"""TRL 1.16.0 GRPO objective, transcribed to NumPy (float64) for testing our MLX code against.

Source: trl-1.16.0-py3-none-any.whl (pip download --no-deps trl==1.16.0), files
  trl/trainer/grpo_trainer.py  (cited as T:<line>)
  trl/trainer/grpo_config.py   (cited as C:<line>)
  trl/trainer/utils.py         (cited as U:<line>)
Every function follows TRL's code line by line (not our code); the tests compare our MLX code
against it. `python tests/trl_reference.py` runs its self-check.

Conventions
-----------
* Arrays are (B, T) over completion tokens (right padded), advantages are (B,). Masks are 0/1.
* `completion_mask` is TRL's completion_mask AFTER mask_truncated_completions (T:2488-2495);
  `tool_mask` (1 = model token, 0 = tool-result / env token) is optional. TRL's loss mask is
  `completion_mask * tool_mask` (T:2497, T:3027).
* Stop-gradient: TRL detaches in four places (old = per_token_logps.detach() T:3066, cispo's
  clamped ratio T:3110, the off-policy mask T:2957, vespo's phi under @torch.no_grad T:2970).
  Every function that TRL differentiates takes `logprobs` (carries gradient) and `logprobs_sg`
  (the same values, treated as a constant; defaults to `logprobs`). Forward values never depend on
  the split; `trl_loss_grad` differentiates w.r.t. `logprobs` with `logprobs_sg` held fixed, which is
  exactly the gradient torch autograd gives w.r.t. per_token_logps (away from clip kinks).
* Entropies are inputs (their gradient w.r.t. logits, used only by the entropy bonus, is not
  represented here).
* One call of `trl_loss` = one micro-batch on one process (TRL's `_compute_loss`), already divided
  for gradient accumulation exactly as TRL does (GRPOTrainer.loss_is_scaled_for_ga = True, T:285).
  `trl_optimizer_step` combines micro-batches x processes the way DDP + accumulation do.

"""

from __future__ import annotations

import math

import numpy as np

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")  # C:801-834
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # C:934-946

# GRPOConfig defaults relevant to the objective (C:<line> of the field).
TRL_DEFAULTS = {
    "loss_type": "dapo",  # C:801
    "epsilon": 0.2,  # C:693
    "epsilon_high": None,  # C:705 -> same as epsilon (T:946)
    "delta": None,  # C:697
    "beta": 0.0,  # C:681
    "num_iterations": 1,  # C:689
    "importance_sampling_level": "token",  # C:760
    "scale_rewards": "group",  # C:789
    "multi_objective_aggregation": "sum_then_normalize",  # C:777
    "mask_truncated_completions": False,  # C:836
    "top_entropy_quantile": 1.0,  # C:866
    "sapo_temperature_neg": 1.05,  # C:714
    "sapo_temperature_pos": 1.0,  # C:722
    "vespo_k_pos": 2.0,  # C:730
    "vespo_lambda_pos": 3.0,  # C:737
    "vespo_k_neg": 3.0,  # C:745
    "vespo_lambda_neg": 2.0,  # C:752
    "vllm_importance_sampling_correction": True,  # C:925 (only active with use_vllm=True)
    "vllm_importance_sampling_mode": "sequence_mask",  # C:934
    "vllm_importance_sampling_clip_max": 3.0,  # C:947
    "vllm_importance_sampling_clip_min": None,  # C:955
    "off_policy_mask_threshold": None,  # C:963
    "use_bias_correction_kl": True,  # C:972
    "entropy_coef": 0.0,  # C:876
}


# ----------------------------------------------------------------------------------------------
# small torch-equivalents
# ----------------------------------------------------------------------------------------------


def _nanmean(x, axis=None, keepdims=False):
    """torch.nanmean: mean of the non-NaN values, NaN where there are none."""
    x = np.asarray(x, dtype=np.float64)
    valid = ~np.isnan(x)
    total = np.where(valid, x, 0.0).sum(axis=axis, keepdims=keepdims)
    count = valid.sum(axis=axis, keepdims=keepdims)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def nanstd(x, axis=None, keepdims=False):
    """trl.trainer.utils.nanstd (U:1021-1054): Bessel-corrected std ignoring NaN; NaN if count <= 1.

    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    """
    x = np.asarray(x, dtype=np.float64)
    mean = _nanmean(x, axis=axis, keepdims=True)
    variance = _nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        correction = np.where(count > 1, count / np.maximum(count - 1, 1), np.nan)
    std = np.sqrt(variance * correction)
    if keepdims:
        return std
    return std.reshape(()) if axis is None else np.squeeze(std, axis=axis)


def _nanmin(x):
    """trl nanmin (U:1124): min ignoring NaN, NaN if all NaN."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    return float(x.min()) if x.size else float("nan")


def _nanmax(x):
    """trl nanmax (U:1141): max ignoring NaN, NaN if all NaN."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    return float(x.max()) if x.size else float("nan")


def _sigmoid(x):
    return np.where(
        x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x)))
    )


def _isclose0(x):
    """torch.isclose(x, 0) with default rtol=1e-5, atol=1e-8 (NaN -> False)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.abs(x) <= 1e-8


# ----------------------------------------------------------------------------------------------
# advantages (T:2755-2830)
# ----------------------------------------------------------------------------------------------


def trl_advantages(
    rewards_per_func,
    num_generations: int,
    *,
    reward_weights=None,
    scale_rewards: str | bool = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    reward_func_names=None,
):
    """Advantages and reward metrics of one generation batch (all processes), T:2759-2830.

    rewards_per_func: (N, F) float, NaN where a reward function returned None (T:1630).
    Returns (advantages (N,), metrics) with TRL's metric names
    rewards/<name>/mean, rewards/<name>/std, reward, reward_std, frac_reward_zero_std.

    sum_then_normalize (T:2762-2788):
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)  (repeat_interleave)
        "group"/"none": std_rewards = nanstd(rewards.view(-1, num_generations), dim=1) (repeat_interleave)
        "batch":        std_rewards = nanstd(rewards).expand_as(rewards)
        advantages = rewards - mean_grouped_rewards
        if self.scale_rewards != "none": advantages = advantages / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    normalize_then_sum (T:2790-2800): per-function group z-score (std + 1e-4), weighted nansum, then
        (rewards - nanmean(rewards)) / (nanstd(rewards) + 1e-4) over the batch; scale_rewards unused.
    Then advantages = torch.nan_to_num(advantages, nan=0.0) (T:2810).
    """
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # C:1078
    r = np.asarray(rewards_per_func, dtype=np.float64)
    if r.ndim == 1:
        r = r[:, None]
    n, f = r.shape
    w = np.ones(f) if reward_weights is None else np.asarray(reward_weights, dtype=np.float64)
    if w.shape != (f,):
        raise ValueError(
            f"Number of reward weights ({w.size}) must match number of reward functions ({f})"
        )
    names = reward_func_names or [f"func{i}" for i in range(f)]
    unscorable = np.isnan(r).all(axis=1)  # T:2759

    def weighted_nansum(m):
        return np.where(np.isnan(m * w[None, :]), 0.0, m * w[None, :]).sum(axis=1)

    if multi_objective_aggregation == "sum_then_normalize":
        rewards = weighted_nansum(r)
        rewards[unscorable] = np.nan
        mean_g = np.repeat(_nanmean(rewards.reshape(-1, num_generations), axis=1), num_generations)
        if scale_rewards in ("group", "none"):
            if num_generations > 1:
                std = np.repeat(
                    nanstd(rewards.reshape(-1, num_generations), axis=1), num_generations
                )
            else:
                std = np.zeros_like(rewards)
        elif scale_rewards == "batch":
            std = (
                np.full_like(rewards, nanstd(rewards))
                if rewards.size > 1
                else np.zeros_like(rewards)
            )
        else:
            raise ValueError(
                f"Invalid value for scale_rewards: {scale_rewards}. Must be one of 'batch', 'group', or 'none'."
            )
        adv = rewards - mean_g
        if scale_rewards != "none":
            adv = adv / (std + 1e-4)
        is_std_zero = _isclose0(std)
    elif multi_objective_aggregation == "normalize_then_sum":
        grouped = r.reshape(-1, num_generations, f)
        mean_k = _nanmean(grouped, axis=1, keepdims=True)
        std_k = (
            nanstd(grouped, axis=1, keepdims=True) if num_generations > 1 else np.zeros_like(mean_k)
        )
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).reshape(-1, f)
        rewards = weighted_nansum(reward_k)
        rewards[unscorable] = np.nan
        std = np.full_like(rewards, nanstd(rewards)) if rewards.size > 1 else np.zeros_like(rewards)
        adv = (rewards - _nanmean(rewards)) / (std + 1e-4)
        is_std_zero = _isclose0(std)
    else:
        raise ValueError(
            f"Invalid multi_objective_aggregation: {multi_objective_aggregation}. Must be "
            "'sum_then_normalize' or 'normalize_then_sum'."
        )
    adv = np.nan_to_num(adv, nan=0.0)  # T:2810 (only nan; +-inf stay)

    metrics = {}
    for i, name in enumerate(names):  # T:2820-2825
        metrics[f"rewards/{name}/mean"] = float(_nanmean(r[:, i]))
        metrics[f"rewards/{name}/std"] = float(nanstd(r[:, i]))
    logged = weighted_nansum(r)  # T:2826-2830 (weighted sum again, even for normalize_then_sum)
    logged[unscorable] = np.nan
    metrics["reward"] = float(_nanmean(logged))
    metrics["reward_std"] = float(nanstd(logged))
    metrics["frac_reward_zero_std"] = float(np.mean(is_std_zero))
    return adv, metrics


# ----------------------------------------------------------------------------------------------
# masks and normalisers built at generation time
# ----------------------------------------------------------------------------------------------


def trl_truncation_and_num_items(
    completion_mask, *, is_truncated=None, tool_mask=None, mask_truncated_completions=False
):
    """mask_truncated_completions and num_items_in_batch, T:2488-2498 (whole generation batch,
    all processes concatenated; TRL gathers the per-process sums).

        if self.mask_truncated_completions:
            is_truncated = torch.tensor([ids[-1] not in eos_and_pad for ids in completion_ids_list])
            completion_mask = completion_mask * (~is_truncated).unsqueeze(1).int()
            if tool_mask is not None:
                tool_mask = tool_mask * (~is_truncated).unsqueeze(1).int()
        loss_mask = completion_mask if tool_mask is None else completion_mask * tool_mask
        num_items_in_batch = self.accelerator.gather(loss_mask.sum()).sum()

    num_items_in_batch is counted AFTER truncated rows are masked and AFTER tool tokens are removed.
    is_truncated: (B,) bool, "last completion token is not EOS/pad" (T:2490).
    Returns (completion_mask, tool_mask, num_items_in_batch).
    """
    cm = np.asarray(completion_mask, dtype=np.float64).copy()
    tm = None if tool_mask is None else np.asarray(tool_mask, dtype=np.float64).copy()
    if mask_truncated_completions:
        keep = ~np.asarray(is_truncated, dtype=bool)
        cm = cm * keep[:, None]
        if tm is not None:
            tm = tm * keep[:, None]
    loss_mask = cm if tm is None else cm * tm
    return cm, tm, float(loss_mask.sum())


def trl_high_entropy_mask(entropies, mask, top_entropy_quantile, *, gathered_entropies=None):
    """GRPOTrainer.get_high_entropy_mask (T:1380-1416), called with threshold = 1 - top_entropy_quantile
    (T:3049-3050). The quantile is taken over the valid-token entropies of THIS micro-batch on ALL
    processes (pad_across_processes + gather, T:1397-1408); pass them as `gathered_entropies`
    (1-D); default: this batch's valid tokens only (one process).

        local = entropies[mask.bool()].float()
        ... gathered = gathered[gathered != pad_value]
        if gathered.numel() == 0: return torch.zeros_like(entropies, dtype=torch.bool)
        entropy_threshold = torch.quantile(gathered, threshold)        # linear interpolation
        masked_entropies = entropies * mask.float()
        entropy_mask = masked_entropies >= entropy_threshold
        return entropy_mask & mask.bool()
    """
    e = np.asarray(entropies, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    pool = (
        e[m > 0]
        if gathered_entropies is None
        else np.asarray(gathered_entropies, dtype=np.float64).reshape(-1)
    )
    if pool.size == 0:
        return np.zeros_like(e, dtype=bool)
    threshold = 1.0 - top_entropy_quantile
    entropy_threshold = np.quantile(pool, threshold, method="linear")  # == torch.quantile default
    return ((e * m) >= entropy_threshold) & (m > 0)


def trl_vllm_importance_sampling(
    old_logprobs,
    sampling_logprobs,
    completion_mask,
    *,
    tool_mask=None,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
    process_rows=None,
):
    """vLLM (sampler) importance-sampling correction, T:2659-2706, and its metrics, T:2860-2896.

    old_logprobs: policy log-probs recomputed by the training model at generation time (always
    computed when the correction is on, T:2643-2645); sampling_logprobs: the sampler's per-token
    log-probs (NaN where unavailable, padded with 0.0, T:2463-2478). Both at temperature.

        mask = completion_mask if tool_mask is None else completion_mask * tool_mask
        per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
        per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
        sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
        ratio = torch.exp(logps_diff)                       # (B, T) or (B, 1)
        *_truncate: ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
        *_mask:     ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), 0.0)
                    with min_val = clip_min or -inf, max_val = clip_max or +inf
    NOTE the sequence-level ratio is exp of the SUM of token log-ratio differences (not the mean that
    importance_sampling_level="sequence" uses).

    Metrics (computed once per generation batch; each process computes local values over its rows,
    then they are gathered). process_rows: list of row-index arrays, one per process (default: one).
        sampling/sampling_logp_difference/mean = mean over processes of mean(|old - sampling|) over
            valid, non-NaN tokens (0.0 for a process with none)
        sampling/sampling_logp_difference/max  = max over processes of the local max (0.0 if none)
        sampling/importance_sampling_ratio/min  = nanmin over processes of local min
        sampling/importance_sampling_ratio/mean = nanmean over processes of local mean
        sampling/importance_sampling_ratio/max  = nanmax over processes of local max
        where the local set is ratio.flatten() (all rows, sequence modes) or ratio[mask] (token
        modes); an empty local set contributes 0.0.
    Returns (ratio, metrics).
    """
    if mode not in IS_MODES:
        raise ValueError(
            f"Unknown vLLM importance sampling level: {mode}. Possible values are 'token_truncate', "
            "'token_mask', 'sequence_truncate', and 'sequence_mask'."
        )
    if (
        mode in ("token_truncate", "sequence_truncate") and clip_min is None and clip_max is None
    ):  # C:1163-1171
        raise ValueError(
            "At least one of `vllm_importance_sampling_clip_min` or `vllm_importance_sampling_clip_max` "
            "must be set when `vllm_importance_sampling_mode` is a `*_truncate` mode."
        )
    old = np.asarray(old_logprobs, dtype=np.float64)
    samp = np.asarray(sampling_logprobs, dtype=np.float64)
    cm = np.asarray(completion_mask, dtype=np.float64)
    mask = cm if tool_mask is None else cm * np.asarray(tool_mask, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.nan_to_num((old - samp) * mask, nan=0.0)
    sequence_level_is = mode in ("sequence_mask", "sequence_truncate")
    logps_diff = diff.sum(axis=-1, keepdims=True) if sequence_level_is else diff
    with np.errstate(over="ignore"):
        ratio = np.exp(logps_diff)
    if mode in ("sequence_truncate", "token_truncate"):
        lo = -np.inf if clip_min is None else clip_min
        hi = np.inf if clip_max is None else clip_max
        ratio = np.clip(ratio, lo, hi)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = np.where((ratio < min_val) | (ratio > max_val), 0.0, ratio)

    rows_list = process_rows if process_rows is not None else [np.arange(old.shape[0])]
    mean_d, max_d, mins, means, maxs = [], [], [], [], []
    bmask = mask > 0
    with np.errstate(invalid="ignore"):
        delta = np.abs(old - samp)
    for rows in rows_list:
        rows = np.asarray(rows)
        d = delta[rows][bmask[rows] & ~np.isnan(delta[rows])]
        mean_d.append(float(d.mean()) if d.size else 0.0)
        max_d.append(float(d.max()) if d.size else 0.0)
        flat = ratio[rows].reshape(-1) if sequence_level_is else ratio[rows][bmask[rows]]
        mins.append(float(flat.min()) if flat.size else 0.0)
        means.append(float(flat.mean()) if flat.size else 0.0)
        maxs.append(float(flat.max()) if flat.size else 0.0)
    metrics = {
        "sampling/sampling_logp_difference/mean": float(np.mean(mean_d)),
        "sampling/sampling_logp_difference/max": float(np.max(max_d)),
        "sampling/importance_sampling_ratio/min": _nanmin(mins),
        "sampling/importance_sampling_ratio/mean": float(_nanmean(np.array(means))),
        "sampling/importance_sampling_ratio/max": _nanmax(maxs),
    }
    return ratio, metrics


def trl_off_policy_mask(advantages, logprobs_sg, sampling_logprobs, mask, off_policy_threshold):
    """GRPOTrainer.get_off_policy_mask (T:2945-2968), DeepSeek-V3.2 OPSM. Returns (B, 1) 0/1.

        kl_div = sampling_per_token_logps - per_token_logps.detach()
        kl_div = torch.nan_to_num(kl_div, nan=0.0)
        seq_kl_sum = (kl_div * mask).sum(dim=1, keepdim=True)
        avg_seq_kl = seq_kl_sum / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return ((advantages >= 0) | (avg_seq_kl <= off_policy_threshold))
    `sampling_logprobs` is inputs.get("sampling_per_token_logps", old_per_token_logps) (T:3073).
    """
    adv = np.asarray(advantages, dtype=np.float64).reshape(-1, 1)
    m = np.asarray(mask, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        kl = np.nan_to_num(np.asarray(sampling_logprobs, dtype=np.float64) - logprobs_sg, nan=0.0)
    avg = (kl * m).sum(axis=1, keepdims=True) / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    return ((adv >= 0) | (avg <= off_policy_threshold)).astype(np.float64)


def trl_gamma_weights(
    advantages,
    log_ratio_sg,
    mask,
    importance_sampling_ratio=None,
    *,
    k_pos=2.0,
    lambda_pos=3.0,
    k_neg=3.0,
    lambda_neg=2.0,
):
    """GRPOTrainer.get_gamma_weights (T:2970-3018), VESPO, no gradient. Returns phi (B, 1).

    lower_clamp = math.log(1e-8)
    log_ratio_clamped = torch.clamp(log_ratio_per_token, -20.0, 20.0)
    seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
        seq_log_ratio += torch.sum(log_is_ratio, dim=-1, keepdim=True)     # unmasked sum
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, k_pos, k_neg)
    lambda_seq = torch.where(is_nonneg_adv, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    phi_seq = torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    """
    adv = np.asarray(advantages, dtype=np.float64).reshape(-1, 1)
    m = np.asarray(mask, dtype=np.float64)
    lower = math.log(1e-8)
    seq = np.sum(np.clip(log_ratio_sg, -20.0, 20.0) * m, axis=-1, keepdims=True)
    if importance_sampling_ratio is not None:
        with np.errstate(divide="ignore"):
            log_is = np.clip(
                np.log(np.asarray(importance_sampling_ratio, dtype=np.float64)), lower, 20.0
            )
        seq = seq + np.sum(log_is, axis=-1, keepdims=True)
    log_w = np.clip(seq, lower, 20.0)
    w = np.exp(log_w)
    nonneg = adv >= 0
    k = np.where(nonneg, k_pos, k_neg)
    lam = np.maximum(np.where(nonneg, lambda_pos, lambda_neg), 1e-4)
    with np.errstate(over="ignore", invalid="ignore"):
        phi = np.exp(lam + k * log_w - lam * w)
    return np.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


# ----------------------------------------------------------------------------------------------
# the loss (T:3020-3290)
# ----------------------------------------------------------------------------------------------


def _loss_parts(
    logprobs,
    old_logprobs,
    advantages,
    completion_mask,
    *,
    loss_type="dapo",
    epsilon_low=0.2,
    epsilon_high=None,
    beta=0.0,
    ref_logprobs=None,
    delta=None,
    importance_sampling_level="token",
    num_items_in_batch=None,
    max_completion_length=None,
    tool_mask=None,
    entropies=None,
    top_entropy_quantile=1.0,
    gathered_entropies=None,
    importance_sampling_ratio=None,
    sampling_logprobs=None,
    vllm_is_mode=None,
    vllm_is_clip_min=None,
    vllm_is_clip_max=3.0,
    vllm_is_cap=None,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    off_policy_mask_threshold=None,
    use_bias_correction_kl=True,
    entropy_coef=0.0,
    gradient_accumulation_steps=1,
    steps_per_generation=None,
    num_processes=1,
    mode="train",
    logprobs_sg=None,
):
    """Body of trl_loss; returns (loss, parts, extra) where parts are the cross-process reducible
    pieces of each metric and extra holds IS metrics computed here."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"Unknown importance sampling level: {importance_sampling_level}. Possible values are 'token' "
            "and 'sequence'."
        )
    lp = np.asarray(logprobs, dtype=np.float64)
    lp_sg = lp if logprobs_sg is None else np.asarray(logprobs_sg, dtype=np.float64)
    cm = np.asarray(completion_mask, dtype=np.float64)
    mask = cm if tool_mask is None else cm * np.asarray(tool_mask, dtype=np.float64)  # T:3027
    eps_low = epsilon_low
    eps_high = epsilon_high if epsilon_high is not None else epsilon_low  # T:945-946
    if steps_per_generation is None:
        steps_per_generation = gradient_accumulation_steps  # C:1097-1100
    if vllm_is_cap is not None:  # deprecated alias, C:1143-1150
        vllm_is_clip_max = vllm_is_cap
    extra = {}

    # T:3049-3052
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs entropies")
        entropy_mask = trl_high_entropy_mask(
            entropies, mask, top_entropy_quantile, gathered_entropies=gathered_entropies
        ).astype(np.float64)

    adv = np.asarray(advantages, dtype=np.float64)
    if adv.ndim == 1:  # T:3057-3058
        adv = adv[:, None]

    # T:3066: old = per_token_logps.detach() if None
    old = lp_sg if old_logprobs is None else np.asarray(old_logprobs, dtype=np.float64)

    # vLLM IS ratio (generation time, T:2659-2706): computed from old (gen-time policy) vs sampler
    use_is = (
        vllm_is_mode is not None
        and sampling_logprobs is not None
        and importance_sampling_ratio is None
    )
    if use_is:
        if loss_type == "vespo" and vllm_is_mode not in (
            "token_truncate",
            "token_mask",
        ):  # T:936-941
            raise ValueError(
                f"VESPO loss requires `vllm_importance_sampling_mode` to be either 'token_truncate' or "
                f"'token_mask'. Got: {vllm_is_mode}."
            )
        importance_sampling_ratio, extra = trl_vllm_importance_sampling(
            old,
            sampling_logprobs,
            cm,
            tool_mask=tool_mask,
            mode=vllm_is_mode,
            clip_min=vllm_is_clip_min,
            clip_max=vllm_is_clip_max,
        )

    # T:3068-3080 off-policy sequence mask
    off_policy_mask = None
    if off_policy_mask_threshold is not None:
        samp = old if sampling_logprobs is None else np.asarray(sampling_logprobs, dtype=np.float64)
        off_policy_mask = trl_off_policy_mask(adv, lp_sg, samp, mask, off_policy_mask_threshold)

    # T:3082-3095
    log_ratio = lp - old
    log_ratio_sg = lp_sg - old
    if importance_sampling_level == "token":
        log_w, log_w_sg = log_ratio, log_ratio_sg
    else:
        denom = np.maximum(mask.sum(-1), 1.0)
        log_w = ((log_ratio * mask).sum(-1) / denom)[:, None]
        log_w_sg = ((log_ratio_sg * mask).sum(-1) / denom)[:, None]
    coef_1 = np.exp(log_w)
    coef_1_sg = np.exp(log_w_sg)

    # T:3097-3105 KL (k3), times the IS ratio coef_1 (differentiable) when use_bias_correction_kl
    per_token_kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        ref = np.asarray(ref_logprobs, dtype=np.float64)
        per_token_kl = np.exp(ref - lp) - (ref - lp) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    # T:3107-3138 per-token loss by loss type
    phi_seq = None
    coef_1_metric = coef_1  # the variable TRL's clip metrics read (after the delta cap)
    if loss_type == "cispo":
        clamped = np.minimum(coef_1_sg, eps_high)  # torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped * adv * lp
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
        c1 = coef_1
        if delta is not None:
            c1 = np.minimum(coef_1, delta)
            coef_1_metric = c1
        per_token_loss = -np.minimum(c1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        temps = np.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        soft = _sigmoid(temps * (coef_1 - 1)) * 4 / temps
        per_token_loss = -soft * adv
    else:  # vespo
        phi_seq = trl_gamma_weights(
            adv,
            log_ratio_sg,
            mask,
            importance_sampling_ratio,
            k_pos=vespo_k_pos,
            lambda_pos=vespo_lambda_pos,
            k_neg=vespo_k_neg,
            lambda_neg=vespo_lambda_neg,
        )
        per_token_loss = -phi_seq * adv * lp

    # T:3140-3150, in this order
    if off_policy_mask is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * np.asarray(importance_sampling_ratio, dtype=np.float64)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = np.broadcast_to(
        per_token_loss, np.broadcast_shapes(per_token_loss.shape, (lp.shape[0], 1))
    )

    # T:3152-3184 normalisation
    ga = gradient_accumulation_steps if mode == "train" else 1.0
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
        policy_loss = loss
        loss = loss / ga
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / max(mask.sum(), 1.0)
        policy_loss = loss
        loss = loss / ga
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError(
                "dr_grpo needs max_completion_length (GRPOConfig.max_completion_length)"
            )
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_length)
        policy_loss = loss
        loss = loss / ga
    elif loss_type in ("cispo", "dapo", "vespo"):
        n_items = (
            float(mask.sum()) * num_processes * steps_per_generation / gradient_accumulation_steps
            if num_items_in_batch is None
            else float(num_items_in_batch)
        )
        normalizer = max(n_items, 1.0) / num_processes
        if mode == "train":
            normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        loss = (per_token_loss * mask).sum() / normalizer
        policy_loss = loss
    else:  # luspo
        loss = (per_token_loss * mask).sum(-1).mean()
        policy_loss = loss
        loss = loss / ga

    # T:3186-3245 entropy bonus (static coefficient only)
    parts = {}
    if entropy_coef != 0.0:
        if entropies is None:
            raise ValueError("entropy_coef != 0 needs entropies")
        eff = mask if entropy_mask is None else mask * entropy_mask
        ent = np.asarray(entropies, dtype=np.float64)
        entropy_loss = (ent * eff).sum() / max(eff.sum(), 1.0) / ga
        loss = loss - entropy_coef * entropy_loss
        parts["policy_loss"] = ("proc_mean", float(policy_loss))
        if mode == "train":
            parts["entropy_coef"] = ("const", float(entropy_coef))

    # T:3254-3288 metrics (as reducible parts)
    def gmm(x):  # global_masked_mean
        x = np.broadcast_to(x, np.broadcast_shapes(x.shape, (lp.shape[0], 1)))
        if x.shape[1] == 1:
            return ("mean", float(x.sum()), float(x.shape[0]))
        return ("mean", float((x * mask).sum()), float(mask.sum()))

    def msm(x):  # masked_seq_mean (no clamp: NaN for an all-masked row)
        if x.shape[1] == 1:
            return x[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (x * mask).sum(-1) / mask.sum(-1)

    if beta != 0.0:
        parts["kl"] = gmm(per_token_kl)
    if entropies is not None:
        parts["entropy"] = gmm(np.asarray(entropies, dtype=np.float64))
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        low = ((coef_1_metric < 1 - eps_low) & (adv < 0)).astype(np.float64)
        high = ((coef_1_metric > 1 + eps_high) & (adv > 0)).astype(np.float64)
        region = np.maximum(low, high)
        parts["clip_ratio/low_mean"] = gmm(low)
        parts["clip_ratio/high_mean"] = gmm(high)
        parts["clip_ratio/region_mean"] = gmm(region)
        parts["clip_ratio/low_min"] = ("min", msm(low))
        parts["clip_ratio/high_max"] = ("max", msm(high))
    elif loss_type == "cispo":
        parts["cispo_clip_ratio"] = gmm(((coef_1 > eps_high) & (adv > 0)).astype(np.float64))
    elif loss_type == "vespo":
        parts["vespo/phi_seq_mean"] = gmm(phi_seq)
    return float(loss), parts, extra


def _reduce_parts(parts_per_process):
    """Cross-process reduction exactly as TRL: accelerator.reduce(sum) of (sum, count) for
    global_masked_mean (T:3259-3265); gather + nanmin / nanmax of per-sequence values
    (T:3280-3283); gather().nanmean() for policy_loss (T:3213)."""
    out = {}
    for name in parts_per_process[0]:
        kind = parts_per_process[0][name][0]
        vals = [p[name] for p in parts_per_process]
        if kind == "mean":
            s = sum(v[1] for v in vals)
            c = sum(v[2] for v in vals)
            out[name] = s / max(c, 1.0)
        elif kind == "min":
            out[name] = _nanmin(np.concatenate([np.atleast_1d(v[1]) for v in vals]))
        elif kind == "max":
            out[name] = _nanmax(np.concatenate([np.atleast_1d(v[1]) for v in vals]))
        elif kind == "proc_mean":
            out[name] = float(_nanmean(np.array([v[1] for v in vals])))
        else:  # const
            out[name] = vals[0][1]
    return out


def trl_loss(logprobs, old_logprobs, advantages, completion_mask, **kwargs):
    """TRL 1.16 GRPOTrainer._compute_loss (T:3020-3290) for ONE micro-batch on ONE process.

    Returns (loss, metrics). The loss is the value TRL back-propagates for this micro-batch: it is
    already divided by gradient_accumulation_steps (grpo/bnpo/dr_grpo/sapo/luspo) or by TRL's
    rescaled num_items_in_batch (dapo/cispo/vespo). Metrics are what TRL appends for this
    micro-step with one process (use trl_optimizer_step for several processes).

    Arguments (keyword-only after the four arrays; defaults = GRPOConfig defaults):
      logprobs (B,T): current policy log-probs at temperature (carry gradient).
      old_logprobs (B,T) or None: None = on-policy, TRL uses per_token_logps.detach() (T:3066).
      advantages (B,) or (B,T); completion_mask (B,T) (after mask_truncated_completions).
      loss_type: grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo.
      epsilon_low (GRPOConfig.epsilon), epsilon_high (None -> epsilon_low, T:946).
        cispo uses epsilon_high as the ABSOLUTE cap of the ratio (clamp(ratio, max=epsilon_high)).
      beta, ref_logprobs, use_bias_correction_kl=True (KL *= coef_1, T:3104-3105).
      delta: cap of the unclipped ratio (grpo-family only), importance_sampling_level token|sequence.
      num_items_in_batch: loss-mask tokens of the WHOLE generation batch over ALL processes
        (trl_truncation_and_num_items); default = this batch's tokens * num_processes *
        steps_per_generation / gradient_accumulation_steps (i.e. this batch is one micro-batch of
        an evenly split generation batch).
      max_completion_length: dr_grpo's constant (GRPOConfig.max_completion_length, required).
      tool_mask (B,T): 1 model tokens, 0 tool/env tokens; loss mask = completion_mask * tool_mask.
      entropies (B,T), top_entropy_quantile, gathered_entropies (pool for the quantile).
      importance_sampling_ratio: precomputed IS ratio (B,T) or (B,1); or give sampling_logprobs +
        vllm_is_mode (+ vllm_is_clip_min / vllm_is_clip_max, vllm_is_cap = deprecated alias of
        clip_max) and it is computed from old_logprobs (or logprobs if None) like TRL does at
        generation time; its sampling/* metrics are then included (TRL logs them once per
        generation batch).
      sapo_temperature_pos/neg, vespo_k_pos/lambda_pos/k_neg/lambda_neg, off_policy_mask_threshold.
      entropy_coef (static; adaptive control not modelled).
      gradient_accumulation_steps (GA), steps_per_generation (TRL's: micro-batches per generation
        batch; None -> GA), num_processes, mode ("train" | "eval").
      logprobs_sg: stop-gradient copy of logprobs (see module docstring).
    """
    loss, parts, extra = _loss_parts(logprobs, old_logprobs, advantages, completion_mask, **kwargs)
    metrics = _reduce_parts([parts])
    metrics.update(extra)
    return loss, metrics


def trl_loss_grad(logprobs, old_logprobs, advantages, completion_mask, h=1e-6, **kwargs):
    """d trl_loss / d logprobs as torch autograd computes it (detached terms held fixed), by central
    differences in float64 with logprobs_sg pinned to the unperturbed values. Exact up to O(h^2)
    except within h of a clip boundary. Returns (B, T)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    sg = kwargs.pop("logprobs_sg", None)
    sg = lp.copy() if sg is None else np.asarray(sg, dtype=np.float64)
    if (
        kwargs.get("vllm_is_mode") is not None
        and kwargs.get("importance_sampling_ratio") is None
        and kwargs.get("sampling_logprobs") is not None
    ):
        # the IS ratio is a generation-time constant: freeze it
        old_for_is = sg if old_logprobs is None else old_logprobs
        kwargs["importance_sampling_ratio"], _ = trl_vllm_importance_sampling(
            old_for_is,
            kwargs["sampling_logprobs"],
            completion_mask,
            tool_mask=kwargs.get("tool_mask"),
            mode=kwargs["vllm_is_mode"],
            clip_min=kwargs.get("vllm_is_clip_min"),
            clip_max=kwargs.get("vllm_is_cap") or kwargs.get("vllm_is_clip_max", 3.0),
        )
    old = sg if old_logprobs is None else old_logprobs
    grad = np.zeros_like(lp)
    for idx in np.ndindex(lp.shape):
        up, dn = lp.copy(), lp.copy()
        up[idx] += h
        dn[idx] -= h
        fu, _, _ = _loss_parts(up, old, advantages, completion_mask, logprobs_sg=sg, **kwargs)
        fd, _, _ = _loss_parts(dn, old, advantages, completion_mask, logprobs_sg=sg, **kwargs)
        grad[idx] = (fu - fd) / (2 * h)
    return grad


def trl_optimizer_step(micro_steps, **kwargs):
    """One optimizer step of TRL: GA micro-steps x P processes (DDP averages gradients over
    processes, accumulation sums the micro-step losses; T:3152-3184 divide for GA).

    micro_steps: list (length GA) of lists (length P) of dicts with keys logprobs, old_logprobs,
      advantages, completion_mask and optionally tool_mask, ref_logprobs, entropies,
      importance_sampling_ratio, sampling_logprobs, logprobs_sg.
    kwargs: everything else of trl_loss; num_items_in_batch must be the whole generation batch's
      (all processes); gradient_accumulation_steps defaults to len(micro_steps) and
      num_processes to len(micro_steps[0]).
    The entropy quantile of micro-step m pools the valid-token entropies of every process
    (T:1397-1413).
    Returns (effective_loss, metrics): effective_loss = (1/P) sum_m sum_p loss_{m,p}, whose gradient
    is the one the optimizer sees; metrics = per micro-step cross-process reductions averaged over
    the micro-steps (GRPOTrainer.log averages every appended value, T:3305-3312).
    """
    kwargs.setdefault("gradient_accumulation_steps", len(micro_steps))
    p = kwargs.setdefault("num_processes", len(micro_steps[0]))
    total = 0.0
    per_step_metrics = []
    for step in micro_steps:
        pool = None
        if kwargs.get("top_entropy_quantile", 1.0) < 1.0:
            pool = np.concatenate(
                [
                    np.asarray(d["entropies"])[
                        (np.asarray(d["completion_mask"]) * np.asarray(d.get("tool_mask", 1.0))) > 0
                    ]
                    for d in step
                ]
            )
        parts_list = []
        for d in step:
            d = dict(d)
            args = (
                d.pop("logprobs"),
                d.pop("old_logprobs", None),
                d.pop("advantages"),
                d.pop("completion_mask"),
            )
            loss, parts, _ = _loss_parts(*args, gathered_entropies=pool, **d, **kwargs)
            total += loss / p
            parts_list.append(parts)
        per_step_metrics.append(_reduce_parts(parts_list))
    metrics = {}
    for name in per_step_metrics[0]:
        vals = [m[name] for m in per_step_metrics if not math.isnan(m[name])]
        metrics[name] = sum(vals) / len(vals) if vals else None
    return total, metrics


def trl_split_generation_batch(
    n_rows_per_process: int, steps_per_generation: int, num_processes: int = 1, permutation=None
):
    """Row indices of TRL's micro-batches (T:1280-1312, T:1536-1543): process p holds the contiguous
    rows [p*n, (p+1)*n) of the generation batch (RepeatSampler order; a prompt's G completions can
    straddle processes), shuffles them once per generation (shuffle_sequence_dict, randperm; pass
    `permutation` of range(n) to reproduce one) and splits them into steps_per_generation equal
    chunks; micro-step i uses chunk i % steps_per_generation. Returns [micro_step][process] -> rows.
    """
    n = n_rows_per_process
    perm = np.arange(n) if permutation is None else np.asarray(permutation)
    size = n // steps_per_generation
    return [
        [p * n + perm[i * size : (i + 1) * size] for p in range(num_processes)]
        for i in range(steps_per_generation)
    ]


# ----------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------


def _close(a, b, tol=1e-8):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _selfcheck():
    rng = np.random.default_rng(0)
    B, T, G = 8, 6, 4
    lengths = np.array([6, 3, 5, 1, 4, 6, 2, 5])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    lp = -rng.uniform(0.05, 3.0, size=(B, T)) * mask
    old = (lp + rng.normal(0, 0.15, size=(B, T))) * mask
    ref = (lp + rng.normal(0, 0.3, size=(B, T))) * mask
    samp = (old + rng.normal(0, 0.1, size=(B, T))) * mask
    ent = rng.uniform(0.0, 4.0, size=(B, T)) * mask
    rewards = rng.integers(0, 2, size=(B, 2)).astype(np.float64)
    rewards[3, 1] = np.nan
    rewards[:G, 0] = 1.0  # group 0, function 0 constant

    adv, rm = trl_advantages(rewards, G, reward_func_names=["acc", "fmt"])
    print("advantages:", np.round(adv, 4), {k: round(v, 4) for k, v in rm.items()})
    assert np.allclose(adv.reshape(-1, G).sum(1), 0, atol=1e-9)
    adv_b, _ = trl_advantages(rewards, G, scale_rewards="batch")
    adv_n, _ = trl_advantages(rewards, G, scale_rewards=False)
    adv_g, _ = trl_advantages(rewards, G, multi_objective_aggregation="normalize_then_sum")
    assert adv_b.shape == adv_n.shape == adv_g.shape == (B,)

    # 1. on-policy, every grpo-family loss has ratio 1: closed forms
    n_tok = mask.sum()
    expected = {
        "grpo": -adv.mean(),  # per-row token mean of -A, mean over rows
        "bnpo": -(adv * lengths).sum() / n_tok,
        "dapo": -(adv * lengths).sum() / n_tok,
        "dr_grpo": -(adv * lengths).sum() / (B * T),
        "luspo": -(adv * lengths).mean(),
        "sapo": None,
    }
    for lt, want in expected.items():
        loss, m = trl_loss(lp, None, adv, mask, loss_type=lt, max_completion_length=T)
        if lt == "sapo":  # sigmoid(0)*4/tau = 2/tau
            tau = np.where(adv > 0, 1.0, 1.05)
            want = -(2 / tau * adv).mean()
        assert _close(loss, want), (lt, loss, want)
        g = trl_loss_grad(lp, None, adv, mask, loss_type=lt, max_completion_length=T)
        # on-policy, d ratio / d logprob = 1 and sapo's gate has slope 1 at ratio 1: gradient = -A / normaliser
        if lt in ("bnpo", "dapo"):
            want_g = -adv[:, None] * mask / n_tok
        elif lt in ("grpo", "sapo"):
            want_g = -adv[:, None] * mask / np.maximum(mask.sum(-1, keepdims=True), 1) / B
        elif lt == "dr_grpo":
            want_g = -adv[:, None] * mask / (B * T)
        else:  # luspo
            want_g = -adv[:, None] * mask / B
        assert np.allclose(g, want_g, atol=1e-7), lt
    print("on-policy closed forms and gradients: ok")

    # 2. off-policy losses with all options
    base = dict(epsilon_low=0.2, epsilon_high=0.28, max_completion_length=T)
    results = {}
    for lt in LOSS_TYPES:
        kw = dict(base, loss_type=lt)
        if lt == "cispo":
            kw["epsilon_high"] = 5.0
        if lt == "luspo":
            kw["importance_sampling_level"] = "sequence"
        loss, m = trl_loss(lp, old, adv, mask, **kw)
        results[lt] = loss
        print(
            f"{lt:8s} loss={loss: .6f}",
            {k: (round(v, 4) if v is not None else v) for k, v in m.items()},
        )
    # cispo gradient = -clamp(r, max=eps_high) * A / N_tokens  (weight detached)
    g = trl_loss_grad(lp, old, adv, mask, loss_type="cispo", epsilon_high=5.0)
    want = -np.minimum(np.exp(lp - old), 5.0) * adv[:, None] * mask / n_tok
    assert np.allclose(g, want, atol=1e-7)
    # vespo gradient = -phi * A / N_tokens  (phi detached)
    phi = trl_gamma_weights(adv, lp - old, mask)
    g = trl_loss_grad(lp, old, adv, mask, loss_type="vespo")
    assert np.allclose(g, -phi * adv[:, None] * mask / n_tok, atol=1e-7)
    assert np.allclose(trl_gamma_weights(adv, np.zeros((B, T)), mask), 1.0)  # phi(1) = 1
    print("cispo / vespo detach semantics: ok")

    # epsilon_high=None means epsilon_low
    a, _ = trl_loss(lp, old, adv, mask, loss_type="dapo", epsilon_low=0.2, epsilon_high=None)
    b, _ = trl_loss(lp, old, adv, mask, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2)
    assert a == b

    # KL with use_bias_correction_kl: value = mean(k3 * ratio); on-policy value = k3 but the gradient differs
    l_c, m_c = trl_loss(lp, None, adv, mask, beta=0.04, ref_logprobs=ref)
    l_n, m_n = trl_loss(
        lp, None, adv, mask, beta=0.04, ref_logprobs=ref, use_bias_correction_kl=False
    )
    assert _close(l_c, l_n) and _close(m_c["kl"], m_n["kl"])
    g_c = trl_loss_grad(lp, None, adv, mask, beta=0.04, ref_logprobs=ref)
    g_n = trl_loss_grad(
        lp, None, adv, mask, beta=0.04, ref_logprobs=ref, use_bias_correction_kl=False
    )
    k3 = np.exp(ref - lp) - (ref - lp) - 1
    assert np.allclose(g_c - g_n, 0.04 * k3 * mask / n_tok, atol=1e-7)  # extra k3 * d(log ratio)
    print("bias-corrected KL: ok")

    # 3. num_items_in_batch counted after mask_truncated_completions; accumulation == full batch (dapo)
    trunc = np.array([1, 0, 0, 0, 0, 1, 0, 0], dtype=bool)
    cm, tm, n_items = trl_truncation_and_num_items(
        mask, is_truncated=trunc, mask_truncated_completions=True
    )
    assert n_items == mask[~trunc].sum()
    full, _ = trl_loss(lp, old, adv, cm, loss_type="dapo", num_items_in_batch=n_items)
    micro = trl_split_generation_batch(B, steps_per_generation=2)
    steps = [
        [
            dict(logprobs=lp[r], old_logprobs=old[r], advantages=adv[r], completion_mask=cm[r])
            for r in procs
        ]
        for procs in micro
    ]
    acc, _ = trl_optimizer_step(steps, loss_type="dapo", num_items_in_batch=n_items)
    assert _close(full, acc), (full, acc)
    # two optimizer steps per generation (spg=2, GA=1): each step divides by n_items / 2
    s0, _ = trl_optimizer_step(
        steps[:1],
        loss_type="dapo",
        num_items_in_batch=n_items,
        gradient_accumulation_steps=1,
        steps_per_generation=2,
    )
    r0 = micro[0][0]
    assert _close(
        s0,
        (
            -(
                np.minimum(
                    np.exp(lp - old)[r0] * adv[r0, None],
                    np.clip(np.exp(lp - old)[r0], 0.8, 1.2) * adv[r0, None],
                )
            )
            * cm[r0]
        ).sum()
        / (n_items / 2),
    )
    # two processes x GA=2 (spg=2): DDP mean of sums == full-batch dapo
    micro2 = trl_split_generation_batch(B // 2, steps_per_generation=2, num_processes=2)
    steps2 = [
        [
            dict(logprobs=lp[r], old_logprobs=old[r], advantages=adv[r], completion_mask=cm[r])
            for r in procs
        ]
        for procs in micro2
    ]
    acc2, met2 = trl_optimizer_step(steps2, loss_type="dapo", num_items_in_batch=n_items)
    assert _close(full, acc2)
    # bnpo under accumulation = mean of micro-batch token means (NOT the full token mean)
    accb, _ = trl_optimizer_step(steps, loss_type="bnpo")
    want = np.mean(
        [trl_loss(lp[r[0]], old[r[0]], adv[r[0]], cm[r[0]], loss_type="bnpo")[0] for r in micro]
    )
    assert _close(accb, want)
    print("num_items_in_batch / accumulation / DDP: ok", {k: round(v, 4) for k, v in met2.items()})

    # 4. importance-sampling correction, all modes
    for mode in IS_MODES:
        ratio, im = trl_vllm_importance_sampling(
            old, samp, mask, mode=mode, clip_min=0.5, clip_max=1.2
        )
        if mode.startswith("sequence"):
            assert ratio.shape == (B, 1)
        if mode.endswith("truncate"):
            assert ratio.min() >= 0.5 - 1e-12 and ratio.max() <= 1.2 + 1e-12
        else:
            assert np.all((ratio == 0) | ((ratio >= 0.5) & (ratio <= 1.2)))
        loss, m = trl_loss(
            lp,
            old,
            adv,
            mask,
            loss_type="dapo",
            sampling_logprobs=samp,
            vllm_is_mode=mode,
            vllm_is_clip_min=0.5,
            vllm_is_clip_max=1.2,
        )
        manual, _ = trl_loss(lp, old, adv, mask, loss_type="dapo", importance_sampling_ratio=ratio)
        assert _close(loss, manual)
        print(f"IS {mode:17s} loss={loss: .6f}", {k: round(v, 4) for k, v in im.items()})
    # NaN sampler log-probs are neutral (ratio 1 there) and excluded from the difference metric
    samp_nan = samp.copy()
    samp_nan[0, 0] = np.nan
    r_nan, m_nan = trl_vllm_importance_sampling(old, samp_nan, mask, mode="token_truncate")
    assert r_nan[0, 0] == 1.0 and not math.isnan(m_nan["sampling/sampling_logp_difference/mean"])
    print("IS correction: ok")

    # 5. entropy mask
    em = trl_high_entropy_mask(ent, mask, 0.2)
    kept = em.sum() / mask.sum()
    assert 0.15 <= kept <= 0.3, kept
    assert trl_high_entropy_mask(ent, mask, 0.0).sum() == 1  # only the max
    assert trl_high_entropy_mask(ent, mask, 1.0).sum() == mask.sum()
    loss, m = trl_loss(
        lp, old, adv, mask, entropies=ent, top_entropy_quantile=0.2, entropy_coef=0.01
    )
    print(
        "entropy mask keeps",
        round(float(kept), 3),
        "metrics",
        {k: round(v, 4) for k, v in m.items()},
    )

    # 6. off-policy sequence mask and tool mask
    loss, m = trl_loss(lp, old, adv, mask, off_policy_mask_threshold=0.05, sampling_logprobs=samp)
    tool = np.ones((B, T))
    tool[:, 2] = 0
    loss_t, _ = trl_loss(lp, old, adv, mask, tool_mask=tool)
    loss_m, _ = trl_loss(lp, old, adv, mask * tool)
    assert _close(loss_t, loss_m)
    print("off-policy mask / tool mask: ok")
    print("all checks passed")


if __name__ == "__main__":
    _selfcheck()
