"""Project files: schema, validation messages, round trips, overrides, atomic saves."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from tunedeck.core.errors import ProjectError, UserError
from tunedeck.core.hardware import Gpu, Hardware
from tunedeck.core.project import Project, atomic_write_text, parse_override
from tunedeck.core.resolve import resolve
from tunedeck.core.schema import FIELDS, SECTIONS

COMMENTED = """\
# fine-tune for short Python answers
schema = 1
name = "python-qa"   # used for run names

[model]
source = "default"

[lora]
# attention only, small rank
r = 8
alpha = 16
target_modules = ["q_proj", "v_proj"]

[training]
learning_rate = 1e-4
max_steps = 50
"""


def test_load_then_save_gives_the_same_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(COMMENTED)
    project = Project.load(path)
    project.save()
    assert path.read_text() == COMMENTED


def test_new_project_round_trips_and_has_every_section(tmp_path):
    path = tmp_path / "new.toml"
    project = Project.new("demo", dataset="data.jsonl", path=path)
    project.save()
    data = tomllib.loads(path.read_text())
    assert data["schema"] == 1 and data["name"] == "demo"
    for section in SECTIONS:
        assert section in data
    again = Project.load(path)
    assert again.as_dict() == project.as_dict()
    again.save()
    assert tomllib.loads(path.read_text()) == data


def test_defaults_fill_missing_keys_and_sources_are_reported(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(COMMENTED)
    project = Project.load(path)
    assert project["lora.r"] == 8
    assert project["lora.dropout"] == 0.05
    assert project.source_of("lora.r") == "project"
    assert project.source_of("lora.dropout") == "default"
    assert project["training.precision"] == "auto"


def test_set_keeps_comments_and_key_order(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(COMMENTED)
    project = Project.load(path)
    project.set("lora.r", 32)
    project.set("training.seed", 7)
    project.set("quantization.mode", "4bit")
    assert project.dirty
    project.save()
    text = path.read_text()
    assert "# attention only, small rank\nr = 32\nalpha = 16" in text
    assert 'name = "python-qa"   # used for run names' in text
    assert text.index("learning_rate") < text.index("seed = 7")
    assert "[quantization]\nmode = \"4bit\"" in text
    assert not project.dirty


def test_a_failed_set_changes_nothing(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(COMMENTED)
    project = Project.load(path)
    before = project.text()
    with pytest.raises(ProjectError, match=r"lora\.r: -1 is not valid: expected an integer >= 1"):
        project.set("lora.r", -1)
    with pytest.raises(ProjectError, match="eval set"):
        project.set("training.eval_steps", 10)
    assert project.text() == before and not project.dirty
    assert project["lora.r"] == 8


def test_unset_restores_the_default(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(COMMENTED)
    project = Project.load(path)
    project.unset("lora.r")
    assert project["lora.r"] == 16 and project.source_of("lora.r") == "default"


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("lora.r=8", "lora.r", 8),
        ('lora.target_modules=["q_proj","v_proj"]', "lora.target_modules", ["q_proj", "v_proj"]),
        ("lora.target_modules=all-linear", "lora.target_modules", "all-linear"),
        ("model.source=HuggingFaceTB/SmolLM2-360M", "model.source", "HuggingFaceTB/SmolLM2-360M"),
        ("training.learning_rate=1e-4", "training.learning_rate", 1e-4),
        ("training.gradient_checkpointing=true", "training.gradient_checkpointing", True),
        ('dataset.columns={messages="dialog"}', "dataset.columns", {"messages": "dialog"}),
        ("dataset.eval_split=0.1", "dataset.eval_split", 0.1),
    ],
)
def test_overrides_are_read_as_toml_values(item, key, value):
    assert parse_override(item) == (key, value)
    project = Project.new("x")
    project.apply_overrides([item])
    assert project[key] == value


def test_overrides_from_lists_the_edits():
    saved = Project.new("x")
    edited = Project.new("x")
    edited.set("lora.r", 4)
    edited.set("lora.target_modules", ["q_proj"])
    assert edited.overrides_from(saved) == ["lora.r=4", 'lora.target_modules=["q_proj"]']


BAD_FILES = [
    ("schema = 1\n[lora\nr = 8\n", "not valid TOML"),
    ("schema = 1\nname = \n", "not valid TOML"),
    ('schema = "one"\n', 'schema: "one" is not valid: expected an integer'),
    ("schema = 9\n", "newer than this tunedeck reads"),
    ("name = 3\n", "name: 3 is not valid: expected a string"),
    ("colour = 1\n", "colour: unknown key"),
    ("[trainig]\nseed = 1\n", 'trainig: unknown key; did you mean "training"?'),
    ("[lora]\nrank = 8\n", 'lora.rank: unknown key; did you mean "r"?'),
    ("[lora]\nr = -4\n", "lora.r: -4 is not valid: expected an integer >= 1"),
    ("[lora]\nr = 0\n", "lora.r: 0 is not valid"),
    ("[lora]\nr = 8.5\n", "lora.r: 8.5 is not valid: expected an integer"),
    ('[lora]\nr = "8"\n', 'lora.r: "8" is not valid: expected an integer'),
    ("[lora]\nalpha = 0\n", "lora.alpha: 0 is not valid: expected a number > 0"),
    ("[lora]\ndropout = 1.5\n", "lora.dropout: 1.5 is not valid"),
    ("[lora]\ntarget_modules = []\n", "lora.target_modules: [] is not valid"),
    ("[lora]\ntarget_modules = [1, 2]\n", "lora.target_modules: [1, 2] is not valid"),
    ('[lora]\nbias = "some"\n', 'lora.bias: "some" is not valid: expected one of "none", "all", "lora_only"'),
    ("[lora]\nuse_dora = \"yes\"\n", 'lora.use_dora: "yes" is not valid: expected true or false'),
    ('[quantization]\nmode = "3bit"\n', 'quantization.mode: "3bit" is not valid: expected one of'),
    ('[quantization]\nquant_type = "nf3"\n', 'did you mean "nf4"?'),
    ('[dataset]\nformat = "csv"\n', 'dataset.format: "csv" is not valid'),
    ('[dataset]\nloss_on = "prompt"\n', "dataset.loss_on"),
    ("[dataset]\nmax_length = 0\n", "dataset.max_length: 0 is not valid: expected an integer >= 8"),
    ("[dataset]\neval_split = 1.0\n", "dataset.eval_split: 1.0 is not valid"),
    ("[dataset]\ncolumns = {messages = 3}\n", "dataset.columns"),
    ('[training]\nprecision = "bf61"\n', 'did you mean "bf16"?'),
    ('[training]\ngradient_checkpointing = "yes"\n', 'expected "auto", true or false'),
    ("[training]\nlearning_rate = -1e-4\n", "training.learning_rate: -0.0001 is not valid"),
    ("[training]\nlearning_rate = nan\n", "training.learning_rate: nan is not valid"),
    ("[training]\nbatch_size = 0\n", "training.batch_size: 0 is not valid"),
    ("[training]\nepochs = 0\n", "training.epochs: 0 is not valid: expected a number > 0"),
    ("[training]\neval_steps = 10\n", "asks for evaluation but there is no eval set"),
    ('[training]\nlr_scheduler = "cosin"\n', 'did you mean "cosine"?'),
    ("lora = 3\n", "lora: expected a table [lora]"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_project_files_give_one_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        Project.load(path)
    line = str(info.value)
    assert message in line
    assert "\n" not in line.strip() or "not valid TOML" in line
    assert line.startswith(str(path))
    assert path.read_text() == text


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="no such project file; create one with `tunedeck new"):
        Project.load(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="is a folder without project.toml"):
        Project.load(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="bin.toml: not UTF-8 text \(line 1, byte 0\); save it as UTF-8"):
        Project.load(tmp_path / "bin.toml")


def test_unknown_override_key_and_bad_override_value():
    project = Project.new("x")
    with pytest.raises(UserError, match='lora.rank: unknown key; did you mean "r"'):
        project.apply_overrides(["lora.rank=8"])
    with pytest.raises(UserError, match="expected key.path=value"):
        project.apply_overrides(["lora.r"])
    with pytest.raises(UserError, match="not a valid TOML value"):
        project.apply_overrides(['lora.target_modules=["q_proj"'])


def test_every_field_has_help_and_a_valid_default():
    from tunedeck.core.schema import check_value

    for fld in FIELDS:
        assert fld.help.endswith(".") or fld.help.endswith(")"), fld.key
        if fld.key not in ("name", "dataset.path"):
            assert check_value(fld, fld.default) == fld.default


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "p.toml"
    path.write_text(COMMENTED)
    project = Project.load(path)
    project.set("lora.r", 64)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(UserError, match="p.toml: cannot read or write it"):  # one line, not an OSError
        project.save()
    assert path.read_text() == COMMENTED
    assert [p.name for p in tmp_path.iterdir()] == ["p.toml"]


def test_atomic_write_keeps_permissions(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("x = 1\n")
    path.chmod(0o640)
    atomic_write_text(path, "x = 2\n")
    assert path.read_text() == "x = 2\n"
    assert path.stat().st_mode & 0o777 == 0o640


def test_paths_resolve_against_the_project_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "p.toml"
    path.write_text('[dataset]\npath = "../data/rows.jsonl"\n')
    project = Project.load(path)
    assert project.resolve_path(project["dataset.path"]) == tmp_path / "data" / "rows.jsonl"


CPU = Hardware(gpus=(), cpu_count=2, ram_total=24 * 2**30)
A100 = Hardware(gpus=(Gpu(0, "A100", 80 * 2**30, (8, 0)),), cpu_count=16)
T4 = Hardware(gpus=(Gpu(0, "T4", 16 * 2**30, (7, 5)),), cpu_count=8)


def test_auto_resolves_from_the_hardware():
    project = Project.new("x")
    cpu = resolve(project, CPU)
    assert (cpu.device, cpu.precision, cpu.gradient_checkpointing, cpu.compute_dtype) == (
        "cpu", "fp32", False, "float32")
    gpu = resolve(project, A100)
    assert (gpu.precision, gpu.gradient_checkpointing, gpu.compute_dtype) == ("bf16", True, "bfloat16")
    old = resolve(project, T4)
    assert (old.precision, old.compute_dtype) == ("fp16", "float16")
    project.set("training.gradient_checkpointing", True)
    assert resolve(project, CPU).gradient_checkpointing is True
    assert resolve(project, CPU).effective_batch == 16


def test_settings_that_cannot_work_on_this_hardware():
    project = Project.new("x")
    project.set("training.precision", "fp16")
    with pytest.raises(UserError, match='"fp16" needs a GPU'):
        resolve(project, CPU)
    project.set("training.precision", "bf16")
    with pytest.raises(UserError, match=r"\"bf16\" is not supported by GPU 0 \(T4\)"):
        resolve(project, T4)
    project.set("training.precision", "auto")
    project.set("quantization.mode", "4bit")
    project.set("quantization.compute_dtype", "float16")
    with pytest.raises(UserError, match="quantization.compute_dtype"):
        resolve(project, CPU)


def test_sample_demo_project_is_valid():
    demo = Path(__file__).resolve().parent.parent / "sample_data" / "demo.toml"
    project = Project.load(demo)
    assert project["model.source"] == "default"
    assert project.resolve_path(project["dataset.path"]).is_file()


def test_the_readme_project_example_is_a_valid_project():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    project = Project.from_text(block)
    for fld in FIELDS:  # the example shows every key
        assert project.source_of(fld.key) == "project", fld.key


def test_overrides_are_checked_together_so_their_order_does_not_matter():
    project = Project.new("x")
    project.apply_overrides(["dataset.eval_split=0.1", "training.eval_steps=5"])
    for order in (["dataset.eval_split=0", "training.eval_steps=0"],
                  ["training.eval_steps=0", "dataset.eval_split=0"]):
        p = Project.new("x")
        p.apply_overrides(["dataset.eval_split=0.1", "training.eval_steps=5"])
        p.apply_overrides(order)
        assert (p["dataset.eval_split"], p["training.eval_steps"]) == (0.0, 0)
    with pytest.raises(ProjectError, match="eval set"):
        project.apply_overrides(["dataset.eval_split=0"])
    assert project["dataset.eval_split"] == 0.1
