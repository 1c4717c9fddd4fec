"""The dataset preview: rows rendered with the trainer's own render-and-mask, whole-set stats,
search, every format and column mapping, fuzzed format detection and rendering, and
`tunedeck preview` (text, --json, --row, bad input)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunedeck.core import cli
from tunedeck.core.datafile import FORMATS, detect_format, load_messages, to_messages
from tunedeck.core.errors import UserError
from tunedeck.core.preview import histogram, preview_row, preview_search, preview_stats, project_tokenizer
from tunedeck.core.project import Project
from tunedeck.core.render import IGNORE, TEMPLATES, render

QA = [{"role": "user", "content": "How do I reverse a list?"},
      {"role": "assistant", "content": "Use items[::-1]."}]
MULTI = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]

# each format with its default field names, and with other names mapped by dataset.columns
FORMAT_ROWS = {
    "messages": ({"messages": QA}, {"chat": QA}, {"messages": "chat"}),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
                 {"turns": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
                 {"conversations": "turns"}),
    "alpaca": ({"instruction": "Add", "input": "1 and 2", "output": "3"},
               {"task": "Add", "context": "1 and 2", "answer": "3"},
               {"instruction": "task", "input": "context", "output": "answer"}),
    "prompt_completion": ({"prompt": "Q?", "completion": "A."}, {"question": "Q?", "answer": "A."},
                          {"prompt": "question", "completion": "answer"}),
    "text": ({"text": "A plain document."}, {"body": "A plain document."}, {"text": "body"}),
}


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def make_project(tmp_path: Path, model_dir: Path, data: str = "data.jsonl", **settings_: object) -> Project:
    text = (f'schema = 1\nname = "p"\n[model]\nsource = "{model_dir}"\n[quantization]\nmode = "none"\n'
            f'[dataset]\npath = "{data}"\neval_split = 0.0\n')
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    project = Project.load(path)
    for key, value in settings_.items():
        project.set(key.replace("__", "."), value)
    return project


def trainer_examples(project: Project, tokenizer) -> list[dict]:
    """The training examples the trainer's own data code builds for the project."""
    from tunedeck.core.finetune import Run
    from tunedeck.core.trainer import Emitter

    run = Run.__new__(Run)  # only the data path: no run folder, no model
    run.project, run.emit, run.ref = project, Emitter(None), type("Ref", (), {"display": "m"})()
    train, _, _ = run._datasets(tokenizer)
    return [dict(ex) for ex in train]


# -- one row ---------------------------------------------------------------------------------


def test_a_row_shows_its_fields_text_and_tokens_with_the_trainers_mask(tmp_path, default_model_dir, tok,
                                                                        write_jsonl):
    write_jsonl([{"messages": QA}, {"messages": MULTI}, {"messages": [{"role": "user", "content": "no answer"}]}])
    project = make_project(tmp_path, default_model_dir)
    shown = [preview_row(project, index=i, tokenizer=tok) for i in range(2)]
    examples = trainer_examples(project, tok)
    assert len(examples) == 2
    for row, example in zip(shown, examples):
        assert [t["id"] for t in row["tokens"]] == example["input_ids"]
        assert [t["trained"] for t in row["tokens"]] == [label != IGNORE for label in example["labels"]]
        assert "".join(t["text"] for t in row["tokens"]) == row["text"]
    first = shown[0]
    assert first["fields"] == {"messages": QA} and first["row"] == 1 and first["error"] is None
    trained = "".join(t["text"] for t in first["tokens"] if t["trained"])
    assert trained == "Use items[::-1].<|im_end|>"
    assert not shown[0]["last"]
    bad = preview_row(project, row=3, tokenizer=tok)
    assert bad["last"] and bad["error"] == "no assistant answer to train on" and bad["tokens"] == []


def test_every_assistant_turn_trains_and_eos_trains_with_pad_eos(tmp_path, default_model_dir, tok, write_jsonl):
    write_jsonl([{"messages": MULTI}, {"text": "A plain document."}])
    project = make_project(tmp_path, default_model_dir, **{"dataset__format": "messages"})
    row = preview_row(project, index=0, tokenizer=tok)
    runs, current = [], ""
    for t in row["tokens"]:
        if t["trained"]:
            current += t["text"]
        elif current:
            runs, current = runs + [current], ""
    assert runs == ["Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>"]
    # a text row ends with eos, trained, also when eos is the pad token
    text_project = make_project(tmp_path, default_model_dir, **{"dataset__format": "text"})
    text_row = preview_row(text_project, index=1, tokenizer=tok)
    assert text_row["tokens"][-1] == {"id": tok.eos_token_id, "text": tok.eos_token, "trained": True, "part": "text"}
    from tunedeck.core.batching import BatchCollator

    example = {"input_ids": [t["id"] for t in text_row["tokens"]],
               "labels": [t["id"] if t["trained"] else IGNORE for t in text_row["tokens"]]}
    pad_eos = BatchCollator(tok.eos_token_id, padding_free=False)  # pad = eos
    batch = pad_eos([example, {"input_ids": [5] * 40, "labels": [5] * 40}])
    last = len(text_row["tokens"]) - 1
    assert batch["labels"][0, last].item() == tok.eos_token_id
    assert (batch["labels"][0, last + 1:] == IGNORE).all()


def test_truncation_point_is_marked(tmp_path, default_model_dir, tok, write_jsonl):
    write_jsonl([{"messages": QA}])
    project = make_project(tmp_path, default_model_dir, **{"dataset__max_length": 12})
    row = preview_row(project, tokenizer=tok)
    assert len(row["tokens"]) == 12 and row["truncated_at"] == 12 and row["length"] > 12
    assert row["trained"] == 0  # the answer is past the cut
    stats = preview_stats(project, tokenizer=tok)
    assert stats["truncated"] == 1 and stats["percent_truncated"] == 100.0
    assert stats["nothing_trained"] == [1]
    assert "raise dataset.max_length" in stats["refusal"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_and_its_column_mapping(tmp_path, default_model_dir, tok, write_jsonl, fmt):
    plain, mapped, columns = FORMAT_ROWS[fmt]
    for row, cols in ((plain, {}), (mapped, columns)):
        write_jsonl([row, row])
        project = make_project(tmp_path, default_model_dir, **{"dataset__columns": cols})
        shown = preview_row(project, tokenizer=tok)
        assert shown["format"] == fmt and shown["error"] is None, shown["error"]
        assert shown["fields"] == row and shown["trained"] > 0
        stats = preview_stats(project, tokenizer=tok)
        assert (stats["rows"], stats["usable"], stats["skipped"], stats["refusal"]) == (2, 2, [], None)


def test_json_csv_and_parquet_files(tmp_path, default_model_dir, tok):
    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        project = make_project(tmp_path, default_model_dir, data=name)
        assert preview_row(project, index=2, tokenizer=tok)["fields"] == rows[2]
        assert preview_stats(project, tokenizer=tok)["rows"] == 3


def test_mixed_good_and_bad_rows_are_counted_with_reasons(tmp_path, default_model_dir, tok, write_jsonl):
    write_jsonl([{"messages": QA}, "{not json", {"messages": [{"role": "robot", "content": "x"}]},
                 {"messages": QA}, {"messages": [{"role": "user", "content": "Q"},
                                                 {"role": "assistant", "content": "  "}]}, {"messages": QA}])
    project = make_project(tmp_path, default_model_dir)
    stats = preview_stats(project, tokenizer=tok)
    assert stats["rows"] == 6 and stats["usable"] == 3
    assert [s["row"] for s in stats["skipped"]] == [2, 3, 5]
    assert stats["skipped"][0]["reason"].startswith("bad JSON")
    assert "unknown role 'robot'" in stats["skipped"][1]["reason"]
    assert stats["skipped"][2]["reason"] == "an empty assistant answer"
    assert stats["refusal"] is None
    assert 0 < stats["percent_trained"] < 100 and stats["trained_tokens"] < stats["tokens"]
    assert sum(stats["histogram"]["counts"]) == 3
    bad = preview_row(project, row=2, tokenizer=tok)
    assert bad["fields"] is None and bad["error"].startswith("bad JSON")
    # most rows bad: the preview says training refuses it, as the trainer does
    write_jsonl([{"messages": QA}, "{bad", "{bad"])
    stats = preview_stats(project, tokenizer=tok)
    assert stats["refusal"].startswith("dataset.path: 2 of 3 rows")
    with pytest.raises(UserError, match="2 of 3 rows"):
        trainer_examples(project, tok)


def test_eval_split_by_ratio_or_file(tmp_path, default_model_dir, tok, write_jsonl):
    write_jsonl([{"messages": QA}] * 20)
    project = make_project(tmp_path, default_model_dir, **{"dataset__eval_split": 0.1})
    assert preview_stats(project, tokenizer=tok)["eval"] == {"ratio": 0.1, "rows": 2}
    project.set("dataset.eval_split", "eval.jsonl")
    assert preview_stats(project, tokenizer=tok)["eval"] == {"path": str(tmp_path / "eval.jsonl")}


def test_search_finds_rows_and_wraps(tmp_path, default_model_dir, write_jsonl):
    write_jsonl([{"prompt": f"question {i}", "completion": "Zebra" if i in (2, 5) else "no"} for i in range(8)])
    project = make_project(tmp_path, default_model_dir)
    assert preview_search(project, "zebra") == {"index": 2, "row": 3}
    assert preview_search(project, "zebra", start=3) == {"index": 5, "row": 6}
    assert preview_search(project, "zebra", start=6) == {"index": 2, "row": 3}  # wraps
    assert preview_search(project, "zebra", start=4, backward=True) == {"index": 2, "row": 3}
    assert preview_search(project, "giraffe") == {"index": None, "row": None}
    with pytest.raises(UserError):
        preview_search(project, "  ")


def test_first_row_reads_only_the_start_of_a_file(tmp_path, default_model_dir, tok, write_jsonl):
    path = write_jsonl([{"messages": QA}] * 3)
    with open(path, "a", encoding="utf-8") as fh:  # a broken tail is not read for the first row
        fh.write("\xff{{{ not json\n" * 5)
    project = make_project(tmp_path, default_model_dir, **{"dataset__format": "messages"})
    assert preview_row(project, tokenizer=tok)["error"] is None
    assert preview_stats(project, tokenizer=tok)["refusal"].startswith("dataset.path: 5 of 8 rows")


def test_bad_input_is_one_line(tmp_path, default_model_dir, tok, write_jsonl):
    write_jsonl([{"messages": QA}])
    project = make_project(tmp_path, default_model_dir)
    with pytest.raises(UserError, match="has no row 7"):
        preview_row(project, row=7, tokenizer=tok)
    with pytest.raises(UserError, match="has no row at position 3"):
        preview_row(project, index=2, tokenizer=tok)
    project.set("dataset.path", "missing.jsonl")
    with pytest.raises(UserError, match="no such file"):
        preview_row(project, tokenizer=tok)
    project.set("dataset.path", "")
    with pytest.raises(UserError, match="dataset.path is empty"):
        preview_stats(project, tokenizer=tok)


def test_the_tokenizer_is_loaded_once_per_model(tmp_path, default_model_dir):
    project = make_project(tmp_path, default_model_dir)
    assert project_tokenizer(project) is project_tokenizer(make_project(tmp_path, default_model_dir))


def test_histogram_bins():
    assert histogram([]) == {"edges": [], "counts": []}
    h = histogram([10, 10, 50, 200], bins=4)
    assert sum(h["counts"]) == 4 and h["edges"][0] == 10 and h["edges"][-1] > 200
    assert len(h["edges"]) == len(h["counts"]) + 1


# -- fuzzing: never a crash, every skip has a reason -----------------------------------------

TEXT = st.text(max_size=12)
VALUE = st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                     max_leaves=6)
TURN = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "gpt", "", None]),
                              "content": st.one_of(TEXT, st.none())})
ROW = st.one_of(
    st.dictionaries(st.sampled_from(["messages", "conversations", "instruction", "input", "output", "prompt",
                                     "completion", "text", "other"]), VALUE, max_size=4),
    st.fixed_dictionaries({"messages": st.lists(TURN, max_size=4)}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system", "robot"]), "value": TEXT}), max_size=4)}),
)
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # examples: the profile's (conftest)


@FUZZ
@given(st.lists(ROW, max_size=6))
def test_fuzzed_format_detection_never_crashes_and_every_skip_has_a_reason(rows):
    fmt = detect_format(rows)
    assert fmt is None or fmt in FORMATS
    for row in rows:
        for f in FORMATS:
            try:
                messages = to_messages(row, f)
            except ValueError as exc:
                assert str(exc).strip()
            else:  # a question after the last answer is dropped: a row always ends with an answer
                assert messages and messages[-1]["role"] == "assistant"


@FUZZ
@given(st.lists(st.one_of(ROW, st.text(max_size=8)), min_size=1, max_size=5))
def test_fuzzed_files_load_with_a_reason_for_every_skip(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)).replace("\n", " ") + "\n" for r in rows),
                    encoding="utf-8")
    try:
        good, summary = load_messages(path)
    except UserError as exc:
        assert "cannot tell the format" in exc.message
        return
    assert len(good) + len(summary.skipped) == summary.rows
    assert all(e.reason.strip() and e.row >= 1 for e in summary.skipped)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.text(min_size=1, max_size=20)),
                min_size=1, max_size=5),
       st.sampled_from(["auto", *TEMPLATES]), st.integers(min_value=1, max_value=64),
       st.sampled_from(["assistant", "all"]))
def test_fuzzed_rendering_never_crashes_and_masks_consistently(tok, turns, template, max_length, loss_on):
    messages = [{"role": r, "content": c} for r, c in turns]
    try:
        messages = to_messages({"messages": messages}, "messages")
    except ValueError as exc:
        assert str(exc).strip()
        return
    chat_template = None if template == "auto" else TEMPLATES[template]
    try:
        r = render(tok, messages, max_length=max_length, loss_on=loss_on, chat_template=chat_template)
    except ValueError as exc:
        assert str(exc).strip()
        return
    assert len(r.input_ids) == len(r.labels) <= max_length
    assert all(label in (IGNORE, tid) for tid, label in zip(r.input_ids, r.labels))
    assert not r.labels or r.labels[0] == IGNORE


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_json_row_and_stats(tmp_path, default_model_dir, write_jsonl, capsys):
    write_jsonl([{"messages": QA}, "{bad", {"messages": MULTI}])
    project = make_project(tmp_path, default_model_dir)
    assert cli.main(["preview", str(project.path), "--row", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tokens = report["row"]["tokens"]
    assert tokens and all(set(t) == {"id", "text", "trained", "part"} for t in tokens)
    assert report["row"]["row"] == 3 and any(t["trained"] for t in tokens)
    stats = report["stats"]
    assert stats["rows"] == 3 and stats["skipped"] == [{"row": 2, "reason": stats["skipped"][0]["reason"]}]
    assert stats["skipped"][0]["reason"].startswith("bad JSON")
    assert cli.main(["preview", str(project.path), "--set", "dataset.max_length=8"]) == 0
    out = capsys.readouterr().out
    assert "rows: 3 · skipped: 1" in out and "row 2: bad JSON" in out and "truncated at 8" in out


@pytest.mark.parametrize("args, message", [
    (["--row", "9"], "has no row 9"),
    (["--row", "0"], "row numbers start at 1"),
    (["--set", "dataset.path=nope.jsonl"], "no such file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, default_model_dir, write_jsonl, capsys, args, message):
    write_jsonl([{"messages": QA}])
    project = make_project(tmp_path, default_model_dir)
    assert cli.main(["preview", str(project.path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunedeck: error: ") and message in err and err.count("\n") == 1


def test_cli_missing_project_in_a_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tunedeck.core", "preview", str(tmp_path / "none.toml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tunedeck: error: ") and proc.stderr.count("\n") == 1


# -- through the engine process ---------------------------------------------------------------


@pytest.mark.slow
def test_the_ops_answer_through_the_engine_process(tmp_path, default_model_dir, write_jsonl):
    from tunedeck.core.engine import EngineClient, EngineError

    write_jsonl([{"messages": QA}, {"messages": MULTI}])
    project = make_project(tmp_path, default_model_dir)
    args = {"project_text": project.text(), "project_path": str(project.path)}
    with EngineClient(log_path=tmp_path / "engine.log") as client:
        second = client.preview_row(**args, index=1, timeout=120)
        assert second == preview_row(project, index=1)
        assert client.preview_stats(**args, timeout=120)["rows"] == 2
        assert client.preview_search(**args, text="2+2", timeout=120) == {"index": 1, "row": 2}
        with pytest.raises(EngineError, match="has no row 5"):
            client.preview_row(**args, row=5, timeout=120)


@pytest.mark.slow
def test_cli_piped_keeps_the_mask_in_plain_text(tmp_path, default_model_dir, write_jsonl):
    """Written to a pipe (no colour), the trained tokens are still told apart: a header explains
    the notation, trained spans are in «…», trained tokens in [..] and masked ones in (..)."""
    write_jsonl([{"messages": QA}])
    project = make_project(tmp_path, default_model_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    proc = subprocess.run([sys.executable, "-m", "tunedeck.core", "preview", str(project.path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b[" not in out  # no colour codes
    lines = out.splitlines()
    assert lines[0].startswith("notation (plain text, no colour):") and "«…»" in lines[0]
    report = preview_row(project)
    trained = "".join(t["text"] for t in report["tokens"] if t["trained"])
    assert trained.strip() and f"«{trained}»" in out  # the answer (and its end token) as one trained span
    first = report["tokens"][0]
    assert not first["trained"] and out.split("tokens: ", 1)[1].splitlines()[1].startswith(f"({first['text']})")
    assert any(f"[{t['text'].strip()}]" in out for t in report["tokens"] if t["trained"] and t["text"].strip())
