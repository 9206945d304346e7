"""GRPO stages: each module is a pure MLX core (plus, in pipelines/tasks.py, a thin Prefect task).

Importing this package first attaches an optimized BLAS to MLX's Linux CPU backend; it has to
happen before anything imports `mlx.core` (see stages/backend.py).
"""

from stages.backend import use_fast_blas

use_fast_blas()
