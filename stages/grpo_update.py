"""The GRPO update: the optimizer loop over one generation batch (TRL's GRPOTrainer semantics).

Each generation batch is shuffled and split into `steps_per_generation` optimizer steps, repeated
`num_iterations` times; each step's gradient is accumulated over micro-batches weighted as TRL
weighs them (the whole step batch's gradient for every loss type but bnpo, whose micro-batches are
token means of their own; stages/losses.py), then clipped, averaged over processes (data
parallel) and applied with AdamW. The forward pass is stages/policy.py's; the
advantages come from stages/advantages.py.
"""

from __future__ import annotations

import gc
import math
import re
import shutil
from dataclasses import dataclass, replace
from typing import Any

from stages import distributed, grad_checkpoint, lean_activations, lora
from stages.advantages import AGGREGATIONS, SCALE_REWARDS
from stages.entropy import high_entropy_mask
from stages.losses import (
    EXTREME_METRICS,
    IS_LEVELS,
    LOSS_TYPES,
    SAMPLER_IS_MODES,
    find_loss_type,
    grpo_loss,
    metric_count,
    sampler_importance_ratio,
)
from stages.policy import (
    PackedBatch,
    StagedEval,
    TiedInputGradient,
    completion_logprobs,
    pack,
    take_rows,
)
from stages.rollout import RolloutBatch
from stages.settings import check, one_of, setting

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """`train.*`: the training loop, the GRPO objective (TRL's GRPOConfig names) and AdamW."""

    steps: int = setting(300, "GRPO steps (one generation batch each)")
    prompts_per_step: int = setting(
        8, "unique prompts per step; rows = prompts_per_step * rollout.group_size"
    )
    learning_rate: float = setting(3e-4, "AdamW learning rate (peak, after warmup)")
    lr_schedule: str = setting("constant", "constant | linear | cosine (after warmup)")
    warmup_steps: int = setting(0, "linear warmup, in optimizer steps")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float = setting(1.0, "clip by global norm; 0 disables")
    micro_batch_size: Any = setting(
        0,
        "rows per forward/backward (gradient accumulation); 0 = all; auto = the most that fit "
        "train.memory_budget_gb, measured at start",
    )
    memory_budget_gb: float | None = setting(
        None,
        "memory the update may use with micro_batch_size=auto; null: the device's (CUDA's free "
        "memory, Metal's recommended working set, half the RAM on CPU)",
    )
    loss_type: str = setting(
        "dapo",
        "grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo (TRL's; stages/losses.py)",
    )
    epsilon_low: float = setting(0.2, "ratio clipped below at 1 - epsilon_low (TRL's epsilon)")
    epsilon_high: float | None = setting(
        None,
        "ratio clipped above at 1 + epsilon_high; null: epsilon_low (TRL); cispo: the absolute "
        "cap on the ratio (TRL recommends 5.0)",
    )
    beta: float = setting(0.0, "KL coefficient to the frozen reference model (k3 estimator)")
    use_bias_correction_kl: bool = setting(
        True, "multiply the k3 KL by the importance ratio (TRL; unbiased reverse-KL gradient)"
    )
    num_iterations: int = setting(1, "mu: passes over each generation batch (TRL's num_iterations)")
    steps_per_generation: int = setting(
        1,
        "optimizer steps each generation batch is split into (shuffled, equal parts); "
        "optimizer steps per step = this * num_iterations",
    )
    scale_rewards: str = setting("group", "group | batch | none: divide advantages by that std")
    multi_objective_aggregation: str = setting(
        "sum_then_normalize",
        "or normalize_then_sum (GDPO: normalise each reward within its group, then weighted "
        "sum, then batch-normalise)",
    )
    importance_sampling_level: str = setting(
        "token", "token | sequence (GSPO: one ratio per completion)"
    )
    delta: float | None = setting(
        None, "two-sided clipping: cap the unclipped ratio at delta (> 1); null: off"
    )
    sapo_temperature_pos: float = setting(1.0, "sapo: gate temperature where the advantage > 0")
    sapo_temperature_neg: float = setting(1.05, "sapo: gate temperature where the advantage <= 0")
    vespo_k_pos: float = setting(2.0, "vespo: power k of the gamma weight where advantage >= 0")
    vespo_lambda_pos: float = setting(3.0, "vespo: decay lambda of the gamma weight there")
    vespo_k_neg: float = setting(3.0, "vespo: power k of the gamma weight where advantage < 0")
    vespo_lambda_neg: float = setting(2.0, "vespo: decay lambda of the gamma weight there")
    mask_truncated_completions: bool = setting(
        False, "completions cut at max_new_tokens get no loss (DAPO)"
    )
    top_entropy_quantile: float = setting(
        1.0, "train only on the top fraction of high-entropy tokens; 1 = all"
    )
    vllm_importance_sampling_correction: bool | None = setting(
        None,
        "correct for the rollout engine's log-probs differing from the trainer's (TRL's "
        "vLLM correction); null: on when rollout.fast_kernels, true: always, false: never",
    )
    vllm_importance_sampling_mode: str = setting(
        "sequence_mask", "token_truncate | token_mask | sequence_truncate | sequence_mask"
    )
    vllm_importance_sampling_clip_max: float | None = setting(
        3.0, "upper bound of that ratio (truncate: clipped to it; mask: above it -> 0); null: none"
    )
    vllm_importance_sampling_clip_min: float | None = setting(
        None, "lower bound of that ratio (truncate: clipped; mask: below it -> 0); null: none"
    )
    vllm_importance_sampling_cap: float | None = setting(
        None, "deprecated (TRL 1.6): the same as vllm_importance_sampling_clip_max"
    )
    dynamic_sampling: bool = setting(
        False,
        "DAPO: drop groups whose rewards are all equal and sample fresh prompts until the step "
        "has prompts_per_step groups",
    )
    max_resample_rounds: int = setting(
        3, "dynamic sampling: at most this many extra generation rounds per step"
    )
    gradient_checkpointing: Any = setting(
        "auto",
        "auto: elementwise on a GPU (CUDA, Metal) with lean_activations, false on the CPU; "
        "true: recompute each block's activations in the backward (least memory, about one "
        "more forward); mlp: recompute only each block's MLP (about 40% less activation "
        "memory, about 60% of true's extra compute); elementwise: recompute no matmul, only the "
        "norms' and the swiglu's outputs the linear layers take and Qwen3's attention between "
        "its projections (about 40% less activation memory, needs lean_activations); false: "
        "keep them",
    )
    lean_activations: bool = setting(
        True,
        "swiglu (without gradient checkpointing), attention (CPU, Metal) and rms_norm (CPU) "
        "keep only their inputs for the backward pass and recompute the rest (sigmoid; "
        "attention scores, tile by tile): same gradients, less memory; false: MLX's autograd "
        "as it is",
    )

    def validate(self) -> None:
        check(self.steps >= 1, "steps", self.steps, ">= 1")
        check(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step, ">= 1")
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        one_of("lr_schedule", self.lr_schedule, SCHEDULES)
        check(
            isinstance(self.gradient_checkpointing, bool)
            or self.gradient_checkpointing in ("auto", "mlp", "elementwise"),
            "gradient_checkpointing",
            self.gradient_checkpointing,
            "auto | true | false | mlp | elementwise",
        )
        check(
            self.lean_activations or self.gradient_checkpointing != "elementwise",
            "gradient_checkpointing",
            self.gradient_checkpointing,
            "elementwise needs train.lean_activations=true",
        )
        check(
            isinstance(self.lean_activations, bool),
            "lean_activations",
            self.lean_activations,
            "true | false",
        )
        one_of("loss_type", self.loss_type, tuple(LOSS_TYPES))
        one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check(0 <= self.epsilon_low < 1, "epsilon_low", self.epsilon_low, "in [0, 1)")
        check(
            self.epsilon_high is None or self.epsilon_high >= 0,
            "epsilon_high",
            self.epsilon_high,
            "null or >= 0",
        )
        check(self.beta >= 0, "beta", self.beta, ">= 0")
        check(self.num_iterations >= 1, "num_iterations", self.num_iterations, ">= 1")
        micro = self.micro_batch_size
        check(
            micro == "auto"
            or (isinstance(micro, int) and not isinstance(micro, bool) and micro >= 0),
            "micro_batch_size",
            micro,
            "auto, or rows >= 0 (0 = whole batch)",
        )
        budget = self.memory_budget_gb
        check(budget is None or budget > 0, "memory_budget_gb", budget, "null or > 0")
        one_of("multi_objective_aggregation", self.multi_objective_aggregation, AGGREGATIONS)
        one_of("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        check(self.delta is None or self.delta > 1, "delta", self.delta, "null or > 1")
        for key in ("sapo_temperature_pos", "sapo_temperature_neg"):
            check(getattr(self, key) > 0, key, getattr(self, key), "> 0")
        for key in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        check(
            self.steps_per_generation >= 1,
            "steps_per_generation",
            self.steps_per_generation,
            ">= 1",
        )
        check(
            0 <= self.top_entropy_quantile <= 1,
            "top_entropy_quantile",
            self.top_entropy_quantile,
            "in [0, 1]",
        )
        mode = self.vllm_importance_sampling_mode
        one_of("vllm_importance_sampling_mode", mode, SAMPLER_IS_MODES)
        low, high = self.vllm_importance_sampling_clip_min, self.sampler_clip_max
        check(
            low is None or high is None or low < high,
            "vllm_importance_sampling_clip_min",
            low,
            f"less than vllm_importance_sampling_clip_max ({high})",
        )
        check(
            not mode.endswith("truncate") or low is not None or high is not None,
            "vllm_importance_sampling_clip_max",
            high,
            "a bound (or vllm_importance_sampling_clip_min) for a *_truncate mode",
        )
        check(
            self.max_resample_rounds >= 0, "max_resample_rounds", self.max_resample_rounds, ">= 0"
        )

    def checkpointing(self) -> bool | str:
        """gradient_checkpointing for this process's default device: "auto" is "elementwise"
        on a GPU (there memory is scarcer than compute: 27% less peak memory for the update
        of Qwen3-0.6B at 0.78-1.0x its speed on an H200) with lean_activations, false on the
        CPU (where one block's recomputation only adds temporaries)."""
        if self.gradient_checkpointing != "auto":
            return self.gradient_checkpointing
        on_gpu = mx.default_device() != mx.cpu
        return "elementwise" if self.lean_activations and on_gpu else False

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps over the whole run (what the learning-rate schedule counts)."""
        return self.steps * self.num_iterations * self.steps_per_generation

    @property
    def sampler_clip_max(self) -> float | None:
        """The importance-sampling ratio's upper bound (the deprecated cap wins, as in TRL)."""
        if self.vllm_importance_sampling_cap is not None:
            return self.vllm_importance_sampling_cap
        return self.vllm_importance_sampling_clip_max

    def with_sampler_correction(self, fast_kernels: bool) -> TrainConfig:
        """This config with vllm_importance_sampling_correction resolved to a bool: null is on
        exactly when the rollout runs on the fast kernels (TRL corrects only vLLM rollouts)."""
        active = self.vllm_importance_sampling_correction
        return replace(
            self, vllm_importance_sampling_correction=fast_kernels if active is None else active
        )


class FusedAdamW(optim.AdamW):
    """MLX's AdamW with each array's update compiled into fused kernels that write in place.

    Uncompiled, AdamW's update of one array is about a dozen elementwise operations, each with
    an output the size of the array: for the 155M-value embedding of Qwen3-0.6B that is GBs of
    temporaries (on a GPU, MLX allocates an evaluation's outputs when it encodes it) and a dozen
    dispatches per array. Here AdamW's arithmetic is compiled three times: for the new
    parameter, the new first moment and the new second moment. Each is one kernel that reads its
    inputs once, and MLX gives its outputs the buffers of inputs no one else holds, so evaluating
    the parameters first and the moments after (`_update_step`) updates all three in place. (One
    compiled function for all three would not: an output that another output reads splits the
    fusion and keeps both.) The learning rate and step go in as inputs, so a schedule never
    retraces. Bit-identical to the plain update on CPU; on CUDA the fused kernel may contract
    multiply-adds (last bits). Without a compiler for MLX's CPU kernels (no g++, c++ or
    clang++) the plain update runs.

    Two forms of the same arithmetic. On a GPU the kernels are `optim.AdamW.apply_single`
    traced (`_traced`), with the learning rate and step as inputs: tested in place on an H200.
    On the CPU (`SCALARS_OUTSIDE`) the step's scalar factors (weight decay, the bias
    corrections' powers of the betas) are computed once per step and dtype and passed in, the
    same expressions in the same order (bit-identical): inside a compiled kernel MLX computes a
    scalar subexpression once per element, and the powers made the CPU's kernel 7x slower
    (benchmarks/adamw.py). On CUDA that form measured one parameter-sized buffer more per
    moment at the update's peak (H200, tests/test_grpo_update.py), where the powers cost little.

    `update(model, gradients, gradient_scale=s)` applies the gradients multiplied by `s` (global
    norm clipping, as optim.clip_grad_norm scales them) inside the same kernels: the scaled
    gradients, one more copy of every gradient held between the two evaluations, never exist.
    """

    def __init__(self, *args, scalars_outside: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        compiles = _can_compile()
        self.scalars_outside = (
            mx.default_device() == mx.cpu if scalars_outside is None else scalars_outside
        ) and self.bias_correction
        self._gradient_scale = None
        self._scalars: dict = {}  # dtype -> this step's (decay, c1, c2), scalars_outside
        if not compiles:
            self._new_parameter, self._new_moments = None, {}
        elif self.scalars_outside:
            self._new_parameter, self._new_moments = self._scalar_kernels()
        else:
            self._new_parameter = mx.compile(lambda *a: self._traced(*a)[0])
            # One kernel per moment: one kernel for both would keep the scaled gradient (read
            # by both) as an array of its own.
            self._new_moments = {
                key: mx.compile(lambda *a, key=key: self._traced(*a)[1][key]) for key in ("m", "v")
            }

    def _scalar_kernels(self):
        """The CPU's kernels: Adam's and AdamW's apply_single with the step's scalars as
        inputs (new parameter; each moment reading only its own moment)."""
        b1, b2 = self.betas
        eps = self.eps

        def scaled(gradient, scale):
            if scale:  # optim.clip_grad_norm's scaling, cast back as it does
                return (gradient * scale[0]).astype(gradient.dtype)
            return gradient

        def new_m(gradient, m, *scale):
            return b1 * m + (1 - b1) * scaled(gradient, scale)

        def new_v(gradient, v, *scale):
            return b2 * v + (1 - b2) * mx.square(scaled(gradient, scale))

        def new_parameter(gradient, parameter, m, v, decay, c1, c2, *scale):
            m, v = new_m(gradient, m, *scale), new_v(gradient, v, *scale)
            return parameter * decay - (c1 * m) / (mx.sqrt(v) * c2 + eps)

        return mx.compile(new_parameter), {"m": mx.compile(new_m), "v": mx.compile(new_v)}

    def update(self, model: nn.Module, gradients: dict, gradient_scale: mx.array | None = None):
        """optim.Optimizer.update; `gradient_scale`: use gradients x gradient_scale."""
        self._gradient_scale = gradient_scale
        try:
            super().update(model, gradients)
        finally:
            self._gradient_scale = None

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        self._scalars = {}  # this step's, computed by the first array of each dtype
        try:
            return super().apply_gradients(gradients, parameters)
        finally:
            self._scalars = {}

    def _step_scalars(self, dtype) -> tuple[mx.array, mx.array, mx.array]:
        """AdamW's and Adam's scalar factors for this step, as their apply_single computes
        them: the weight decay factor, c1 = lr / (1 - b1^t), c2 = 1 / sqrt(1 - b2^t)."""
        if dtype not in self._scalars:
            lr = self.learning_rate.astype(dtype)
            b1, b2 = self.betas
            step = self.step
            self._scalars[dtype] = (
                1 - lr * self.weight_decay,
                (lr / (1 - b1**step)).astype(dtype),
                mx.rsqrt(1 - b2**step).astype(dtype),
            )
        return self._scalars[dtype]

    def _traced(self, gradient, parameter, state, learning_rate, step, *scale):
        if scale:  # optim.clip_grad_norm's scaling, cast back as it does
            gradient = (gradient * scale[0]).astype(gradient.dtype)
        saved = self.state["learning_rate"], self.state["step"]
        self.state["learning_rate"], self.state["step"] = learning_rate, step
        try:
            state = dict(state)
            parameter = super().apply_single(gradient, parameter, state)
        finally:
            self.state["learning_rate"], self.state["step"] = saved
        return parameter, state

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        scale = () if self._gradient_scale is None else (self._gradient_scale,)
        if self._new_parameter is None:
            if scale:
                gradient = (gradient * scale[0]).astype(gradient.dtype)
            return super().apply_single(gradient, parameter, state)
        if self.scalars_outside:
            m, v = state["m"], state["v"]
            decay, c1, c2 = self._step_scalars(gradient.dtype)
            new_parameter = self._new_parameter(gradient, parameter, m, v, decay, c1, c2, *scale)
            moments = self._new_moments
            state.update({key: new(gradient, state[key], *scale) for key, new in moments.items()})
            return new_parameter
        lr, step = self.state["learning_rate"], self.state["step"]
        new_parameter = self._new_parameter(gradient, parameter, state, lr, step, *scale)
        # The moments do not read the parameter: a scalar stands in for it, so that the old
        # parameter is not held by the moments' graph and its buffer takes the new one.
        stand_in = mx.zeros((), dtype=parameter.dtype)
        moments = {
            key: new_moment(gradient, stand_in, state, lr, step, *scale)
            for key, new_moment in self._new_moments.items()
        }
        state.update(moments)
        return new_parameter


def _can_compile() -> bool:
    """Whether mx.compile can build fused kernels here (MLX's CPU backend needs a compiler)."""
    if mx.default_device() != mx.cpu:
        return True
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


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
    """AdamW (bias-corrected, as torch's) with linear warmup then a constant, linear-decay or
    cosine schedule; each array's update compiled (FusedAdamW)."""
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
    # torch's AdamW (TRL's optimizer) always corrects the moments' initial bias; mlx's does not
    # unless asked.
    return FusedAdamW(
        learning_rate=lr,
        betas=list(betas),
        eps=eps,
        weight_decay=weight_decay,
        bias_correction=True,
    )


def _loss_fn(
    model,
    packed: PackedBatch,
    old_logprobs,
    advantages,
    ref_logprobs,
    sampler_ratio,
    cfg: TrainConfig,
    temperature: float,
    max_completion_length: int,
    num_items_in_batch,
    scale,
    world: distributed.World,
    stages: StagedEval,
    sampler_logprobs=None,
):
    """(loss * scale, (metrics, detached log-probs)). With `sampler_logprobs` (the correction
    with one optimizer step per batch) the sampler's importance ratio is taken against this
    very forward's detached log-probs: the policy that generated the batch is the current one."""
    logprobs, entropies = completion_logprobs(model, packed, temperature, stages=stages)
    mask = packed.loss_mask
    if sampler_logprobs is not None:
        sampler_ratio, _ = _sampler_ratio(mx.stop_gradient(logprobs), sampler_logprobs, mask, cfg)
    entropy_mask = None
    if cfg.top_entropy_quantile < 1.0:
        # TRL takes the quantile over this micro-batch of every process
        pool = (distributed.all_gather(entropies, world), distributed.all_gather(mask, world))
        entropy_mask = high_entropy_mask(entropies, mask, cfg.top_entropy_quantile, pool=pool)
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
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        entropy_mask=entropy_mask,
        sampler_ratio=sampler_ratio,
        use_bias_correction_kl=cfg.use_bias_correction_kl,
        sapo_temperature_pos=cfg.sapo_temperature_pos,
        sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos,
        vespo_lambda_pos=cfg.vespo_lambda_pos,
        vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg,
    )
    metrics["entropy"] = (entropies * mask).sum() / mx.maximum(mask.sum(), 1.0)
    return loss * scale, (metrics, mx.stop_gradient(logprobs))


def _sampler_ratio(old_logprobs, sampler_logprobs, mask, cfg: TrainConfig):
    return sampler_importance_ratio(
        old_logprobs,
        sampler_logprobs,
        mask,
        mode=cfg.vllm_importance_sampling_mode,
        clip_min=cfg.vllm_importance_sampling_clip_min,
        clip_max=cfg.sampler_clip_max,
    )


def update_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    batch,
    advantages: mx.array,
    cfg: TrainConfig,
    ref_model: nn.Module | None = None,
    world: distributed.World | None = None,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """All optimizer steps for one generation batch (a RolloutBatch). Returns metrics (floats).

    The logits are divided by the batch's sampling temperature (TRL), and dr_grpo divides by
    its completion width (TRL's max_completion_length: rollout.max_new_tokens, or with tools
    rollout.max_completion_length). Only generated tokens count (the batch's generated_mask:
    tool results are read by the forward, never in a loss, log-prob, ratio, KL or normaliser).
    The batch is shuffled (with `seed`) and split into `cfg.steps_per_generation` equal parts,
    one optimizer step each, and that is repeated `cfg.num_iterations` times (TRL's mu). When
    there is more than one optimizer step, the ratio's denominator is the policy that generated
    the batch, computed once before the first step and held fixed (with one step it is the
    update's own forward, detached, as in TRL, and so is the correction's: no extra forward).
    Each step's gradient is accumulated over micro-batches of `cfg.micro_batch_size` rows, each
    weighted as TRL weighs its micro-batches (stages/losses.py), then clipped by global norm.

    dapo, cispo and vespo divide by the real tokens of the whole generation batch (after
    `mask_truncated_completions`) over its `steps_per_generation` optimizer steps, as TRL.
    `cfg.vllm_importance_sampling_correction` true (null counts as false here; the pipeline
    resolves it with TrainConfig.with_sampler_correction): the rollout's own log-probs
    (batch.logprobs, rollout.logprobs_source=sampler) and the generating policy's give TRL's
    importance-sampling ratio (stages.losses.sampler_importance_ratio), which weights the loss.

    Metrics (TRL's names): loss and grad_norm (means over optimizer steps), learning_rate (last
    step's); entropy, kl, the loss type's clip metrics (clip_ratio/*, cispo_clip_ratio,
    vespo/phi_seq_mean): each micro-batch's value over every process (token or row means;
    clip_ratio/low_min and high_max the min / max over sequences), averaged over the step's
    micro-batches as TRL averages its micro-steps; sampling/* with the correction.

    ref_model: the frozen reference when beta != 0; `model` itself for a LoRA model, whose
    reference is its base (adapters switched off, stages.lora.adapters_disabled).
    With cfg.gradient_checkpointing, every block's activations are recomputed in the backward
    ("mlp": each block's MLP activations only), and the staged evaluation keeps one part in
    flight (StagedEval.parts_in_flight); "elementwise" recomputes no matmul
    (stages.lean_activations) and keeps the parts in flight as they are.

    world (data parallel): `batch` is this rank's equal share of the generation batch. dapo's
    token count is summed over ranks, each loss is scaled so that the average of the ranks'
    gradients (mlx.nn.average_gradients) is TRL's (bnpo: the average of the ranks' token
    means), clipping follows the average, the top_entropy_quantile threshold pools the
    micro-batch of every rank, and the metrics are reduced over ranks. With
    steps_per_generation > 1 each rank shuffles its own share (same-size optimizer batches,
    different rows than one process would draw).
    """
    if cfg.micro_batch_size == "auto":
        raise ValueError("micro_batch_size=auto: choose the rows first with plan_micro_batch")
    world = world or distributed.World()
    try:
        # Checkpointing is asked for to save memory: one part in flight (a lower peak that
        # does not move with the host's timing, for some speed). On the CPU two parts buy no
        # speed (the host and the compute share the cores) and hold more: one there too.
        checkpointing = cfg.checkpointing()
        recompute = checkpointing in (True, "mlp")
        parts = 1 if recompute or mx.default_device() == mx.cpu else StagedEval.in_flight
        with (
            grad_checkpoint.enabled(model, checkpointing if recompute else False),
            lean_activations.enabled(model, cfg.lean_activations, checkpointing=checkpointing),
            lora.adapters_in_activation_dtype(model),
            StagedEval.parts_in_flight(parts),
        ):
            metrics = _update_step(model, optimizer, batch, advantages, cfg, ref_model, world, seed)
        return distributed.reduce_metrics(metrics, world)
    finally:
        model.eval()  # _update_step turns on training mode (LoRA dropout) for the gradient pass


def _update_step(
    model, optimizer, batch, advantages, cfg: TrainConfig, ref_model, world, seed: int
) -> dict[str, float]:
    """update_step's body (see there)."""
    temperature = batch.temperature or 1.0  # greedy rollouts: plain logits
    packed = pack(batch)
    max_completion_length = packed.completion_ids.shape[1]  # the rollout's completion budget
    rule = find_loss_type(cfg.loss_type)
    world_scale = float(world.size) if rule.sums_over_processes else 1.0
    n_rows = packed.tokens.shape[0]
    if cfg.mask_truncated_completions:
        kept = mx.array([reason != "length" for reason in batch.finish_reasons], dtype=mx.float32)
        packed = replace(packed, loss_mask=packed.loss_mask * kept[:, None])
    parts = cfg.steps_per_generation
    if parts < 1 or n_rows % parts:
        raise ValueError(
            f"steps_per_generation={parts} does not split the generation batch of {n_rows} rows "
            "into equal parts"
        )
    # dapo's normaliser: real tokens of the whole generation batch (every process), counted
    # after truncated completions are masked, per optimizer step (TRL's num_items_in_batch).
    num_items = mx.maximum(distributed.all_sum(packed.loss_mask.sum(), world), 1.0) / parts
    order = np.arange(n_rows)
    if parts > 1:
        order = np.random.default_rng(seed).permutation(n_rows)
    part_size = n_rows // parts
    step_rows = [order[i * part_size : (i + 1) * part_size] for i in range(parts)]
    micro = cfg.micro_batch_size or part_size

    def chunks_of(rows: np.ndarray) -> list[mx.array]:
        return [mx.array(rows[i : i + micro]) for i in range(0, len(rows), micro)]

    def no_grad_logprobs(net):
        values = []
        for chunk in chunks_of(np.arange(n_rows)):
            logprobs, _ = completion_logprobs(
                net, take_rows(packed, chunk), temperature, entropies=False
            )
            values.append(mx.stop_gradient(logprobs))
            mx.eval(values[-1])
        return mx.concatenate(values)

    # With one optimizer step per batch the ratio is 1 (old = current, detached), as in TRL,
    # and the sampler correction compares the sampler with that same forward.
    correction = bool(cfg.vllm_importance_sampling_correction)
    multi_step = cfg.num_iterations * parts > 1
    old_logprobs = no_grad_logprobs(model) if multi_step else None
    sampler_ratio, sampling_metrics = None, {}
    if correction and multi_step:
        sampler_ratio, sampling_metrics = _sampler_ratio(
            old_logprobs, batch.logprobs, packed.loss_mask, cfg
        )
    in_loss_correction = correction and not multi_step
    forward_logprobs = []  # with in_loss_correction: each chunk's, in row order
    ref_logprobs = None
    if cfg.beta != 0.0 and ref_model is model:
        with lora.adapters_disabled(model):
            ref_logprobs = no_grad_logprobs(model)
            mx.eval(ref_logprobs)
    elif cfg.beta != 0.0:
        ref_logprobs = no_grad_logprobs(ref_model)
    model.train()
    loss_and_grad = nn.value_and_grad(model, _loss_fn)
    tied = TiedInputGradient(model)  # the tied embedding's two gradients summed in place
    # Each block's backward in two parts (its MLP's, then the rest) where nothing recomputes
    # a whole block or MLP (eval_by_block).
    split = cfg.checkpointing() in (False, "elementwise")

    steps: list[dict[str, float]] = []
    per_chunk: list[dict[str, tuple[float, float]]] = []  # metric -> (value, count) per chunk
    for _ in range(cfg.num_iterations):
        for rows in step_rows:
            chunks = chunks_of(rows)
            grads, chunk_results = None, []
            learning_rate = optimizer.learning_rate.item()  # this step's, before it is taken
            for chunk in chunks:
                share = rule.micro_batch_weight(chunk.size, len(rows), len(chunks))
                chunk_packed = take_rows(packed, chunk)
                stages = StagedEval()
                with (
                    grad_checkpoint.staged(model, stages, split, lean_activations.recorded_as),
                    tied.recording(),
                ):
                    (loss, (metrics, chunk_logprobs)), chunk_grads = loss_and_grad(
                        model,
                        chunk_packed,
                        None if old_logprobs is None else old_logprobs[chunk],
                        advantages[chunk],
                        None if ref_logprobs is None else ref_logprobs[chunk],
                        None if sampler_ratio is None else sampler_ratio[chunk],
                        cfg,
                        temperature,
                        max_completion_length,
                        num_items,
                        share * world_scale,
                        world,
                        stages,
                        batch.logprobs[chunk] if in_loss_correction else None,
                    )
                chunk_grads = tied.fold(chunk_grads)
                if in_loss_correction:
                    forward_logprobs.append(chunk_logprobs)
                stages.run()  # the vocabulary head block by block, then the rest
                if grads is not None:
                    chunk_grads = tree_map(lambda a, b: a + b, grads, chunk_grads)
                grads = chunk_grads
                # The backward, last block first, each with its input's gradient. Its last
                # blocks are left in flight (two parts in flight): the host builds the next
                # micro-batch's graph meanwhile, and reads the metrics after the step.
                pipelined = PIPELINED and StagedEval.in_flight >= 2
                eval_by_block(
                    grads,
                    reverse=True,
                    alongside=stages.input_grads,
                    middle=stages.middle_grads,
                    down=stages.down_grads,
                    wait=not pipelined,
                )
                (mx.async_eval if pipelined else mx.eval)(loss, metrics, forward_logprobs)
                chunk_results.append((loss, metrics, chunk_packed.loss_mask))
            if world.size > 1:
                grads = nn.utils.average_gradients(grads, group=world.group)
            grad_norm, scale = global_norm(grads), None
            if cfg.max_grad_norm > 0:
                # optim.clip_grad_norm's scale, applied inside FusedAdamW's kernels: no scaled
                # copy of the gradients is held.
                scale = mx.minimum(cfg.max_grad_norm / (grad_norm + 1e-6), 1.0)
            if isinstance(optimizer, FusedAdamW):
                optimizer.update(model, grads, gradient_scale=scale)
            else:
                if scale is not None:
                    grads = tree_map(lambda g, s=scale: (g * s).astype(g.dtype), grads)
                optimizer.update(model, grads)
            # The parameters first, then the moments: each evaluation can then write over the
            # arrays it replaces (FusedAdamW).
            eval_by_block(model.parameters())
            eval_by_block(optimizer.state)
            step_loss = 0.0
            for loss, metrics, mask in chunk_results:
                step_loss += loss.item()
                per_chunk.append(
                    {
                        name: (
                            value.item(),
                            1.0
                            if name in EXTREME_METRICS
                            else metric_count(name, mask, cfg.importance_sampling_level),
                        )
                        for name, value in metrics.items()
                    }
                )
            steps.append(
                {"loss": step_loss, "grad_norm": grad_norm.item(), "learning_rate": learning_rate}
            )

    results = {
        "loss": float(np.mean([s["loss"] for s in steps])),
        "grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
        "learning_rate": steps[-1]["learning_rate"],
        "optimizer_steps": float(len(steps)),
    }
    results.update(_micro_step_means(per_chunk, world))
    if in_loss_correction:  # one step: the chunks are the batch's rows in order
        _, sampling_metrics = _sampler_ratio(
            mx.concatenate(forward_logprobs), batch.logprobs, packed.loss_mask, cfg
        )
    results.update({name: value.item() for name, value in sampling_metrics.items()})
    return results


_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Micro-batches overlap: the host builds one's graph while the GPU finishes the last one's
# backward (with two parts in flight, StagedEval.in_flight).
PIPELINED = True


def _block_parts(tree, reverse: bool, alongside: dict, middle: dict, down: dict) -> list[list]:
    """eval_by_block's groups, in order (then the rest of the tree, last). Built here so that
    no local of the caller keeps a group's arrays after it is evaluated."""
    # block -> its parts in backward order: the down projection's, the MLP's, the rest
    blocks: dict[int, tuple[list, list, list]] = {}
    rest = []
    for name, value in tree_flatten(tree):
        found = _BLOCK.search(name)
        if not found:
            rest.append(value)
            continue
        index = int(found.group(1))
        part = 2
        if index in down and _DOWN_PART.match(name, found.end()):
            part = 0
        elif index in middle and _MLP_PART.match(name, found.end()):
            part = 1
        blocks.setdefault(index, ([], [], []))[part].append(value)
    for index in [*alongside, *middle, *down]:
        blocks.setdefault(index, ([], [], []))
    parts: list[list] = []
    for index in sorted(blocks, reverse=reverse):
        in_down, in_mlp, block = blocks.pop(index)  # not held once evaluated
        if index in alongside:
            block.append(alongside.pop(index))
        ordered = []
        if index in down:
            ordered.append([*in_down, down.pop(index)])
        if index in middle:
            ordered.append([*in_mlp, middle.pop(index)])
        ordered.append(block)
        parts.extend(ordered if reverse else ordered[::-1])
    return [*parts, rest]


def eval_by_block(
    tree,
    *,
    reverse: bool = False,
    alongside: dict | None = None,
    middle: dict | None = None,
    down: dict | None = None,
    wait: bool = True,
) -> None:
    """Evaluate a tree of arrays named like a model's parameters (gradients, or parameters with
    optimizer state) one transformer block at a time, then the rest; `reverse`: last block
    first, the order of the backward pass. At most two parts are in flight: on a GPU, MLX
    allocates every output of an evaluation when it encodes it, so one evaluation of the whole
    backward (or of AdamW's update) would hold the temporaries of every block at once.
    `alongside` (block -> array, emptied as it goes): evaluated with that block's arrays (the
    gradient of each block's input, StagedEval.input_grads: block i's activations are then
    released with block i, not with block i - 1). `middle` (block -> array, likewise: the
    gradient of each block's MLP input, StagedEval.middle_grads): such a block is two parts,
    its MLP's arrays with that gradient first, then the rest, so one evaluation holds part of
    a block's backward. `down` (likewise, StagedEval.down_grads: the gradient of the MLP's
    down projection's input): the down projection's arrays with it come before the rest of
    the MLP's. `wait=False`: the last evaluations are left in flight (`mx.async_eval`)
    instead of waited for."""
    parts = _block_parts(tree, reverse, alongside or {}, middle or {}, down or {})
    rest = parts.pop()
    previous = None
    while parts:
        group = parts.pop(0)
        if StagedEval.in_flight < 2:
            mx.eval(group)
            continue
        mx.async_eval(group)
        if previous is not None:
            mx.eval(previous)
        previous = group
    (mx.eval if wait else mx.async_eval)(rest, previous or [])


# A block's MLP (or mixture of experts) parameters, after "layers.<i>." (eval_by_block), and
# its MLP's down projection's.
_MLP_PART = re.compile("|".join(rf"{name}\." for name in grad_checkpoint.MLP_NAMES))
_DOWN_PART = re.compile(
    "|".join(rf"{name}\.{grad_checkpoint.DOWN_NAME}\." for name in grad_checkpoint.MLP_NAMES)
)


# Squares of at most this many gradient values at a time (64 MiB of float32) in global_norm.
NORM_SLAB = 1 << 24


def global_norm(grads) -> mx.array:
    """The global L2 norm of a gradient tree (float32), evaluated slab by slab: squaring a
    gradient at once makes a temporary of its size (the 0.6 GB embedding of Qwen3-0.6B in
    float32), and one evaluation of every square would hold them all (on a GPU, MLX allocates
    an evaluation's outputs when it encodes it). Here at most NORM_SLAB squares exist at once."""
    total, pending = mx.array(0.0, dtype=mx.float32), 0
    for _, gradient in tree_flatten(grads):
        rows = gradient.reshape(gradient.shape[0], -1) if gradient.ndim else gradient.reshape(1, 1)
        step = max(1, NORM_SLAB // max(rows.shape[1], 1))
        for start in range(0, rows.shape[0], step):
            slab = rows[start : start + step]
            if pending and pending + slab.size > NORM_SLAB:
                mx.eval(total)
                pending = 0
            total = total + mx.square(slab.astype(mx.float32)).sum()
            pending += slab.size
    return mx.sqrt(total)


def _micro_step_means(per_chunk: list[dict], world: distributed.World) -> dict[str, float]:
    """TRL's logged value of each loss metric: per micro-batch, the value over every process
    (sums and counts added for means; min / max for EXTREME_METRICS), then the mean over the
    micro-batches, NaNs left out."""
    names = sorted(per_chunk[0])
    means = [n for n in names if n not in EXTREME_METRICS]
    sums = mx.array([[c[n][0] * c[n][1] for n in means] for c in per_chunk], dtype=mx.float32)
    counts = mx.array([[c[n][1] for n in means] for c in per_chunk], dtype=mx.float32)
    sums, counts = distributed.all_sum(sums, world), distributed.all_sum(counts, world)
    values = {n: np.array(sums[:, i] / mx.maximum(counts[:, i], 1.0)) for i, n in enumerate(means)}
    for name in names:
        if name not in EXTREME_METRICS:
            continue
        largest = EXTREME_METRICS[name] == "max"
        column = np.array([c[name][0] for c in per_chunk], dtype=np.float32)
        # NaN (a micro-batch without real tokens) must not win the extreme over processes
        fill = -np.inf if largest else np.inf
        column = mx.array(np.where(np.isnan(column), fill, column))
        reduced = np.array(distributed.all_extreme(column, world, largest=largest))
        values[name] = np.where(np.isinf(reduced), np.nan, reduced)
    results = {}
    for name, column in values.items():
        finite = column[~np.isnan(column)]
        results[name] = float(finite.mean()) if finite.size else math.nan
    return results


@dataclass(frozen=True)
class MicroBatchPlan:
    """What `plan_micro_batch` measured and chose (bytes are peak memory of one update)."""

    rows: int  # rows per micro-batch
    fixed_bytes: int  # weights, optimizer state, gradients and what does not grow with rows
    per_row_bytes: int  # what one more row of the longest sequence adds
    budget_bytes: int
    tokens: int  # the sequence length planned for (longest prompt + max_new_tokens)

    def describe(self) -> str:
        return (
            f"{self.rows} rows per micro-batch (budget {_size(self.budget_bytes)}: "
            f"{_size(self.fixed_bytes)} for weights, optimizer and gradients, "
            f"{_size(self.per_row_bytes)} per row of {self.tokens} tokens)"
        )


def _size(nbytes: int) -> str:
    if nbytes >= 1e8:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


class MemoryBudgetError(ValueError):
    """Not even one row fits the memory budget; the message says what to change."""


def plan_micro_batch(
    model: nn.Module,
    optimizer: optim.Optimizer,
    cfg: TrainConfig,
    *,
    max_rows: int,
    prompt_tokens: int,
    completion_tokens: int,
    budget_bytes: int,
    ref_model: nn.Module | None = None,
) -> MicroBatchPlan:
    """The largest micro-batch (<= max_rows) whose update fits `budget_bytes`, measured: one
    update step (this config: loss, head, gradient checkpointing, reference model, AdamW) on
    synthetic rows of the longest sequence, with 1 and then 3 rows, each undone afterwards
    (weights and optimizer state are put back). Peak memory grows linearly with the rows of a
    micro-batch (the vocabulary head's blocks do not grow: stages/policy.py), so the two
    peaks give the fixed part and the part per row. Raises MemoryBudgetError when one row
    does not fit."""
    tokens = prompt_tokens + completion_tokens
    optimizer.init(model.trainable_parameters())  # its state is part of the fixed memory

    def peak_with(rows: int) -> int:
        batch = _synthetic_batch(rows, prompt_tokens, completion_tokens)
        probe = replace(cfg, micro_batch_size=rows, steps_per_generation=1, num_iterations=1)
        params = tree_map(lambda x: x, model.trainable_parameters())
        state = tree_map(lambda x: x, optimizer.state)
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        try:
            with StagedEval.parts_in_flight(1):  # one part at a time: the same peak every run
                update_step(model, optimizer, batch, mx.ones((rows,)), probe, ref_model)
            return mx.get_peak_memory()
        finally:  # undo the probe's step
            model.update(params)
            optimizer.state = state
            gc.collect()
            mx.clear_cache()

    one = peak_with(1)
    per_row = max((peak_with(3) - one) // 2, 1)
    fixed = max(one - per_row, 0)
    # A run evaluates two parts at a time (StagedEval.in_flight): a tenth of the budget is kept
    # for the second one.
    usable = int(budget_bytes * 0.9)
    rows = min(max_rows, (usable - fixed) // per_row) if usable > fixed else 0
    plan = MicroBatchPlan(int(rows), fixed, per_row, budget_bytes, tokens)
    if plan.rows < 1:
        raise MemoryBudgetError(
            f"train.memory_budget_gb={budget_bytes / 1e9:.3g} cannot hold one row of {tokens} "
            f"tokens: an update of one row needs {one / 1e9:.2f} GB; raise the budget, or set "
            "train.gradient_checkpointing=true, model.lora.enabled=true, or a smaller "
            "rollout.max_new_tokens"
        )
    return plan


def _synthetic_batch(rows: int, prompt_tokens: int, completion_tokens: int):
    """Rows of the given lengths (token 0 everywhere; memory does not depend on the values)."""
    return RolloutBatch(
        prompt_ids=[[0] * prompt_tokens for _ in range(rows)],
        completion_ids=mx.zeros((rows, completion_tokens), dtype=mx.int32),
        completion_mask=mx.ones((rows, completion_tokens), dtype=mx.float32),
        logprobs=mx.zeros((rows, completion_tokens), dtype=mx.float32),
        finish_reasons=["stop"] * rows,
        prompt_texts=[""] * rows,
        texts=[""] * rows,
        group_size=rows,
    )
