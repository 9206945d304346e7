"""MLX's launcher without its busy wait: `python -m pipelines.launch` takes `mlx.launch`'s
arguments and runs its code (mlx._distributed_utils.launch), e.g.

    python -m pipelines.launch -n 2 --backend ring python -m pipelines.grpo +experiment=quickstart

mlx.launch (mlx 0.32) forwards each process's output from a thread per process whose select()
also waits for the process's stdin pipe to be writable, which an empty pipe always is, so the
threads never sleep; its main loop's select() on the launcher's own stdin returns at once too
when that is /dev/null or a closed pipe. On the 2-core CPU the launcher of two ranks that only
sleep 3 s used 4.3 CPU seconds, 0.2 s under this module (docs/scaling-out.md): a third process
taking CPU from the two that train. Here those waits wait for the processes' output only: the
launcher's stdin is not forwarded (the pipeline reads none), everything else is mlx.launch's.
"""

from __future__ import annotations

import select
import sys


def _wait_for_output(rlist, wlist, xlist, timeout=None):
    """select() over the readable side only: stdin, the launcher's or a process's, is never
    waited on, so a wait lasts until a process writes or the timeout."""
    stdin = sys.stdin.fileno() if sys.stdin is not None else -1
    readable, _, errors = select.select([fd for fd in rlist if fd != stdin], [], xlist, timeout)
    return readable, [], errors


def main() -> None:
    from mlx._distributed_utils import launch

    launch.select = _wait_for_output
    launch.main()


if __name__ == "__main__":
    main()
