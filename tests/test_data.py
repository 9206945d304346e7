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


def test_chat_messages_column_loads_and_encodes(tmp_path):
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"what is {i}+1?"},
                {"role": "assistant", "content": str(i + 1)},
            ],
            "answer": str(i + 1),
        }
        for i in range(4)
    ]
    path = _write(tmp_path, chats, ".jsonl")
    rows = data.load_rows(str(path), prompt_column="messages")
    assert rows[1]["prompt"][0] == {"role": "user", "content": "what is 1+1?"}
    # the trailing assistant turn (the reference answer) is not part of the prompt
    assert data.prompt_messages(rows[1]["prompt"], "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "what is 1+1?"},
    ]

    class ChatTokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and tokenize
            text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
            return [ord(c) for c in text]

        def encode(self, text):
            return [ord(c) for c in text]

    ids = data.encode_prompt(ChatTokenizer(), rows[0]["prompt"])
    assert "".join(map(chr, ids)) == "<user>what is 0+1?<assistant>"
    plain = data.encode_prompt(ChatTokenizer(), "hi", use_chat_template=True, system_prompt="S")
    assert "".join(map(chr, plain)) == "<system>S<user>hi<assistant>"
    assert data.encode_prompt(ChatTokenizer(), "hi") == [104, 105]

    class PlainTokenizer:
        chat_template = None

    with pytest.raises(ValueError, match="a chat prompt needs a chat template"):
        data.encode_prompt(PlainTokenizer(), rows[0]["prompt"])


def test_bad_prompt_values_are_named(tmp_path):
    path = _write(tmp_path, [{"prompt": "ok"}, {"prompt": [{"text": "no role"}]}], ".jsonl")
    with pytest.raises(ValueError, match="row 1: prompt must be a string or a list of"):
        data.load_rows(str(path))


def test_column_mapping_and_missing_columns(tmp_path, records):
    path = _write(tmp_path, records, ".jsonl")
    rows = data.load_rows(str(path), prompt_column="question", columns={"solution": "answer"})
    assert rows[3]["solution"] == "#### 3"
    with pytest.raises(ValueError, match=r"no column 'final' \(data.columns.answer\)"):
        data.load_rows(str(path), prompt_column="question", columns={"answer": "final"})
    with pytest.raises(ValueError, match="reward math needs column 'gold'.*data.columns.gold="):
        data.check_columns(rows, {"math": ["answer", "gold"]}, str(path))


def test_train_eval_split_is_seeded_disjoint_and_checked(tmp_path, records):
    rows = data.arithmetic_rows(50, seed=1)
    rows = [{**r, "id": i} for i, r in enumerate(rows)]
    train, held_out = data.split_rows(rows, 10, seed=3)
    assert len(train) == 40 and len(held_out) == 10
    assert {r["id"] for r in train} | {r["id"] for r in held_out} == set(range(50))
    assert not {r["id"] for r in train} & {r["id"] for r in held_out}
    assert data.split_rows(rows, 10, seed=3) == (train, held_out)
    assert data.split_rows(rows, 10, seed=4)[1] != held_out
    assert data.split_rows(rows, 0) == (rows, [])
    with pytest.raises(ValueError, match="eval split of 50 rows is not smaller than the dataset"):
        data.split_rows(rows, 50)

    train_path = _write(tmp_path, records, ".jsonl")
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"question": "e", "answer": "#### 9"}) + "\n")
    train, held_out = data.load_splits(
        data.DataConfig(
            source=str(train_path),
            prompt_column="question",
            eval_size=2,
            eval_source=str(eval_path),
        )
    )
    assert len(train) == 4 and len(held_out) == 3 and held_out[-1]["prompt"] == "e"
