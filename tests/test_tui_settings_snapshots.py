"""Snapshots of the Settings screen at 80x24 with a search active (pytest-textual-snapshot).
Deterministic as tests/test_tui_snapshots.py: fixed project, fixed CPU machine, engine
answers computed in-process and waited for."""

from __future__ import annotations

from textual.widgets import Input
from tui_helpers import CPU, InProcessEngine, settle, write_project

from tunedeck.core import models
from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp


def test_settings_search_80x24(tmp_path, monkeypatch, snap_compare):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_scan_hf_cache", lambda: [])
    app = TunedeckApp(Project.load(write_project(tmp_path)), engine=InProcessEngine(), hardware=CPU)

    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("slash")
        pilot.app.screen.query_one("#search-input", Input).cursor_blink = False
        await pilot.press(*"lora.")
        await settle(pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
