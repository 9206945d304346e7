"""Crash-safety building blocks, on the real tiny model and a real SQLite MLflow store:
checkpoint validation and fallback, the step guard (NaN rollback, signals), the MLflow spool."""

import json
import os
import signal
import subprocess
import sys
import time

from stages import checkpoint, grpo_update
from stages.advantages import compute_advantages
from stages.grpo_update import TrainConfig
from stages.rollout import RolloutConfig, generate_rollouts

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from pipelines import resume, safety
from pipelines.tracking import Tracker, flush_spool


def _save(tiny, root, step):
    model, tokenizer = tiny
    optimizer = grpo_update.make_optimizer(1e-3)
    optimizer.init(model.trainable_parameters())
    state = {"step": step, "optimizer": optimizer.state}
    return checkpoint.save(model, tokenizer, checkpoint.step_dir(root, step), state=state)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda p: _truncate(p / "model.safetensors", 50), "model.safetensors has"),
        (lambda p: _truncate(p / "optimizer.safetensors", 8), "optimizer.safetensors has"),
        (lambda p: (p / "trainer_state.json").write_text('{"step": 4'), "trainer_state.json has"),
        (lambda p: (p / "config.json").unlink(), "config.json is missing"),
    ],
)
def test_validate_names_what_is_damaged_and_latest_valid_falls_back(
    tiny, tmp_path, damage, problem
):
    root = tmp_path / "checkpoints"
    older, newest = _save(tiny, root, 2), _save(tiny, root, 4)
    assert checkpoint.validate(older) is None and checkpoint.validate(newest) is None
    damage(newest)
    assert problem in checkpoint.validate(newest)
    found, rejected = checkpoint.latest_valid(root)
    assert found == older and [p for p, _ in rejected] == [newest]


def test_validate_without_manifest_still_catches_truncated_weights(tiny, tmp_path):
    path = _save(tiny, tmp_path, 2)
    (path / checkpoint.MANIFEST_FILE).unlink()  # e.g. a checkpoint from before manifests
    assert checkpoint.validate(path) is None
    _truncate(path / "model.safetensors", 10)
    assert "model.safetensors is truncated" in checkpoint.validate(path)
    (path / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"not json at all!")
    assert "model.safetensors has no valid safetensors header" in checkpoint.validate(path)


def test_latest_checkpoint_sets_damaged_ones_aside(tiny, tmp_path, capsys):
    root = tmp_path / "checkpoints"
    older, newest = _save(tiny, root, 2), _save(tiny, root, 4)
    _truncate(newest / "model.safetensors", 50)
    (root / ".step-00000006.tmp-123").mkdir()  # a save that never got renamed into place
    assert resume.latest_checkpoint(root) == older  # preflight: reports nothing, moves nothing
    assert newest.exists() and capsys.readouterr().err == ""
    assert resume.latest_checkpoint(root, set_aside=True) == older
    err = capsys.readouterr().err
    assert "step-00000004 is damaged (model.safetensors has" in err
    assert "resuming from the previous checkpoint" in err
    assert not newest.exists() and (root / ".corrupt-step-00000004").is_dir()
    assert not (root / ".step-00000006.tmp-123").exists()
    assert checkpoint.list_checkpoints(root) == [older]
    _truncate(older / "model.safetensors", 50)
    with pytest.raises(ValueError, match="no usable checkpoint"):
        resume.latest_checkpoint(root)


def _truncate(path, nbytes):
    path.write_bytes(path.read_bytes()[:-nbytes])


class _Recorder:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def _batch(model, tokenizer):
    prompts = [tokenizer.encode(t) for t in ["1+2=", "3+4="]]
    return generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(group_size=2, max_new_tokens=3)
    )


def test_nonfinite_update_is_rolled_back_counted_and_stops_after_n(tiny):
    model, tokenizer = tiny
    batch = _batch(model, tokenizer)
    optimizer = grpo_update.make_optimizer(1e-2)
    good = compute_advantages(mx.array([1.0, 0.0, 0.0, 1.0]), 2, "group")
    grpo_update.update_step(model, optimizer, batch, good, TrainConfig())  # optimizer has state
    guard, tracker = safety.StepGuard(max_nonfinite_steps=2), _Recorder()

    class Stream:
        position = 7

    before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    state_before = {k: np.array(v) for k, v in tree_flatten(optimizer.state)}
    guard.begin_step(1, model, optimizer, Stream)
    nan = mx.array([float("nan")] * 4)
    metrics = grpo_update.update_step(model, optimizer, batch, nan, TrainConfig())
    assert not np.isfinite(metrics["loss"])
    assert np.isnan(np.array(tree_flatten(model.trainable_parameters())[0][1])).any()
    assert guard.check_update(metrics, model, optimizer, tracker, 1) is True
    for name, value in tree_flatten(model.trainable_parameters()):
        np.testing.assert_array_equal(np.array(value), before[name])
    for name, value in tree_flatten(optimizer.state):
        np.testing.assert_array_equal(np.array(value), state_before[name])
    assert tracker.logged == [(1, {"nonfinite/skipped_steps": 1, "nonfinite/consecutive": 1})]

    # A good step resets the consecutive count; the total stays.
    guard.begin_step(2, model, optimizer, Stream)
    metrics = grpo_update.update_step(model, optimizer, batch, good, TrainConfig())
    assert guard.check_update(metrics, model, optimizer, tracker, 2) is False
    assert (guard.nonfinite_run, guard.nonfinite_total) == (0, 1)

    for step in (3, 4):
        guard.begin_step(step, model, optimizer, Stream)
        metrics = grpo_update.update_step(model, optimizer, batch, nan, TrainConfig())
        if step == 3:
            guard.check_update(metrics, model, optimizer, tracker, step)
    with pytest.raises(safety.TrainingStopped, match="2 consecutive steps") as stopped:
        guard.check_update(metrics, model, optimizer, tracker, 4)
    assert stopped.value.exit_code == 3 and stopped.value.step == 5
    assert all(mx.isfinite(v).all().item() for _, v in tree_flatten(model.parameters()))


def test_roll_back_restores_the_data_position(tiny):
    model, _ = tiny
    optimizer = grpo_update.make_optimizer(1e-2)

    class Stream:
        position = 16

    guard = safety.StepGuard(5)
    guard.begin_step(2, model, optimizer, Stream)
    Stream.position = 20
    guard.roll_back(model, optimizer, Stream)
    assert Stream.position == 16


def test_first_signal_finishes_the_step_second_abandons_it():
    guard = safety.StepGuard(5)
    previous = signal.getsignal(signal.SIGTERM)
    guard.install()
    try:
        guard.step = 4
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.stop_requested and guard.signal_name == "SIGTERM"
        with pytest.raises(safety.TrainingStopped, match="stopped by SIGTERM after step 5") as e:
            guard.raise_if_stopping(5)
        assert e.value.exit_code == 143
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert guard.interrupted().exit_code == 130
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_step_that_cannot_finish_after_a_signal_exits_after_the_grace_period():
    """With several processes, SIGTERM may mean a peer died and the step waits on it forever
    (NCCL does not notice): after stop_grace_seconds the process exits with a clear message."""
    script = (
        "import os, signal, time\n"
        "from pipelines import safety\n"
        "guard = safety.StepGuard(5, stop_grace_seconds=0.5).install()\n"
        "guard.step = 6\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(60)  # a collective that never returns\n"
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50
    )
    assert time.monotonic() - start < 30
    assert done.returncode == 143
    assert "error: step 7 did not finish within 0.5 s of SIGTERM" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_grace_period_ends_with_the_guard():
    guard = safety.StepGuard(5, stop_grace_seconds=0.2).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        guard.uninstall()  # the step finished and the loop left: no exit later
    time.sleep(0.5)  # still alive


def test_resume_hint_replaces_run_resume():
    hint = resume.resume_hint(["train.steps=9", "run.resume=/x"])
    assert hint == "resume with: python -m pipelines.grpo train.steps=9 run.resume=latest"


def test_tracker_spools_while_mlflow_is_down_and_sends_when_back(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spool = tmp_path / "out" / "mlflow_spool.jsonl"
    tracker = Tracker("exp", "run", uri, spool=spool, retry_seconds=0.0)
    store = tracker.client
    tracker.log_metrics({"reward": 0.5}, 0)
    tracker.end_step()
    tracker.client = MlflowClient("http://127.0.0.1:9")  # nothing listens: connection refused
    for step in (1, 2, 3):
        tracker.log_metrics({"reward": step / 10}, step)
        tracker.end_step()
    tracker.set_tags({"note": "down"})
    err = capsys.readouterr().err
    assert err.count("is unreachable") == 1 and "training goes on" in err
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "metrics"] == [1, 2, 3]

    tracker.client = store  # the server is back
    tracker.log_metrics({"reward": 0.4}, 4)
    tracker.end_step()
    assert "reachable again" in capsys.readouterr().err
    assert not spool.exists()
    history = store.get_metric_history(tracker.run_id, "reward")
    assert sorted((m.step, m.value) for m in history) == [
        (0, 0.5),
        (1, pytest.approx(0.1)),
        (2, pytest.approx(0.2)),
        (3, pytest.approx(0.3)),
        (4, pytest.approx(0.4)),
    ]
    assert store.get_run(tracker.run_id).data.tags["note"] == "down"


def test_a_steps_metrics_reach_mlflow_in_one_write_and_in_order(tmp_path):
    """Every stage logs its own metrics; MLflow (a SQLite commit per write) gets one write per
    step, sent at the end of the step or before any other record, so the order is kept."""
    tracker = Tracker("exp", "run", f"sqlite:///{tmp_path / 'mlflow.db'}")
    store = tracker.client
    sent = []

    class Recording:
        def __getattr__(self, name):
            def call(*args, **kwargs):
                sent.append((name, sorted(m.key for m in kwargs.get("metrics", []))))
                return getattr(store, name)(*args, **kwargs)

            return call

    tracker.client = Recording()
    tracker.log_metrics({"reward": 0.5}, 0)
    tracker.log_metrics({"loss": 1.0, "grad_norm": 2.0}, 0)
    assert sent == []  # nothing written mid-step
    tracker.end_step()
    assert sent == [("log_batch", ["grad_norm", "loss", "reward"])]
    tracker.log_metrics({"reward": 0.7}, 1)
    tracker.log_metrics({"reward": 0.9}, 2)  # a new step sends the previous one
    tracker.set_tags({"note": "x"})  # any other record sends the pending metrics first
    assert sent[1:] == [("log_batch", ["reward"]), ("log_batch", ["reward"]), ("log_batch", [])]
    history = store.get_metric_history(tracker.run_id, "reward")
    assert sorted((m.step, m.value) for m in history) == [
        (0, 0.5),
        (1, pytest.approx(0.7)),
        (2, pytest.approx(0.9)),
    ]


def test_spool_left_at_the_end_is_sent_by_flush(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spool = tmp_path / "mlflow_spool.jsonl"
    tracker = Tracker("exp", "run", uri, spool=spool, retry_seconds=0.0)
    store = tracker.client
    tracker.client = MlflowClient("http://127.0.0.1:9")
    tracker.log_metrics({"loss": 1.5}, 0)
    folder = tmp_path / "step-00000001"  # a checkpoint: its optimizer state is not logged
    (folder / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.safetensors", "sub/notes.txt"):
        (folder / name).write_text(name)
    tracker.log_artifacts(folder, "checkpoint", exclude=("optimizer.safetensors",))
    tracker.finish("FINISHED")
    assert "python -m pipelines.tracking flush" in capsys.readouterr().err
    assert store.get_run(tracker.run_id).info.status == "RUNNING"
    assert flush_spool(spool, uri) == 3
    assert store.get_run(tracker.run_id).info.status == "FINISHED"
    assert [m.value for m in store.get_metric_history(tracker.run_id, "loss")] == [1.5]
    logged = {a.path for a in store.list_artifacts(tracker.run_id, "checkpoint")}
    assert logged == {"checkpoint/model.safetensors", "checkpoint/sub"}
    assert [a.path for a in store.list_artifacts(tracker.run_id, "checkpoint/sub")] == [
        "checkpoint/sub/notes.txt"
    ]


def test_spool_left_by_a_crashed_run_is_sent_by_the_resumed_run(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spool = tmp_path / "mlflow_spool.jsonl"
    crashed = Tracker("exp", "run", uri, spool=spool, retry_seconds=0.0)
    store = crashed.client
    crashed.client = MlflowClient("http://127.0.0.1:9")
    for step in range(3):
        crashed.log_metrics({"reward": float(step)}, step)
        crashed.end_step()
    assert len(spool.read_text().splitlines()) == 3
    run_id = crashed.run_id
    del crashed  # killed while MLflow was down: only the spool on disk remains

    resumed = Tracker("exp", "run", uri, run_id=run_id, spool=spool)
    assert resumed.run_id == run_id
    assert "note: sent 3 MLflow records left in" in capsys.readouterr().err
    assert not spool.exists()
    history = store.get_metric_history(resumed.run_id, "reward")
    assert sorted(m.step for m in history) == [0, 1, 2]


_SIGTERM_SCRIPT = """
import os, signal, sys, time
from pipelines import safety
safety.install_peer_loss_sigterm()
if sys.argv[1] == "lost":
    safety.hold_sigterm_after_peer_loss()
    guard = safety.StepGuard(5).install()
    guard.uninstall()  # restores the handlers it replaced, and keeps holding SIGTERM
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
print("reported", flush=True)
"""


@pytest.mark.parametrize("lost", [False, True], ids=["no-peer-lost", "peer-lost"])
def test_sigterm_is_held_once_a_peer_is_lost(lost):
    """A data-parallel process ends on SIGTERM as usual, but once it has seen a peer fail it
    ignores it (mlx.launch's SIGTERM to the survivors) so it can report the lost peer."""
    done = subprocess.run(
        [sys.executable, "-c", _SIGTERM_SCRIPT, "lost" if lost else "fine"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if lost:
        assert done.returncode == 0 and "reported" in done.stdout, done.stderr
    else:
        assert done.returncode == -15 and "reported" not in done.stdout
