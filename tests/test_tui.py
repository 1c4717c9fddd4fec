"""The app driven with Pilot: switching screens, the start screen, saving, quitting, keys,
the palette, themes, the open and new dialogs, and the command line. (The Settings screen
has its own file, test_tui_settings.py.)"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import pytest
from textual.binding import Binding
from textual.command import CommandList
from tui_helpers import PROJECT_TOML, InProcessEngine, edit, make_app, settle, write_project

from tunedeck.core import cli
from tunedeck.core.paths import load_user_config, save_user_config
from tunedeck.tui import app as app_module
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.commands import TunedeckCommands
from tunedeck.tui.screens.dialogs import ChoiceScreen, KeysScreen, NewProjectScreen, OpenProjectScreen
from tunedeck.tui.widgets.facts import Facts

SIZE = (100, 30)


@pytest.fixture
def project_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_project(tmp_path)


async def test_number_keys_and_tabs_switch_screens(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        for key, mode in zip("123564", ("models", "modules", "dataset", "train", "chat", "settings")):
            await pilot.press(key)
            await pilot.pause()
            assert app.current_mode == mode
        await pilot.click("ModeTabs", offset=(4, 0))  # " 1 Models "
        await pilot.pause()
        assert app.current_mode == "models"
        await pilot.click("ModeTabs", offset=(26, 0))  # " 3 Dataset "
        assert app.current_mode == "dataset"


async def test_without_a_project_the_start_screen_offers_recent_and_new(project_path):
    save_user_config({"recent_projects": [str(project_path), "/nowhere/gone.toml"]})
    app = make_app(None)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.current_mode == "start"
        await pilot.press("4")  # screens need a project
        assert app.current_mode == "start"
        options = app.screen.query_one("#recent").options
        assert [str(o.prompt) for o in options] == ["demo.toml", "/nowhere/gone.toml  [dim](missing)[/dim]"]
        await pilot.press("down", "enter")  # the missing one: one line, still here
        await pilot.pause()
        assert app.current_mode == "start"
        assert any("no such project file" in n.message for n in app._notifications)
        await pilot.press("up", "enter")
        await pilot.pause()
        assert app.current_mode == "settings"
        assert app.session.path == project_path


async def test_save_keeps_the_file_order_and_comments(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, "training.learning_rate", "1", "e", "-", "4")
        await pilot.press("enter", "ctrl+s")
        await pilot.pause()
    assert project_path.read_text() == PROJECT_TOML.replace("learning_rate = 0.0002", "learning_rate = 1e-4")  # as typed
    assert not list(project_path.parent.glob(".demo.toml.*"))  # no temp file left behind


async def test_quit_asks_when_there_are_unsaved_changes(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, "lora.r", "8")
        await pilot.press("enter", "ctrl+q")
        await pilot.pause()
        assert isinstance(app.screen, ChoiceScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert app.is_running and app.current_mode == "settings"
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#answer-discard")
        await pilot.pause()
    assert app.return_code == 0
    assert project_path.read_text() == PROJECT_TOML


async def test_save_and_quit(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, "lora.r", "8")
        await pilot.press("enter", "ctrl+q")
        await pilot.pause()
        await pilot.press("enter")  # "Save and quit" has the focus
        await pilot.pause()
    assert "r = 8" in project_path.read_text()


async def test_quit_without_changes_does_not_ask(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert not app.is_running


async def test_keys_lists_every_binding_with_its_id(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, KeysScreen)
        ids = {row.binding_id for row in app.screen.rows}
        assert {"project.save", "project.open", "app.quit", "app.keys", "app.command_palette", "screen.models",
                "screen.chat", "settings.presets", "settings.reset_field", "settings.edit"} <= ids
        await pilot.press("question_mark")
        await pilot.pause()
        assert not isinstance(app.screen, KeysScreen)


def test_every_binding_of_the_app_has_an_id():
    from tunedeck.tui import screens, widgets

    classes: list[type] = [TunedeckApp]
    for package in (screens, widgets):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            classes += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                        if obj.__module__ == module.__name__]
    bindings = [(cls.__name__, b) for cls in classes for b in cls.__dict__.get("BINDINGS", [])]
    assert len(bindings) > 15
    assert [(name, b.key) for name, b in bindings if not (isinstance(b, Binding) and b.id)] == []


async def test_keys_can_be_remapped_by_binding_id(project_path):
    save_user_config({"keymap": {"screen.train": "f5"}})
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        assert app.current_mode == "train"


async def test_the_palette_lists_the_app_commands_and_runs_them(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        names = [name for name, _, _ in TunedeckCommands(app.screen).commands()]
        for expected in ("Open project…", "New project…", "Save project", "Screen: Train", "Start training",
                         "Preset: QLoRA 4-bit nf4", "Theme: tunedeck-light", "Keys"):
            assert expected in names
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Screen: Train")
        results = app.screen.query_one(CommandList)
        for _ in range(100):  # the palette searches in the background
            if results.option_count and "Screen: Train" in str(results.get_option_at_index(0).prompt):
                break
            await pilot.pause(0.05)
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert app.current_mode == "train"


async def test_theme_choice_is_remembered(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "tunedeck-dark"
        app.set_theme("tunedeck-high-contrast")
        await settle(pilot)
    assert load_user_config()["theme"] == "tunedeck-high-contrast"
    again = make_app(project_path)
    async with again.run_test(size=SIZE):
        assert again.theme == "tunedeck-high-contrast"


async def test_open_dialog_reports_a_broken_file_in_one_line(project_path):
    broken = project_path.parent / "broken.toml"
    broken.write_text("[lora\nr = 8\n")
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, OpenProjectScreen)
        await pilot.press(*"broken.toml", "enter")
        await pilot.pause()
        problem = str(app.screen.query_one(".dialog-problem").render())
        assert problem.startswith("broken.toml: not valid TOML") and "\n" not in problem
        await pilot.press("escape")
        await pilot.pause()
        assert app.session.path == project_path


async def test_open_asks_first_when_there_are_changes_then_opens(project_path, tmp_path):
    other = write_project(tmp_path / "other")
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, "lora.r", "8")
        await pilot.press("enter", "ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, ChoiceScreen)
        await pilot.click("#answer-discard")
        await pilot.pause()
        await pilot.press(*"other/demo.toml", "enter")
        await pilot.pause()
        assert app.session.path == other
        assert app.session.project["lora.r"] == 16 and not app.session.dirty
        assert load_user_config()["recent_projects"][0] == str(other)


async def test_new_project_dialog_writes_a_starter_file(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert isinstance(app.screen, NewProjectScreen)
        await pilot.press(*"fresh.toml", "tab", "tab", *"data.jsonl", "enter")
        await pilot.pause()
        assert app.session.path == project_path.parent / "fresh.toml"
        assert app.session.project["dataset.path"] == "data.jsonl"
        assert (project_path.parent / "fresh.toml").is_file()


def test_a_broken_project_from_the_shell_is_one_line_and_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text("[lora]\nr = -1\n")
    assert cli.main([str(broken)]) == 2
    err = capsys.readouterr().err
    assert err == f"tunedeck: error: {broken}: lora.r: -1 is not valid: expected an integer >= 1 and <= 4096\n"
    assert cli.main([str(tmp_path / "missing.toml")]) == 2
    assert "no such project file" in capsys.readouterr().err


class FakeRun:
    """A RunHandle stand-in that replays events."""

    def __init__(self, run_dir: Path, events: list[dict[str, Any]]) -> None:
        self.name, self.run_dir, self.status = "demo-1", run_dir, "starting"
        self._events, self.stopped, self._ended = list(events), False, False

    @property
    def ended(self) -> bool:
        return self._ended

    def events(self, timeout: float = 0.2) -> list[dict[str, Any]]:
        if not self._events:
            self._ended = True
            return []
        ev = self._events.pop(0)
        self.status = {"run_started": "running", "finished": "finished", "failed": "failed"}.get(ev["type"],
                                                                                                 self.status)
        return [ev]

    def stop(self) -> None:
        self.stopped = True


@pytest.mark.slow
async def test_training_from_the_palette_follows_the_run(tmp_path, monkeypatch, default_model_dir):
    import json

    monkeypatch.chdir(tmp_path)  # a model with a tokenizer: the pre-flight renders the rows
    project_path = write_project(tmp_path, PROJECT_TOML.replace('"tiny-llama"', json.dumps(str(default_model_dir))))
    started: list[tuple[str, tuple[str, ...]]] = []
    run = FakeRun(project_path.parent / "runs" / "demo-1", [
        {"type": "run_started", "step": 0, "max_steps": 3},
        {"type": "step", "step": 1, "loss": 2.5, "max_steps": 3},
        {"type": "step", "step": 2, "loss": 1.25, "max_steps": 3},
        {"type": "finished", "step": 3},
    ])

    def start_run(path: str, overrides: tuple[str, ...], **options: object) -> FakeRun:
        started.append((path, overrides))
        assert options == {"deep": False}  # the engine ran the full pre-flight first
        return run

    import tunedeck.core.launcher as launcher

    monkeypatch.setattr(launcher, "start_run", start_run)
    app = make_app(project_path, InProcessEngine())  # it runs the pre-flight
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, "training.max_steps", "3")
        await pilot.press("enter")
        app.action_start_training()
        await settle(pilot)
        assert started == [(str(project_path), ("training.max_steps=3",))]
        assert app.run_view.status == "finished" and app.run_view.loss_value == 1.25
        assert any("demo-1 finished" in n.message for n in app._notifications)
        await pilot.press("5")
        await settle(pilot)
        rows = dict(app.screen.query_one("#numbers", Facts).rows)
        assert (rows["status"], rows["step"], rows["loss"]) == ("finished", "3 / 3  (100%)", "1.2500")


def test_run_app_refuses_a_bad_file_before_taking_the_terminal(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora]\nrank = 8\n")
    with pytest.raises(Exception, match='lora.rank: unknown key; did you mean "r"'):
        app_module.run_app(str(bad))


async def test_paths_complete_from_the_folder(project_path):
    from tunedeck.tui.screens.dialogs import PathSuggester

    (project_path.parent / "runs").mkdir()
    suggest = PathSuggester(".toml").get_suggestion
    assert await suggest("dem") == "demo.toml"
    assert await suggest("ru") == "runs/"
    assert await suggest("zzz") is None
    assert await PathSuggester().get_suggestion("data") == "data.jsonl"
