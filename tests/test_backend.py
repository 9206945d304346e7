import os
import platform
import subprocess
import sys

from stages import backend

import mlx.core as mx
import pytest


def test_auto_dtype_is_float32_on_cpu():
    if mx.default_device() != mx.cpu:
        pytest.skip("needs the CPU backend (an accelerator is present)")
    assert backend.resolve_dtype("auto") == mx.float32
    assert backend.resolve_dtype(None) == mx.float32
    assert backend.resolve_dtype("bfloat16") == mx.bfloat16


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype 'float8'"):
        backend.resolve_dtype("float8")


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="MKL from the cpu extra is installed on Linux x86-64 only",
)
def test_linux_cpu_uses_mkl_from_the_cpu_extra():
    assert backend.blas().startswith("libmkl_rt")


def _probe(env_extra):
    env = {**os.environ, **env_extra}
    code = "import stages, mlx.core as mx; from stages import backend; print(backend.blas())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS swap is Linux-only")
def test_missing_blas_warns_in_one_line():
    result = _probe({"MLX_GRPO_BLAS": "/nonexistent/libblas.so"})
    assert result.returncode == 0
    assert result.stdout.strip() in ("reference", "platform")
    if result.stdout.strip() == "reference":
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("warning:") and "pip install mkl" in lines[0]


def test_reference_opt_out_is_silent():
    result = _probe({"MLX_GRPO_BLAS": "reference"})
    assert result.returncode == 0 and result.stderr.strip() == ""


def test_mlx_matmul_is_correct_with_the_chosen_blas():
    import numpy as np

    a = np.random.default_rng(0).standard_normal((257, 129)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((129, 65)).astype(np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)
