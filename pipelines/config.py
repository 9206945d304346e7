"""The GRPO config: Hydra composes `conf/`, these dataclasses are its schema.

`compose(overrides)` composes `conf/grpo.yaml` with Hydra's override grammar, merges it into the
schema (unknown keys and wrong types fail there) and checks values. Every failure is a
`ConfigError` whose message is one line naming the key, raised before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


BACKENDS = ("any", "ring", "mpi", "nccl")


class ConfigError(ValueError):
    """A bad configuration; the message is one line that names the key."""


@dataclass
class RunConfig:
    name: str = "quickstart"
    seed: int = 0
    output_dir: str = "outputs/${run.name}"
    resume: str | None = None  # null, "latest", or a checkpoint directory


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    scale: float = 20.0  # mlx-lm's scale: the update is scale * (x @ A @ B)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # empty: every linear in a block
    num_layers: int = -1  # adapt the last N blocks; -1: all


@dataclass
class ModelConfig:
    path: str = MISSING  # HF-format directory or builtin:<name>
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on GPU/Metal; checkpoint = as stored
    lora: LoraConfig = field(default_factory=LoraConfig)
    fuse_lora_at_end: bool = False  # merge the adapters and save full HF weights to <out>/fused


@dataclass
class DataConfig:
    source: str = MISSING  # builtin:arithmetic, or a .jsonl/.json/.csv/.parquet/save_to_disk path
    prompt_column: str = "prompt"
    num_rows: int = 512  # built-in task only
    use_chat_template: bool = False
    system_prompt: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # reward argument -> dataset column
    eval_size: int = 0  # rows held out of the training data for evaluation
    eval_source: str | None = None  # or a separate file of evaluation prompts
    # Extra chat-template variables, e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardFuncConfig:
    weight: float = 1.0
    # Import path of a TRL-signature reward function; null: the key names a built-in.
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # settings bound to the function


ON_ERROR_CHOICES = ("raise", "none")


@dataclass
class RewardConfig:
    funcs: dict[str, RewardFuncConfig] = field(default_factory=dict)
    weights: list[float] | None = None  # TRL's reward_weights: one per function, in order
    timeout: float | None = None  # seconds per reward-function call; null: no limit
    on_error: str = "raise"  # raise | none (record None, report function and sample)


@dataclass
class RolloutSettings:
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    presence_context_size: int = 20
    frequency_penalty: float = 0.0
    frequency_context_size: int = 20
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    stop_strings: list[str] = field(default_factory=list)
    max_kv_size: int = 0
    logprobs_source: str = "sampler"
    engine: str = "auto"  # auto | mlx_lm | fused (stages.rollout.RolloutConfig.engine)


@dataclass
class TrainConfig:
    steps: int = 300
    prompts_per_step: int = 8
    learning_rate: float = 3e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 0
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    beta: float = 0.0
    num_iterations: int = 1
    steps_per_generation: int = 1
    scale_rewards: str = "group"
    multi_objective_aggregation: str = "sum_then_normalize"
    importance_sampling_level: str = "token"
    delta: float | None = None
    mask_truncated_completions: bool = False
    top_entropy_quantile: float = 1.0
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass


@dataclass
class EvalSettings:
    every: int = 0  # evaluate every N steps (0: only at the end); needs eval rows
    num_samples: int = 1  # 1: greedy; k > 1: k sampled completions per prompt, pass@k
    max_prompts: int = 0  # evaluate on at most this many eval rows; 0: all
    batch_size: int = 16  # prompts per generate call
    accuracy_reward: str | None = None  # reward function that defines "correct"; null: first
    accuracy_threshold: float = 1.0  # correct when that reward >= this
    table_rows: int = 16  # example completions logged as a table


@dataclass
class CheckpointConfig:
    every: int = 20
    keep_last: int = 3


@dataclass
class MlflowConfig:
    experiment: str = "grpo"
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    log_completions_every: int = 10


@dataclass
class SafetyConfig:
    max_nonfinite_steps: int = 5  # stop (with a checkpoint) after N NaN/inf steps in a row
    mlflow_retry_seconds: float = 10.0  # while MLflow is unreachable, retry at most this often


@dataclass
class DistributedConfig:
    # Read under `mlx.launch -n N ...` (data parallel); a lone process is world size 1.
    backend: str = "any"  # any | ring | mpi | nccl
    # After SIGTERM/Ctrl-C in a group of processes, the step has this long to finish before the
    # process exits without saving: a step whose peer has died can never finish.
    stop_grace_seconds: float = 300.0


@dataclass
class ScheduleConfig:
    # Read by `python -m pipelines.schedule` only; exactly one of cron / interval.
    cron: str | None = None  # cron string, e.g. "0 3 * * *"
    interval: float | None = None  # seconds between runs
    timezone: str = "UTC"  # for cron
    name: str | None = None  # deployment name; null: run.name


@dataclass
class GRPOConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    experiment: Any = None


_NOISE = ("object_type", "reference_type", "Config search path", "provider=")


def _one_line(error: Exception) -> str:
    """OmegaConf/Hydra errors span lines ("...\n    full_key: x"); fold them into one."""
    text = str(error)
    unknown = re.match(r"Could not override '([^']+)'\.\s*To append to your config", text)
    if unknown:
        key = unknown.group(1)
        return f"unknown key {key} (check the spelling; every key is in conf/grpo.yaml)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(line for line in lines if not line.startswith(_NOISE))


def _check(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"config {key}={value!r} is invalid: expected {expected}")


def validate(cfg: GRPOConfig) -> GRPOConfig:
    """Value checks the types cannot express. Raises ConfigError naming the key."""
    from stages.grpo_update import AGGREGATIONS, IS_LEVELS, LOSS_TYPES, SCALE_REWARDS, SCHEDULES
    from stages.rewards import REGISTRY, bind
    from stages.rollout import ENGINES

    t, r = cfg.train, cfg.rollout
    _check(t.steps >= 1, "train.steps", t.steps, ">= 1")
    _check(t.prompts_per_step >= 1, "train.prompts_per_step", t.prompts_per_step, ">= 1")
    _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "> 0")
    _check(t.lr_schedule in SCHEDULES, "train.lr_schedule", t.lr_schedule, " | ".join(SCHEDULES))
    _check(t.loss_type in LOSS_TYPES, "train.loss_type", t.loss_type, " | ".join(LOSS_TYPES))
    _check(
        t.scale_rewards in SCALE_REWARDS,
        "train.scale_rewards",
        t.scale_rewards,
        " | ".join(SCALE_REWARDS),
    )
    _check(0 <= t.epsilon_low < 1, "train.epsilon_low", t.epsilon_low, "in [0, 1)")
    _check(t.epsilon_high >= 0, "train.epsilon_high", t.epsilon_high, ">= 0")
    _check(t.beta >= 0, "train.beta", t.beta, ">= 0")
    _check(t.num_iterations >= 1, "train.num_iterations", t.num_iterations, ">= 1")
    _check(
        t.micro_batch_size >= 0,
        "train.micro_batch_size",
        t.micro_batch_size,
        ">= 0 (0 = whole batch)",
    )
    _check(
        t.multi_objective_aggregation in AGGREGATIONS,
        "train.multi_objective_aggregation",
        t.multi_objective_aggregation,
        " | ".join(AGGREGATIONS),
    )
    _check(
        t.importance_sampling_level in IS_LEVELS,
        "train.importance_sampling_level",
        t.importance_sampling_level,
        " | ".join(IS_LEVELS),
    )
    _check(t.delta is None or t.delta > 1, "train.delta", t.delta, "null or > 1")
    _check(
        t.steps_per_generation >= 1,
        "train.steps_per_generation",
        t.steps_per_generation,
        ">= 1",
    )
    rows = t.prompts_per_step * r.group_size
    _check(
        rows % t.steps_per_generation == 0,
        "train.steps_per_generation",
        t.steps_per_generation,
        f"a divisor of the {rows} rows of a generation batch "
        "(train.prompts_per_step * rollout.group_size)",
    )
    _check(
        0 <= t.top_entropy_quantile <= 1,
        "train.top_entropy_quantile",
        t.top_entropy_quantile,
        "in [0, 1]",
    )
    _check(
        r.group_size >= 2,
        "rollout.group_size",
        r.group_size,
        ">= 2 (advantages compare completions within a group)",
    )
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, ">= 1")
    _check(r.temperature >= 0, "rollout.temperature", r.temperature, ">= 0")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "in (0, 1]")
    _check(r.top_k >= 0, "rollout.top_k", r.top_k, ">= 0 (0 disables)")
    _check(0 <= r.min_p < 1, "rollout.min_p", r.min_p, "in [0, 1)")
    _check(r.repetition_penalty > 0, "rollout.repetition_penalty", r.repetition_penalty, "> 0")
    for key in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
        _check(getattr(r, key) >= 1, f"rollout.{key}", getattr(r, key), ">= 1")
    _check(0 <= r.xtc_probability <= 1, "rollout.xtc_probability", r.xtc_probability, "in [0, 1]")
    _check(0 <= r.xtc_threshold <= 0.5, "rollout.xtc_threshold", r.xtc_threshold, "in [0, 0.5]")
    _check(all(r.stop_strings), "rollout.stop_strings", r.stop_strings, "non-empty strings")
    _check(r.max_kv_size >= 0, "rollout.max_kv_size", r.max_kv_size, ">= 0 (0 = unbounded)")
    _check(
        r.logprobs_source in ("sampler", "policy"),
        "rollout.logprobs_source",
        r.logprobs_source,
        "sampler | policy",
    )
    _check(r.engine in ENGINES, "rollout.engine", r.engine, " | ".join(ENGINES))
    _check(cfg.checkpoint.every >= 1, "checkpoint.every", cfg.checkpoint.every, ">= 1")
    _check(
        cfg.model.dtype in ("auto", "checkpoint", "float32", "bfloat16", "float16"),
        "model.dtype",
        cfg.model.dtype,
        "auto | checkpoint | float32 | bfloat16 | float16",
    )
    lora = cfg.model.lora
    _check(lora.rank >= 1, "model.lora.rank", lora.rank, ">= 1")
    _check(lora.scale > 0, "model.lora.scale", lora.scale, "> 0")
    _check(0 <= lora.dropout < 1, "model.lora.dropout", lora.dropout, "in [0, 1)")
    _check(
        lora.num_layers == -1 or lora.num_layers >= 1,
        "model.lora.num_layers",
        lora.num_layers,
        ">= 1, or -1 for all blocks",
    )
    _check(
        not cfg.model.fuse_lora_at_end or lora.enabled,
        "model.fuse_lora_at_end",
        True,
        "false unless model.lora.enabled=true (there is nothing to fuse)",
    )
    _check(
        not cfg.data.chat_template_kwargs or cfg.data.use_chat_template,
        "data.chat_template_kwargs",
        dict(cfg.data.chat_template_kwargs),
        "empty unless data.use_chat_template=true",
    )
    _check_ops(cfg)
    _check(bool(cfg.reward.funcs), "reward.funcs", {}, "at least one reward function")
    for name, spec in cfg.reward.funcs.items():
        _check(
            spec._target_ is not None or name in REGISTRY,
            f"reward.funcs.{name}",
            name,
            f"a built-in ({', '.join(sorted(REGISTRY))}) or an entry with _target_",
        )
        if spec._target_ is None:
            try:
                bind(REGISTRY[name], dict(spec.kwargs), name)
            except (TypeError, ValueError) as error:
                raise ConfigError(
                    f"config reward.funcs.{name}.kwargs is invalid: {error}"
                ) from None
    rw = cfg.reward
    if rw.weights is not None and len(rw.weights) != len(rw.funcs):
        raise ConfigError(
            f"config reward.weights has {len(rw.weights)} values for {len(rw.funcs)} reward "
            f"functions ({', '.join(rw.funcs)}); give one weight per function, in that order"
        )
    _check(rw.on_error in ON_ERROR_CHOICES, "reward.on_error", rw.on_error, "raise | none")
    _check(rw.timeout is None or rw.timeout > 0, "reward.timeout", rw.timeout, "null or > 0")
    d, e = cfg.data, cfg.eval
    _check(d.eval_size >= 0, "data.eval_size", d.eval_size, ">= 0")
    _check(e.every >= 0, "eval.every", e.every, ">= 0 (0: only at the end)")
    _check(e.num_samples >= 1, "eval.num_samples", e.num_samples, ">= 1 (1: greedy)")
    _check(e.max_prompts >= 0, "eval.max_prompts", e.max_prompts, ">= 0 (0: all)")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
    _check(e.table_rows >= 0, "eval.table_rows", e.table_rows, ">= 0")
    _check(
        e.accuracy_reward is None or e.accuracy_reward in rw.funcs,
        "eval.accuracy_reward",
        e.accuracy_reward,
        f"null or one of reward.funcs ({', '.join(rw.funcs)})",
    )
    return cfg


def _check_ops(cfg: GRPOConfig) -> None:
    s, sch = cfg.safety, cfg.schedule
    _check(s.max_nonfinite_steps >= 1, "safety.max_nonfinite_steps", s.max_nonfinite_steps, ">= 1")
    _check(s.mlflow_retry_seconds > 0, "safety.mlflow_retry_seconds", s.mlflow_retry_seconds, "> 0")
    backend = cfg.distributed.backend
    _check(backend in BACKENDS, "distributed.backend", backend, " | ".join(BACKENDS))
    grace = cfg.distributed.stop_grace_seconds
    _check(grace > 0, "distributed.stop_grace_seconds", grace, "> 0")
    _check(
        sch.interval is None or sch.interval > 0, "schedule.interval", sch.interval, "> 0 seconds"
    )
    _check(
        sch.cron is None or sch.interval is None,
        "schedule.interval",
        sch.interval,
        "null when schedule.cron is set (one schedule per deployment)",
    )
    if sch.cron is not None or sch.timezone != "UTC":
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=sch.cron or "0 0 * * *", timezone=sch.timezone)
        except ValueError as error:
            key = "schedule.timezone" if "timezone" in str(error) else "schedule.cron"
            expected = (
                "an IANA time zone like Europe/Paris"
                if key == "schedule.timezone"
                else 'a cron string like "0 3 * * *"'
            )
            _check(False, key, getattr(sch, key.split(".")[1]), expected)


def to_schema(composed: DictConfig) -> GRPOConfig:
    """Merge a composed DictConfig into the schema and validate it."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(GRPOConfig), composed)
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config error: {_one_line(error)}") from None
    return validate(cfg)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> GRPOConfig:
    """Compose conf/grpo.yaml with Hydra overrides (e.g. "+experiment=quickstart")."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = hydra_compose(config_name="grpo", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"config error: {_one_line(error)}") from None
    return to_schema(composed)


def flatten(cfg: GRPOConfig) -> dict[str, str]:
    """Dotted key -> value string of the resolved config (MLflow params)."""
    flat: dict[str, str] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)

    visit("", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return flat


def to_yaml(cfg: GRPOConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
