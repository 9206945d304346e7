"""Entry points: grpo (train).

Importing `stages` first attaches the optimized CPU BLAS before anything loads mlx.core. The
Prefect defaults are set here, before any pipelines module imports prefect; users' own settings
win.
"""

import os

import stages  # noqa: F401

# Prefect narrates every task run at INFO; the console shows our progress bar instead. Its
# temporary server's telemetry would log an error on machines without internet.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary server is stopped when the run exits; its event recorder sometimes loses that
# race and logs a traceback after the run has finished. Its logs are internal: show only the
# critical ones (the run's own failures are logged by this process, not the server).
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
# The temporary server needs ~10 s on an idle 2-core machine; give a loaded one time too.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
