"""Crash safety inside the training loop: stop cleanly on SIGTERM/Ctrl-C, skip non-finite steps.

`StepGuard` is used by `grpo_flow` with one call per step boundary:

    guard.begin_step(step, model, optimizer, stream)    # remember the state the step starts from
    ... rollout, rewards, update ...
    guard.check_update(metrics, model, optimizer, tracker, step)   # NaN/inf: roll back, count
    ... checkpoint if due, or if guard.stop_requested ...
    guard.raise_if_stopping(done)                        # after the save: TrainingStopped

MLX arrays are immutable, so remembering the step's starting state costs no copy: it keeps
references to the parameter and optimizer-state arrays the update replaces.

Signals: the first SIGTERM or SIGINT asks the loop to finish the current step, checkpoint and
stop; a second one abandons the step at once (KeyboardInterrupt), and the flow rolls the model,
optimizer and data position back to the start of that step before it checkpoints. Either way a
resumed run continues exactly where the checkpoint says.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from dataclasses import dataclass

from stages.settings import check, setting

from mlx.utils import tree_map


@dataclass
class SafetyConfig:
    """`safety.*`: what happens on non-finite steps and while MLflow is unreachable."""

    max_nonfinite_steps: int = setting(
        5,
        "NaN/inf loss or gradient: the step is rolled back and skipped; after this many in a "
        "row, stop with a checkpoint of the last good state",
    )
    mlflow_retry_seconds: float = setting(
        10.0,
        "MLflow unreachable: records are kept (and spooled to <output_dir>/mlflow_spool.jsonl) "
        "and resent at most this often",
    )

    def validate(self) -> None:
        check(
            self.max_nonfinite_steps >= 1, "max_nonfinite_steps", self.max_nonfinite_steps, ">= 1"
        )
        check(
            self.mlflow_retry_seconds > 0, "mlflow_retry_seconds", self.mlflow_retry_seconds, "> 0"
        )


_peer_lost = threading.Event()


def hold_sigterm_after_peer_loss() -> None:
    """From now on this process ignores SIGTERM (main thread only). Called once a collective has
    failed because another process of the group is gone: `mlx.launch` then stops the survivors
    with SIGTERM, which would kill this one before it has marked its run FAILED and printed
    its one-line error."""
    _peer_lost.set()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _sigterm_unless_peer_lost(signum, frame) -> None:
    if _peer_lost.is_set():
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def install_peer_loss_sigterm() -> None:
    """SIGTERM as usual (the process ends), except after `hold_sigterm_after_peer_loss`. Installed
    by a data-parallel process before its flow, so the handler a flow engine restores on its
    way out still holds the signal while the process reports a lost peer."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_unless_peer_lost)


class TrainingStopped(Exception):
    """Training stopped early, with a checkpoint. `exit_code`: 130 SIGINT, 143 SIGTERM, 3 NaN."""

    def __init__(self, message: str, exit_code: int, step: int):
        super().__init__(message)
        self.exit_code = exit_code
        self.step = step


def _tree_refs(tree):
    # A new container tree over the same (immutable) arrays: later in-place dict updates by the
    # optimizer do not reach it.
    return tree_map(lambda x: x, tree)


class StepGuard:
    """Signal handling and the non-finite-step rule for one training loop.

    max_nonfinite_steps: stop after this many consecutive steps whose loss or gradient norm is
    NaN or inf (each one is rolled back and skipped).
    """

    def __init__(self, max_nonfinite_steps: int, stop_grace_seconds: float | None = None):
        self.max_nonfinite_steps = max_nonfinite_steps
        # With several processes, a signal may mean a peer has died (mlx.launch stops the others
        # with SIGTERM) and the step, waiting on it in a collective, can never finish: after
        # this many seconds the process exits instead of hanging.
        self.stop_grace_seconds = stop_grace_seconds
        self._deadline: threading.Timer | None = None
        self.signal_name: str | None = None
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.step = 0
        self._start = None
        self._previous: dict = {}

    # -- signals -----------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            print(
                f"\n{name} received: finishing step {self.step + 1}, then saving a checkpoint "
                "(send it again to abandon the step)",
                file=sys.stderr,
                flush=True,
            )
            if self.stop_grace_seconds is not None:
                self._deadline = threading.Timer(self.stop_grace_seconds, self._give_up)
                self._deadline.daemon = True
                self._deadline.start()
            return
        self.signal_name = name
        raise KeyboardInterrupt

    def _give_up(self) -> None:
        print(
            f"error: step {self.step + 1} did not finish within {self.stop_grace_seconds:g} s "
            f"of {self.signal_name} (distributed.stop_grace_seconds): another process of the "
            "group has probably stopped, so its collectives cannot complete. Exiting without "
            "saving; the last checkpoint holds every finished step (resume with "
            "run.resume=latest)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(143 if self.signal_name == "SIGTERM" else 130)

    def install(self) -> StepGuard:
        # Handlers can only be installed from the main thread; elsewhere (a flow run in a
        # worker thread) the process's default handling applies.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if _peer_lost.is_set():
            hold_sigterm_after_peer_loss()

    # -- step state --------------------------------------------------------------------------

    def begin_step(self, step: int, model, optimizer, stream) -> None:
        """Remember what `step` starts from: trainable weights, optimizer state, data position."""
        self.step = step
        self._start = (
            _tree_refs(model.trainable_parameters()),
            _tree_refs(optimizer.state),
            stream.position,
        )

    @property
    def started(self) -> bool:
        return self._start is not None

    def roll_back(self, model, optimizer, stream=None) -> None:
        """Put the model, optimizer (and data position) back to the start of the current step."""
        params, opt_state, position = self._start
        model.update(params)
        optimizer.state = _tree_refs(opt_state)
        if stream is not None:
            stream.position = position

    def check_update(self, metrics: dict, model, optimizer, tracker, step: int) -> bool:
        """After the update: if loss or grad norm is NaN/inf, roll the update back and count it.

        Returns True when the step was skipped. Raises TrainingStopped after
        `max_nonfinite_steps` consecutive skipped steps (the model holds the last good state).
        """
        values = (metrics.get("loss", 0.0), metrics.get("grad_norm", 0.0))
        if all(math.isfinite(v) for v in values):
            self.nonfinite_run = 0
            return False
        self.roll_back(model, optimizer)
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        tracker.log_metrics(
            {
                "nonfinite/skipped_steps": self.nonfinite_total,
                "nonfinite/consecutive": self.nonfinite_run,
            },
            step,
        )
        print(
            f"\nwarning: step {step + 1}: loss={values[0]} grad_norm={values[1]}; update skipped "
            f"({self.nonfinite_run} in a row, {self.nonfinite_total} in all)",
            file=sys.stderr,
            flush=True,
        )
        if self.nonfinite_run >= self.max_nonfinite_steps:
            raise TrainingStopped(
                f"{self.nonfinite_run} consecutive steps had a NaN/inf loss or gradient "
                f"(safety.max_nonfinite_steps={self.max_nonfinite_steps}); stopped with the last "
                "good weights",
                exit_code=3,
                step=step + 1,
            )
        return True

    def raise_if_stopping(self, done: int) -> None:
        """After the step's checkpoint: stop if a signal asked for it."""
        if self.signal_name is not None:
            raise TrainingStopped(
                f"stopped by {self.signal_name} after step {done}",
                exit_code=143 if self.signal_name == "SIGTERM" else 130,
                step=done,
            )

    def interrupted(self) -> TrainingStopped:
        """The error for an abandoned step (a second signal or a KeyboardInterrupt)."""
        name = self.signal_name or "SIGINT"
        return TrainingStopped(
            f"stopped by {name} during step {self.step + 1}; the step was abandoned",
            exit_code=143 if name == "SIGTERM" else 130,
            step=self.step,
        )
