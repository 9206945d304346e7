"""Compute backend: an optimized BLAS for MLX on Linux CPU, and the default dtype per device.

The mlx-cpu wheel for Linux links its matmuls against the reference (netlib) BLAS it bundles,
which runs a 1024x1024 fp32 matmul at about 5 GFLOP/s. `libmlx.so` resolves `cblas_sgemm` and the
LAPACK symbols through the dynamic linker, and libraries loaded with RTLD_GLOBAL come first in
that lookup. So loading an optimized BLAS globally *before* `mlx.core` is imported makes MLX use
it, with no rebuild. `stages/__init__.py` calls `use_fast_blas()` for that reason.

Candidates, in order: the library named by MLX_GRPO_BLAS; Intel MKL installed from PyPI into
this environment (the `cpu` extra pulls it on x86-64); a system OpenBLAS (Debian/Ubuntu
`libopenblas0`). MLX_GRPO_BLAS=reference keeps the bundled one without a warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from pathlib import Path

_state: dict[str, str] = {}


def _mlx_cpu_wheel_libs() -> Path | None:
    """The folder of libraries the Linux mlx-cpu wheel bundles, if that wheel is installed."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    # Every location: a folder named mlx beside a script (a clone of MLX, say) comes first.
    for location in spec.submodule_search_locations:
        libs = Path(location).parent / "mlx_cpu.libs"
        if libs.is_dir():
            return libs
    return None


def _candidates() -> list[str]:
    named = os.environ.get("MLX_GRPO_BLAS")
    if named:
        return [named]
    found = []
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        for soname in ("libmkl_rt.so.3", "libmkl_rt.so.2"):
            path = Path(prefix) / "lib" / soname
            if path.exists():
                found.append(str(path))
    openblas = ctypes.util.find_library("openblas")
    if openblas:
        found.append(openblas)
    return found


def use_fast_blas() -> str:
    """Attach an optimized BLAS to MLX's CPU backend; returns what MLX will use.

    Idempotent. A no-op ("platform") off Linux or without the mlx-cpu wheel (Metal and CUDA
    builds bring their own). Prints one warning line to stderr when only the reference BLAS
    is available, because every CPU matmul is then about 30x slower.
    """
    if "blas" in _state:
        return _state["blas"]
    if not sys.platform.startswith("linux") or _mlx_cpu_wheel_libs() is None:
        _state["blas"] = "platform"
        return _state["blas"]
    if os.environ.get("MLX_GRPO_BLAS") == "reference":
        _state["blas"] = "reference"
        return _state["blas"]
    if "mlx.core" in sys.modules:
        _state["blas"] = "reference"
        print(
            "warning: mlx.core was imported before `stages`, so MLX keeps its slow reference "
            "BLAS; import stages (or pipelines) first",
            file=sys.stderr,
        )
        return _state["blas"]
    # One BLAS thread unless the user says otherwise: MLX's CPU backend runs one operation at a
    # time on one worker thread, and a BLAS thread team on a CPU shared with other work waits at
    # every barrier for a descheduled thread (docs/cpu.md has the measurements).
    for variable in ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    for candidate in _candidates():
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _state["blas"] = Path(candidate).name
        return _state["blas"]
    _state["blas"] = "reference"
    print(
        "warning: MLX on this CPU uses the slow reference BLAS bundled with mlx-cpu; "
        "fix: `pip install mkl` (x86-64) or `apt-get install libopenblas0`, "
        "or point MLX_GRPO_BLAS at a BLAS shared library",
        file=sys.stderr,
    )
    return _state["blas"]


def blas() -> str:
    """What `use_fast_blas` chose: a library name, "reference", or "platform"."""
    return _state.get("blas") or use_fast_blas()


def resolve_dtype(name: str | None):
    """`auto` (or None) means float32 on CPU, bfloat16 on GPU/Metal.

    MLX's CPU half-precision matmuls are far slower than fp32, while GPUs are fastest in bf16.
    """
    import mlx.core as mx

    name = name or "auto"
    if name == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    choices = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
    if name not in choices:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(choices)}")
    return choices[name]


def memory_budget() -> tuple[int, str]:
    """(bytes, where the number comes from) that the training step may use on this device:
    CUDA's free memory, Metal's recommended working set, or half the RAM on CPU."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        info = mx.device_info()
        for key, what in (
            ("free_memory", "CUDA's free memory"),
            ("max_recommended_working_set_size", "Metal's recommended working set"),
            ("memory_size", "the device's memory"),
            ("total_memory", "the device's memory"),
        ):
            if info.get(key):
                return int(info[key]), what
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // 2, "half the RAM"
