"""Bad input found by `python -m pipelines.grpo` before anything starts: one line, exit 2.
In-process calls of the real entry point (the subprocess versions are in test_cli.py)."""

import pytest

from pipelines import grpo

CASES = [
    (["data.eval_size=600"], "eval split of 600 rows is not smaller than the dataset (512 rows)"),
    (
        ["data.source=DATA", "data.prompt_column=question", "+data.columns.answer=solution"],
        "has no column 'solution' (data.columns.answer)",
    ),
    (
        ["data.source=DATA", "data.prompt_column=question", "reward=gsm8k"],
        "reward math_answer needs column 'answer'",
    ),
    (
        ["data.source=DATA", "data.prompt_column=question", "+data.columns.answer=gold"],
        None,  # mapping the column fixes it: no error
    ),
    (
        ["data.source=DATA", "data.prompt_column=question", "data.eval_source=MISSING"],
        "does not exist",
    ),
    (["train.loss_type=ppo"], "train.loss_type='ppo' is invalid"),
    (["train.multi_objective_aggregation=avg"], "multi_objective_aggregation='avg' is invalid"),
    (["reward.weights=[1,2]"], "reward.weights has 2 values for 1 reward functions"),
    (["+reward.funcs.mine._target_=no_such_pkg.rewards.mine"], "reward.funcs.mine: reward"),
    (["+reward.funcs.mine._target_=stages.rewards.nope"], "cannot be imported"),
]


@pytest.mark.parametrize("overrides, fragment", CASES)
def test_bad_input_is_one_line_before_anything_starts(
    tmp_path, monkeypatch, capsys, overrides, fragment
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(
        '{"question": "1+1=", "gold": "2"}\n{"question": "2+2=", "gold": "4"}\n'
    )
    overrides = [
        o.replace("DATA", str(tmp_path / "data.jsonl")).replace(
            "MISSING", str(tmp_path / "x.jsonl")
        )
        for o in overrides
    ]
    if fragment is None:
        grpo.preflight(grpo.compose(overrides))
        return
    assert grpo.main(overrides) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists()
