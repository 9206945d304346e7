import os
import platform
import subprocess
import sys

from stages import backend

import mlx.core as mx
import pytest


def test_auto_dtype_is_float32_on_cpu_bfloat16_on_gpu():
    expected = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert backend.resolve_dtype("auto") == expected
    assert backend.resolve_dtype(None) == expected
    assert backend.resolve_dtype("bfloat16") == mx.bfloat16


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype 'float8'"):
        backend.resolve_dtype("float8")


def test_blas_choice_matches_the_platform():
    """Linux x86-64 with the mlx-cpu wheel: MKL from the cpu extra. Metal and CUDA builds bring
    their own BLAS ("platform")."""
    if backend._mlx_cpu_wheel_libs() is None or not sys.platform.startswith("linux"):
        assert backend.blas() == "platform"
    elif platform.machine() == "x86_64":
        assert backend.blas().startswith("libmkl_rt")
    else:  # no MKL wheel: a system OpenBLAS if installed, else the bundled reference
        assert backend.blas() != "platform"


def _probe(env_extra):
    env = {**os.environ, **env_extra}
    code = "import stages, mlx.core as mx; from stages import backend; print(backend.blas())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_missing_blas_warns_in_one_line():
    result = _probe({"MLX_GRPO_BLAS": "/nonexistent/libblas.so"})
    assert result.returncode == 0
    # Where the swap applies (Linux, mlx-cpu wheel) the named library fails to load -> warning.
    expected = "reference" if backend.blas() != "platform" else "platform"
    assert result.stdout.strip() == expected
    if expected == "reference":
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


def _blas_threads(env_extra: dict, drop: tuple = ()) -> str:
    env = {k: v for k, v in {**os.environ, **env_extra}.items() if k not in drop}
    code = (
        "import ctypes, os, stages; from stages import backend; name = backend.blas(); "
        "n = ctypes.CDLL(name).MKL_Get_Max_Threads() if name.startswith('libmkl') else -1; "
        "print(os.environ.get('MKL_NUM_THREADS'), n)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_one_blas_thread_unless_the_user_sets_it():
    """MLX's CPU backend runs one operation at a time; a BLAS thread team on a shared CPU stalls
    (docs/cpu.md). A user's MKL_NUM_THREADS is kept."""
    mkl = backend.blas().startswith("libmkl")
    assert _blas_threads({}, drop=("MKL_NUM_THREADS",)) == ("1 1" if mkl else "1 -1")
    assert _blas_threads({"MKL_NUM_THREADS": "2"}) == ("2 2" if mkl else "2 -1")


def test_a_folder_named_mlx_beside_the_script_does_not_hide_the_wheel(tmp_path):
    """A script run from a folder holding a directory called mlx (a clone of MLX, a cache) makes
    that folder the first place `mlx` is looked up; the wheel's BLAS is still found."""
    (tmp_path / "mlx" / "0.1").mkdir(parents=True)
    code = "import stages; from stages import backend; print(backend.blas())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == backend.blas()
