"""The app's project state without the UI: text <-> values, edits, invalid edits, saving."""

from __future__ import annotations

import pytest
from tui_helpers import PROJECT_TOML, write_project

from tunedeck.core.errors import UserError
from tunedeck.core.project import Project
from tunedeck.core.schema import field_for
from tunedeck.tui.session import Session, display_path, format_value, parse_text
from tunedeck.tui.themes import DEFAULT_THEME, bundled_themes, theme_from_toml, user_themes


@pytest.mark.parametrize(("key", "text", "value"), [
    ("lora.r", "8", 8),
    ("lora.alpha", "16.5", 16.5),
    ("lora.target_modules", "all-linear", "all-linear"),
    ("lora.target_modules", "q_proj, v_proj", ["q_proj", "v_proj"]),
    ("lora.target_modules", "q_proj", ["q_proj"]),
    ("lora.target_modules", r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
    ("lora.target_modules", '["q_proj", "k_proj"]', ["q_proj", "k_proj"]),
    ("lora.modules_to_save", "", []),
    ("lora.modules_to_save", "lm_head embed_tokens", ["lm_head", "embed_tokens"]),
    ("dataset.columns", "messages=dialog", {"messages": "dialog"}),
    ("dataset.columns", '{prompt = "q", completion = "a"}', {"prompt": "q", "completion": "a"}),
    ("dataset.columns", "", {}),
    ("dataset.eval_split", "0.1", 0.1),
    ("dataset.eval_split", "eval.jsonl", "eval.jsonl"),
    ("dataset.path", " data with spaces.jsonl", " data with spaces.jsonl"),
    ("training.gradient_checkpointing", "auto", "auto"),
    ("training.learning_rate", "2e-4", 2e-4),
])
def test_text_is_read_like_set(key, text, value):
    assert parse_text(field_for(key), text) == value


@pytest.mark.parametrize(("key", "value"), [
    ("lora.target_modules", ["q_proj", "v_proj"]),
    ("lora.target_modules", "all-linear"),
    ("dataset.columns", {"messages": "dialog", "system": "sys"}),
    ("lora.modules_to_save", []),
    ("training.max_steps", -1),
    ("lora.dropout", 0.05),
])
def test_format_then_parse_round_trips(key, value):
    fld = field_for(key)
    assert parse_text(fld, format_value(fld, value)) == value


def test_bad_table_text_names_the_key():
    with pytest.raises(UserError, match="dataset.columns: 'dialog' is not valid"):
        parse_text(field_for("dataset.columns"), "dialog")
    with pytest.raises(UserError, match=r"lora.target_modules: \[q_proj is not a valid TOML value"):
        parse_text(field_for("lora.target_modules"), "[q_proj")


@pytest.fixture
def session(tmp_path) -> Session:
    return Session(Project.load(write_project(tmp_path)))


def test_valid_edit_changes_the_project_and_is_dirty(session):
    assert not session.dirty
    assert session.edit_text("lora.r", "8")
    assert session.project["lora.r"] == 8
    assert session.edited("lora.r") and not session.edited("lora.alpha")
    assert session.dirty
    assert session.overrides() == ["lora.r=8"]
    assert session.train_command(session.path.parent) == "tunedeck train demo.toml --set lora.r=8"


def test_invalid_edit_keeps_the_value_and_the_reason(session):
    assert not session.edit_text("lora.r", "0")
    assert session.project["lora.r"] == 16
    assert session.invalid["lora.r"].text == "0"
    assert session.invalid["lora.r"].reason == "0 is not valid: expected an integer >= 1 and <= 4096"
    assert session.dirty
    # the same reason the CLI gives for --set lora.r=0
    with pytest.raises(UserError, match="lora.r: 0 is not valid: expected an integer >= 1 and <= 4096"):
        Project.load(session.path).apply_overrides(["lora.r=0"])
    with pytest.raises(UserError, match="not saved: lora.r is invalid"):
        session.save()
    assert session.path.read_text() == PROJECT_TOML
    assert session.edit_text("lora.r", "4")
    assert not session.invalid


def test_an_edit_refused_by_another_key_passes_once_that_key_changes(session):
    assert not session.edit_text("training.eval_steps", "10")
    assert "training.eval_steps: 10 asks for evaluation" not in session.invalid["training.eval_steps"].reason
    assert session.invalid["training.eval_steps"].reason.startswith("10 asks for evaluation")
    assert session.edit_text("dataset.eval_split", "0.1")
    assert not session.invalid
    assert session.project["training.eval_steps"] == 10


def test_reset_restore_and_save_keep_comments_and_order(session):
    original = session.path.read_text()
    version = session.version
    session.edit_text("lora.r", "32")
    session.edit_value("training.max_steps", 10)
    assert session.version > version
    session.reset("lora.alpha")
    assert session.project.source_of("lora.alpha") == "default"
    snap = session.snapshot("lora.dropout")
    session.edit_text("lora.dropout", "0.5")
    session.restore("lora.dropout", snap)
    assert session.project.source_of("lora.dropout") == "default"
    path = session.save()
    saved = path.read_text()
    assert "# a small project for the app's tests" in saved
    assert 'source = "tiny-llama"   # a model folder next to this file' in saved
    assert "r = 32" in saved and "alpha" not in saved.split("[lora]")[1].split("[dataset]")[0]
    assert saved.index("[model]") < saved.index("[lora]") < saved.index("[training]")
    assert "max_steps = 10" in saved.split("[training]")[1]
    assert not session.dirty
    assert original != saved


def test_display_path_is_relative_to_the_working_folder(tmp_path):
    assert display_path(tmp_path / "a" / "b.toml", tmp_path) == "a/b.toml"
    assert display_path(tmp_path / "b.toml", tmp_path / "elsewhere").endswith("b.toml")


def test_bundled_themes():
    themes = bundled_themes()
    names = [t.name for t in themes]
    assert names[0] == DEFAULT_THEME
    assert {"tunedeck-dark", "tunedeck-light", "tunedeck-high-contrast"} <= set(names)
    assert not next(t for t in themes if t.name == "tunedeck-light").dark


def test_user_theme_files(tmp_path):
    (tmp_path / "ok.toml").write_text('name = "mine"\nprimary = "#123456"\n')
    (tmp_path / "bad.toml").write_text('name = "bad"\nprimary = "not a colour"\n')
    (tmp_path / "worse.toml").write_text('name = "x"\nprimry = "#000000"\n')
    themes, problems = user_themes(tmp_path)
    assert [t.name for t in themes] == ["mine"]
    assert problems == [f"theme {tmp_path / 'bad.toml'}: primary: 'not a colour' is not a colour",
                        f"theme {tmp_path / 'worse.toml'}: unknown key 'primry'; keys are the fields of "
                        "textual.theme.Theme"]
    with pytest.raises(UserError, match="not valid TOML"):
        theme_from_toml("name = ", "x.toml")
