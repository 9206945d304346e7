"""Real servers for end-to-end tests: a Prefect server and an MLflow tracking server, each a
subprocess on a free loopback port, in its own process group so it can be stopped whole."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} not up after {timeout} s: {log.read_text()[-2000:]}")


class Server:
    """A server subprocess; start() waits until `health` answers 200, stop() kills its group."""

    def __init__(self, argv: list[str], health: str, workdir: Path, env: dict | None = None):
        self.argv, self.health, self.workdir = argv, health, workdir
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.log = workdir / f"server-{os.getpid()}-{id(self)}.log"

    def start(self, timeout: float = 90) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_http(self.health, self.process, self.log, timeout)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def prefect_server(workdir: Path) -> tuple[Server, str]:
    port = free_port()
    env = {
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server = Server(
        [*argv, "--port", str(port)], f"http://127.0.0.1:{port}/api/health", workdir, env
    )
    return server, f"http://127.0.0.1:{port}/api"


def mlflow_server(workdir: Path, port: int | None = None) -> tuple[Server, str]:
    port = port or free_port()
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow-server.db'}",
        "--artifacts-destination", str(workdir / "mlflow-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server = Server(argv, f"http://127.0.0.1:{port}/health", workdir)
    return server, f"http://127.0.0.1:{port}"
