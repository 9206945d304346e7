import json

from stages import data

import pytest


def test_arithmetic_rows_are_seeded_and_correct():
    rows = data.arithmetic_rows(50, seed=3)
    assert rows == data.arithmetic_rows(50, seed=3)
    for row in rows:
        a, b = row["prompt"].rstrip("=").split("+")
        assert int(row["answer"]) == int(a) + int(b) and int(a) <= 4 and int(b) <= 4


@pytest.fixture
def records():
    return [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(6)]


def _write(tmp_path, records, suffix):
    import datasets

    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".csv":
        datasets.Dataset.from_list(records).to_csv(str(path))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", "_saved"])
def test_each_format_loads_with_column_mapping(tmp_path, records, suffix):
    path = _write(tmp_path, records, suffix)
    rows = data.load_rows(str(path), prompt_column="question")
    assert [r["prompt"] for r in rows] == [r["question"] for r in records]
    assert rows[2]["answer"] == "#### 2" and "question" not in rows[0]


def test_missing_prompt_column_names_the_columns(tmp_path, records):
    path = _write(tmp_path, records, ".jsonl")
    with pytest.raises(ValueError, match=r"no prompt column 'prompt'.*\['answer', 'question'\]"):
        data.load_rows(str(path))


def test_missing_file_and_bad_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_rows(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "train.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        data.load_rows(str(bad))


def test_stream_position_resumes_exactly():
    rows = data.arithmetic_rows(10, seed=0)
    uninterrupted = data.PromptStream(rows, seed=7)
    expected = [uninterrupted.next_batch(4) for _ in range(5)]  # crosses epoch boundaries
    first = data.PromptStream(rows, seed=7)
    got = [first.next_batch(4) for _ in range(2)]
    resumed = data.PromptStream(rows, seed=7, position=first.position)
    got += [resumed.next_batch(4) for _ in range(3)]
    assert got == expected
    epoch = [r["prompt"] for r in data.PromptStream(rows, seed=7).next_batch(10)]
    assert sorted(epoch) == sorted(r["prompt"] for r in rows)  # each row once per epoch
