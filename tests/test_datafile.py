"""Reading dataset files and normalising rows to chat messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunedeck.core.datafile import (
    RowError,
    dataset_problem,
    detect_format,
    load_messages,
    read_rows,
    to_messages,
)
from tunedeck.core.errors import UserError

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"

QA = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_sample_datasets_load_in_each_format():
    for name, fmt, minimum in [
        ("python_qa.jsonl", "messages", 150),
        ("python_qa_alpaca.jsonl", "alpaca", 20),
        ("python_qa_sharegpt.jsonl", "sharegpt", 20),
    ]:
        rows, summary = load_messages(SAMPLE / name)
        assert summary.format == fmt
        assert summary.skipped == [] and len(rows) >= minimum
        assert all(m[-1]["role"] == "assistant" for _, m in rows)


def test_formats_normalise_to_messages():
    assert to_messages({"messages": QA}, "messages") == QA
    assert to_messages({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
                       "sharegpt") == QA
    assert to_messages({"instruction": "Q?", "input": "", "output": "A."}, "alpaca") == QA
    assert to_messages({"instruction": "Sort", "input": "[3, 1]", "output": "A."}, "alpaca")[0]["content"] == (
        "Sort\n\n[3, 1]")
    assert to_messages({"prompt": "Q?", "completion": "A."}, "prompt_completion") == QA
    assert to_messages({"text": "plain"}, "text") == [{"role": "assistant", "content": "plain"}]


def test_system_prompt_is_added_only_where_missing():
    with_system = [{"role": "system", "content": "S"}] + QA
    assert to_messages({"messages": QA}, "messages", system_prompt="Be brief.")[0] == {
        "role": "system", "content": "Be brief."}
    assert to_messages({"messages": with_system}, "messages", system_prompt="Be brief.") == with_system


def test_column_mapping():
    row = {"dialog": QA}
    assert detect_format([row]) is None
    assert detect_format([row], {"messages": "dialog"}) == "messages"
    assert to_messages(row, "messages", {"messages": "dialog"}) == QA
    row = {"question": "Q?", "answer": "A."}
    assert to_messages(row, "prompt_completion", {"prompt": "question", "completion": "answer"}) == QA


@pytest.mark.parametrize(
    ("row", "fmt", "reason"),
    [
        ({}, "messages", 'missing field "messages"'),
        ({"messages": "x"}, "messages", "not JSON"),
        ({"messages": []}, "messages", "no messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "content is not text"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "messages", "no assistant answer"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]}, "messages",
         "empty assistant answer"),
        ({"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"},
                       {"role": "assistant", "content": "A"}]}, "messages", "does not start with a user turn"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"},
                       {"role": "assistant", "content": "A"}]}, "messages", "two user turns in a row"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "unknown speaker 'alien'"),
        ({"instruction": "Q"}, "alpaca", 'missing field "output"'),
        ({"prompt": "Q", "completion": None}, "prompt_completion", 'missing field "completion"'),
        ({"text": ""}, "text", "empty text"),
    ],
)
def test_rows_that_do_not_fit_get_a_reason(row, fmt, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        to_messages(row, fmt)


def test_mixed_good_and_bad_rows_are_listed_with_row_numbers(write_jsonl):
    path = write_jsonl([
        {"messages": QA},
        "{not json",
        {"messages": [{"role": "user", "content": "Q"}]},
        "",
        "[1, 2]",
        {"messages": QA},
        {"messages": QA},
        {"messages": QA},
    ])
    rows, summary = load_messages(path)
    assert [n for n, _ in rows] == [1, 6, 7, 8]
    assert summary.rows == 7  # blank lines are not rows
    assert [(e.row, e.reason.split(" (")[0]) for e in summary.skipped] == [
        (2, "bad JSON"), (3, "no assistant answer to train on"), (5, "expected a JSON object, got list")]
    assert dataset_problem(summary) is None


def test_a_dataset_that_is_mostly_bad_or_empty_is_refused(write_jsonl):
    _, summary = load_messages(write_jsonl([{"messages": QA}, "{", "{"]), fmt="messages")
    assert "2 of 3 rows" in dataset_problem(summary)
    _, summary = load_messages(write_jsonl([], "empty.jsonl"), fmt="messages")
    assert "has no rows" in dataset_problem(summary)


def test_unknown_fields_and_files(tmp_path, write_jsonl):
    with pytest.raises(UserError, match="cannot tell the format from the fields"):
        load_messages(write_jsonl([{"q": 1}]))
    with pytest.raises(UserError, match="no such file"):
        list(read_rows(tmp_path / "missing.jsonl"))
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(UserError, match="unknown file type .txt"):
        list(read_rows(tmp_path / "rows.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="not one written by save_to_disk"):
        list(read_rows(tmp_path / "folder"))


def test_json_csv_and_parquet_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"prompt": "Q?", "completion": "A."}]}))
    rows, summary = load_messages(tmp_path / "a.json")
    assert summary.format == "prompt_completion" and rows[0][1] == QA
    (tmp_path / "b.csv").write_text("instruction,input,output\nQ?,,A.\n")
    rows, summary = load_messages(tmp_path / "b.csv")
    assert summary.format == "alpaca" and rows[0][1] == QA
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "c.parquet")
    rows, summary = load_messages(tmp_path / "c.parquet")
    assert summary.format == "text" and len(rows) == 2
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        load_messages(tmp_path / "bad.json")


def test_save_to_disk_folders(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"messages": QA}] * 3).save_to_disk(str(tmp_path / "saved"))
    rows, summary = load_messages(tmp_path / "saved")
    assert summary.format == "messages" and len(rows) == 3


def test_read_rows_limit_streams(write_jsonl):
    path = write_jsonl([{"text": str(i)} for i in range(100)])
    got = list(read_rows(path, limit=3))
    assert [n for n, _ in got] == [1, 2, 3]
    assert not any(isinstance(r, RowError) for _, r in got)
