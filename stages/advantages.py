"""Group-relative advantages from the reward matrix, with TRL's formulas and names.

`group_advantages` turns the (N, F) rewards of N completions (G per prompt) by F reward functions
into one advantage per completion: `scale_rewards` and `multi_objective_aggregation` are TRL's
GRPOConfig options of the same names.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def _nanmean(x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    valid = ~np.isnan(x)
    total = np.where(valid, x, 0.0).sum(axis=axis, keepdims=keepdims)
    count = valid.sum(axis=axis, keepdims=keepdims)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _nanstd(x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    """Unbiased std ignoring NaN (TRL's nanstd): NaN where fewer than 2 values."""
    valid = ~np.isnan(x)
    mean = _nanmean(x, axis=axis, keepdims=True)
    squares = np.where(valid, (x - mean) ** 2, 0.0).sum(axis=axis, keepdims=keepdims)
    count = valid.sum(axis=axis, keepdims=keepdims)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 1, np.sqrt(squares / np.maximum(count - 1, 1)), np.nan)


def group_advantages(
    scores: mx.array,
    weights,
    group_size: int,
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
) -> tuple[mx.array, dict[str, float]]:
    """Advantages from the (N, F) reward matrix (NaN = None), TRL's formulas. Returns
    ((N,) advantages, {"frac_reward_zero_std": ...}).

    sum_then_normalize: total = weighted NaN-ignoring sum over functions; advantage = total -
    group mean, divided by (std + 1e-4) where std is the group's (scale="group"), the batch's
    ("batch") or not at all ("none").
    normalize_then_sum (GDPO): each function is normalised within its group, (r - mean) /
    (std + 1e-4), then weighted and summed, and the sum normalised over the batch; `scale` is not
    used (as in TRL).
    A row where every function returned None is unscorable: it is left out of the means and
    stds (NaN-aware) and its advantage is 0. Stds are unbiased (ddof=1) as torch.std in TRL.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale!r} is not one of {', '.join(SCALE_REWARDS)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}"
        )
    matrix = np.array(scores, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    n_rows, n_funcs = matrix.shape
    weight_row = np.asarray(weights, dtype=np.float64).reshape(1, -1)
    if weight_row.shape[1] != n_funcs:
        raise ValueError(f"{weight_row.shape[1]} reward weights for {n_funcs} reward functions")
    if group_size < 1 or n_rows % group_size:
        raise ValueError(f"{n_rows} rewards do not split into groups of {group_size}")
    np_errors = np.seterr(invalid="ignore", over="ignore")  # inf/NaN handled explicitly below
    unscorable = np.isnan(matrix).all(axis=1)

    if aggregation == "sum_then_normalize":
        total = np.where(np.isnan(matrix), 0.0, matrix * weight_row).sum(axis=1)
        total[unscorable] = np.nan
        grouped = total.reshape(-1, group_size)
        mean = np.repeat(_nanmean(grouped, axis=1), group_size)
        if scale == "batch":
            std = np.full(n_rows, _nanstd(total) if n_rows > 1 else 0.0)
        else:
            std = (
                np.repeat(_nanstd(grouped, axis=1), group_size)
                if group_size > 1
                else np.zeros(n_rows)
            )
        advantages = total - mean
        if scale != "none":
            advantages = advantages / (std + 1e-4)
    else:
        grouped = matrix.reshape(-1, group_size, n_funcs)
        mean_k = _nanmean(grouped, axis=1, keepdims=True)
        std_k = _nanstd(grouped, axis=1, keepdims=True) if group_size > 1 else np.zeros_like(mean_k)
        normalised = ((grouped - mean_k) / (std_k + 1e-4)).reshape(n_rows, n_funcs)
        total = np.where(np.isnan(normalised), 0.0, normalised * weight_row).sum(axis=1)
        total[unscorable] = np.nan
        std = np.full(n_rows, _nanstd(total) if n_rows > 1 else 0.0)
        advantages = (total - _nanmean(total)) / (std + 1e-4)
    # NaN from None (unscorable rows, groups without two scores) means "no signal": 0. An
    # infinite reward is a broken reward function, not "no signal": its group stays NaN so the
    # step's loss is non-finite and the NaN guard skips and reports it.
    broken = np.repeat(np.isinf(matrix).any(axis=1).reshape(-1, group_size).any(axis=1), group_size)
    advantages = np.nan_to_num(advantages, nan=0.0, posinf=0.0, neginf=0.0)
    advantages[broken] = np.nan
    is_std_zero = np.isclose(np.nan_to_num(std, nan=1.0), 0.0)
    metrics = {"frac_reward_zero_std": float(is_std_zero.mean())}
    np.seterr(**np_errors)
    return mx.array(advantages.astype(np.float32)), metrics


def compute_advantages(rewards: mx.array, group_size: int, scale: str) -> mx.array:
    """Group-relative advantages of one total reward per row. rewards: (N,) -> (N,).

    advantage = reward - mean(reward of its group), divided by (std + 1e-4) where std is the
    group's (scale="group"), the whole batch's (scale="batch"), or not at all ("none").
    NaN rewards (unscorable rows) get advantage 0 and are left out of the statistics.
    """
    return group_advantages(rewards.reshape(-1, 1), [1.0], group_size, scale)[0]


def informative_groups(scores: mx.array, weights, group_size: int) -> np.ndarray:
    """DAPO's dynamic-sampling filter: (G,) bool, True for the groups whose weighted total
    rewards (NaN-aware, as the advantages sum them) are not all equal, i.e. that carry a
    gradient. A group with fewer than two scored rows is not informative."""
    matrix = np.array(scores, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    weight_row = np.asarray(weights, dtype=np.float64).reshape(1, -1)
    unscorable = np.isnan(matrix).all(axis=1)
    total = np.where(np.isnan(matrix), 0.0, matrix * weight_row).sum(axis=1)
    total[unscorable] = np.nan
    grouped = total.reshape(-1, group_size)
    missing = np.isnan(grouped)
    spread = np.where(missing, -np.inf, grouped).max(axis=1) - np.where(
        missing, np.inf, grouped
    ).min(axis=1)
    return ((~missing).sum(axis=1) >= 2) & (spread > 0)
