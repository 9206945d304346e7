"""Data-parallel GRPO: 2 processes over the ring backend (`python -m pipelines.launch`, MLX's
launcher) vs 1 process, on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launching import launch_env

# Every run uses the session's Prefect server instead of starting a temporary one each.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_prefect")]

TINY = (
    "+experiment=quickstart",
    "train.steps=3",
    "train.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=3",
    "checkpoint.every=3",
    "train.scale_rewards=batch",  # advantages need the statistics of the whole batch
    "mlflow.log_completions_every=1",
)
ROOT = Path("outputs") / "quickstart" / "checkpoints"
HERE = Path(__file__).resolve().parent  # faults.py, the test-only reward functions


def run(cwd: Path, *overrides: str, processes=1, timeout=400, env=None, backend="ring"):
    cwd.mkdir(parents=True, exist_ok=True)
    tracking = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env = {**launch_env(backend), **tracking, **(env or {})}
    command = [sys.executable, "-m", "pipelines.grpo", *overrides]
    if processes > 1:  # mlx.launch without its busy wait (pipelines/launch.py)
        launcher = [sys.executable, "-m", "pipelines.launch"]
        command = [*launcher, "-n", str(processes), "--backend", backend, *command]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _weights(path) -> dict:
    """A model's parameters by name (a checkpoint directory or a builtin model), float32."""
    import stages  # noqa: F401
    from stages.load_weights import load

    import mlx.core as mx
    from mlx.utils import tree_flatten

    model, _ = load(str(path), dtype="float32")
    return {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}


def _runs(cwd: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grpo")
    return client, client.search_runs([experiment.experiment_id])


def test_two_processes_train_like_one_over_ring_and_mpi(tmp_path):
    # dapo (the default): its token count is summed over ranks. Every loss_type's normaliser is
    # checked at the update level (tests/test_distributed.py, loss and grad norm too: Adam's
    # step is almost blind to a gradient's scale, so the weights alone would not show it).
    loss_type = "dapo"
    from stages import checkpoint

    import numpy as np

    overrides = (*TINY, f"train.loss_type={loss_type}")
    one = run(tmp_path / "one", *overrides)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(tmp_path / "two", *overrides, processes=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "exited with code" not in two.stderr, two.stderr[-3000:]
    assert two.stdout.count("done: 3 steps") == 1  # rank 0 reports; rank 1 stays quiet

    # One MLflow run and one checkpoint series, written by rank 0.
    client, runs = _runs(tmp_path / "two")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rewards = client.get_metric_history(runs[0].info.run_id, "reward")
    assert sorted(m.step for m in rewards) == [0, 1, 2]
    root = tmp_path / "two" / ROOT
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000003"]
    assert not (tmp_path / "two" / "outputs" / "quickstart" / "checkpoints-rank1").exists()

    # Same samples, advantages and global gradient: the same weights (float32, atol 1e-5).
    single = _weights(tmp_path / "one" / ROOT / "step-00000003")
    parallel = _weights(root / "step-00000003")
    assert single.keys() == parallel.keys()
    changed = 0
    start = _weights("builtin:tiny_qwen3")
    for name, value in single.items():
        np.testing.assert_allclose(
            np.array(parallel[name]), np.array(value), atol=1e-5, rtol=0, err_msg=name
        )
        changed += not np.allclose(np.array(value), np.array(start[name]), atol=1e-6)
    assert changed > len(single) // 2  # training moved the weights: the comparison is not vacuous
    history_one = checkpoint.load_state(tmp_path / "one" / ROOT / "step-00000003")["history"]
    history_two = checkpoint.load_state(root / "step-00000003")["history"]
    for a, b in zip(history_one, history_two, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)

    # Resume: every process loads rank 0's checkpoint; the one MLflow run and series continue.
    again = run(tmp_path / "two", *overrides, "train.steps=4", "run.resume=latest", processes=2)
    assert "exited with code" not in again.stderr, again.stderr[-3000:]
    assert again.stdout.count("done: 4 steps") == 1
    client, runs = _runs(tmp_path / "two")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rewards = client.get_metric_history(runs[0].info.run_id, "reward")
    assert sorted(m.step for m in rewards) == [0, 1, 2, 3]
    names = [p.name for p in checkpoint.list_checkpoints(root)]
    assert names == ["step-00000003", "step-00000004"]
    assert checkpoint.load_state(root / "step-00000004")["data_position"] == 4 * 4

    # The same over MLX's MPI backend (Open MPI from the dev extra): the same weights again.
    mpi = run(tmp_path / "mpi", *overrides, "distributed.backend=mpi", processes=2, backend="mpi")
    assert mpi.stdout.count("done: 3 steps") == 1, mpi.stdout[-2000:] + mpi.stderr[-3000:]
    _, runs = _runs(tmp_path / "mpi")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    over_mpi = _weights(tmp_path / "mpi" / ROOT / "step-00000003")
    for name, value in single.items():
        np.testing.assert_allclose(
            np.array(over_mpi[name]), np.array(value), atol=1e-5, rtol=0, err_msg=name
        )


def test_a_process_that_dies_stops_the_other_with_one_line_and_keeps_finished_steps(tmp_path):
    """Rank 1 dies (os._exit, like an out-of-memory kill) in step 4; rank 0 must not hang: it
    stops with one clear line and a resume command, its checkpoint of step 2 stays valid and
    the MLflow run is marked FAILED."""
    from stages import checkpoint

    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    result = run(
        tmp_path,
        *TINY,
        "train.steps=6",
        "checkpoint.every=2",
        "+reward.funcs.exact_answer._target_=faults.dies_on_call",
        processes=2,
        timeout=300,  # a hang fails here
        env={"GRPO_TEST_DIE_RANK": "1", "GRPO_TEST_DIE_CALL": "4", "PYTHONPATH": path},
    )
    assert "exited with code 9" in result.stderr  # rank 1's death, as mlx.launch reports it
    assert (
        "error: lost contact with another process of the group "
        "([ring] connection to a peer was lost)" in result.stderr
    ), result.stderr[-3000:]
    assert "run.resume=latest" in result.stderr
    assert "Traceback" not in result.stderr
    root = tmp_path / ROOT
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000002"]
    valid, rejected = checkpoint.latest_valid(root)
    assert valid.name == "step-00000002" and not rejected
    _, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


def test_world_size_must_divide_prompts_per_step(tmp_path):
    result = run(tmp_path, *TINY, "train.prompts_per_step=3", processes=2, timeout=120)
    # mlx.launch itself exits 0; it reports the exit codes (and stops the other process once
    # one fails, so only the first to fail is sure to report).
    assert "exited with code 2" in result.stderr
    assert (
        "error: train.prompts_per_step (3) must be divisible by the number of processes (2)"
        in result.stderr
    )
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_processes_with_different_configs_stop_at_start(tmp_path):
    # mlx.launch gives each process its MLX_RANK: a config that reads it differs per rank.
    result = run(tmp_path, *TINY, "run.name=rank${oc.env:MLX_RANK}", processes=2, timeout=120)
    assert "error: ranks [1] have a different resolved config than rank 0" in result.stderr
    assert "exited with code 2" in result.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_dynamic_sampling_two_processes_keep_the_same_groups_as_one(tmp_path):
    """Every rank decides on the gathered rewards, so both keep the same groups; the kept groups
    are shared out equally whichever rank generated them: the same weights, the same data
    position (with resampled rounds) and the same per-step rewards as one process."""
    from stages import checkpoint

    import numpy as np

    overrides = (*TINY, "train.dynamic_sampling=true", "train.max_resample_rounds=2")
    one = run(tmp_path / "one", *overrides)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(tmp_path / "two", *overrides, processes=2)
    assert two.stdout.count("done: 3 steps") == 1, two.stdout[-2000:] + two.stderr[-3000:]
    single = tmp_path / "one" / ROOT / "step-00000003"
    parallel = tmp_path / "two" / ROOT / "step-00000003"
    position = checkpoint.load_state(single)["data_position"]
    assert position > 3 * 4 and checkpoint.load_state(parallel)["data_position"] == position
    for a, b in zip(
        checkpoint.load_state(single)["history"],
        checkpoint.load_state(parallel)["history"],
        strict=True,
    ):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
    expected = _weights(single)
    for name, value in _weights(parallel).items():
        np.testing.assert_allclose(
            np.array(value), np.array(expected[name]), atol=1e-5, rtol=0, err_msg=name
        )


def test_tool_run_two_processes_train_like_one(tmp_path, tools_path):
    """Multi-turn rollouts with the add tool: every row draws with its global row's keys and
    the tool rounds do not depend on which rows share a batch, so 2 processes give 1 process's
    rewards, tool metrics and weights."""
    from stages import checkpoint

    import numpy as np

    overrides = (
        "+experiment=tools_quickstart",
        "train.steps=2",
        "train.prompts_per_step=4",
        "rollout.group_size=4",
        "checkpoint.every=2",
        "train.scale_rewards=batch",
        "mlflow.log_completions_every=1",
    )
    root = Path("outputs") / "tools-quickstart" / "checkpoints" / "step-00000002"
    one = run(tmp_path / "one", *overrides, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(tmp_path / "two", *overrides, processes=2, timeout=600)
    assert two.stdout.count("done: 2 steps") == 1, two.stdout[-2000:] + two.stderr[-3000:]
    for a, b in zip(
        checkpoint.load_state(tmp_path / "one" / root)["history"],
        checkpoint.load_state(tmp_path / "two" / root)["history"],
        strict=True,
    ):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    single, parallel = _weights(tmp_path / "one" / root), _weights(tmp_path / "two" / root)
    for name, value in single.items():
        np.testing.assert_allclose(
            np.array(parallel[name]), np.array(value), atol=1e-5, rtol=0, err_msg=name
        )
    metrics = []
    for directory in ("one", "two"):
        client, runs = _runs(tmp_path / directory)
        metrics.append(runs[0].data.metrics)
    assert metrics[0]["tools/call_frequency"] > 0.5  # the rows did call the tool
    for name in ("tools/call_frequency", "tools/turns_per_row", "completions/mean_length"):
        assert metrics[0][name] == pytest.approx(metrics[1][name], abs=1e-6), name
