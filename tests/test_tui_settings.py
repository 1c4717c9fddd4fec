"""The settings editor under a real user's keyboard: bursts of keys (over SSH keys come
many at a time), ctrl+r as an edit, searching keys with ``/``, and numbers kept in the
form they were typed."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tui_helpers import CPU, PROJECT_TOML, SilentEngine, burst, drain, write_project

from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.widgets.field_editor import FieldEditor
from tunedeck.tui.widgets.settings_list import SettingsList, SettingsSearch
from tunedeck.tui.widgets.summary import SettingsSummary

SIZE = (100, 30)


@pytest.fixture
def project_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_project(tmp_path)


def make_app(path: Path) -> TunedeckApp:
    return TunedeckApp(Project.load(path), engine=SilentEngine(), hardware=CPU)


def last_note(app: TunedeckApp) -> str:
    return list(app._notifications)[-1].message


def row(app: TunedeckApp, key: str):
    return app.screen.query_one(SettingsList)._views[key]


def saved_line(path: Path, name: str) -> str:
    return next(line for line in path.read_text().splitlines() if line.startswith(f"{name} ="))


BURSTS = [
    ((*"abc", "backspace", "backspace", "backspace", *"128"), "128"),
    ((*"16", "backspace", "backspace", "backspace", "backspace", *"64"), "64"),
    ((*"12", "left", "9", "end", "backspace", "7"), "197"),
    ((*"8", "home", "delete", *"32"), "32"),
]


@pytest.mark.parametrize(("keys", "typed"), BURSTS)
async def test_a_burst_of_keys_is_applied_in_order_and_saved(project_path, keys, typed):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.screen.query_one(SettingsList).highlight("lora.r")
        # enter opens the editor: the keys after it are the editor's; after the second, the list's
        burst(app, "enter", *keys, "enter", "down", "ctrl+s")
        await drain(pilot)
        assert app.session.project["lora.r"] == int(typed)
        assert saved_line(project_path, "r") == f"r = {typed}"
        assert app.screen.query_one(SettingsList).highlighted_key == "lora.alpha"
        assert app.screen.query_one(FieldEditor).key is None
        assert app.title == "demo"


async def test_a_switch_flips_and_the_keys_after_it_stay_with_the_list(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        settings = app.screen.query_one(SettingsList)
        settings.highlight("lora.use_dora")
        burst(app, "enter", "down")
        await drain(pilot)
        assert app.session.project["lora.use_dora"] is True
        assert settings.highlighted_key != "lora.use_dora" and app.focused is settings


@pytest.mark.parametrize(("keys", "typed"), BURSTS[:2])
async def test_pilot_presses_without_pauses_keep_every_key(project_path, keys, typed):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.screen.query_one(SettingsList).highlight("model.source")
        await pilot.press("enter", *keys, "enter", "ctrl+s")
        await pilot.pause()
        assert app.session.project["model.source"] == typed
        assert saved_line(project_path, "source").startswith(f'source = "{typed}"')


async def test_escape_in_a_burst_puts_the_value_back(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.screen.query_one(SettingsList).highlight("lora.r")
        await pilot.press("enter")
        await pilot.pause()
        burst(app, *"99", "escape", "down", "ctrl+s")
        await drain(pilot)
        assert app.session.project["lora.r"] == 16
        assert project_path.read_text() == PROJECT_TOML
        assert app.screen.query_one(SettingsList).highlighted_key == "lora.alpha"


async def test_ctrl_r_sets_the_default_as_an_edit_then_removes_the_line(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        settings = app.screen.query_one(SettingsList)
        settings.highlight("training.epochs")  # 1 in the file; the default is 3
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert app.session.project["training.epochs"] == 3
        assert row(app, "training.epochs").edited
        assert row(app, "training.epochs").source == "edited"
        assert row(app, "training.epochs").value == "3"
        assert "--set training.epochs=3" in app.screen.query_one(SettingsSummary).command
        assert "ctrl+r again removes the line" in last_note(app)
        assert app.title == "demo *"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert saved_line(project_path, "epochs") == "epochs = 3"  # kept, with the default
        assert not row(app, "training.epochs").edited
        await pilot.press("ctrl+r")  # already the default: now the line goes
        await pilot.pause()
        assert row(app, "training.epochs").edited
        assert row(app, "training.epochs").source == "default"
        assert app.title == "demo *"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "epochs" not in project_path.read_text()
        assert "# a small project" in project_path.read_text()
        assert app.session.project["training.epochs"] == 3
        await pilot.press("ctrl+r")  # not in the file: nothing to do, said so
        await pilot.pause()
        assert "is not in the file" in last_note(app)
        assert app.title == "demo"


async def test_ctrl_r_in_the_open_editor_shows_the_default(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await app.screen.edit_field("lora.r")
        await pilot.press("0")  # invalid
        await pilot.pause()
        await pilot.press("ctrl+r")
        await pilot.pause()
        default = app.session.project["lora.r"]
        assert "lora.r" not in app.session.invalid
        assert app.screen.query_one("#editor-input").value == str(default)
        assert row(app, "lora.r").edited == (default != 16)


async def test_slash_filters_keys_with_a_count_and_escape_clears(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        settings = app.screen.query_one(SettingsList)
        total = settings.option_count
        burst(app, "/", *"lora.", "backspace", *".a")
        await drain(pilot)
        search = app.screen.query_one(SettingsSearch)
        assert search.is_open
        shown = [o.id for o in settings.options if not o.disabled]
        assert search.query_one("#search-input").value == "lora.a"
        assert shown and all("lora.a" in key for key in shown)
        assert "lora.alpha" in shown
        count = str(search.query_one("#search-count").render())
        assert count == f"{len(shown)} of {len(settings._fields)} match"
        await pilot.press("enter")  # to the list, the filter stays
        await pilot.pause()
        assert app.focused is settings
        assert settings.highlighted_key == shown[0]
        await pilot.press("enter")  # edits the match
        await pilot.pause()
        assert app.screen.query_one(FieldEditor).key == shown[0]
        await pilot.press("escape")  # closes the editor first
        await pilot.pause()
        await pilot.press("escape")  # then clears the search
        await pilot.pause()
        assert not search.is_open and settings.option_count == total
        assert settings.highlighted_key == shown[0]


async def test_a_search_that_matches_nothing_says_so(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("slash", *"zzz")
        await pilot.pause()
        search = app.screen.query_one(SettingsSearch)
        assert str(search.query_one("#search-count").render()) == "no key matches"
        assert app.screen.query_one(SettingsList).option_count == 0
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen.query_one(SettingsList).option_count > 0
        assert isinstance(app.focused, SettingsList)


async def test_a_number_keeps_the_form_it_was_typed_in(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await app.screen.edit_field("training.learning_rate")
        await pilot.pause()
        await pilot.press(*"5e-4", "enter")
        await pilot.pause()
        assert app.session.project["training.learning_rate"] == 0.0005
        assert row(app, "training.learning_rate").value == "5e-4"
        assert "--set training.learning_rate=5e-4" in app.screen.query_one(SettingsSummary).command
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert saved_line(project_path, "learning_rate") == "learning_rate = 5e-4"
        await app.screen.edit_field("training.learning_rate")  # opens with the text as written
        await pilot.pause()
        assert app.screen.query_one("#editor-input").value == "5e-4"
        await pilot.press(*"1e-3", "escape")  # put back: still in its form
        await pilot.pause()
        assert row(app, "training.learning_rate").value == "5e-4"
        assert app.title == "demo"


def test_project_keeps_a_typed_number_only_when_it_reads_back_the_same():
    project = Project.from_text("[training]\nlearning_rate = 0.0002  # note\n")
    project.set("training.learning_rate", 0.0005, literal="5e-4")
    assert "learning_rate = 5e-4  # note" in project.text()
    assert project.value_text("training.learning_rate") == "5e-4"
    project.set("training.learning_rate", 0.0003, literal="5e-4")  # not that value: canonical form
    assert "learning_rate = 0.0003  # note" in project.text()
    project.set("training.learning_rate", 0.0004, literal="4e-4 # a comment")  # not a number alone
    assert "learning_rate = 0.0004  # note" in project.text()
    project.set("training.learning_rate", 0.0004, literal="4E-4")  # same value, new form
    assert "learning_rate = 4E-4  # note" in project.text()
    assert "training.learning_rate=4E-4" in project.overrides_from(Project.from_text(""))


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_a_burst_from_tmux_send_keys_is_stored_as_typed(tmp_path, monkeypatch):
    """The keys of one ``send-keys`` call reach the app in one read, as over SSH."""
    from test_tui_tmux import TUNEDECK, Tmux

    project = write_project(tmp_path)
    tmux = Tmux(f"tunedeck-burst-{os.getpid()}")
    env = {"TUNEDECK_CONFIG_DIR": str(tmp_path / "config"), "TUNEDECK_CACHE_DIR": str(tmp_path / "cache"),
           "TERM": "xterm-256color"}
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    try:
        tmux.run("new-session", "-d", "-s", "app", "-x", "100", "-y", "30", "-c", str(tmp_path), *env_args,
                 f"env -u COLUMNS -u LINES {TUNEDECK} demo.toml")
        tmux.wait_for("demo — demo.toml")
        tmux.wait_for("⏎ Edit")  # the list is shown and has the focus: the keys below are its
        # each burst ends with enter; the save (a key of the app, not of the field) comes after
        tmux.keys(*["Down"] * 9, "Enter", "a", "b", "c", *["BSpace"] * 3, "1", "2", "8", "Enter")
        tmux.wait_for("⏎ Edit")  # the editor closed
        tmux.keys("C-s")
        tmux.wait_for("saved demo.toml")
        assert "\nr = 128\n" in project.read_text()
        tmux.keys("Enter", "1", "6", *["BSpace"] * 4, "6", "4", "Enter")
        tmux.wait_for("⏎ Edit")
        tmux.keys("C-s")
        deadline = time.monotonic() + 15
        while "\nr = 64\n" not in project.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "\nr = 64\n" in project.read_text()
        tmux.keys("/", "e", "p", "o", "c", "h")  # search: the keys after / are the search's
        tmux.wait_for("/epoch")  # every key typed
        screen = tmux.wait_for("1 of ")  # the count: one key matches
        assert "/epoch" in screen and "epochs" in screen and "alpha" not in screen, screen
    finally:
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True)
