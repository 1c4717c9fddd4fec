"""The Dataset screen driven with Pilot: the first row and the stats, next/previous, jump to a
row, search, the three views, the trained tokens equal to the trainer's labels, a settings
change read again, and bad data shown as one line. The engine's ops run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from textual.widgets import Input, Static
from tui_helpers import CPU, PROJECT_TOML, InProcessEngine, settle, write_project

from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.dataset import DatasetScreen
from tunedeck.tui.widgets.dataset_stats import DatasetStats
from tunedeck.tui.widgets.tokens_view import RowView

SIZE = (100, 30)


@pytest.fixture
def project_path(tmp_path, monkeypatch, default_model_dir) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_project(tmp_path, PROJECT_TOML.replace('"tiny-llama"', json.dumps(str(default_model_dir))))


def make_app(path: Path) -> TunedeckApp:
    return TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)


async def open_dataset(pilot) -> DatasetScreen:
    await pilot.press("3")
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, DatasetScreen)
    return screen


def status(screen: DatasetScreen) -> str:
    return str(screen.query_one("#dataset-status", Static).render())


def row(screen: DatasetScreen) -> dict:
    shown = screen.query_one(RowView).row
    assert shown is not None
    return shown


@pytest.mark.slow
async def test_first_row_stats_and_navigation(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        assert row(screen)["row"] == 1 and row(screen)["messages"][0]["content"] == "What is 0 + 0?"
        stats = screen.query_one(DatasetStats).stats
        assert stats["rows"] == 13 and stats["skipped"] == [{"row": 13, "reason": "no assistant answer to train on"}]
        assert status(screen).startswith("row 1 (#1 of 13, messages)")
        lines = str(screen.query_one("#stats-lines", Static).render())
        assert "rows: 13 · skipped: 1" in lines and "row 13: no assistant answer to train on" in lines
        await pilot.press("n", "n")
        await settle(pilot)
        assert row(screen)["row"] == 3
        await pilot.press("p")
        await settle(pilot)
        assert row(screen)["row"] == 2
        await pilot.press("p", "p")  # the first row: stays, says so
        await settle(pilot)
        assert row(screen)["row"] == 1
        await pilot.press("g")
        assert app.focused is screen.query_one("#dataset-input", Input)
        await pilot.press("1", "3", "enter")
        await settle(pilot)
        assert row(screen)["row"] == 13 and row(screen)["error"] == "no assistant answer to train on"
        assert "skipped: no assistant answer" in str(screen.query_one(RowView).render())
        await pilot.press("n")
        await settle(pilot)
        assert row(screen)["row"] == 13
        assert any("last row" in str(n.message) for n in app._notifications)


async def test_token_view_marks_what_the_trainer_trains(project_path):
    from tunedeck.core.preview import preview_row

    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        shown = row(screen)
        expected = preview_row(app.session.project, index=0)
        assert shown["tokens"] == expected["tokens"]
        trained = "".join(t["text"] for t in shown["tokens"] if t["trained"])
        assert trained == "0<|im_end|>"
        view = screen.query_one(RowView)
        text = view.content()
        assert "<|im_start|>" in text.plain and "<|im_end|>" in text.plain  # special tokens visible
        styles = {text.plain[s.start:s.end]: str(s.style) for s in text.spans}
        assert "green" in styles["0"] and styles["<|im_start|>"] == "dim underline"  # masked, special
        await pilot.press("v")
        assert view.view == "text" and view.content().plain == shown["text"]
        await pilot.press("v")
        assert view.view == "fields" and json.loads(view.content().plain) == shown["fields"]


@pytest.mark.slow
async def test_search_and_a_missing_match(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        await pilot.press("slash")
        await pilot.press(*"7 + 7", "enter")
        await settle(pilot)
        assert row(screen)["row"] == 8
        await pilot.press("slash", *"zebra", "enter")
        await settle(pilot)
        assert row(screen)["row"] == 8
        assert any("no row contains 'zebra'" in str(n.message) for n in app._notifications)


@pytest.mark.slow
async def test_settings_change_reads_again_and_truncation_shows(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        assert row(screen)["truncated_at"] is None
        app.edit_setting("dataset.max_length", value=8)
        await settle(pilot)
        assert row(screen)["truncated_at"] == 8
        assert "✂ truncated at max_length = 8" in screen.query_one(RowView).content().plain
        stats = screen.query_one(DatasetStats).stats
        assert stats["max_length"] == 8 and stats["percent_truncated"] == 100.0
        assert "training refuses this dataset" in str(screen.query_one("#stats-refusal", Static).render())


@pytest.mark.slow
async def test_missing_dataset_is_one_line_not_a_crash(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await open_dataset(pilot)
        app.edit_setting("dataset.path", value="gone.jsonl")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, DatasetScreen)
        assert any("gone.jsonl" in str(n.message) and "no such file" in str(n.message) for n in app._notifications)
        assert "no such file" in str(screen.query_one("#stats-lines", Static).render())
        assert "no such file" in status(screen) and screen.query_one(RowView).row is None
        app.edit_setting("dataset.path", value="")
        await settle(pilot)
        assert "set dataset.path" in status(screen)
