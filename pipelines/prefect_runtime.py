"""Prefect's runtime for a training run: its temporary server, and stop messages without noise.

`pipelines/__init__.py` sets Prefect's logging defaults before anything imports prefect.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import types

from stages import distributed

from pipelines.safety import TrainingStopped


def start_prefect_server_outside_ctrl_c() -> None:
    """Start Prefect's temporary server (used when PREFECT_API_URL is unset) in its own process
    group. Ctrl-C in a terminal signals the whole foreground process group; the server would die
    under the stopping run, which then could not record its final state. Prefect starts the
    server with a plain Popen, so for that one call its module sees a Popen with
    process_group=0; the server is still stopped at exit by Prefect's own atexit hook."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        return  # a server is configured: its module (about 2.7 s to import) is not needed
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api import server as server_module

    server = server_module.SubprocessASGIServer()
    if server.running:
        return
    own_group = types.SimpleNamespace(**vars(subprocess))
    own_group.Popen = functools.partial(subprocess.Popen, process_group=0)
    server_module.subprocess = own_group
    try:
        server.start()
    finally:
        server_module.subprocess = subprocess


def quiet_stop_tracebacks() -> None:
    """Prefect logs an exception that ends a task or flow with its traceback; a clean stop is
    not a crash, and a lost peer is reported by `main` in one line, so on the console each is
    only our message (the run's state in the Prefect UI still says why it ended)."""

    class _DropStops(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            error = record.exc_info[1] if record.exc_info else None
            if error is None:
                return True
            return not (isinstance(error, TrainingStopped) or distributed.is_peer_failure(error))

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_DropStops())
