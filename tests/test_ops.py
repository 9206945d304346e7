"""Operations end to end, on real subprocesses and servers: crash and resume, damaged
checkpoints, NaN steps, an MLflow server that goes away mid-run, comparing runs.

Exact resume: on the CPU backend (float32) a run killed and resumed from a checkpoint ends with
bit-identical weights and optimizer state to an uninterrupted run. The assertions allow
TOLERANCE (absolute) for float non-associativity, e.g. a BLAS choosing another summation order.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
TOLERANCE = 1e-6
TINY = (
    "+experiment=quickstart",
    "train.steps=6",
    "checkpoint.every=2",
    "checkpoint.keep_last=0",
    "train.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=3",
    "mlflow.log_completions_every=0",
    "+reward.funcs.exact_answer._target_=faults.slow_exact_answer",
)


def _env(workdir: Path, prefect_api: str, **extra) -> dict:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def start(workdir: Path, prefect_api: str, *overrides: str, **env) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.grpo", *overrides],
        cwd=workdir,
        env=_env(workdir, prefect_api, **env),
        stdout=open(workdir / "stdout.txt", "w"),  # noqa: SIM115
        stderr=open(workdir / "stderr.txt", "w"),  # noqa: SIM115
    )


def train(workdir: Path, prefect_api: str, *overrides: str, timeout: float = 300, **env):
    process = start(workdir, prefect_api, *overrides, **env)
    code = process.wait(timeout=timeout)
    return code, (workdir / "stderr.txt").read_text()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def checkpoints(workdir: Path) -> Path:
    return workdir / "outputs" / "quickstart" / "checkpoints"


def arrays(path: Path) -> dict:
    import mlx.core as mx

    found = dict(mx.load(str(path / "model.safetensors")))
    found.update(
        {f"optimizer.{k}": v for k, v in mx.load(str(path / "optimizer.safetensors")).items()}
    )
    return found


def max_difference(a: Path, b: Path) -> float:
    import mlx.core as mx

    first, second = arrays(a), arrays(b)
    assert first.keys() == second.keys()
    return max(mx.abs(first[k] - second[k]).max().item() for k in first)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_api) -> Path:
    """An uninterrupted tiny run: its final checkpoint."""
    workdir = tmp_path_factory.mktemp("reference")
    code, stderr = train(workdir, prefect_api, *TINY)
    assert code == 0, stderr[-3000:]
    return checkpoints(workdir) / "step-00000006"


def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted(
    tmp_path, prefect_api, reference
):
    delay = random.uniform(0.0, 1.2)
    process = start(tmp_path, prefect_api, *TINY, GRPO_TEST_REWARD_SLEEP="0.4")
    wait_for(lambda: (checkpoints(tmp_path) / "step-00000002").is_dir(), 240, "step 2")
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    from stages import checkpoint

    killed_at = checkpoint.load_state(checkpoint.latest(checkpoints(tmp_path)))["step"]
    assert 2 <= killed_at < 6, f"killed {delay:.2f} s after step 2, last checkpoint {killed_at}"

    code, stderr = train(tmp_path, prefect_api, *TINY, "run.resume=latest")
    assert code == 0, stderr[-3000:]
    difference = max_difference(reference, checkpoints(tmp_path) / "step-00000006")
    assert difference <= TOLERANCE, f"killed at +{delay:.2f} s: max |diff| {difference}"


def test_sigterm_saves_then_damaged_newest_checkpoint_falls_back(tmp_path, prefect_api, reference):
    process = start(tmp_path, prefect_api, *TINY, GRPO_TEST_REWARD_SLEEP="0.4")
    wait_for(lambda: (checkpoints(tmp_path) / "step-00000002").is_dir(), 240, "step 2")
    # Signal once step 3 has finished too (the progress bar says so), so the stop lands after
    # the step-2 checkpoint whatever the machine's load: then there are two checkpoints.
    wait_for(lambda: "3/6" in (tmp_path / "stderr.txt").read_text(), 240, "step 3")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "SIGTERM received" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "resume with: python -m pipelines.grpo " in stderr and "run.resume=latest" in stderr

    from stages import checkpoint

    saved = checkpoint.list_checkpoints(checkpoints(tmp_path))
    stopped_at = checkpoint.load_state(saved[-1])["step"]
    assert saved[0].name == "step-00000002" and 3 <= stopped_at < 6, saved
    # The newest checkpoint loses the end of its weights file (a disk-full or torn copy).
    weights = saved[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    code, stderr = train(tmp_path, prefect_api, *TINY, "run.resume=latest")
    assert code == 0, stderr[-3000:]
    assert f"checkpoints/{saved[-1].name} is damaged (model.safetensors has" in stderr
    assert "resuming from the previous checkpoint" in stderr
    assert (checkpoints(tmp_path) / f".corrupt-{saved[-1].name}").is_dir()
    assert max_difference(reference, checkpoints(tmp_path) / "step-00000006") <= TOLERANCE


def test_nan_steps_are_skipped_then_stop_with_last_good_state(tmp_path, prefect_api):
    overrides = [
        *TINY[:-1],
        "train.steps=8",
        "safety.max_nonfinite_steps=2",
        "+reward.funcs.exact_answer._target_=faults.inf_on_calls",
    ]
    # Steps 3, 5 and 6 (1-based) get infinite rewards, so NaN advantages, loss and gradients.
    code, stderr = train(tmp_path, prefect_api, *overrides, GRPO_TEST_INF_CALLS="3,5,6")
    assert code == 3, stderr[-3000:]
    assert stderr.count("update skipped") == 3
    assert "2 consecutive steps had a NaN/inf loss or gradient" in stderr
    assert "resume with:" in stderr and "Traceback" not in stderr

    from stages import checkpoint

    from mlflow import MlflowClient

    root = checkpoints(tmp_path)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == [
        "step-00000002",
        "step-00000004",
        "step-00000006",
    ]
    # Steps 5 and 6 were rolled back: the stop checkpoint holds step 4's weights and optimizer.
    assert max_difference(root / "step-00000004", root / "step-00000006") == 0.0
    # Step 3 was rolled back too, but step 4 trained: the weights moved and are finite.
    assert max_difference(root / "step-00000002", root / "step-00000004") > 0.0
    import mlx.core as mx

    assert all(mx.isfinite(v).all().item() for v in arrays(root / "step-00000006").values())

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("grpo").experiment_id])[0]
    skipped = client.get_metric_history(run.info.run_id, "nonfinite/skipped_steps")
    assert sorted((m.step, m.value) for m in skipped) == [(2, 1.0), (4, 2.0), (5, 3.0)]
    assert run.info.status == "KILLED"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from servers import mlflow_server

    server, uri = mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    server.start(timeout=180)
    yield server, uri
    server.stop()


def test_mlflow_server_down_mid_run_loses_nothing(tmp_path, prefect_api, mlflow_server):
    from mlflow import MlflowClient

    server, uri = mlflow_server
    steps = 8
    pause = tmp_path / "pause"
    process = start(
        tmp_path,
        prefect_api,
        *TINY,
        f"train.steps={steps}",
        f"mlflow.tracking_uri={uri}",
        "safety.mlflow_retry_seconds=1",
        "mlflow.experiment=outage",
        GRPO_TEST_REWARD_SLEEP="0.3",
        GRPO_TEST_PAUSE_FILE=str(pause),
    )
    client = MlflowClient(uri)

    def logged_step_1() -> bool:
        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return bool(runs) and any(
            m.step >= 1 for m in client.get_metric_history(runs[0].info.run_id, "reward")
        )

    wait_for(logged_step_1, 240, "step 1 in MLflow")
    server.stop()
    stderr_file = tmp_path / "stderr.txt"
    # The step's metrics go to MLflow at its end: that write finds the server gone.
    wait_for(lambda: "is unreachable" in stderr_file.read_text(), 60, "the outage warning")
    pause.touch()  # hold training at its next reward call while the server restarts
    server.start(timeout=180)
    pause.unlink()
    assert process.wait(timeout=240) == 0, stderr_file.read_text()[-3000:]

    stderr = stderr_file.read_text()
    assert stderr.count("is unreachable") == 1, stderr[-3000:]
    assert "reachable again" in stderr
    assert not (tmp_path / "outputs" / "quickstart" / "mlflow_spool.jsonl").exists()
    run = client.search_runs([client.get_experiment_by_name("outage").experiment_id])[0]
    assert run.info.status == "FINISHED"
    for key in ("reward", "loss", "tokens/s", "completions/mean_length"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(steps)), key
    assert {"checkpoint", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_compare_against_a_running_mlflow_server(tmp_path, mlflow_server):
    from mlflow import MlflowClient
    from test_compare import make_runs

    server, uri = mlflow_server
    if server.process.poll() is not None:
        server.start(timeout=180)
    make_runs(MlflowClient(uri), "compare-me")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.compare", "compare-me", "--tracking-uri", uri,
         "--output", str(tmp_path / "curves.png")],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["low-lr", "high-lr"]
    assert next(line for line in lines if line.startswith("final reward")).split()[2:] == [
        "0.5",
        "0.75",
    ]
    assert any(line.split()[:1] == ["train.learning_rate"] for line in lines)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("compare-me")
    compare_runs = [
        r for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("mlx_grpo.kind") == "compare"
    ]  # fmt: skip
    assert len(compare_runs) == 1
    paths = [a.path for a in client.list_artifacts(compare_runs[0].info.run_id, "compare")]
    assert sorted(paths) == ["compare/compare.png", "compare/compare.txt"]


TOOLS_TINY = (
    "+experiment=tools_quickstart",
    "train.steps=6",
    "checkpoint.every=2",
    "checkpoint.keep_last=0",
    "train.prompts_per_step=2",
    "rollout.group_size=4",
    "mlflow.log_completions_every=0",
    "+reward.funcs.exact_answer._target_=faults.slow_exact_answer",
)


def test_tool_run_sigkill_then_resume_matches_uninterrupted(tmp_path, prefect_api, tools_path):
    """A multi-turn run (the tools quickstart: tool calls, tool tokens in the cache and in the
    update's forward) killed after its first checkpoint and resumed ends with the weights and
    optimizer state of an uninterrupted run."""
    from stages import checkpoint

    root = Path("outputs") / "tools-quickstart" / "checkpoints"
    code, stderr = train(tmp_path / "whole", prefect_api, *TOOLS_TINY, timeout=600)
    assert code == 0, stderr[-3000:]
    killed = tmp_path / "killed"
    process = start(killed, prefect_api, *TOOLS_TINY, GRPO_TEST_REWARD_SLEEP="0.4")
    wait_for(lambda: (killed / root / "step-00000002").is_dir(), 400, "step 2")
    time.sleep(random.uniform(0.0, 1.2))
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    killed_at = checkpoint.load_state(checkpoint.latest(killed / root))["step"]
    assert 2 <= killed_at < 6
    code, stderr = train(killed, prefect_api, *TOOLS_TINY, "run.resume=latest", timeout=600)
    assert code == 0, stderr[-3000:]
    final = "step-00000006"
    difference = max_difference(tmp_path / "whole" / root / final, killed / root / final)
    assert difference <= TOLERANCE, f"killed at step {killed_at}: max |diff| {difference}"
    state = checkpoint.load_state(tmp_path / "whole" / root / final)
    assert state["data_position"] == 6 * 2
