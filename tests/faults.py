"""Test-only reward functions that inject faults into a real training subprocess.

Selected by import path, e.g. `reward.funcs.exact_answer._target_=faults.slow_exact_answer`
with `tests/` on PYTHONPATH. Both score like the built-in `exact_answer`.
"""

import math
import os
import time

from stages.rewards import exact_answer

_calls = 0


def slow_exact_answer(prompts, completions, **columns):
    """exact_answer after sleeping $GRPO_TEST_REWARD_SLEEP seconds (0 if unset), and waiting
    while the file $GRPO_TEST_PAUSE_FILE exists: lets a test act mid-run."""
    time.sleep(float(os.environ.get("GRPO_TEST_REWARD_SLEEP", "0")))
    pause = os.environ.get("GRPO_TEST_PAUSE_FILE")
    while pause and os.path.exists(pause):
        time.sleep(0.1)
    return exact_answer(prompts, completions, **columns)


def inf_on_calls(prompts, completions, **columns):
    """exact_answer, but +inf for every completion on the calls (1-based, one call per step)
    listed in $GRPO_TEST_INF_CALLS ("3,5,6"): the advantages and the loss become NaN."""
    global _calls
    _calls += 1
    bad = {int(c) for c in os.environ.get("GRPO_TEST_INF_CALLS", "").split(",") if c}
    values = exact_answer(prompts, completions, **columns)
    return [math.inf] * len(values) if _calls in bad else values


def dies_on_call(prompts, completions, **columns):
    """exact_answer, but the process with MLX_RANK $GRPO_TEST_DIE_RANK exits at once (os._exit,
    as a crash or an out-of-memory kill would) on call $GRPO_TEST_DIE_CALL (1-based)."""
    global _calls
    _calls += 1
    rank = os.environ.get("MLX_RANK", "0")
    if rank == os.environ.get("GRPO_TEST_DIE_RANK") and _calls == int(
        os.environ.get("GRPO_TEST_DIE_CALL", "0")
    ):
        os._exit(9)
    return exact_answer(prompts, completions, **columns)
