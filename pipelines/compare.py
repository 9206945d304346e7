"""Compare GRPO runs in MLflow: a side-by-side table and a PNG of reward and loss curves.

    python -m pipelines.compare grpo                      # the runs of experiment "grpo"
    python -m pipelines.compare 8a7f95a7 3c1d09e2         # run ids (or unique id prefixes)
    python -m pipelines.compare grpo --last 4 --output compare.png --tracking-uri http://...

The table has one column per run: final and best reward, final eval accuracy (`eval/accuracy`,
when logged), mean tokens/s, wall time, steps, and every config key whose value differs between
the runs. The PNG is also logged to MLflow, as the artifact of a run named `compare` (tagged
`mlx_grpo.kind=compare`) in the first run's experiment; `compare` never lists such runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.tracking import quiet_logs, resolve_uri

COMPARE_TAG = "mlx_grpo.kind"


class CompareError(ValueError):
    pass


def find_runs(client, targets: list[str], last: int) -> list:
    """Runs named by `targets`: one experiment name, or run ids / unique id prefixes."""
    from mlflow.exceptions import MlflowException

    if len(targets) == 1:
        experiment = client.get_experiment_by_name(targets[0])
        if experiment is not None:
            runs = [
                r
                for r in client.search_runs(
                    [experiment.experiment_id], order_by=["attributes.start_time DESC"]
                )
                if r.data.tags.get(COMPARE_TAG) != "compare"
            ][:last]
            if not runs:
                raise CompareError(f"experiment {targets[0]!r} has no runs")
            return list(reversed(runs))
    runs = []
    all_runs = None
    for target in targets:
        try:
            runs.append(client.get_run(target))
            continue
        except MlflowException:
            pass
        if all_runs is None:
            experiments = client.search_experiments()
            all_runs = client.search_runs([e.experiment_id for e in experiments])
        matches = [r for r in all_runs if r.info.run_id.startswith(target)]
        if len(matches) != 1:
            what = "no run or experiment" if not matches else f"{len(matches)} runs"
            raise CompareError(f"{target!r} matches {what}; give an experiment name or run ids")
        runs.append(matches[0])
    return runs


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    by_step = dict(points)  # a resumed run may have logged a step twice: keep the last value
    return sorted(by_step.items())


def summarize(client, run) -> dict:
    run_id = run.info.run_id
    reward = _history(client, run_id, "reward")
    tokens = [v for _, v in _history(client, run_id, "tokens/s")]
    accuracy = _history(client, run_id, "eval/accuracy")
    end = run.info.end_time or int(time.time() * 1000)
    return {
        "run": run.info.run_name or run_id[:8],
        "run id": run_id[:12],
        "status": run.info.status,
        "steps": len(reward),
        "final reward": reward[-1][1] if reward else None,
        "best reward": max(v for _, v in reward) if reward else None,
        "eval/accuracy": accuracy[-1][1] if accuracy else None,
        "tokens/s": sum(tokens) / len(tokens) if tokens else None,
        "wall time": (end - run.info.start_time) / 1000,
    }


def differing_params(runs) -> dict[str, list[str]]:
    keys = sorted(set().union(*(r.data.params for r in runs)))
    out = {}
    for key in keys:
        values = [r.data.params.get(key, "-") for r in runs]
        if len(set(values)) > 1:
            out[key] = values
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _wall(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_table(summaries: list[dict], diffs: dict[str, list[str]]) -> str:
    rows = []
    for key in summaries[0]:
        if key == "run":
            continue
        cells = [_wall(s[key]) if key == "wall time" else _cell(s[key]) for s in summaries]
        rows.append((key, cells))
    if diffs:
        rows.append(("config that differs:", [""] * len(summaries)))
        rows += [(f"  {key}", values) for key, values in diffs.items()]
    else:
        rows.append(("config that differs:", ["(none)"] + [""] * (len(summaries) - 1)))
    header = ("", [s["run"] for s in summaries])
    width0 = max(len(r[0]) for r in [header, *rows])
    widths = [max(len(cells[i]) for _, cells in [header, *rows]) for i in range(len(summaries))]

    def line(name, cells):
        return "  ".join([name.ljust(width0), *(c.rjust(w) for c, w in zip(cells, widths))])

    out = [line(*header), "-" * len(line(*header))]
    out += [line(name, cells) for name, cells in rows]
    return "\n".join(out)


def plot_curves(client, runs, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for run in runs:
        label = run.info.run_name or run.info.run_id[:8]
        label = f"{label} ({run.info.run_id[:6]})"
        for axis, key in zip(axes, ("reward", "loss")):
            points = _history(client, run.info.run_id, key)
            if points:
                axis.plot(*zip(*points), label=label)
    for axis, key in zip(axes, ("reward", "loss")):
        axis.set(title=key, xlabel="step")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def log_comparison(client, runs, png: Path, table: str) -> str:
    """Log the PNG and table to a `compare` run in the first run's experiment. Returns its id."""
    import shutil
    import tempfile

    compare_run = client.create_run(
        runs[0].info.experiment_id,
        run_name="compare",
        tags={COMPARE_TAG: "compare", "compared_runs": ",".join(r.info.run_id for r in runs)},
    )
    run_id = compare_run.info.run_id
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        shutil.copyfile(png, folder / "compare.png")
        (folder / "compare.txt").write_text(table + "\n")
        client.log_artifacts(run_id, str(folder), "compare")
    client.set_terminated(run_id)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.compare",
        description="Compare GRPO runs: a side-by-side table and reward/loss curves.",
    )
    parser.add_argument("targets", nargs="+", help="an experiment name, or run ids / prefixes")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory",
    )
    parser.add_argument("--last", type=int, default=10, help="experiment: newest N runs (10)")
    parser.add_argument("--output", default="compare.png", help="PNG path (compare.png)")
    parser.add_argument("--no-log", action="store_true", help="do not log the PNG to MLflow")
    args = parser.parse_args(argv)

    uri = resolve_uri(args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        print(f"error: no MLflow store at {uri}; pass --tracking-uri", file=sys.stderr)
        return 2
    quiet_logs()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        runs = find_runs(client, args.targets, args.last)
        summaries = [summarize(client, run) for run in runs]
        table = format_table(summaries, differing_params(runs))
        print(table)
        png = plot_curves(client, runs, Path(args.output))
        print(f"\ncurves: {png}")
        if not args.no_log:
            run_id = log_comparison(client, runs, png, table)
            print(f"logged to MLflow run {run_id} (compare/compare.png) in {uri}")
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except MlflowException as error:
        print(f"error: MLflow at {uri}: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
