"""The Models screen driven with Pilot: the models found, their memory estimates, picking one
for the project, adding a path, and models that cannot be read."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable, Input
from tui_helpers import CPU, SilentEngine, settle, write_project, write_tiny_model

from tunedeck.core import models
from tunedeck.core.engine.ops import lora_summary
from tunedeck.core.memory import _longest, estimate_for_model, remember_longest_row
from tunedeck.core.paths import load_user_config, save_user_config
from tunedeck.core.project import Project
from tunedeck.core.units import format_gib
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.dialogs import AddModelScreen
from tunedeck.tui.screens.models import ModelsScreen

SIZE = (100, 30)


@pytest.fixture
def project_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "_scan_hf_cache", lambda: [])  # this machine's HF cache is not the test's
    return write_project(tmp_path)


@pytest.fixture
def zoo(tmp_path) -> Path:
    """A model folder named in the user config: one tiny llama and one corrupt GGUF file."""
    folder = tmp_path / "zoo"
    write_tiny_model(folder / "other-llama")
    (folder / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00cut short")
    save_user_config({"model_dirs": [str(folder)]})
    return folder


def make_app(path: Path) -> TunedeckApp:
    return TunedeckApp(Project.load(path), engine=SilentEngine(), hardware=CPU)


def rows(app: TunedeckApp) -> dict[str, list[str]]:
    """The table as text, by model path."""
    screen = app.screen
    assert isinstance(screen, ModelsScreen)
    table = screen.query_one(DataTable)
    return {info.path: [str(cell) for cell in table.get_row_at(index)] for index, info in enumerate(screen._infos)}


def cursor_to(app: TunedeckApp, path: Path) -> None:
    screen = app.screen
    index = next(i for i, info in enumerate(screen._infos) if info.path == str(path))
    screen.query_one(DataTable).move_cursor(row=index)


async def test_lists_the_default_the_model_dirs_and_the_projects_model(project_path, zoo):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1")
        await settle(pilot)
        screen = app.screen
        sources = [info.source for info in screen._infos]
        assert sources[0] == "default"
        table = rows(app)
        tiny, other = project_path.parent / "tiny-llama", zoo / "other-llama"
        assert table[str(tiny)][:4] == ["●", "tiny-llama", "llama", "22.7K"]  # the project's own model
        assert table[str(other)][1:4] == ["zoo/other-llama", "llama", "22.7K"]
        assert table[str(other)][6:] == ["2", "32", "256", "f32", "90.6 KiB", "no", "no"]
        expected = estimate_for_model(next(i for i in screen._infos if i.path == str(other)), app.session.project,
                                      hardware=CPU)  # the project's settings as resolved here: fp32 on a CPU
        assert expected["lora"].precision == "fp32" and expected["lora"].seq_length == 1024
        assert table[str(other)][4] == "0.04 GiB" == format_gib(expected["lora"].total)
        assert table[str(other)][5] == format_gib(expected["qlora"].total)
        broken = table[str(zoo / "broken.gguf")]
        assert broken[1].endswith("✗") and broken[2] == "unreadable"
        detail = str(screen.query_one("#model-detail").render())
        assert "LlamaForCausalLM (llama)" in detail and "LoRA peak" in detail and "QLoRA peak" in detail
        assert "in GiB at batch 4 × 1024 tokens (at max_length), r 16 on cpu" in str(
            screen.query_one("#models-status").render())
        assert "~0.04 GiB on cpu: QLoRA 4bit fp32, batch 4 × 1024 tokens (at max_length)" in detail


async def test_enter_sets_the_projects_model(project_path, zoo):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1")
        await settle(pilot)
        cursor_to(app, zoo / "broken.gguf")
        await pilot.press("enter")
        await pilot.pause()
        assert any("cannot be used: unreadable GGUF header" in n.message for n in app._notifications)
        assert app.session.project["model.source"] == "tiny-llama"
        cursor_to(app, zoo / "other-llama")
        await pilot.press("enter")
        await settle(pilot)
        assert app.session.project["model.source"] == "zoo/other-llama"  # relative to the project file
        assert app.title == "demo *"
        assert any(n.message.startswith("model.source = 'zoo/other-llama' (unsaved") for n in app._notifications)
        assert rows(app)[str(zoo / "other-llama")][0] == "●"
        assert rows(app)[str(project_path.parent / "tiny-llama")][0] == ""
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert 'source = "zoo/other-llama"' in project_path.read_text()


async def test_a_changed_rank_changes_the_estimates(project_path, zoo):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1")
        await settle(pilot)
        before = rows(app)[str(zoo / "other-llama")][4]
        app.edit_setting("lora.r", value=512)
        await settle(pilot)
        assert rows(app)[str(zoo / "other-llama")][4] != before


async def test_adding_a_path(project_path, tmp_path):
    elsewhere = write_tiny_model(tmp_path / "more" / "third-llama")
    (tmp_path / "empty").mkdir()
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1")
        await settle(pilot)
        await pilot.press("a")
        await pilot.pause()
        assert isinstance(app.screen, AddModelScreen)
        await pilot.press(*"empty", "enter")  # a folder without config.json
        await settle(pilot)
        assert any(n.message.startswith(f"{tmp_path / 'empty'}: no model there; a model folder has a config.json")
                   for n in app._notifications)
        await pilot.press("a")
        await pilot.pause()
        app.screen.query_one(Input).value = "more"
        await pilot.press("enter")
        await settle(pilot)
        assert str(elsewhere) in rows(app)
        assert any(n.message == "added more to the model folders (user config)" for n in app._notifications)
        assert load_user_config()["model_dirs"] == [str(tmp_path / "more")]
        app.screen.add_path("nowhere")
        await pilot.pause()
        assert "nowhere: no such file or folder" in list(app._notifications)[-1].message


async def test_a_project_model_that_is_not_a_model_is_one_line(project_path):
    (project_path.parent / "not-a-model").mkdir()
    project_path.write_text(project_path.read_text().replace('"tiny-llama"', '"not-a-model"'))
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1")
        await settle(pilot)
        status = str(app.screen.query_one("#models-status").render())
        assert status.startswith("model not-a-model:") and "has no config.json" in status
        assert "\n" not in status.strip()
        await pilot.press("down", "enter")  # the screen stays usable: pick a model that works
        await settle(pilot)
        assert app.session.project["model.source"] != "not-a-model"
        status = app.screen.query_one("#models-status")
        assert not status.has_class("-error") and "models (● the project's)" in str(status.render())


async def test_the_projects_model_shows_the_modules_number_at_the_longest_row(project_path):
    project = Project.load(project_path)
    remember_longest_row(project, 9)  # as the engine or a run keeps it once the rows are tokenized
    try:
        exact = lora_summary(project, hardware=CPU)["memory"]  # the Modules screen's number (meta-built counts)
        assert (exact["seq_length"], exact["longest_row"]) == (9, 9)
        app = make_app(project_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("1")
            await settle(pilot)
            row = rows(app)[str(project_path.parent / "tiny-llama")]
            assert row[4] == format_gib(exact["total"])
            assert app.screen._estimates[(app.screen._estimating, str(project_path.parent / "tiny-llama"))].lora[
                "total"] == exact["total"]  # config-only counts equal the meta-built ones for this model
            status = str(app.screen.query_one("#models-status").render())
            assert "memory in GiB at batch 4 × 9 tokens (the longest row)" in status
            app.edit_setting("dataset.max_length", value=8)  # now every batch is cut to max_length
            await settle(pilot)
            status = str(app.screen.query_one("#models-status").render())
            assert "batch 4 × 8 tokens (max_length: the longest row, 9 tokens, is truncated)" in status
            assert rows(app)[str(project_path.parent / "tiny-llama")][4] != row[4] or exact["total"] < 2**30 * 0.005
    finally:
        _longest.clear()


async def test_settings_that_cannot_resolve_here_are_one_line_in_the_row(project_path):
    project_path.write_text(project_path.read_text().replace("[training]\n", '[training]\nprecision = "fp16"\n'))
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1")
        await settle(pilot)
        tiny = str(project_path.parent / "tiny-llama")
        assert rows(app)[tiny][4] == "?"
        error = app.screen._estimates[(app.screen._estimating, tiny)].error
        assert error.startswith("no memory estimate: ") and "training.precision" in error and "needs a GPU" in error
        assert "\n" not in error and error[:40] in str(app.screen.query_one("#model-detail").render())
