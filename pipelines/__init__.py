"""Entry points: grpo (train). Importing `stages` first attaches the optimized CPU BLAS."""

import stages  # noqa: F401
