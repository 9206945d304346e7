"""GRPO update: group-relative advantages, TRL's clipped surrogate loss, and an AdamW step.

Formulas and names follow TRL's GRPOTrainer (`_compute_loss`): token-level importance ratios
clipped to [1 - epsilon_low, 1 + epsilon_high], optional k3 KL to a reference policy, and the
normalisations of `loss_type` grpo / bnpo / dr_grpo / dapo.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from stages import grad_checkpoint, lora
from stages.entropy import high_entropy_mask, token_entropy

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
SCHEDULES = ("constant", "linear", "cosine")


def compute_advantages(rewards: mx.array, group_size: int, scale: str) -> mx.array:
    """Group-relative advantages. rewards: (N,) with N = prompts * group_size -> (N,).

    advantage = reward - mean(reward of its group), divided by (std + 1e-4) where std is the
    group's (scale="group"), the whole batch's (scale="batch"), or not at all ("none").
    Standard deviations are unbiased (ddof=1), as torch.std in TRL.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale!r} is not one of {', '.join(SCALE_REWARDS)}")
    if rewards.size % group_size:
        raise ValueError(f"{rewards.size} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    advantages = grouped - grouped.mean(axis=1, keepdims=True)
    if scale == "group":
        advantages = advantages / (mx.std(grouped, axis=1, keepdims=True, ddof=1) + 1e-4)
    elif scale == "batch":
        advantages = advantages / (mx.std(rewards, ddof=1) + 1e-4)
    return advantages.reshape(-1)


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

    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    metrics["clip_ratio/low_mean"] = (low * mask).sum() / token_count
    metrics["clip_ratio/high_mean"] = (high * mask).sum() / token_count
    metrics["clip_ratio/region_mean"] = ((low | high) * mask).sum() / token_count
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
    num_iterations: int = 1  # mu: optimizer steps per generation batch
    micro_batch_size: int = 0  # rows per forward/backward; 0 = whole batch (no accumulation)
    max_grad_norm: float = 1.0
    top_entropy_quantile: float = 1.0
    max_completion_length: int | None = None
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


def _rows(packed: PackedBatch, rows: slice) -> PackedBatch:
    return PackedBatch(
        packed.tokens[rows],
        packed.gather_index[rows],
        packed.completion_ids[rows],
        packed.completion_mask[rows],
    )


def update_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    batch,
    advantages: mx.array,
    cfg: UpdateConfig,
    ref_model: nn.Module | None = None,
) -> dict[str, float]:
    """`cfg.num_iterations` optimizer steps on one RolloutBatch. Returns metrics (floats).

    ref_model: the frozen reference when beta != 0; `model` itself for a LoRA model, whose
    reference is its base (adapters switched off, stages.lora.adapters_disabled).
    With cfg.gradient_checkpointing, every block's activations are recomputed in the backward.
    """
    try:
        with grad_checkpoint.enabled(model, cfg.gradient_checkpointing):
            return _update_step(model, optimizer, batch, advantages, cfg, ref_model)
    finally:
        model.eval()  # _update_step turns on training mode (LoRA dropout) for the gradient pass


def _update_step(model, optimizer, batch, advantages, cfg, ref_model) -> dict[str, float]:
    """update_step's body.

    Gradients are accumulated over micro-batches of `cfg.micro_batch_size` rows, each loss
    scaled so the sum equals the whole-batch loss (dapo already divides by the whole batch's
    token count). Gradients are clipped by global norm before each AdamW step.
    """
    packed = pack(batch)
    n_rows = packed.tokens.shape[0]
    micro = cfg.micro_batch_size or n_rows
    chunks = [slice(i, min(i + micro, n_rows)) for i in range(0, n_rows, micro)]
    num_items = packed.completion_mask.sum()

    def no_grad_logprobs(net):
        return mx.concatenate(
            [
                mx.stop_gradient(
                    token_logprobs(
                        completion_logits(net, _rows(packed, c), cfg.temperature),
                        packed.completion_ids[c],
                    )
                )
                for c in chunks
            ]
        )

    # With mu > 1 the ratio is against the policy that generated the batch, held fixed.
    old_logprobs = no_grad_logprobs(model) if cfg.num_iterations > 1 else None
    ref_logprobs = None
    if cfg.beta != 0.0 and ref_model is model:
        with lora.adapters_disabled(model):
            ref_logprobs = no_grad_logprobs(model)
            mx.eval(ref_logprobs)
    elif cfg.beta != 0.0:
        ref_logprobs = no_grad_logprobs(ref_model)
    model.train()
    loss_and_grad = nn.value_and_grad(model, _loss_fn)

    totals: dict[str, float] = {}
    for _ in range(cfg.num_iterations):
        grads, loss_sum, sums = None, 0.0, {}
        for rows in chunks:
            scale = 1.0 if cfg.loss_type == "dapo" else (rows.stop - rows.start) / n_rows
            (loss, metrics), chunk_grads = loss_and_grad(
                model,
                _rows(packed, rows),
                None if old_logprobs is None else old_logprobs[rows],
                advantages[rows],
                None if ref_logprobs is None else ref_logprobs[rows],
                cfg,
                num_items,
                scale,
            )
            grads = chunk_grads if grads is None else _tree_add(grads, chunk_grads)
            mx.eval(grads, loss, metrics)
            loss_sum += loss.item()
            weight = (rows.stop - rows.start) / n_rows
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value.item() * weight
        if cfg.max_grad_norm > 0:
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            grad_norm = mx.sqrt(sum((g * g).sum() for g in _leaves(grads)))
        learning_rate = optimizer.learning_rate.item()
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        step_metrics = {
            "loss": loss_sum,
            "grad_norm": grad_norm.item(),
            "learning_rate": learning_rate,
            **sums,
        }
        for name, value in step_metrics.items():
            totals[name] = totals.get(name, 0.0) + value / cfg.num_iterations
    return totals


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [value for _, value in tree_flatten(tree)]


def _tree_add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)
