"""pipelines.compare against a real SQLite MLflow store (runs logged with MlflowClient)."""

import time

import pytest

from pipelines import compare


def make_runs(client, experiment: str) -> list[str]:
    """Two finished runs that differ in learning rate; the second logs eval/accuracy."""
    experiment_id = client.create_experiment(experiment)
    ids = []
    for name, lr, rewards in (
        ("low-lr", "3e-4", [0.1, 0.6, 0.5]),
        ("high-lr", "1e-3", [0.2, 0.4, 0.75]),
    ):
        run = client.create_run(experiment_id, run_name=name)
        run_id = run.info.run_id
        client.log_param(run_id, "train.learning_rate", lr)
        client.log_param(run_id, "train.steps", "3")
        now = int(time.time() * 1000)
        for step, reward in enumerate(rewards):
            client.log_metric(run_id, "reward", reward, now, step)
            client.log_metric(run_id, "loss", 0.1 * step, now, step)
            client.log_metric(run_id, "tokens/s", 100.0 + 10 * step, now, step)
        if name == "high-lr":
            client.log_metric(run_id, "eval/accuracy", 0.25, now, 2)
        client.set_terminated(run_id)
        ids.append(run_id)
    return ids


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(uri), uri


def test_compare_an_experiment_prints_the_table_and_logs_the_png(tmp_path, store, capsys):
    client, uri = store
    make_runs(client, "exp")
    png = tmp_path / "out" / "curves.png"
    assert compare.main(["exp", "--tracking-uri", uri, "--output", str(png)]) == 0
    out = capsys.readouterr().out
    rows = {
        line.strip().split("  ")[0]: line.split()[-2:]
        for line in out.splitlines()[2:]
        if line.strip()
    }
    assert out.splitlines()[0].split() == ["low-lr", "high-lr"]
    assert rows["final reward"] == ["0.5", "0.75"]
    assert rows["best reward"] == ["0.6", "0.75"]
    assert rows["eval/accuracy"] == ["-", "0.25"]
    assert rows["tokens/s"] == ["110", "110"]
    assert rows["steps"] == ["3", "3"]
    assert rows["train.learning_rate"] == ["3e-4", "1e-3"]
    assert "train.steps" not in rows  # equal in both runs
    assert png.read_bytes()[:4] == b"\x89PNG"

    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id])
    logged = [r for r in runs if r.data.tags.get(compare.COMPARE_TAG) == "compare"]
    assert len(logged) == 1 and len(runs) == 3
    assert {a.path for a in client.list_artifacts(logged[0].info.run_id, "compare")} == {
        "compare/compare.png",
        "compare/compare.txt",
    }
    # Comparing again lists the two training runs only, never the comparison run.
    assert compare.main(["exp", "--tracking-uri", uri, "--output", str(png), "--no-log"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["low-lr", "high-lr"]


def test_compare_run_ids_and_prefixes(tmp_path, store, capsys):
    client, uri = store
    first, second = make_runs(client, "exp")
    args = [second, first[:10], "--tracking-uri", uri, "--output", str(tmp_path / "c.png")]
    assert compare.main([*args, "--no-log"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["high-lr", "low-lr"]


def test_compare_unknown_target_is_one_line(tmp_path, store, capsys):
    client, uri = store
    make_runs(client, "exp")
    assert compare.main(["nope", "--tracking-uri", uri, "--output", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: 'nope' matches no run or experiment; give an experiment name or run ids"
