"""Snapshots of every screen (pytest-textual-snapshot); update with --snapshot-update after
reviewing the SVGs. Deterministic: a project written with fixed content, the working folder
set to it (paths show relative), a fixed CPU machine, and engine answers computed in-process
and waited for before the screenshot."""

from __future__ import annotations

import pytest
from textual.widgets import Input
from tui_helpers import CPU, InProcessEngine, settle, write_project

from tunedeck.core import models
from tunedeck.core.paths import save_user_config
from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp


@pytest.fixture
def make_app(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the Models screen lists the bundled default as shipped (a GGUF file) and no HF cache
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_scan_hf_cache", lambda: [])
    path = write_project(tmp_path)

    def make(*, project: bool = True, theme: str | None = None) -> TunedeckApp:
        if theme:
            save_user_config({"theme": theme})
        return TunedeckApp(Project.load(path) if project else None, engine=InProcessEngine(), hardware=CPU)

    return make


def keys_then_settle(*keys: str):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press(*keys)
        await settle(pilot)

    return run_before


@pytest.mark.parametrize("key", ["1", "2", "3", "4", "5", "6"])
def test_screen(key, make_app, snap_compare):
    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=keys_then_settle(key))


def test_settings_80x24(make_app, snap_compare):
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=keys_then_settle())


def test_settings_editing_an_invalid_value(make_app, snap_compare):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.app.screen.edit_field("lora.r")
        pilot.app.screen.query_one("#editor-input", Input).cursor_blink = False
        await pilot.press("0")
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run_before)


@pytest.mark.parametrize("theme", ["tunedeck-light", "tunedeck-high-contrast"])
def test_settings_themes(theme, make_app, snap_compare):
    assert snap_compare(make_app(theme=theme), terminal_size=(100, 30), run_before=keys_then_settle())


def test_start_screen(make_app, snap_compare):
    save_user_config({"recent_projects": ["/projects/python-qa/demo.toml", "/projects/old/run.toml"]})
    assert snap_compare(make_app(project=False), terminal_size=(100, 30))


def test_modules_tree_with_a_partial_pick(make_app, snap_compare):
    # the tree opens on the model's blocks; layer 0 unpicked: the targets become a regex
    keys = keys_then_settle("2", "v", "down", "down", "down", "right", "space")
    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=keys)


def test_models_with_unreadable_files(make_app, snap_compare, tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00cut short")
    (zoo / "notes.gguf").write_text("not a model")
    save_user_config({"model_dirs": ["zoo"]})
    async def run_before(pilot) -> None:
        await keys_then_settle("1")(pilot)
        await pilot.press("up")  # the detail shows the highlighted file's problem
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=run_before)


def test_keys(make_app, snap_compare):
    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=keys_then_settle("f1"))
