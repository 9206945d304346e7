"""Shared fixtures. Every test runs offline against the built-in tiny model, built once per
session into a temporary cache; Prefect and MLflow state also live in temporary folders.

The suite runs on two pytest-xdist workers (`-n 2 --dist loadgroup`, pyproject.toml), each its
own session with its own Prefect home and Prefect server; the cache of built models is shared.
The hook at the end orders the tests longest first and keeps together on one worker the tests
that share an expensive fixture."""

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="grpo-tests-"))
# A cache of the test run's own unless MLX_GRPO_CACHE names one, shared by xdist's workers (they
# inherit the controller's environment, where it is set first): a model one worker built or
# converted is not built again by the other. Builds are written beside the cache entry and
# renamed into place, so no worker reads another's half-done build (two building at once both
# finish; the first rename wins).
os.environ.setdefault(
    "GRPO_TESTS_CACHE", os.environ.get("MLX_GRPO_CACHE") or str(_SESSION_DIR / "cache")
)
os.environ["MLX_GRPO_CACHE"] = os.environ["GRPO_TESTS_CACHE"]
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


@pytest.fixture(scope="session")
def tools_path() -> Path:
    """The built-in tools model, copied into the run's cache from the build that ships in
    stages/builtin_models (its 600 warm-up steps take about 2 minutes on 2 cores)."""
    from stages.load_weights import resolve_path

    return resolve_path("builtin:tiny_qwen3_tools")


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


# Modules with the longest tests first (measured, docs/testing.md): pytest-xdist hands out tests
# in this order as workers free up, so the long ones start early and the two workers end together.
LONGEST_FIRST = ("test_real_model.py", "test_scale.py", "test_cli.py", "test_ops.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Order the tests longest first and group, for `--dist loadgroup`: the tests of a module
    that share a module-scoped fixture (a reference run, a server, a loaded model) run on one
    worker, so it is made once."""
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        scopes = definitions.name2fixturedefs.values() if definitions else []
        if any(defs[-1].scope == "module" for defs in scopes):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))

    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order
