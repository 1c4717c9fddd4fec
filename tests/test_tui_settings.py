"""The Settings screen: what it shows, editing, validation, choices, presets and the
summary; and the editor under a real user's keyboard: bursts of keys (over SSH keys come
many at a time), ctrl+r as an edit, searching keys with ``/``, and numbers kept in the
form they were typed."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tui_helpers import PROJECT_TOML, InProcessEngine, burst, drain, edit, make_app, settle, write_project

from tunedeck.core.paths import load_user_config
from tunedeck.core.project import Project
from tunedeck.core.schema import field_for
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.dialogs import PresetScreen
from tunedeck.tui.widgets.field_editor import FieldEditor
from tunedeck.tui.widgets.settings_list import SettingsList, SettingsSearch
from tunedeck.tui.widgets.summary import SettingsSummary

SIZE = (100, 30)


@pytest.fixture
def project_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_project(tmp_path)


def last_note(app: TunedeckApp) -> str:
    return list(app._notifications)[-1].message


def row(app: TunedeckApp, key: str):
    return app.screen.query_one(SettingsList)._views[key]


def saved_line(path: Path, name: str) -> str:
    return next(line for line in path.read_text().splitlines() if line.startswith(f"{name} ="))


async def test_opens_a_project_on_the_settings_screen(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.current_mode == "settings"
        assert (app.title, app.sub_title) == ("demo", "demo.toml")
        assert isinstance(app.focused, SettingsList)
        assert app.focused.highlighted_key == "model.source"
        assert row(app, "training.precision").source == "default, auto -> fp32"
        assert row(app, "lora.r").source == "project"
        assert row(app, "dataset.path").problem == ""
        assert app.screen.query_one(SettingsSummary).command == "tunedeck train demo.toml"
        assert load_user_config()["recent_projects"] == [str(project_path)]


async def test_settings_say_why_auto_chose_its_precision(project_path):
    from dataclasses import replace

    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert row(app, "training.precision").help.startswith("auto chose fp32: this CPU has no native bf16")
        measured = "this CPU has AVX512-BF16: bf16 measured 2.3x as fast as fp32, with the same loss"
        app.hardware = replace(app.hardware, cpu_precision="bf16", cpu_precision_reason=measured)
        await pilot.pause()
        assert row(app, "training.precision").source == "default, auto -> bf16"
        assert row(app, "training.precision").help == f"auto chose bf16: {measured}"
        await app.screen.edit_field("training.precision")
        await pilot.pause()
        assert measured in str(app.screen.query_one("#editor-note").render())  # the whole line, under the editor
        await pilot.press("down", "down", "down", "enter")  # fp32, set in the project
        await pilot.pause()
        assert app.session.project["training.precision"] == "fp32"
        assert row(app, "training.precision").help == field_for("training.precision").help


async def test_editing_a_value_marks_it_and_the_title(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, "lora.r", "8")
        assert app.session.project["lora.r"] == 8
        assert row(app, "lora.r").source == "edited"
        assert app.title == "demo *"
        assert app.screen.query_one(SettingsSummary).command == "tunedeck train demo.toml --set lora.r=8"
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.focused, SettingsList)
        assert app.focused.highlighted_key == "lora.r"
        assert project_path.read_text() == PROJECT_TOML  # not saved yet


async def test_the_keyboard_alone_reaches_and_edits_a_field(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*["down"] * 9, "enter")  # model.source ... lora.r (headings are skipped)
        await pilot.pause()
        assert app.screen.query_one(FieldEditor).key == "lora.r"
        await pilot.press("6", "4", "enter", "ctrl+s")
        await pilot.pause()
        assert "r = 64" in project_path.read_text()


async def test_invalid_input_is_marked_with_the_reason_and_not_saved(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, "lora.r", "0")
        lora_r = row(app, "lora.r")
        assert (lora_r.value, lora_r.severity) == ("0", "error")
        assert lora_r.problem == "0 is not valid: expected an integer >= 1 and <= 4096"
        editor = app.screen.query_one(FieldEditor)
        assert "expected an integer >= 1" in str(editor.query_one("#editor-note").render())
        assert app.screen.query_one(SettingsSummary).invalid == ("lora.r",)
        await pilot.press("enter")  # keep the invalid text, move on
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert project_path.read_text() == PROJECT_TOML
        assert any("not saved: lora.r is invalid" in n.message for n in app._notifications)
        await edit(pilot, "lora.r", "1", "2")
        await pilot.press("enter", "ctrl+s")
        await pilot.pause()
        assert "r = 12" in project_path.read_text()
        assert app.title == "demo"


async def test_a_rule_between_keys_and_escape_puts_a_value_back(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, "training.eval_steps", "5")
        assert row(app, "training.eval_steps").problem.startswith("5 asks for evaluation but there is no eval set")
        await pilot.press("enter")
        await edit(pilot, "dataset.eval_split", "0", ".", "1")
        await pilot.press("enter")
        await pilot.pause()
        assert not app.session.invalid
        assert app.session.project["training.eval_steps"] == 5
        await edit(pilot, "lora.alpha", "9", "9")
        assert app.session.project["lora.alpha"] == 99
        await pilot.press("escape")
        await pilot.pause()
        assert app.session.project["lora.alpha"] == 32
        assert row(app, "lora.alpha").source == "project"


async def test_choices_switches_and_defaults(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, "quantization.mode", "down", "down", "enter")  # none -> 8bit -> 4bit
        assert app.session.project["quantization.mode"] == "4bit"
        assert app.screen.query_one(FieldEditor).key is None
        await pilot.app.screen.edit_field("lora.use_dora")  # a switch flips at once
        await pilot.pause()
        assert app.session.project["lora.use_dora"] is True
        app.screen.query_one(SettingsList).highlight("lora.alpha")
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert app.session.project.source_of("lora.alpha") == "default"
        assert row(app, "lora.alpha").source == "default"  # the same value (32), no longer in the file
        assert app.session.project["lora.alpha"] == 32
        assert app.title == "demo *"  # saving would change the file


async def test_presets_are_applied_as_visible_edits(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        assert isinstance(app.screen, PresetScreen)
        await pilot.press("down", "down", "enter")  # QLoRA 4-bit nf4
        await pilot.pause()
        project = app.session.project
        assert (project["quantization.mode"], project["quantization.quant_type"]) == ("4bit", "nf4")
        assert row(app, "quantization.mode").edited
        assert any(n.title == "Preset applied" for n in app._notifications)
        await app.apply_preset("Quick test run (max_steps 10)")
        assert project["training.max_steps"] == 10
        assert "--set training.max_steps=10" in app.screen.query_one(SettingsSummary).command


async def test_the_summary_counts_with_the_engine_and_presets_use_its_layer_names(project_path):
    app = make_app(project_path, InProcessEngine())
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        summary = app.screen.query_one(SettingsSummary)
        assert not summary.pending and not summary.error
        # r (in + out) per layer: q, o 32->32; k, v 32->16; gate, up 32->64, down 64->32; two blocks
        assert summary.result["trainable_params"] == 2 * 16 * (2 * 64 + 2 * 48 + 3 * 96)
        await edit(pilot, "lora.target_modules", "n", "o", "p", "e")
        await settle(pilot)
        [error] = summary.result["errors"]  # what the trainer would refuse, in one line
        assert error.startswith('lora.target_modules ["nope"] matches no layer of this model; its layers: ')
        assert error in str(summary.render())
        await pilot.press("escape")
        await settle(pilot)
        assert not summary.result["errors"] and summary.result["trainable_params"] > 0
        await app.apply_preset("LoRA, attention only")
        await settle(pilot)
        assert app.session.project["lora.target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert summary.result["adapted"] == {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2}


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
