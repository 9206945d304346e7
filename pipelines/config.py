"""The GRPO config: Hydra composes `conf/`, and the root schema is one node per section.

Each section's dataclass lives beside the code that uses it and validates its own fields
(stages.rollout.RolloutConfig, stages.grpo_update.TrainConfig, ...; stages/settings.py). This
module holds the root `GRPOConfig`, the two sections no stage owns (`run`, `schedule`), and the
checks that span sections. `compose(overrides)` composes `conf/grpo.yaml` with Hydra's override
grammar, merges it into the schema (unknown keys and wrong types fail there) and checks values.
Every failure is a `ConfigError` whose message is one line naming the key, raised before any
model is loaded.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.checkpoint import CheckpointConfig
from stages.data import DataConfig
from stages.distributed import DistributedConfig
from stages.evaluate import EvalConfig
from stages.grpo_update import TrainConfig
from stages.load_weights import ModelConfig
from stages.rewards import RewardConfig
from stages.rollout import RolloutConfig
from stages.settings import FieldError, check, setting

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines.safety import SafetyConfig
from pipelines.tracking import MlflowConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A bad configuration; the message is one line that names the key."""


@dataclass
class RunConfig:
    """`run.*`: the run's name, seed, output folder and resume point."""

    name: str = setting("quickstart", "MLflow run name and output folder name")
    seed: int = setting(0, "seeds data order, sampling and everything random")
    output_dir: str = setting(
        "outputs/${run.name}", "checkpoints go to <output_dir>/checkpoints/step-XXXXXXXX"
    )
    resume: str | None = setting(
        None, "null: start fresh; latest: newest checkpoint in output_dir; or a path"
    )

    def validate(self) -> None:
        check(bool(self.name), "name", self.name, "a non-empty name")


@dataclass
class ScheduleConfig:
    """`schedule.*`: read by `python -m pipelines.schedule` only; one of cron / interval."""

    cron: str | None = setting(None, 'e.g. "0 3 * * *" (nightly at 03:00 in schedule.timezone)')
    interval: float | None = setting(None, "or: seconds between runs (one of cron / interval)")
    timezone: str = setting("UTC", "IANA name, for cron")
    name: str | None = setting(None, "Prefect deployment name; null: run.name")

    def validate(self) -> None:
        check(self.interval is None or self.interval > 0, "interval", self.interval, "> 0 seconds")
        check(
            self.cron is None or self.interval is None,
            "interval",
            self.interval,
            "null when schedule.cron is set (one schedule per deployment)",
        )
        if self.cron is None and self.timezone == "UTC":
            return
        # Prefect parses cron strings and time zones; imported only when there is one to check
        # (importing prefect takes seconds).
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=self.cron or "0 0 * * *", timezone=self.timezone)
        except ValueError as error:
            if "timezone" in str(error):
                check(False, "timezone", self.timezone, "an IANA time zone like Europe/Paris")
            check(False, "cron", self.cron, 'a cron string like "0 3 * * *"')


@dataclass
class GRPOConfig:
    """The whole config: one node per section of conf/grpo.yaml."""

    run: RunConfig = setting(factory=RunConfig, help="the run")
    model: ModelConfig = setting(factory=ModelConfig, help="weights to train")
    data: DataConfig = setting(factory=DataConfig, help="prompts")
    reward: RewardConfig = setting(factory=RewardConfig, help="reward functions")
    rollout: RolloutConfig = setting(factory=RolloutConfig, help="generation")
    train: TrainConfig = setting(factory=TrainConfig, help="objective and optimizer")
    eval: EvalConfig = setting(factory=EvalConfig, help="held-out evaluation")
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig, help="checkpoints")
    mlflow: MlflowConfig = setting(factory=MlflowConfig, help="tracking")
    safety: SafetyConfig = setting(factory=SafetyConfig, help="non-finite steps, outages")
    schedule: ScheduleConfig = setting(factory=ScheduleConfig, help="scheduled runs")
    distributed: DistributedConfig = setting(factory=DistributedConfig, help="data parallel")
    experiment: Any = setting(
        None, "selected with +experiment=<name> (conf/experiment/*.yaml); none: the quickstart"
    )


def sections(cfg: GRPOConfig) -> dict[str, Any]:
    """Section name -> its config node (every field of GRPOConfig that is a dataclass)."""
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(getattr(cfg, f.name))
    }


def validate(cfg: GRPOConfig) -> GRPOConfig:
    """Each section checks its own values, then the checks that span sections. Raises
    ConfigError naming the key."""
    try:
        for name, section in sections(cfg).items():
            try:
                section.validate()
            except FieldError as error:
                raise error.within(name) from None
        _check_across_sections(cfg)
    except FieldError as error:
        raise ConfigError(f"config {error}") from None
    return cfg


def _check_across_sections(cfg: GRPOConfig) -> None:
    t, r = cfg.train, cfg.rollout
    check(
        r.group_size >= 2,
        "rollout.group_size",
        r.group_size,
        ">= 2 (advantages compare completions within a group)",
    )
    rows = t.prompts_per_step * r.group_size
    check(
        rows % t.steps_per_generation == 0,
        "train.steps_per_generation",
        t.steps_per_generation,
        f"a divisor of the {rows} rows of a generation batch "
        "(train.prompts_per_step * rollout.group_size)",
    )
    correction = t.with_sampler_correction(r.fast_kernels).vllm_importance_sampling_correction
    check(
        not correction or r.logprobs_source == "sampler",
        "train.vllm_importance_sampling_correction",
        t.vllm_importance_sampling_correction,
        "false or null with rollout.logprobs_source=policy (the correction needs the "
        "sampler's own log-probs)",
    )
    check(
        not correction
        or t.loss_type != "vespo"
        or t.vllm_importance_sampling_mode.startswith("token"),
        "train.vllm_importance_sampling_mode",
        t.vllm_importance_sampling_mode,
        "token_truncate | token_mask with loss_type=vespo (TRL)",
    )
    funcs = cfg.reward.funcs
    check(
        bool(funcs) or r.environment_factory is not None,
        "reward.funcs",
        {},
        "at least one reward function (or a rollout.environment_factory with get_reward)",
    )
    check(
        not r.rollout_func or r.logprobs_source == "sampler",
        "rollout.logprobs_source",
        r.logprobs_source,
        "sampler with rollout.rollout_func (its log-probs are the function's)",
    )
    check(
        cfg.data.source != "builtin:none" or r.environment_factory is not None,
        "data.source",
        cfg.data.source,
        "a dataset, unless rollout.environment_factory makes the prompts (builtin:none)",
    )
    check(
        cfg.eval.accuracy_reward is None or cfg.eval.accuracy_reward in funcs,
        "eval.accuracy_reward",
        cfg.eval.accuracy_reward,
        f"null or one of reward.funcs ({', '.join(funcs)})",
    )


_NOISE = ("object_type", "reference_type", "Config search path", "provider=")


def _one_line(error: Exception) -> str:
    """OmegaConf/Hydra errors span lines ("...\\n    full_key: x"); fold them into one."""
    text = str(error)
    unknown = re.match(r"Could not override '([^']+)'\.\s*To append to your config", text)
    if unknown:
        key = unknown.group(1)
        return f"unknown key {key} (check the spelling; every key is in conf/grpo.yaml)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(line for line in lines if not line.startswith(_NOISE))


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


def to_container(cfg: GRPOConfig) -> dict:
    """The resolved config as plain dicts and lists (JSON-able)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def flatten(cfg: GRPOConfig) -> dict[str, str]:
    """Dotted key -> value string of the resolved config (MLflow params)."""
    flat: dict[str, str] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)

    visit("", to_container(cfg))
    return flat


def to_yaml(cfg: GRPOConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
