"""What a finished run reports: the summary as a Prefect artifact, and the reward/loss plot.

The summary (final metrics, checkpoint path, MLflow run link) is shown on the flow run's
Artifacts tab in the Prefect UI (and under Artifacts, by key, across runs), for runs started by
`pipelines.grpo` or by a `pipelines.schedule` deployment. The plot is logged to MLflow.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipelines.tracking import Tracker


def artifact_key(run_name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "grpo-summary-" + (re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "run")


def summary_markdown(summary: dict, history: list[dict], link: str) -> str:
    rows = [
        ("steps", summary.get("steps")),
        ("final reward", _fmt(summary.get("final_reward"))),
        ("best reward", _fmt(max((h["reward"] for h in history), default=None))),
        ("mean reward, first 10 steps", _fmt(summary.get("reward_first10"))),
        ("mean reward, last 10 steps", _fmt(summary.get("reward_last10"))),
        ("final loss", _fmt(history[-1]["loss"] if history else None)),
        ("eval accuracy, first eval", _eval(summary, "first")),
        ("eval accuracy, last eval", _eval(summary, "last")),
        ("checkpoint", f"`{summary.get('checkpoint')}`"),
        ("MLflow run", link if link.startswith("http") else f"`{link}`"),
    ]
    lines = ["# GRPO run summary", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _eval(summary: dict, which: str) -> str:
    accuracy = summary.get(f"eval_{which}_accuracy")
    return "-" if accuracy is None else f"{accuracy:.4f} (step {summary[f'eval_{which}_step']})"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def publish_summary(summary: dict, history: list[dict], tracker: Tracker, run_name: str) -> str:
    """Create the markdown artifact in the current flow run. Returns the markdown."""
    from prefect.artifacts import create_markdown_artifact

    markdown = summary_markdown(summary, history, tracker.link)
    try:
        create_markdown_artifact(
            markdown=markdown,
            key=artifact_key(run_name),
            description=f"GRPO run {run_name}: final metrics, checkpoint, MLflow run",
        )
    except Exception as error:  # noqa: BLE001  (a finished run must not fail on its report)
        print(f"warning: Prefect summary artifact not created: {error}", file=sys.stderr)
    return markdown


def plot_rewards(history: list[dict], path: Path) -> Path:
    """PNG of the reward and loss per step (`history`: {"step", "reward", "loss"} per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(steps, [h["reward"] for h in history])
    axes[0].set(title="reward", xlabel="step")
    axes[1].plot(steps, [h["loss"] for h in history])
    axes[1].set(title="loss", xlabel="step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
