"""Shared fixtures. Every test runs offline against the built-in tiny model, built once per
session into a temporary cache; Prefect and MLflow state also live in temporary folders."""

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="grpo-tests-"))
os.environ.setdefault("MLX_GRPO_CACHE", str(_SESSION_DIR / "cache"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import stages  # noqa: E402,F401  (attach the fast BLAS before anything imports mlx.core)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from stages.load_weights import resolve_path

    return resolve_path("builtin:tiny_qwen3")


@pytest.fixture
def tiny(tiny_path):
    """A freshly loaded (model, tokenizer) in float32."""
    from stages.load_weights import load

    return load(tiny_path, dtype="float32")


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect server (`prefect server start`) on a loopback port, for the session.
    Subprocesses given PREFECT_API_URL use it instead of starting a temporary one each."""
    from servers import prefect_server

    server, api = prefect_server(tmp_path_factory.mktemp("prefect-server"))
    server.start(timeout=180)
    yield api
    server.stop()


@pytest.fixture
def shared_prefect(prefect_api, monkeypatch):
    """Training subprocesses use the session's Prefect server instead of each starting a
    temporary one (about 15 s each on 2 cores)."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    return prefect_api
