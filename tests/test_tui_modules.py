"""The Modules screen (the target-module inspector) driven with Pilot: picking groups, presets
and single layers, counts equal to peft's own, saving the choice, and a model that cannot be
read. The engine's ops run in-process (the same functions the engine process runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable, Tree
from tui_helpers import CPU, PROJECT_TOML, InProcessEngine, SilentEngine, settle, write_project

from tunedeck.core.inspect import lora_config, project_counts
from tunedeck.core.project import Project
from tunedeck.core.units import format_gib
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.modules import NOTHING_PICKED, READING, ModulesScreen
from tunedeck.tui.widgets.choice import ChoiceSummary
from tunedeck.tui.widgets.layers import GroupTable, LayerTree

SIZE = (100, 30)
GROUPS = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture
def project_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_project(tmp_path)


def make_app(path: Path, engine=None) -> TunedeckApp:
    return TunedeckApp(Project.load(path), engine=engine or InProcessEngine(), hardware=CPU)


def peft_counts(model_dir: Path, lora: dict) -> tuple[int, int]:
    """What peft reports after wrapping the real model (its weights loaded)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return get_peft_model(model, lora_config(lora)).get_nb_trainable_parameters()


def shown(app: TunedeckApp) -> dict:
    result = app.screen.query_one(ChoiceSummary).result
    assert result is not None
    return result


async def open_modules(pilot) -> ModulesScreen:
    await pilot.press("2")
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, ModulesScreen)
    return screen


async def test_toggling_a_group_counts_exactly_what_peft_reports(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_modules(pilot)
        table = screen.query_one(GroupTable)
        assert app.focused is table
        assert [str(table.get_row_at(i)[1]) for i in range(table.row_count)] == GROUPS
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == ["□"] + ["■"] * 7 + ["□"]
        assert shown(app)["trainable_params"] == 2 * 16 * (2 * 64 + 2 * 48 + 3 * 96)  # all-linear
        await pilot.press("down", "space")  # q_proj off
        await settle(pilot)
        targets = ["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert app.session.project["lora.target_modules"] == targets
        assert app.title == "demo *"
        lora = {**app.session.project.values["lora"], "target_modules": targets}
        assert (shown(app)["trainable_params"], shown(app)["total_params"]) == peft_counts(
            project_path.parent / "tiny-llama", lora)
        assert str(table.get_row_at(1)[0]) == "□"
        await pilot.press("enter")  # q_proj on again
        await settle(pilot)
        assert app.session.project["lora.target_modules"] == "all-linear"
        assert not app.session.dirty


async def test_a_click_toggles_a_group(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_modules(pilot)
        table = screen.query_one(GroupTable)
        await pilot.click(GroupTable, offset=(4, 1 + GROUPS.index("lm_head")))  # below the header
        await settle(pilot)
        assert table.cursor_row == GROUPS.index("lm_head")
        result = shown(app)
        assert "lm_head" in result["targets"] and result["adapted"]["lm_head"] == 1
        [error] = result["errors"]  # training refuses an adapter on the output layer, and says why
        assert "includes the output layer lm_head" in error and 'modules_to_save = ["lm_head"]' in error
        assert error in str(screen.query_one(ChoiceSummary).render())


async def test_presets(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_modules(pilot)
        await pilot.press("a")
        await settle(pilot)
        assert app.session.project["lora.target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert shown(app)["trainable_params"] == 2 * 16 * (2 * 64 + 2 * 48)
        await pilot.press("m")  # attention + MLP is every linear layer but the output here
        await settle(pilot)
        assert app.session.project["lora.target_modules"] == "all-linear"
        await pilot.press("down", "space", "l")
        await settle(pilot)
        assert app.session.project["lora.target_modules"] == "all-linear"
        memory = shown(app)["memory"]
        assert (memory["device"], memory["batch_size"], memory["max_length"]) == ("cpu", 4, 1024)
        assert (f"~{format_gib(memory['total'])} on cpu: LoRA fp32, batch 4 × 1024 tokens (at max_length)"
                in str(screen.query_one(ChoiceSummary).render()))  # the tiny model has no tokenizer: no longest row


@pytest.mark.slow
async def test_a_partial_pick_writes_a_regex_that_counts_the_same_and_saves(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_modules(pilot)
        await pilot.press("v")
        tree = screen.query_one(LayerTree)
        assert app.focused is tree
        assert str(tree.root.label).startswith("◩ LlamaForCausalLM  14/16 layers")
        await pilot.press("a")
        await settle(pilot)
        node = tree.node_for("model.layers.1.self_attn")
        await pilot.pause()  # the expanded nodes get their lines
        tree.move_cursor(node)
        await pilot.press("space")  # layer 1's attention off: layer 0's stays
        await settle(pilot)
        targets = app.session.project["lora.target_modules"]
        assert isinstance(targets, str) and "layers" in targets
        assert shown(app)["layers"] == [f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")]
        assert str(node.label).startswith("□ self_attn  0/4")
        assert str(tree.root.label).startswith("◩ LlamaForCausalLM  4/16 layers")
        lora = {**app.session.project.values["lora"], "target_modules": targets}
        counted = (shown(app)["trainable_params"], shown(app)["total_params"])
        assert counted == peft_counts(project_path.parent / "tiny-llama", lora)
        assert counted[0] == 16 * (2 * 64 + 2 * 48)  # r (in + out) over q, k, v, o of one block
        leaf = tree.node_for("model.layers.1.mlp.down_proj")
        await pilot.pause()
        tree.move_cursor(leaf)
        await pilot.press("enter")  # a single layer
        await settle(pilot)
        assert "model.layers.1.mlp.down_proj" in shown(app)["layers"]
        trainable = shown(app)["trainable_params"]
        await pilot.press("ctrl+s")
        await pilot.pause()
    saved = Project.load(project_path)
    assert saved["lora.target_modules"] == app.session.project["lora.target_modules"]
    assert project_counts(saved)["trainable_params"] == trainable  # what `tunedeck check` reports


async def test_unpicking_everything_keeps_the_last_targets(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_modules(pilot)
        await pilot.press("v")
        screen.query_one(LayerTree).move_cursor(screen.query_one(Tree).root)
        await pilot.press("space")  # 14 of 16 picked: picks all 16
        await settle(pilot)
        assert len(shown(app)["layers"]) == 16
        await pilot.press("space")
        await settle(pilot)
        assert screen.query_one(ChoiceSummary).error == NOTHING_PICKED
        assert len(app.session.project["lora.target_modules"]) == 9  # the pick before


async def test_edits_elsewhere_show_here(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await open_modules(pilot)
        await pilot.press("4")
        app.edit_setting("lora.r", value=4)
        app.edit_setting("lora.target_modules", value=["q_proj", "nope"])
        await open_modules(pilot)
        result = shown(app)
        assert result["trainable_params"] == 2 * 4 * (32 + 32)  # q_proj of two blocks at r = 4
        assert result["warnings"][0].startswith('"nope" matches no layer')
        table = app.screen.query_one(DataTable)
        assert [str(table.get_row_at(i)[0]) for i in range(3)] == ["□", "■", "□"]


async def test_a_model_that_cannot_be_read_is_one_line_and_the_screen_stays_usable(project_path):
    (project_path.parent / "not-a-model").mkdir()
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        app.edit_setting("model.source", value="not-a-model")
        screen = await open_modules(pilot)
        status = str(screen.query_one("#modules-status").render())
        assert status == f"model not-a-model: {project_path.parent / 'not-a-model'} has no config.json; give a " \
                          "Hugging Face model folder"
        assert screen.query_one("#modules-status").has_class("-error")
        await pilot.press("space", "a", "v", "v", "enter")  # nothing to pick; nothing breaks
        await settle(pilot)
        assert app.session.project["lora.target_modules"] == "all-linear"
        await pilot.press("4")
        app.edit_setting("model.source", value="tiny-llama")
        await open_modules(pilot)
        assert shown(app)["trainable_params"] > 0
        assert not screen.query_one("#modules-status").has_class("-error")


async def test_reading_the_layers_says_so(project_path):
    app = make_app(project_path, SilentEngine())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await settle(pilot)
        screen = app.screen
        assert str(screen.query_one("#modules-status").render()) == READING
        assert "waiting for the model's layers" in str(screen.query_one(ChoiceSummary).render())
        await pilot.press("a", "space", "v")  # nothing to pick yet; nothing breaks
        await pilot.press("4")
        assert app.current_mode == "settings"


async def test_another_project_is_read_afresh(project_path, tmp_path):
    other = write_project(tmp_path / "other", PROJECT_TOML.replace('target_modules = "all-linear"',
                                                                   'target_modules = ["v_proj"]'))
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_modules(pilot)
        app.open_project(Project.load(other))
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ModulesScreen)
        table = screen.query_one(GroupTable)
        assert table.row_count == len(GROUPS)
        assert [str(table.get_row_at(i)[0]) for i in range(4)] == ["□", "□", "□", "■"]
        assert shown(app)["adapted"] == {"v_proj": 2}
