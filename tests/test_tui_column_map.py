"""The column map dialog (m on the Dataset screen): a file with field names no format has
is offered to be mapped, the dialog guesses, renders the first rows live as the choice
changes (errors in one line), writes dataset.format and dataset.columns as an unsaved edit
(a listed source's own table for a list of sources), escape changes nothing, and it fits
80x24."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Button, Label, Select, Static
from test_tui_dataset import open_dataset
from tui_helpers import CPU, InProcessEngine, settle
from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.column_map import (
    ColumnMapScreen,
    format_fields,
    mapping_values,
    suggest_columns,
    suggest_format,
)
from tunedeck.tui.screens.dataset import DatasetScreen
from tunedeck.tui.widgets.dataset_stats import DatasetStats
from tunedeck.tui.widgets.tokens_view import RowView

QA_ROWS = [{"question": "What is 2 + 2?", "answer": "4", "id": 1},
           {"question": "Capital of France?", "answer": "Paris", "id": 2},
           {"question": "Colour of the sky?", "answer": "Blue", "id": 3}]


def write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_project(folder: Path, model_dir: Path, path: str) -> Path:
    project = folder / "p.toml"
    project.write_text(f'schema = 1\nname = "qa"\n[model]\nsource = {json.dumps(str(model_dir))}\n'
                       f'[quantization]\nmode = "none"\n[dataset]\npath = {path}\neval_split = 0.0\n',
                       encoding="utf-8")
    return project


@pytest.fixture
def qa_project(tmp_path, monkeypatch, default_model_dir) -> Path:
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "qa.jsonl", QA_ROWS)
    return write_project(tmp_path, default_model_dir, '"qa.jsonl"')


def make_app(path: Path) -> TunedeckApp:
    return TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)


async def open_map(pilot) -> ColumnMapScreen:
    await open_dataset(pilot)
    await pilot.press("m")
    await settle(pilot)
    dialog = pilot.app.screen
    assert isinstance(dialog, ColumnMapScreen)
    return dialog


def select(dialog: ColumnMapScreen, name: str) -> Select:
    return dialog.query_one(f"#colmap-{name}", Select)


def preview(dialog: ColumnMapScreen) -> str:
    return str(dialog.query_one("#colmap-preview", Static).render())


def problem(dialog: ColumnMapScreen) -> str:
    return str(dialog.query_one("#colmap-problem", Label).render())


# -- the guesses and the edits, without the app ------------------------------------------------------


def test_guesses_from_field_names_and_kinds():
    assert suggest_format(QA_ROWS) == "prompt_completion"
    assert suggest_columns("prompt_completion", QA_ROWS) == {"prompt": "question", "completion": "answer",
                                                             "tools": None}
    assert suggest_columns("alpaca", QA_ROWS) == {"instruction": "question", "input": None, "output": "answer",
                                                  "system": None, "tools": None}
    turns = [{"dialog": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "system": "Be brief."}]
    assert suggest_format(turns) == "sharegpt"
    assert suggest_columns("sharegpt", turns) == {"conversations": "dialog", "system": "system", "tools": None}
    assert suggest_format([{"chat": [{"role": "user", "content": "Q"}]}]) == "messages"
    assert suggest_format([{"body": "A document."}]) == "text"
    assert suggest_format([{"messages": [], "text": "x"}]) == "messages"  # fits as it is: the first that fits
    # what the project maps already is kept
    assert suggest_columns("prompt_completion", QA_ROWS, {"completion": "id"})["completion"] == "id"
    assert [name for name, required in format_fields("alpaca") if required] == ["instruction", "output"]


def test_the_edits_for_one_source_and_for_a_list():
    one = Project.from_text('schema = 1\nname = "p"\n[dataset]\npath = "qa.jsonl"\n')
    mapping = {"prompt": "question", "completion": "answer", "tools": None}
    assert mapping_values(one, 0, "prompt_completion", mapping) == {
        "dataset.format": "prompt_completion", "dataset.columns": {"prompt": "question", "completion": "answer"}}
    listed = Project.from_text('schema = 1\nname = "p"\n[dataset]\npath = ["chat.jsonl", {path = "qa.jsonl", '
                               'weight = 2}]\n')
    assert mapping_values(listed, 1, "prompt_completion", mapping) == {"dataset.path": [
        "chat.jsonl", {"path": "qa.jsonl", "weight": 2, "format": "prompt_completion",
                       "columns": {"prompt": "question", "completion": "answer"}}]}
    # a field read from its own name needs no entry; the [dataset] columns are kept off that source
    listed.set("dataset.columns", {"messages": "dialog"})
    assert mapping_values(listed, 0, "messages", {"messages": "messages"}) == {"dataset.path": [
        {"path": "chat.jsonl", "format": "messages", "columns": {}}, {"path": "qa.jsonl", "weight": 2}]}


# -- the dialog ----------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_mapping_unusual_fields_writes_format_and_columns_and_the_row_renders(qa_project):
    app = make_app(qa_project)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("3")
        await settle(pilot)
        screen = app.screen
        status = str(screen.query_one("#dataset-status", Static).render())
        assert "cannot tell the format from the fields ['answer', 'id', 'question']" in status
        assert status.endswith("(press m to map them)")
        await pilot.press("m")
        await settle(pilot)
        dialog = app.screen
        assert isinstance(dialog, ColumnMapScreen)
        where = str(dialog.query_one("#colmap-where", Label).render())
        assert "qa.jsonl; writes dataset.format and dataset.columns · fields: question, answer, id" in where
        # the guess, rendered: each row's question as the prompt and its answer as the trained reply
        assert select(dialog, "format").value == "prompt_completion"
        assert (select(dialog, "prompt").value, select(dialog, "completion").value) == ("question", "answer")
        assert select(dialog, "tools").is_blank()
        shown = preview(dialog)
        assert "row 1" in shown and "What is 2 + 2?" in shown and "row 2" in shown and "Capital of France?" in shown
        # a choice that cannot render: one line, live
        select(dialog, "completion").value = "id"
        await settle(pilot)
        assert "skipped: prompt and completion must be text" in preview(dialog)
        # another format, picked with the keyboard: its fields replace the others
        dialog.query_one("#colmap-format", Select).focus()
        await pilot.press("enter", "down", "enter")
        await settle(pilot)
        assert select(dialog, "format").value == "text"
        assert not dialog.query("#colmap-prompt") and select(dialog, "text").value == "question"
        assert "What is 2 + 2?" in preview(dialog) and "<|im_start|>user" not in preview(dialog)
        select(dialog, "format").value = "prompt_completion"
        await settle(pilot)
        assert select(dialog, "completion").value == "answer"
        await pilot.click("#apply")
        await settle(pilot)
        assert isinstance(app.screen, DatasetScreen)
        project = app.session.project
        assert project["dataset.format"] == "prompt_completion"
        assert project["dataset.columns"] == {"prompt": "question", "completion": "answer"}
        assert app.session.dirty and app.session.edited("dataset.columns") and app.title.endswith("*")
        row = screen.query_one(RowView).row
        assert row["error"] is None and row["format"] == "prompt_completion"
        assert "".join(t["text"] for t in row["tokens"] if t["trained"]) == "4<|im_end|>"
        assert screen.query_one(DatasetStats).stats["usable"] == 3
        assert any("dataset.format = \"prompt_completion\"" in str(n.message) and "unsaved" in str(n.message)
                   for n in app._notifications)


@pytest.mark.slow
async def test_escape_leaves_the_project_as_it_was(qa_project):
    app = make_app(qa_project)
    async with app.run_test(size=(100, 30)) as pilot:
        before = app.session.project.text()
        dialog = await open_map(pilot)
        select(dialog, "completion").value = "id"
        await settle(pilot)
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, DatasetScreen)
        assert app.session.project.text() == before and not app.session.dirty


@pytest.mark.slow
async def test_apply_asks_for_a_column_a_format_cannot_do_without(qa_project):
    app = make_app(qa_project)
    async with app.run_test(size=(100, 30)) as pilot:
        dialog = await open_map(pilot)
        select(dialog, "format").value = "sharegpt"  # no column holds a list of turns: no guess
        await settle(pilot)
        assert select(dialog, "conversations").is_blank()
        assert preview(dialog) == "pick the column conversations is read from"
        await pilot.click("#apply")
        await settle(pilot)
        assert app.screen is dialog
        assert problem(dialog) == "pick the column conversations is read from (format sharegpt)"
        select(dialog, "conversations").value = "question"  # a column that is no list: said, one line
        await settle(pilot)
        assert preview(dialog).startswith("row 1\nskipped: \"question\" is a string that is not JSON\n")
        assert app.session.project["dataset.format"] == "auto"


@pytest.mark.slow
async def test_a_listed_source_is_mapped_in_its_own_table(tmp_path, monkeypatch, default_model_dir):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "qa.jsonl", QA_ROWS)
    write_lines(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello"}]}])
    app = make_app(write_project(tmp_path, default_model_dir, '["chat.jsonl", {path = "qa.jsonl", weight = 2}]'))
    async with app.run_test(size=(100, 30)) as pilot:
        dialog = await open_map(pilot)  # the row shown is chat.jsonl's; the one to map is qa.jsonl
        where = str(dialog.query_one("#colmap-where", Label).render())
        assert where.startswith("source 2 of 2 (dataset.path[2]): qa.jsonl; written into its table")
        assert "Capital of France?" in preview(dialog)
        await pilot.click("#apply")
        await settle(pilot)
        project = app.session.project
        assert project["dataset.path"] == ["chat.jsonl", {"path": "qa.jsonl", "weight": 2,
                                                          "format": "prompt_completion",
                                                          "columns": {"prompt": "question", "completion": "answer"}}]
        assert project["dataset.format"] == "auto" and project["dataset.columns"] == {}
        stats = app.screen.query_one(DatasetStats).stats
        assert [(s["usable"], s["share"]) for s in stats["sources"]] == [(1, round(1 / 7, 4)), (3, round(6 / 7, 4))]


def _inside(inner, outer) -> bool:
    return (inner.x >= outer.x and inner.y >= outer.y and inner.right <= outer.right
            and inner.bottom <= outer.bottom and inner.width > 0 and inner.height > 0)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["prompt_completion", "alpaca"])  # alpaca: the most fields
async def test_the_dialog_fits_80x24(qa_project, fmt):
    app = make_app(qa_project)
    async with app.run_test(size=(80, 24)) as pilot:
        dialog = await open_map(pilot)
        select(dialog, "format").value = fmt
        await settle(pilot)
        box = dialog.query_one(".dialog")
        assert _inside(box.region, dialog.region)
        controls = [w for w in dialog.query("*") if w.can_focus and w.display]
        assert {w.id for w in controls} >= {"colmap-format", "apply", "cancel"} | {
            f"colmap-{name}" for name, _ in format_fields(fmt)}
        for widget in controls:
            assert _inside(widget.region, box.content_region), (widget, widget.region, box.content_region)
        assert dialog.query_one("#colmap-preview-box").region.height >= 3
        assert "What is 2 + 2?" in preview(dialog)
        assert all(b.region.height >= 1 for b in dialog.query(Button))
