"""Train a causal LM with GRPO.

    python -m pipelines.grpo +experiment=quickstart [key=value ...]
    python -m pipelines.grpo --cfg [overrides ...]      # print the composed config and exit

Compose the config (Hydra), check inputs, then one Prefect flow: load weights, and per step
rollout -> rewards -> advantages -> GRPO update (entropy inside it), checkpoint every N steps.
Every stage logs to one MLflow run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from stages import checkpoint, data, distributed, grpo_update, load_weights, lora, rewards, rollout
from stages.backend import blas

from omegaconf import OmegaConf
from prefect import flow

from pipelines import report, safety, scale, tasks
from pipelines.config import ConfigError, GRPOConfig, compose, flatten, to_schema, to_yaml
from pipelines.tracking import Tracker


class InputError(ValueError):
    """Bad user input found before training starts (missing files, columns, rewards)."""


def encode_prompt(tokenizer, prompt, data_cfg) -> list[int]:
    """Token ids of a prompt (text or chat messages), per data.use_chat_template."""
    try:
        return data.encode_prompt(
            tokenizer,
            prompt,
            use_chat_template=data_cfg.use_chat_template,
            system_prompt=data_cfg.system_prompt,
            template_kwargs=data_cfg.chat_template_kwargs,
        )
    except ValueError as error:
        raise InputError(str(error)) from None


def resolve_rewards(cfg: GRPOConfig) -> tuple[list, list[str], list[float]]:
    """(functions with their kwargs bound, names, weights); reward.weights overrides weight."""
    funcs, names, weights = [], [], []
    for name, spec in cfg.reward.funcs.items():
        try:
            _, fn = rewards.resolve(spec._target_ or name)
            fn = rewards.bind(fn, dict(spec.kwargs), name)
        except (TypeError, ValueError) as error:
            raise InputError(f"reward.funcs.{name}: {error}") from None
        funcs.append(fn)
        names.append(name)
        weights.append(spec.weight)
    if cfg.reward.weights is not None:
        weights = [float(w) for w in cfg.reward.weights]
    return funcs, names, weights


def load_data(cfg: GRPOConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) per data.*, checked against the columns the rewards need."""
    d = cfg.data
    try:
        train, held_out = data.load_splits(
            d.source,
            prompt_column=d.prompt_column,
            columns=dict(d.columns),
            num_rows=d.num_rows,
            seed=cfg.run.seed,
            eval_size=d.eval_size,
            eval_source=d.eval_source,
        )
        funcs, names, _ = resolve_rewards(cfg)
        needed = {name: rewards.required_columns(fn) for fn, name in zip(funcs, names)}
        data.check_columns(train, needed, d.source)
        if held_out:
            data.check_columns(held_out, needed, d.eval_source or d.source)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from None
    if cfg.eval.max_prompts:
        held_out = held_out[: cfg.eval.max_prompts]
    return train, held_out


def resume_point(cfg: GRPOConfig, set_aside: bool = False) -> Path | None:
    """The checkpoint to resume from, per run.resume (null, "latest" or a path)."""
    root = Path(cfg.run.output_dir) / "checkpoints"
    if cfg.run.resume is None:
        return None
    if cfg.run.resume == "latest":
        return safety.latest_checkpoint(root, set_aside=set_aside)
    path = Path(cfg.run.resume)
    if not (path / checkpoint.STATE_FILE).exists():
        raise InputError(f"run.resume={path} is not a checkpoint (no {checkpoint.STATE_FILE})")
    problem = checkpoint.validate(path)
    if problem:
        raise InputError(f"run.resume={path} is damaged: {problem}")
    return path


def preflight(cfg: GRPOConfig) -> None:
    """Check every input a user can get wrong, before the flow starts and loads anything."""
    try:
        resume_point(cfg)
        if not cfg.model.path.startswith(load_weights.BUILTIN_PREFIX):
            check_model(cfg)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from None
    load_data(cfg)


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


def load_policy(cfg: GRPOConfig, resume_from: Path | None, run_tasks=tasks):
    """(model, tokenizer, ref_model). With LoRA the adapters go on the base (those of the
    checkpoint when resuming) and the reference is the same model with adapters off."""
    s = cfg.model.lora
    if not s.enabled:
        model, tokenizer = run_tasks.load_weights_task(
            str(resume_from or cfg.model.path), cfg.model.dtype
        )
        ref_model = None
        if cfg.train.beta != 0.0:
            ref_model, _ = run_tasks.load_weights_task(cfg.model.path, cfg.model.dtype)
            ref_model.freeze()
        return model, tokenizer, ref_model
    model, tokenizer = run_tasks.load_weights_task(cfg.model.path, cfg.model.dtype)
    if resume_from is not None:
        lora.load_adapters(model, resume_from)
    else:
        settings = lora.LoraSettings(
            s.rank, s.scale, s.dropout, list(s.target_modules), s.num_layers
        )
        try:
            lora.apply(model, settings)
        except ValueError as error:
            raise InputError(str(error)) from None
    return model, tokenizer, model


def _plot_rewards(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(steps, [h["reward"] for h in history])
    axes[0].set(title="reward", xlabel="step")
    axes[1].plot(steps, [h["loss"] for h in history])
    axes[1].set(title="loss", xlabel="step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@flow(name="grpo", log_prints=False, validate_parameters=False)
def grpo_flow(config: dict, world: distributed.World | None = None) -> dict:
    """The GRPO training flow (rank 0's). `config` is the resolved config as a plain dict."""
    return train(config, world)


def _tasks_for(world: distributed.World):
    """Rank 0 runs the Prefect tasks; other ranks their plain functions (no task runs)."""
    return tasks if world.is_main else scale.plain_tasks(tasks)


def train(config: dict, world: distributed.World | None = None) -> dict:
    """The training loop; every rank of a data-parallel run runs it, rank 0 inside the flow."""
    from tqdm import tqdm

    world = world or distributed.World()
    tasks = _tasks_for(world)
    cfg = to_schema(OmegaConf.create(config))
    output_dir = Path(cfg.run.output_dir)
    ckpt_root = output_dir / "checkpoints"
    resume_from = resume_point(cfg, set_aside=world.is_main)
    state = checkpoint.load_state(resume_from) if resume_from else {}

    tracker = (
        scale.NullTracker()
        if not world.is_main
        else Tracker(
            cfg.mlflow.experiment,
            cfg.run.name,
            cfg.mlflow.tracking_uri,
            run_id=state.get("mlflow_run_id"),
            spool=output_dir / "mlflow_spool.jsonl",
            retry_seconds=cfg.safety.mlflow_retry_seconds,
        )
    )
    rank_tracker = tracker  # rank 0's own logging (evaluation runs on rank 0 only)
    if world.size > 1:
        tracker = scale.ReducedTracker(tracker, world)
    guard = safety.StepGuard(
        cfg.safety.max_nonfinite_steps,
        cfg.distributed.stop_grace_seconds if world.size > 1 else None,
    )
    status = "FAILED"
    try:
        tracker.log_params(flatten(cfg))
        tracker.set_tags({"blas": blas(), "output_dir": str(output_dir.resolve())})

        model, tokenizer, ref_model = load_policy(cfg, resume_from, tasks)

        funcs, names, weights = resolve_rewards(cfg)
        rows, eval_rows = load_data(cfg)
        stream = data.PromptStream(rows, seed=cfg.run.seed, position=state.get("data_position", 0))

        t = cfg.train
        optimizer = grpo_update.make_optimizer(
            t.learning_rate,
            schedule=t.lr_schedule,
            warmup_steps=t.warmup_steps,
            total_steps=t.steps * t.num_iterations * t.steps_per_generation,  # optimizer steps
            weight_decay=t.weight_decay,
        )
        if "optimizer" in state:
            optimizer.init(model.trainable_parameters())
            optimizer.state = state["optimizer"]
        update_cfg = grpo_update.UpdateConfig(
            loss_type=t.loss_type,
            epsilon_low=t.epsilon_low,
            epsilon_high=t.epsilon_high,
            beta=t.beta,
            temperature=cfg.rollout.temperature or 1.0,
            num_iterations=t.num_iterations,
            steps_per_generation=t.steps_per_generation,
            importance_sampling_level=t.importance_sampling_level,
            delta=t.delta,
            mask_truncated_completions=t.mask_truncated_completions,
            micro_batch_size=t.micro_batch_size,
            max_grad_norm=t.max_grad_norm,
            top_entropy_quantile=t.top_entropy_quantile,
            max_completion_length=cfg.rollout.max_new_tokens,
            gradient_checkpointing=t.gradient_checkpointing,
        )

        start_step = state.get("step", 0)
        history: list[dict] = state.get("history", [])
        last_saved = start_step if resume_from else None
        progress = tqdm(
            total=t.steps,
            initial=start_step,
            desc="grpo",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not world.is_main,
        )

        def save(done: int, direct: bool = False) -> int:
            if not world.is_main:
                return done
            # direct: no Prefect task (when stopping, its server may be going down too).
            save_task = tasks.checkpoint_task.fn if direct else tasks.checkpoint_task
            save_task(
                model,
                tokenizer,
                str(ckpt_root),
                done,
                {
                    "step": done,
                    "data_position": stream.position,
                    "seed": cfg.run.seed,
                    "mlflow_run_id": tracker.run_id,
                    "history": history,
                    "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
                    "optimizer": optimizer.state,
                },
                cfg.checkpoint.keep_last,
            )
            return done

        guard.install()
        for step in range(start_step, t.steps):
            guard.begin_step(step, model, optimizer, stream)
            step_start = time.perf_counter()
            mine = distributed.shard(t.prompts_per_step, world)  # every rank reads them all
            batch_rows = stream.next_batch(t.prompts_per_step)[mine]
            prompts = [encode_prompt(tokenizer, row["prompt"], cfg.data) for row in batch_rows]
            group = cfg.rollout.group_size
            rollout_cfg = rollout.RolloutConfig(
                seed=cfg.run.seed * 1_000_003 + step,
                row_offset=mine.start * group,
                total_rows=t.prompts_per_step * group,
                **asdict(cfg.rollout),
            )
            batch = tasks.rollout_task(model, tokenizer, prompts, rollout_cfg, tracker, step)
            batch.with_columns(batch_rows)
            scores = tasks.rewards_task(batch, funcs, names, weights, tracker, step, cfg.reward)
            all_scores = distributed.all_gather(scores, world)  # advantages of the global batch
            advantages = tasks.advantages_task(
                all_scores,
                weights,
                batch.group_size,
                t.scale_rewards,
                t.multi_objective_aggregation,
                tracker,
                step,
            )[mine.start * group : mine.stop * group]
            update_cfg.seed = cfg.run.seed * 1_000_003 + step
            metrics = tasks.update_task(
                model, optimizer, batch, advantages, update_cfg, ref_model, tracker, step, world
            )
            guard.check_update(metrics, model, optimizer, tracker, step)

            reward = rewards.combine(scores, weights)
            seconds = time.perf_counter() - step_start
            tokens = sum(map(len, batch.prompt_ids)) + batch.completion_mask.sum().item()
            tracker.log_metrics({"tokens/s": tokens / seconds, "step_seconds": seconds}, step)
            tracker.end_step()  # the step's metrics from every stage, in one MLflow write
            mean_reward = rewards.combine(all_scores, weights).mean().item()
            history.append({"step": step, "reward": mean_reward, "loss": metrics["loss"]})
            if cfg.mlflow.log_completions_every and step % cfg.mlflow.log_completions_every == 0:
                tracker.log_table(
                    {
                        "step": [step] * batch.num_rows,
                        "prompt": batch.prompt_texts,
                        "completion": batch.texts,
                        "reward": reward.tolist(),
                        "advantage": advantages.tolist(),
                        "finish_reason": batch.finish_reasons,
                    },
                    f"completions/step_{step:06d}.json",
                )
            progress.set_postfix(
                reward=f"{history[-1]['reward']:.3f}", loss=f"{metrics['loss']:.4f}", refresh=False
            )
            progress.update(1)

            done = step + 1
            due = (cfg.eval.every and done % cfg.eval.every == 0) or done == t.steps
            if world.is_main and eval_rows and due:
                tasks.evaluate_task(
                    model, tokenizer, eval_rows, funcs, names, weights, cfg, rank_tracker, done
                )
            if done % cfg.checkpoint.every == 0 or done == t.steps or guard.stop_requested:
                last_saved = save(done, direct=guard.stop_requested)
            guard.raise_if_stopping(done)
        progress.close()

        if not world.is_main:
            status = "FINISHED"
            return {"steps": t.steps, "final_reward": history[-1]["reward"] if history else None}
        final = checkpoint.latest(ckpt_root)
        fused = None
        if cfg.model.fuse_lora_at_end:
            lora.fuse(model, dequantize=True)
            fused = str(checkpoint.save(model, tokenizer, output_dir / "fused"))
            tracker.log_artifacts(fused, "fused")
        summary = {
            "steps": t.steps,
            "final_reward": history[-1]["reward"] if history else None,
            "checkpoint": str(final) if final else None,
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri,
            "last_saved_step": last_saved,
            "fused": fused,
        }
        if history:
            first = history[: min(10, len(history))]
            last = history[-min(10, len(history)) :]
            summary["reward_first10"] = sum(h["reward"] for h in first) / len(first)
            summary["reward_last10"] = sum(h["reward"] for h in last) / len(last)
            output_dir.mkdir(parents=True, exist_ok=True)
            tracker.log_artifact(_plot_rewards(history, output_dir / "curves.png"), "plots")
        if final is not None:
            tracker.log_artifacts(final, "checkpoint")
        tracker.set_tags({f"summary.{k}": v for k, v in summary.items() if v is not None})
        report.publish_summary(summary, history, tracker, cfg.run.name)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        if not guard.started:
            raise
        guard.roll_back(model, optimizer, stream)  # abandon the step: back to its start
        save(guard.step, direct=True)
        raise guard.interrupted() from None
    except safety.TrainingStopped as stopped:
        status = "KILLED"
        if last_saved != stopped.step:
            save(stopped.step, direct=True)
        raise
    finally:
        guard.uninstall()
        tracker.finish(status)


def _peer_lost(error: RuntimeError) -> str:
    return (
        f"lost contact with another process of the group ({error}): it exited or was killed. "
        "The step in progress is abandoned; the last checkpoint holds every finished step"
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    show_config = "--cfg" in args
    overrides = [a for a in args if a != "--cfg"]
    try:
        cfg = compose(overrides)
        if show_config:
            print(to_yaml(cfg))
            return 0
        world = scale.join(cfg)
        preflight(cfg)
    except (ConfigError, InputError, distributed.DistributedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    safety.quiet_stop_tracebacks()
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    if not world.is_main:  # no flow, no MLflow run, no checkpoints: rank 0 owns those
        try:
            train(resolved, world)
        except KeyboardInterrupt:
            return 130
        except safety.TrainingStopped as stopped:
            return stopped.exit_code
        except rewards.RewardError as error:
            print(f"error (rank {world.rank}): {error}", file=sys.stderr)
            return 1
        except RuntimeError as error:
            if not distributed.is_peer_failure(error):
                raise
            print(f"error (rank {world.rank}): {_peer_lost(error)}", file=sys.stderr)
            return 1
        return 0
    safety.start_prefect_server_outside_ctrl_c()
    try:
        summary = grpo_flow(resolved, world if world.size > 1 else None)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {safety.resume_hint(overrides)}", file=sys.stderr)
        return 130
    except safety.TrainingStopped as stopped:
        print(f"\n{stopped}; checkpoint saved at step {stopped.step}", file=sys.stderr)
        print(safety.resume_hint(overrides), file=sys.stderr)
        return stopped.exit_code
    except rewards.RewardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if world.size == 1 or not distributed.is_peer_failure(error):
            raise
        print(f"error: {_peer_lost(error)}", file=sys.stderr)
        print(safety.resume_hint(overrides), file=sys.stderr)
        return 1
    first, last = summary.get("reward_first10"), summary.get("reward_last10")
    if first is not None:
        print(
            f"done: {summary['steps']} steps, mean reward first 10 steps {first:.3f} -> "
            f"last 10 steps {last:.3f}"
        )
    print(f"checkpoint: {summary['checkpoint']}")
    if summary.get("fused"):
        print(f"fused model: {summary['fused']}")
    print(f"mlflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
