"""The user's inputs to a run, checked before anything starts and then loaded.

`preflight(cfg)` checks every input a user can get wrong (the resume point, the model directory,
the data and the columns the reward functions need) and raises `InputError` with one line naming
the problem, before the flow starts or any weights load. The loaders below are what the training
loop calls to get the policy, the data and the reward functions.
"""

from __future__ import annotations

from pathlib import Path

from stages import backend, data, load_weights, lora, rewards

from pipelines import resume
from pipelines.config import GRPOConfig


class InputError(ValueError):
    """Bad user input found before training starts (missing files, columns, rewards)."""


def reward_funcs(cfg: GRPOConfig) -> rewards.RewardFuncs:
    try:
        return rewards.resolve_funcs(cfg.reward)
    except ValueError as error:
        raise InputError(str(error)) from None


def load_data(cfg: GRPOConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) per data.*, checked against the columns the rewards need."""
    source = cfg.data.source
    funcs = reward_funcs(cfg)
    try:
        train, held_out = data.load_splits(cfg.data, seed=cfg.run.seed)
        needed = {name: rewards.required_columns(fn) for fn, name in zip(funcs.funcs, funcs.names)}
        data.check_columns(train, needed, source)
        if held_out:
            data.check_columns(held_out, needed, cfg.data.eval_source or source)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from None
    if cfg.eval.max_prompts:
        held_out = held_out[: cfg.eval.max_prompts]
    return train, held_out


def encode_prompts(tokenizer, rows: list[dict], cfg: GRPOConfig) -> list[list[int]]:
    """Token ids of the rows' prompts per data.* (chat template, system prompt)."""
    try:
        return data.encode_prompts(tokenizer, [row["prompt"] for row in rows], cfg.data)
    except ValueError as error:
        raise InputError(str(error)) from None


def resume_point(cfg: GRPOConfig, set_aside: bool = False) -> Path | None:
    """The checkpoint to resume from, per run.resume (null, "latest" or a path)."""
    try:
        return resume.resume_point(cfg.run.output_dir, cfg.run.resume, set_aside=set_aside)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from None


def check_model(cfg: GRPOConfig) -> None:
    """The model directory loads (architecture, shards, shapes, chat template, LoRA/quantized)."""
    model_dir = load_weights.resolve_path(cfg.model.path)
    config = load_weights.check_model_dir(model_dir)
    load_weights.check_shapes(model_dir)
    if cfg.data.use_chat_template:
        load_weights.check_chat_template(model_dir)
    if ("quantization" in config or "quantization_config" in config) and not cfg.model.lora.enabled:
        raise InputError(
            f"{model_dir / 'config.json'} is a quantized model: train it with "
            "model.lora.enabled=true (QLoRA), or use full-precision weights"
        )


def preflight(cfg: GRPOConfig) -> None:
    """Check every input a user can get wrong, before the flow starts and loads anything."""
    resume_point(cfg)
    try:
        if not cfg.model.path.startswith(load_weights.BUILTIN_PREFIX):
            check_model(cfg)
        if cfg.train.micro_batch_size == "auto":
            check_memory_budget(cfg)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from None
    load_data(cfg)


def memory_budget(cfg: GRPOConfig) -> int:
    """train.memory_budget_gb in bytes, or the device's (stages.backend.memory_budget)."""
    if cfg.train.memory_budget_gb is not None:
        return int(cfg.train.memory_budget_gb * 1e9)
    return backend.memory_budget()[0]


def check_memory_budget(cfg: GRPOConfig) -> None:
    """With micro_batch_size=auto: the model's weights, gradients and AdamW state (counted from
    the safetensors headers, before anything loads) must leave room for rows."""
    values = load_weights.parameter_count(load_weights.resolve_path(cfg.model.path))
    dtype = cfg.model.dtype if cfg.model.dtype in ("float32", "bfloat16", "float16") else None
    width = 4 if (dtype or str(backend.resolve_dtype("auto"))).endswith("float32") else 2
    trained = 0 if cfg.model.lora.enabled else values
    copies = 1 + (cfg.train.beta != 0 and not cfg.model.lora.enabled)  # the reference model
    needed = (values * copies + 3 * trained) * width  # weights, gradients, AdamW's m and v
    budget = memory_budget(cfg)
    if needed >= budget:
        raise InputError(
            f"train.memory_budget_gb={budget / 1e9:.3g} cannot hold the model: its weights, "
            f"gradients and AdamW state take {needed / 1e9:.1f} GB before any row; raise the "
            "budget or set model.lora.enabled=true"
        )


def load_policy(cfg: GRPOConfig, resume_from: Path | None, tasks):
    """(model, tokenizer, ref_model) through `tasks.load_weights_task`. With LoRA the adapters go
    on the base (those of the checkpoint when resuming) and the reference is the same model with
    adapters off; otherwise the reference (beta > 0) is a frozen copy of the starting model."""
    m = cfg.model
    if not m.lora.enabled:
        model, tokenizer = tasks.load_weights_task(str(resume_from or m.path), m.dtype)
        ref_model = None
        if cfg.train.beta != 0.0:
            ref_model, _ = tasks.load_weights_task(m.path, m.dtype)
            ref_model.freeze()
        return model, tokenizer, ref_model
    model, tokenizer = tasks.load_weights_task(m.path, m.dtype)
    if resume_from is not None:
        lora.load_adapters(model, resume_from)
    else:
        try:
            lora.apply(model, m.lora)
        except ValueError as error:
            raise InputError(str(error)) from None
    return model, tokenizer, model
