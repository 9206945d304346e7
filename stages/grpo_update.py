"""GRPO update: group-relative advantages, TRL's clipped surrogate loss, and an AdamW step.

Formulas and names follow TRL's GRPOTrainer (`_compute_loss`): token-level importance ratios
clipped to [1 - epsilon_low, 1 + epsilon_high], optional k3 KL to a reference policy, and the
normalisations of `loss_type` grpo / bnpo / dr_grpo / dapo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from stages import distributed, grad_checkpoint, lora
from stages.entropy import high_entropy_mask, token_entropy

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
SCHEDULES = ("constant", "linear", "cosine")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
IS_LEVELS = ("token", "sequence")


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


def grpo_loss(
    logprobs: mx.array,
    old_logprobs: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logprobs: mx.array | None = None,
    delta: float | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    entropy_mask: mx.array | None = None,
) -> tuple[mx.array, dict]:
    """TRL's GRPO loss. logprobs/old/ref/mask/entropy_mask: (B, T) float32; advantages: (B,).

    Returns (scalar loss, metrics) with metrics "kl" (when beta > 0) and the clip ratios
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean" (fractions of real
    tokens). `num_items_in_batch` is dapo's normaliser (active tokens of the whole generation
    batch; defaults to this batch's); `max_completion_length` is dr_grpo's (defaults to T).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    log_ratio = logprobs - old_logprobs
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        per_sequence = (log_ratio * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)
        log_weights = per_sequence[:, None]
    else:
        raise ValueError(
            f"importance_sampling_level {importance_sampling_level!r} is not token or sequence"
        )
    ratio = mx.exp(log_weights)
    clipped_ratio = mx.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = mx.minimum(ratio, delta)
    adv = advantages[:, None]
    per_token_loss = -mx.minimum(ratio * adv, clipped_ratio * adv)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    metrics = {}
    token_count = mx.maximum(mask.sum(), 1.0)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        diff = ref_logprobs - logprobs
        per_token_kl = mx.exp(diff) - diff - 1
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = (per_token_kl * mask).sum() / token_count

    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / token_count
    elif loss_type == "dr_grpo":
        length = max_completion_length or mask.shape[1]
        loss = (per_token_loss * mask).sum() / (mask.shape[0] * length)
    else:  # dapo
        normaliser = num_items_in_batch if num_items_in_batch is not None else token_count
        loss = (per_token_loss * mask).sum() / normaliser

    # TRL's masked_batch_mean: a token mean, or with sequence-level weights a plain mean over rows.
    def batch_mean(x):
        return x.mean() if x.shape[1] == 1 else (x * mask).sum() / token_count

    low = ((ratio < 1 - epsilon_low) & (adv < 0)).astype(mx.float32)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).astype(mx.float32)
    metrics["clip_ratio/low_mean"] = batch_mean(low)
    metrics["clip_ratio/high_mean"] = batch_mean(high)
    metrics["clip_ratio/region_mean"] = batch_mean(mx.maximum(low, high))
    return loss, metrics


@dataclass
class UpdateConfig:
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    importance_sampling_level: str = "token"
    delta: float | None = None
    beta: float = 0.0
    temperature: float = 1.0  # logits are divided by it, as at sampling time (TRL)
    num_iterations: int = 1  # mu: passes over each generation batch
    steps_per_generation: int = 1  # optimizer steps each generation batch is split into
    micro_batch_size: int = 0  # rows per forward/backward; 0 = whole optimizer-step batch
    max_grad_norm: float = 1.0
    top_entropy_quantile: float = 1.0
    max_completion_length: int | None = None
    mask_truncated_completions: bool = False  # rows cut at max_new_tokens get no loss
    seed: int = 0  # shuffles the generation batch before it is split (steps_per_generation > 1)
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward


@dataclass
class PackedBatch:
    """Prompt + completion per row, right-padded, for the training forward pass."""

    tokens: mx.array  # (N, L) int32
    gather_index: mx.array  # (N, T) int32: position whose logits predict completion token t
    completion_ids: mx.array  # (N, T) int32
    completion_mask: mx.array  # (N, T) float32


def pack(batch) -> PackedBatch:
    """Pack a RolloutBatch as [prompt | completion | pad] rows with positions from 0.

    Right padding keeps every real token at its true position under a plain causal mask, so the
    training forward needs no attention mask and matches generation on the left-padded cache.
    """
    completion_ids = np.array(batch.completion_ids)
    lengths = np.array(batch.completion_mask).sum(axis=1).astype(np.int64)
    prompt_lengths = np.array([len(p) for p in batch.prompt_ids])
    width = int((prompt_lengths + lengths).max())
    n_rows, n_steps = completion_ids.shape
    tokens = np.zeros((n_rows, width), dtype=np.int32)
    for row, (prompt, n) in enumerate(zip(batch.prompt_ids, lengths)):
        tokens[row, : len(prompt)] = prompt
        tokens[row, len(prompt) : len(prompt) + n] = completion_ids[row, :n]
    gather = prompt_lengths[:, None] - 1 + np.arange(n_steps)[None, :]
    gather = np.minimum(gather, width - 1).astype(np.int32)
    return PackedBatch(
        mx.array(tokens), mx.array(gather), batch.completion_ids, batch.completion_mask
    )


def _hidden_and_head(model: nn.Module):
    """(backbone, head) of an mlx-lm causal LM, so only completion positions hit the vocab."""
    backbone = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if backbone is None or args is None:
        return None, None
    if getattr(args, "tie_word_embeddings", False):
        return backbone, backbone.embed_tokens.as_linear
    head = getattr(model, "lm_head", None)
    return (backbone, head) if head is not None else (None, None)


def completion_logits(model: nn.Module, packed: PackedBatch, temperature: float = 1.0) -> mx.array:
    """Logits that predict each completion token: (N, T, V) float32, divided by temperature."""
    inputs = packed.tokens[:, :-1] if packed.tokens.shape[1] > 1 else packed.tokens
    index = mx.minimum(packed.gather_index, inputs.shape[1] - 1)
    backbone, head = _hidden_and_head(model)
    if backbone is not None:
        hidden = backbone(inputs)
        picked = mx.take_along_axis(hidden, index[..., None], axis=1)
        logits = head(picked)
    else:
        logits = mx.take_along_axis(model(inputs), index[..., None], axis=1)
    return logits.astype(mx.float32) / temperature


def token_logprobs(logits: mx.array, token_ids: mx.array) -> mx.array:
    """log softmax(logits)[token]. (N, T, V), (N, T) -> (N, T)."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logprobs, token_ids[..., None], axis=-1)[..., 0]


def make_optimizer(
    learning_rate: float,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int = 1,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> optim.AdamW:
    """AdamW with linear warmup then a constant, linear-decay or cosine schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        main = learning_rate
    elif schedule == "linear":
        main = optim.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        main = optim.cosine_decay(learning_rate, decay_steps)
    if warmup_steps > 0:
        warmup = optim.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps)
        main_fn = main if callable(main) else (lambda _: mx.array(learning_rate))
        lr = optim.join_schedules([warmup, main_fn], [warmup_steps])
    else:
        lr = main
    return optim.AdamW(learning_rate=lr, betas=list(betas), eps=eps, weight_decay=weight_decay)


def _loss_fn(
    model,
    packed: PackedBatch,
    old_logprobs,
    advantages,
    ref_logprobs,
    cfg: UpdateConfig,
    num_items_in_batch,
    scale,
):
    logits = completion_logits(model, packed, cfg.temperature)
    logprobs = token_logprobs(logits, packed.completion_ids)
    mask = packed.completion_mask
    entropies = token_entropy(mx.stop_gradient(logits))
    entropy_mask = None
    if cfg.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropies, mask, cfg.top_entropy_quantile)
    old = mx.stop_gradient(logprobs) if old_logprobs is None else old_logprobs
    loss, metrics = grpo_loss(
        logprobs,
        old,
        advantages,
        mask,
        loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        importance_sampling_level=cfg.importance_sampling_level,
        beta=cfg.beta,
        ref_logprobs=ref_logprobs,
        delta=cfg.delta,
        max_completion_length=cfg.max_completion_length,
        num_items_in_batch=num_items_in_batch,
        entropy_mask=entropy_mask,
    )
    metrics["entropy"] = (entropies * mask).sum() / mx.maximum(mask.sum(), 1.0)
    return loss * scale, metrics


def _rows(packed: PackedBatch, rows: mx.array) -> PackedBatch:
    return PackedBatch(
        packed.tokens[rows],
        packed.gather_index[rows],
        packed.completion_ids[rows],
        packed.completion_mask[rows],
    )


def _chunk_scale(loss_type: str, rows: int, step_rows: int, tokens: float, step_tokens: float):
    """Factor that turns one micro-batch's loss into its share of the optimizer-step loss, so
    that accumulated gradients equal those of the whole step batch for every loss_type."""
    if loss_type in ("grpo", "dr_grpo"):  # means over rows: weight by rows
        return rows / step_rows
    if loss_type == "bnpo":  # token mean: weight by tokens (each chunk divides by its own)
        return max(tokens, 1.0) / max(step_tokens, 1.0)
    return 1.0  # dapo already divides by the generation batch's token count


def _world_scale(loss_type: str, world: distributed.World) -> float:
    """Factor on each rank's loss so that the ranks' average gradient is the whole batch's.
    grpo / dr_grpo are means over rows and every rank has the same number of rows: the average
    of the ranks' means is the mean. bnpo (whose chunk scale already divides by the tokens of
    all ranks) and dapo (divided by all ranks' tokens) are sums: undo the average's 1/size."""
    return float(world.size) if loss_type in ("bnpo", "dapo") else 1.0


# Metrics averaged over the whole batch weighted by tokens (token-level) or rows (sequence-level).
_TOKEN_METRICS = ("entropy", "kl")
_CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def update_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    batch,
    advantages: mx.array,
    cfg: UpdateConfig,
    ref_model: nn.Module | None = None,
    world: distributed.World | None = None,
) -> dict[str, float]:
    """All optimizer steps for one generation batch (a RolloutBatch). Returns metrics (floats).

    The batch is shuffled (seeded) and split into `cfg.steps_per_generation` equal parts, one
    optimizer step each, and that is repeated `cfg.num_iterations` times (TRL's mu). When there
    is more than one optimizer step, the ratio's denominator is the policy that generated the
    batch, computed once before the first step and held fixed. Each step's gradient is
    accumulated over micro-batches of `cfg.micro_batch_size` rows, scaled so that it equals the
    gradient of the step's whole batch for every loss_type, then clipped by global norm.

    Metrics (TRL's names): loss and grad_norm (means over optimizer steps), learning_rate (last
    step's), entropy and kl (token means), clip_ratio/low_mean, high_mean, region_mean (token
    means; row means for sequence-level ratios) over every micro-batch, and clip_ratio/low_min,
    high_max: the min / max of the per-micro-batch values (TRL takes them over processes'
    local batches).

    ref_model: the frozen reference when beta != 0; `model` itself for a LoRA model, whose
    reference is its base (adapters switched off, stages.lora.adapters_disabled).
    With cfg.gradient_checkpointing, every block's activations are recomputed in the backward.

    world (data parallel): `batch` is this rank's equal share of the generation batch. dapo's
    token count is summed over ranks, each loss is scaled so that the average of the ranks'
    gradients (mlx.nn.average_gradients) is the gradient of the whole batch, clipping follows
    the average, and the metrics are reduced over ranks (stages.distributed.reduce_metrics).
    With steps_per_generation > 1 each rank shuffles its own share (same-size optimizer
    batches, different rows than one process would draw).
    """
    world = world or distributed.World()
    try:
        with grad_checkpoint.enabled(model, cfg.gradient_checkpointing):
            metrics = _update_step(model, optimizer, batch, advantages, cfg, ref_model, world)
        return distributed.reduce_metrics(metrics, world)
    finally:
        model.eval()  # _update_step turns on training mode (LoRA dropout) for the gradient pass


def _update_step(model, optimizer, batch, advantages, cfg, ref_model, world) -> dict[str, float]:
    """update_step's body (see there)."""
    packed = pack(batch)
    n_rows = packed.tokens.shape[0]
    # dapo's normaliser: active tokens of the whole generation batch, counted before truncated
    # completions are masked (as TRL's num_items_in_batch).
    num_items = distributed.all_sum(packed.completion_mask.sum(), world)
    if cfg.mask_truncated_completions:
        kept = mx.array([reason != "length" for reason in batch.finish_reasons], dtype=mx.float32)
        packed = replace(packed, completion_mask=packed.completion_mask * kept[:, None])
    parts = cfg.steps_per_generation
    if parts < 1 or n_rows % parts:
        raise ValueError(
            f"steps_per_generation={parts} does not split the generation batch of {n_rows} rows "
            "into equal parts"
        )
    order = np.arange(n_rows)
    if parts > 1:
        order = np.random.default_rng(cfg.seed).permutation(n_rows)
    part_size = n_rows // parts
    step_rows = [order[i * part_size : (i + 1) * part_size] for i in range(parts)]
    micro = cfg.micro_batch_size or part_size

    def chunks_of(rows: np.ndarray) -> list[mx.array]:
        return [mx.array(rows[i : i + micro]) for i in range(0, len(rows), micro)]

    def no_grad_logprobs(net):
        values = []
        for chunk in chunks_of(np.arange(n_rows)):
            logprobs = token_logprobs(
                completion_logits(net, _rows(packed, chunk), cfg.temperature),
                packed.completion_ids[chunk],
            )
            values.append(mx.stop_gradient(logprobs))
            mx.eval(values[-1])
        return mx.concatenate(values)

    # With one optimizer step per batch the ratio is 1 (old = current, detached), as in TRL.
    multi_step = cfg.num_iterations * parts > 1
    old_logprobs = no_grad_logprobs(model) if multi_step else None
    ref_logprobs = None
    if cfg.beta != 0.0 and ref_model is model:
        with lora.adapters_disabled(model):
            ref_logprobs = no_grad_logprobs(model)
            mx.eval(ref_logprobs)
    elif cfg.beta != 0.0:
        ref_logprobs = no_grad_logprobs(ref_model)
    model.train()
    loss_and_grad = nn.value_and_grad(model, _loss_fn)
    token_counts = packed.completion_mask.sum(axis=1)

    steps: list[dict[str, float]] = []
    weighted: dict[str, list[tuple[float, float]]] = {}
    per_chunk: dict[str, list[float]] = {"clip_ratio/low_mean": [], "clip_ratio/high_mean": []}
    for _ in range(cfg.num_iterations):
        for rows in step_rows:
            local_tokens = token_counts[mx.array(rows)].sum()
            step_tokens = distributed.all_sum(local_tokens, world).item()
            grads, step_loss = None, 0.0
            for chunk in chunks_of(rows):
                chunk_tokens = token_counts[chunk].sum().item()
                scale = _chunk_scale(
                    cfg.loss_type, chunk.size, len(rows), chunk_tokens, step_tokens
                ) * _world_scale(cfg.loss_type, world)
                (loss, metrics), chunk_grads = loss_and_grad(
                    model,
                    _rows(packed, chunk),
                    None if old_logprobs is None else old_logprobs[chunk],
                    advantages[chunk],
                    None if ref_logprobs is None else ref_logprobs[chunk],
                    cfg,
                    num_items,
                    scale,
                )
                grads = chunk_grads if grads is None else _tree_add(grads, chunk_grads)
                mx.eval(grads, loss, metrics)
                step_loss += loss.item()
                sequence_level = cfg.importance_sampling_level == "sequence"
                for name, value in metrics.items():
                    value = value.item()
                    if name in per_chunk:
                        per_chunk[name].append(value)
                    row_weighted = sequence_level and name in _CLIP_METRICS
                    weight = float(chunk.size) if row_weighted else chunk_tokens
                    weighted.setdefault(name, []).append((value, weight))
            if world.size > 1:
                grads = nn.utils.average_gradients(grads, group=world.group)
            if cfg.max_grad_norm > 0:
                grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            else:
                grad_norm = mx.sqrt(sum((g * g).sum() for g in _leaves(grads)))
            learning_rate = optimizer.learning_rate.item()
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)
            steps.append(
                {"loss": step_loss, "grad_norm": grad_norm.item(), "learning_rate": learning_rate}
            )

    results = {
        "loss": float(np.mean([s["loss"] for s in steps])),
        "grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
        "learning_rate": steps[-1]["learning_rate"],
        "optimizer_steps": float(len(steps)),
    }
    for name, pairs in weighted.items():
        total_weight = sum(w for _, w in pairs)
        results[name] = (
            sum(v * w for v, w in pairs) / total_weight
            if total_weight > 0
            else float(np.mean([v for v, _ in pairs]))
        )
    results["clip_ratio/low_min"] = min(per_chunk["clip_ratio/low_mean"])
    results["clip_ratio/high_max"] = max(per_chunk["clip_ratio/high_mean"])
    return results


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [value for _, value in tree_flatten(tree)]


def _tree_add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)
