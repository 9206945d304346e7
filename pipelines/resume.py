"""Where a run resumes from, and how a stopped run tells the user to resume.

`run.resume` is null (start fresh), "latest" (the newest usable checkpoint under
<output_dir>/checkpoints) or a checkpoint directory. A damaged newer checkpoint (truncated files,
bad JSON, bad safetensors headers) is set aside as `.corrupt-<name>` and the previous one used.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from stages import checkpoint


def resume_point(
    output_dir: str | Path, resume: str | None, set_aside: bool = False
) -> Path | None:
    """The checkpoint to resume from per `run.resume` (null, "latest" or a path). Raises
    ValueError naming the problem when an explicit path is not a usable checkpoint."""
    root = Path(output_dir) / "checkpoints"
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(root, set_aside=set_aside)
    path = Path(resume)
    if not (path / checkpoint.STATE_FILE).exists():
        raise ValueError(f"run.resume={path} is not a checkpoint (no {checkpoint.STATE_FILE})")
    problem = checkpoint.validate(path)
    if problem:
        raise ValueError(f"run.resume={path} is damaged: {problem}")
    return path


def latest_checkpoint(root: Path, set_aside: bool = False) -> Path | None:
    """The newest complete checkpoint under `root`. Raises ValueError if there are checkpoints
    but none is usable. With `set_aside` (the flow, not the preflight check), a damaged newer
    one is reported on stderr and renamed to `.corrupt-<name>`, so it is never resumed or
    counted by pruning in place of a good one."""
    found, rejected = checkpoint.latest_valid(root)
    if found is None and rejected:
        problems = "; ".join(f"{path.name}: {problem}" for path, problem in rejected)
        raise ValueError(f"no usable checkpoint in {root} ({problems})")
    if not set_aside:
        return found
    for staging in Path(root).glob(".step-*.tmp-*"):
        # Left by a save that was interrupted (the rename never happened): never a checkpoint.
        shutil.rmtree(staging, ignore_errors=True)
    for path, problem in rejected:
        moved = checkpoint.set_aside(path)
        print(
            f"warning: checkpoint {path} is damaged ({problem}); moved to {moved.name}",
            file=sys.stderr,
        )
    if found is None:
        print(f"note: no checkpoint in {root} yet; starting from step 0", file=sys.stderr)
    elif rejected:
        print(f"warning: resuming from the previous checkpoint, {found}", file=sys.stderr)
    return found


def resume_hint(overrides: list[str]) -> str:
    kept = [o for o in overrides if not o.startswith("run.resume=")]
    return f"resume with: python -m pipelines.grpo {' '.join([*kept, 'run.resume=latest'])}"
