"""Train a causal LM with GRPO.

    python -m pipelines.grpo +experiment=quickstart [key=value ...]
    python -m pipelines.grpo --cfg [overrides ...]      # print the composed config and exit

Compose the config (Hydra), check inputs, then one Prefect flow: load weights, and per step
rollout -> rewards (with train.dynamic_sampling: more rounds of fresh prompts until enough groups
have rewards that differ) -> advantages -> GRPO update (entropy inside it), checkpoint every N
steps. Every stage logs to one MLflow run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from stages import checkpoint, data, distributed, grpo_update, lora, multiturn, rewards, rollout
from stages.advantages import informative_groups
from stages.backend import blas
from stages.rollout import step_seed

import mlx.core as mx
import numpy as np
from omegaconf import OmegaConf
from prefect import flow

from pipelines import data_parallel, prefect_runtime, report, resume, safety, tasks
from pipelines.config import ConfigError, compose, flatten, to_container, to_schema, to_yaml
from pipelines.inputs import (
    InputError,
    encode_prompts,
    load_data,
    load_policy,
    memory_budget,
    multi_turn,
    preflight,
    resume_point,
    reward_funcs,
)
from pipelines.tracking import Tracker


@flow(name="grpo", log_prints=False, validate_parameters=False)
def grpo_flow(config: dict, world: distributed.World | None = None) -> dict:
    """The GRPO training flow (rank 0's). `config` is the resolved config as a plain dict."""
    return train(config, world)


def train(config: dict, world: distributed.World | None = None) -> dict:
    """The training loop; every rank of a data-parallel run runs it, rank 0 inside the flow.
    Rank 0 runs the Prefect tasks; the other ranks their plain functions (no task runs)."""
    from tqdm import tqdm

    world = world or distributed.World()
    run_tasks = tasks if world.is_main else data_parallel.plain_tasks(tasks)
    cfg = to_schema(OmegaConf.create(config))
    t = cfg.train.with_sampler_correction(cfg.rollout.fast_kernels)
    group = cfg.rollout.group_size
    output_dir = Path(cfg.run.output_dir)
    ckpt_root = output_dir / "checkpoints"
    resume_from = resume_point(cfg, set_aside=world.is_main)
    state = checkpoint.load_state(resume_from) if resume_from else {}

    tracker = (
        data_parallel.NullTracker()
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
        tracker = data_parallel.ReducedTracker(tracker, world)
    guard = safety.StepGuard(
        cfg.safety.max_nonfinite_steps,
        cfg.distributed.stop_grace_seconds if world.size > 1 else None,
    )
    status = "FAILED"
    try:
        tracker.log_params(flatten(cfg))
        tracker.set_tags({"blas": blas(), "output_dir": str(output_dir.resolve())})

        model, tokenizer, ref_model = load_policy(cfg, resume_from, run_tasks)
        turns = multi_turn(cfg, tokenizer)  # tools, environments or rollout_func; None: one turn
        funcs = reward_funcs(cfg)
        rows, eval_rows = load_data(cfg)
        eval_prompts = encode_prompts(tokenizer, eval_rows, cfg) if world.is_main else []
        stream = data.PromptStream(rows, seed=cfg.run.seed, position=state.get("data_position", 0))

        optimizer = grpo_update.make_optimizer(
            t.learning_rate,
            schedule=t.lr_schedule,
            warmup_steps=t.warmup_steps,
            total_steps=t.optimizer_steps,
            weight_decay=t.weight_decay,
        )
        if "optimizer" in state:
            optimizer.init(model.trainable_parameters())
            optimizer.state = state["optimizer"]
        if t.micro_batch_size == "auto":  # measured once; a resumed run keeps its choice
            planned = state.get("micro_batch_size") or plan_micro_batch(
                cfg, t, model, optimizer, ref_model, tokenizer, rows, world, turns
            )
            t = replace(t, micro_batch_size=planned)

        start_step = state.get("step", 0)
        history: list[dict] = state.get("history", [])
        evals: list[dict] = state.get("evals", [])  # {"step", "reward", "accuracy"} per eval
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
            save_task = run_tasks.checkpoint_task.fn if direct else run_tasks.checkpoint_task
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
                    "evals": evals,
                    "config": to_container(cfg),
                    "micro_batch_size": t.micro_batch_size,
                    "optimizer": optimizer.state,
                },
                cfg.checkpoint.keep_last,
            )
            return done

        def generate(step: int, round_index: int = 0):
            """One generation round: this rank's share of fresh prompts, rolled out and scored.
            Returns (this rank's batch, its scores, every rank's scores)."""
            mine = distributed.shard(t.prompts_per_step, world)  # every rank reads them all
            batch_rows = stream.next_batch(t.prompts_per_step)[mine]
            # multi-turn rollouts encode each row's prompt themselves (tools, observations)
            prompts = batch_rows if turns else encode_prompts(tokenizer, batch_rows, cfg)
            batch = run_tasks.rollout_task(
                model,
                tokenizer,
                prompts,
                cfg.rollout,
                tracker,
                step,
                turns=turns,
                world=world,
                seed=step_seed(cfg.run.seed, step, round_index=round_index),
                row_offset=mine.start * group,
                total_rows=t.prompts_per_step * group,
            )
            if turns is None:
                batch.with_columns(batch_rows)
            scores = run_tasks.rewards_task(batch, funcs, cfg.reward, tracker, step)
            return batch, scores, distributed.all_gather(scores, world)

        def evaluate(done: int) -> None:
            """Rank 0: the held-out evaluation after `done` steps (0: before training)."""
            metrics = run_tasks.evaluate_task(
                model,
                tokenizer,
                eval_prompts,
                eval_rows,
                funcs,
                cfg.rollout,
                cfg.eval,
                cfg.reward,
                step_seed(cfg.run.seed, done, "eval"),
                rank_tracker,
                done,
                turns,
            )
            evals.append(
                {
                    "step": done,
                    "reward": metrics["eval/reward"],
                    "accuracy": metrics["eval/accuracy"],
                }
            )

        parts = t.steps_per_generation

        def dynamic_sampling(step: int, batch, all_scores):
            """DAPO's dynamic sampling: keep the groups whose rewards differ (decided on every
            rank's scores, so every rank keeps the same ones) and generate rounds of fresh
            prompts until there are prompts_per_step of them or the rounds run out. Returns
            (this rank's share of the kept groups, their scores, the kept groups' scores of
            every rank, the scores of everything generated)."""
            first_batch, kept, generated, rounds = batch, [], [all_scores], 1
            while True:
                informative = informative_groups(all_scores, funcs.weights, group)
                starts = [int(g) * group for g in np.flatnonzero(informative)]
                rows = [start + i for start in starts for i in range(group)]
                if rows:
                    kept.append((rollout.select_rows(rollout.all_gather_batch(batch, world), rows),
                                 all_scores[mx.array(rows)]))  # fmt: skip
                n_kept = sum(len(b.prompt_ids) for b, _ in kept) // group
                if n_kept >= t.prompts_per_step or rounds > t.max_resample_rounds:
                    break
                batch, _, all_scores = generate(step, rounds)
                generated.append(all_scores)
                rounds += 1
            every = mx.concatenate(generated)
            # an equal share per rank that steps_per_generation splits
            groups = min(n_kept, t.prompts_per_step)
            while groups and (groups % world.size or groups // world.size * group % parts):
                groups -= 1
            zero_std = ~informative_groups(every, funcs.weights, group)
            tracker.log_metrics(
                {
                    **rewards.reward_metrics(every, funcs.names, funcs.weights),
                    "dynamic_sampling/rounds": float(rounds),
                    "dynamic_sampling/dropped_groups": float(zero_std.sum()),
                    "dynamic_sampling/kept_groups": float(groups),
                    "dynamic_sampling/frac_reward_zero_std_before": float(zero_std.mean()),
                },
                step,
            )
            if groups < t.prompts_per_step and world.is_main:
                trained = f"{groups} groups" if groups else "the first round as it is"
                print(
                    f"warning: step {step}: dynamic sampling found {n_kept} informative groups "
                    f"of {t.prompts_per_step} in {rounds} rounds; training on {trained}",
                    file=sys.stderr,
                )
            if groups == 0:  # nothing informative: the first round, as without the filter
                first = generated[0]
                mine = slice(
                    world.rank * len(first) // world.size,
                    (world.rank + 1) * len(first) // world.size,
                )
                return first_batch, first[mine], first, every
            kept_batch = rollout.concatenate([b for b, _ in kept])
            kept_scores = mx.concatenate([s for _, s in kept])[: groups * group]
            share = groups * group // world.size
            mine = list(range(world.rank * share, (world.rank + 1) * share))
            return (
                rollout.select_rows(kept_batch, mine),
                kept_scores[mx.array(mine)],
                kept_scores,
                every,
            )

        guard.install()
        if world.is_main and eval_rows and cfg.eval.at_start and start_step == 0:
            evaluate(0)
        for step in range(start_step, t.steps):
            guard.begin_step(step, model, optimizer, stream)
            step_start = time.perf_counter()
            seed = step_seed(cfg.run.seed, step)
            batch, scores, all_scores = generate(step)
            generated_scores = all_scores
            if t.dynamic_sampling:
                batch, scores, all_scores, generated_scores = dynamic_sampling(
                    step, batch, all_scores
                )
            mine = distributed.shard(len(all_scores) // group, world)
            advantages = run_tasks.advantages_task(  # of the global batch
                all_scores, funcs.weights, group, t, tracker, step
            )[mine.start * group : mine.stop * group]
            metrics = run_tasks.update_task(
                model, optimizer, batch, advantages, t, ref_model, tracker, step, world, seed
            )
            guard.check_update(metrics, model, optimizer, tracker, step)

            seconds = time.perf_counter() - step_start
            tokens = sum(map(len, batch.prompt_ids)) + batch.completion_mask.sum().item()
            tracker.log_metrics({"tokens/s": tokens / seconds, "step_seconds": seconds}, step)
            tracker.end_step()  # the step's metrics from every stage, in one MLflow write
            mean_reward = rewards.combine(generated_scores, funcs.weights).mean().item()
            history.append({"step": step, "reward": mean_reward, "loss": metrics["loss"]})
            every = cfg.mlflow.log_completions_every
            if every and step % every == 0:
                table = {
                    "step": [step] * batch.num_rows,
                    "prompt": batch.prompt_texts,
                    "completion": batch.texts,
                    "reward": rewards.combine(scores, funcs.weights).tolist(),
                    "advantage": advantages.tolist(),
                    "finish_reason": batch.finish_reasons,
                }
                if batch.conversations is not None:  # multi-turn: the messages, tool calls
                    table["conversation"] = multiturn.conversation_json(batch)
                if batch.tool_counts is not None:
                    table["tool_calls"] = batch.tool_counts["calls"]
                tracker.log_table(table, f"completions/step_{step:06d}.json")
            progress.set_postfix(
                reward=f"{history[-1]['reward']:.3f}", loss=f"{metrics['loss']:.4f}", refresh=False
            )
            progress.update(1)

            done = step + 1
            due = (cfg.eval.every and done % cfg.eval.every == 0) or done == t.steps
            if world.is_main and eval_rows and due:
                evaluate(done)
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
            tracker.log_artifact(report.plot_rewards(history, output_dir / "curves.png"), "plots")
        for name, record in (("first", evals[:1]), ("last", evals[-1:])):
            for key, value in (record[0] if record else {}).items():
                summary[f"eval_{name}_{key}"] = value  # eval_first_step, eval_last_accuracy, ...
        if final is not None:  # the model; its optimizer state stays in output_dir for resuming
            tracker.log_artifacts(final, "checkpoint", exclude=(checkpoint.OPTIMIZER_FILE,))
        tracker.set_tags({f"summary.{k}": v for k, v in summary.items() if v is not None})
        report.publish_summary(summary, history, tracker, cfg.run.name)
        status = "FINISHED"
        return summary
    except RuntimeError as error:
        if world.size > 1 and distributed.is_peer_failure(error):
            safety.hold_sigterm_after_peer_loss()  # report before mlx.launch's SIGTERM lands
        raise
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


def plan_micro_batch(
    cfg, train_cfg, model, optimizer, ref_model, tokenizer, rows, world, turns=None
) -> int:
    """train.micro_batch_size=auto: the most rows per micro-batch that fit the memory budget,
    measured on this model at the longest prompt + the completion width (rollout.max_new_tokens;
    with tools rollout.max_completion_length, tool results included); every rank agrees on the
    smallest. A tool run's prompts are measured with the tools' schemas rendered (an
    environment's observations and methods are not known before its reset). Printed once."""
    if turns is not None and turns.toolbox is not None:
        schemas = turns.toolbox.schemas()
        prompts = [
            data.encode_prompt(
                tokenizer,
                data.prompt_messages(row["prompt"], turns.system_prompt),
                template_kwargs=turns.template_kwargs,
                tools=schemas,
            )
            for row in rows
        ]
    else:
        prompts = encode_prompts(tokenizer, rows, cfg)
    longest = max(map(len, prompts))
    per_step = cfg.train.prompts_per_step * cfg.rollout.group_size
    plan = grpo_update.plan_micro_batch(
        model,
        optimizer,
        train_cfg,
        max_rows=per_step // train_cfg.steps_per_generation // world.size,
        prompt_tokens=longest,
        completion_tokens=cfg.rollout.completion_budget,
        budget_bytes=memory_budget(cfg),
        ref_model=ref_model,
    )
    chosen = int(distributed.all_extreme(mx.array(plan.rows), world, largest=False).item())
    if world.is_main:
        print(f"train.micro_batch_size=auto: {plan.describe()}", file=sys.stderr, flush=True)
    return chosen


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
        world = data_parallel.join(cfg)
        preflight(cfg)
    except (ConfigError, InputError, distributed.DistributedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    prefect_runtime.quiet_stop_tracebacks()
    resolved = to_container(cfg)
    if world.size > 1:
        safety.install_peer_loss_sigterm()
    if not world.is_main:  # no flow, no MLflow run, no checkpoints: rank 0 owns those
        try:
            train(resolved, world)
        except KeyboardInterrupt:
            return 130
        except safety.TrainingStopped as stopped:
            return stopped.exit_code
        except grpo_update.MemoryBudgetError as error:
            print(f"error (rank {world.rank}): {error}", file=sys.stderr)
            return 2
        except rewards.RewardError as error:
            print(f"error (rank {world.rank}): {error}", file=sys.stderr)
            return 1
        except RuntimeError as error:
            if not distributed.is_peer_failure(error):
                raise
            print(f"error (rank {world.rank}): {_peer_lost(error)}", file=sys.stderr)
            return 1
        return 0
    prefect_runtime.start_prefect_server_outside_ctrl_c()
    try:
        summary = grpo_flow(resolved, world if world.size > 1 else None)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {resume.resume_hint(overrides)}", file=sys.stderr)
        return 130
    except safety.TrainingStopped as stopped:
        print(f"\n{stopped}; checkpoint saved at step {stopped.step}", file=sys.stderr)
        print(resume.resume_hint(overrides), file=sys.stderr)
        return stopped.exit_code
    except grpo_update.MemoryBudgetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except rewards.RewardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if world.size == 1 or not distributed.is_peer_failure(error):
            raise
        print(f"error: {_peer_lost(error)}", file=sys.stderr)
        print(resume.resume_hint(overrides), file=sys.stderr)
        return 1
    first, last = summary.get("reward_first10"), summary.get("reward_last10")
    if first is not None:
        print(
            f"done: {summary['steps']} steps, mean reward first 10 steps {first:.3f} -> "
            f"last 10 steps {last:.3f}"
        )
    if "eval_first_step" in summary:
        print(
            f"eval on held-out prompts: accuracy {summary['eval_first_accuracy']:.3f} at step "
            f"{summary['eval_first_step']} -> {summary['eval_last_accuracy']:.3f} at step "
            f"{summary['eval_last_step']}"
        )
    print(f"checkpoint: {summary['checkpoint']}")
    if summary.get("fused"):
        print(f"fused model: {summary['fused']}")
    print(f"mlflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
