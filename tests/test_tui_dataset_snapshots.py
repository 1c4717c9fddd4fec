"""Snapshots of the Dataset screen (pytest-textual-snapshot): the token view with its stats
and histogram, and the templated text of a truncated row. Deterministic: fixed rows, the
bundled model's tokenizer, a fixed CPU machine, engine answers computed in-process and
waited for."""

from __future__ import annotations

import json

import pytest
from tui_helpers import CPU, PROJECT_TOML, InProcessEngine, settle, write_project

from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp


@pytest.fixture
def make_app(tmp_path, monkeypatch, default_model_dir):
    monkeypatch.chdir(tmp_path)
    path = write_project(tmp_path, PROJECT_TOML.replace('"tiny-llama"', json.dumps(str(default_model_dir))))

    def make() -> TunedeckApp:
        return TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)

    return make


def keys_then_settle(*keys: str):
    async def run_before(pilot) -> None:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)

    return run_before


def test_token_view(make_app, snap_compare):
    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=keys_then_settle("3", "n", "n"))


def test_templated_text_of_a_truncated_row(make_app, snap_compare):
    async def run_before(pilot) -> None:
        await settle(pilot)
        pilot.app.edit_setting("dataset.max_length", value=20)
        await pilot.press("3")
        await settle(pilot)
        await pilot.press("v")
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=run_before)


def test_legend_and_a_search_80x24(make_app, snap_compare):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("3")
        await settle(pilot)
        await pilot.press("slash", *"7 + 7", "enter")
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run_before)
