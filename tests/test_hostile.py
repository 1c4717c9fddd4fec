"""Hostile input never crashes anything: every command on generated project files, --set
values and dataset files exits 0 or 2 with at most a few lines and no traceback, and
leaves the project file as it was; the app, on hostile projects and datasets, shows a
notification and stays usable."""

from __future__ import annotations

import io
import json
import os
import string
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tui_helpers import CPU, InProcessEngine, settle, write_tiny_model

from tunedeck.core import cli
from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp

HOSTILE_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["[/x]", "[bold]", "[/]", "[link=x]y", "\ud800", "\x00", "\u202e", "'\"", "\\", "${HOME}",
                     "a" * 3000, "[" * 500, "{" * 500]),
)
VALUES = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), HOSTILE_TEXT, st.lists(st.one_of(st.integers(), HOSTILE_TEXT), max_size=4),
    st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=8), HOSTILE_TEXT, max_size=3),
)
KEYS = st.sampled_from([
    "name", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.bias", "lora.modules_to_save",
    "dataset.format", "dataset.columns", "dataset.max_length", "dataset.eval_split", "dataset.system_prompt",
    "training.seed", "training.epochs", "training.max_steps", "training.learning_rate", "training.precision",
    "training.devices", "training.accelerate_config", "quantization.mode", "model.chat_template", "model.source",
    "output.runs_dir", "nonsense.key", "lora", "training",
])
ROWS = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "[/x]", "tool"]), "content": HOSTILE_TEXT}),
        max_size=4)}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "[/x]"]), "value": HOSTILE_TEXT}), max_size=4)}),
    st.fixed_dictionaries({"instruction": HOSTILE_TEXT, "output": HOSTILE_TEXT}),
    st.fixed_dictionaries({"text": HOSTILE_TEXT}),
    st.dictionaries(st.text(max_size=6), VALUES, max_size=3),
)
FILE_BYTES = st.one_of(
    st.lists(ROWS, max_size=5).map(lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()),
    st.binary(max_size=200),
    st.sampled_from([b"\xef\xbb\xbf" + b'{"text": "bom"}\n', b"[" * 5000 + b"]" * 5000, b'{"text": ' + b"9" * 5000 + b"}\n",
                     b'{"text": "\\ud800"}\n', b"\xff\xfe\x00{", b"{" * 3000]),
)


def toml_value(value) -> str:
    """A value as TOML text (strings JSON-quoted; the rest as TOML spells it, or garbage)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, "nan" if value != value else repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def run_cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(args))
    return code, err.getvalue()


@pytest.fixture(scope="module")
def hostile_home(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    write_tiny_model(folder / "tiny")
    return folder


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(overrides=st.lists(st.tuples(KEYS, VALUES), max_size=3), data=FILE_BYTES, suffix=st.sampled_from(
    [".jsonl", ".json", ".csv", ".parquet", ".txt"]), command=st.sampled_from(["check", "preview", "inspect"]))
def test_fuzzed_commands_exit_0_or_2_in_one_line(hostile_home, overrides, data, suffix, command):
    folder = hostile_home
    dataset = folder / f"data{suffix}"
    dataset.write_bytes(data)
    project = folder / "p.toml"
    text = ('schema = 1\nname = "fuzz"\n[model]\nsource = "tiny"\n[dataset]\npath = "' + dataset.name + '"\n'
            "max_length = 64\n")
    project.write_text(text, encoding="utf-8")
    sets = [arg for key, value in overrides for arg in ("--set", f"{key}={toml_value(value)}")]
    args = {"check": ["check", str(project), *sets], "preview": ["preview", str(project), "--json", *sets],
            "inspect": ["inspect", str(project), "--json", *sets]}[command]
    code, err = run_cli(*args)
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(err.strip().splitlines()) <= 3, err
    assert project.read_text(encoding="utf-8") == text  # the project file is left as it was
    assert not [p for p in folder.iterdir() if p.name.startswith(".p.toml.")]  # no temp file left


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.one_of(st.binary(max_size=300), st.lists(st.tuples(KEYS, VALUES), max_size=4).map(
    lambda pairs: "\n".join(f"{k.split('.')[-1]} = {toml_value(v)}" if "." not in k else
                            f"[{k.split('.')[0]}]\n{k.split('.')[1]} = {toml_value(v)}" for k, v in pairs).encode())))
def test_fuzzed_project_files_are_one_line(hostile_home, body):
    project = hostile_home / "fuzzed.toml"
    project.write_bytes(body)
    code, err = run_cli("check", str(project))
    assert code in (0, 2) and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err


@pytest.mark.parametrize("content, words", [
    (b"[lora]\nr = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"\xef\xbb\xbfschema = 1\n", None),  # a BOM is fine
])
def test_project_files_that_cannot_be_read_are_one_line(tmp_path, content, words):
    project = tmp_path / "p.toml"
    project.write_bytes(content)
    code, err = run_cli("check", str(project))
    assert "Traceback" not in err and err.count("\n") <= 1
    if words:
        assert code == 2 and words in err


def test_datasets_that_cannot_be_read_are_one_line_or_a_bad_row(tmp_path, write_jsonl):
    from tunedeck.core.datafile import load_messages

    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n" + b"\xff\xfe\n" + b"[" * 5000 + b"\n"
                     + b'{"text": ' + b"9" * 5000 + b"}\n" + json.dumps({"messages": [
                         {"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}]}).encode()
                     + b"\n" + json.dumps({**good, "messages": good["messages"] + [
                         {"role": "user", "content": "and then?"}]}).encode() + b"\n")
    rows, summary = load_messages(path)
    reasons = {e.row: e.reason for e in summary.skipped}
    assert [n for n, _ in rows] == [1, 6]  # the BOM row reads; the cut-off conversation trains its answer
    assert "not UTF-8" in reasons[2] and "nested too deeply" in reasons[3] and "cannot hold" in reasons[4]
    assert "lone surrogate" in reasons[5] and summary.trimmed == [6] and rows[1][1][-1]["role"] == "assistant"


def test_a_corrupt_parquet_file_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tunedeck.core.datafile import load_messages
    from tunedeck.core.errors import UserError

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 50 for i in range(2000)]}), path, compression="NONE")
    data = bytearray(path.read_bytes())
    for i in range(200, len(data) - 200, 97):
        data[i] ^= 0xFF  # damage the pages, keep the footer
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="Parquet") as refused:
        load_messages(path)
    assert "\n" not in refused.value.message


def test_a_hand_corrupted_events_file_never_breaks_runs_or_attach(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    lines = [{"type": "run_started", "step": "x", "time": "later", "max_steps": "many"},
             {"type": "step", "step": 2, "loss": "low", "tokens_per_s": [1], "eta_s": "soon", "max_steps": -3},
             {"type": "system", "gpus": "two", "gpu_memory_total": "lots", "cpu_percent": "busy", "rss": -1},
             {"type": "eval", "eval_loss": {"a": 1}}, {"type": 7}, {"type": "checkpoint", "path": None},
             {"type": "alarm", "message": None}, {"type": "failed", "reason": ["list"], "traceback": 5}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"type": "step", "loss": ' + "9" * 5000 + "}\n"
    (run_dir / "events.jsonl").write_text(text + "{not json\n\x00\x01\n")
    monkeypatch.chdir(tmp_path)
    code, err = run_cli("runs", "--json")
    assert code == 0, err
    code, err = run_cli("attach", "r", "--text")
    assert code in (1, 2) and "Traceback" not in err and "internal error" not in err, err
    from tunedeck.tui.training import RunView

    view = RunView("r", run_dir)
    view.fold(lines, "failed")
    assert dict(view.snapshot().numbers)["status"] == "failed"


def test_a_full_disk_when_creating_a_project_is_one_line(tmp_path, monkeypatch):
    import errno

    from tunedeck.core import project as project_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(project_module.os, "fsync", full)
    code, err = run_cli("new", str(tmp_path / "p.toml"))
    assert code == 2 and "the disk is full" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # no half-written project, no temp file


def test_a_killed_saves_temp_file_is_cleaned_at_the_next_save(tmp_path):
    path = tmp_path / "p.toml"
    Project.new("p", path=path).save()
    stale = tmp_path / ".p.toml.abc123.tmp"
    stale.write_text("half")
    os.utime(stale, (0, 0))
    Project.load(path).save()
    assert not stale.exists()


def test_new_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        Project.new("p", path=tmp_path / "p.toml").save()
    finally:
        os.umask(old)
    assert (tmp_path / "p.toml").stat().st_mode & 0o777 == 0o644


def test_an_unexpected_error_is_one_line_with_a_crash_log(monkeypatch, tmp_path):
    from tunedeck.core.commands import runs

    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(tmp_path / "cache"))

    def boom(args):
        raise KeyError("a bug")

    monkeypatch.setattr(runs, "run", boom)
    code, err = run_cli("runs")
    assert code == 1 and err.startswith("tunedeck: internal error: KeyError") and "Traceback" not in err
    [log] = (tmp_path / "cache" / "crashes").iterdir()
    assert "Traceback" in log.read_text() and str(log) in err


HOSTILE_PROJECT = """\
schema = 1
name = "[/x] [bold]name"

[model]
source = "tiny[bold]/[/bold]"

[dataset]
path = "data [red] [/x].jsonl"
system_prompt = "[/x]"

[output]
runs_dir = "runs[/x]"
"""


@pytest.mark.slow
async def test_the_app_shows_hostile_text_as_text_and_stays_usable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_model(tmp_path / "tiny[bold]" / "[" / "bold]")
    rows = [{"messages": [{"role": "user", "content": "[/x] question [bold]"},
                          {"role": "assistant", "content": "[/red] answer \x00"}]},
            {"messages": [{"role": "[/x]", "content": "bad role"}]}]
    (tmp_path / "data [red] [").mkdir()  # "[/x]" in a path: a folder and a file
    (tmp_path / "data [red] [/x].jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "p.toml"
    path.write_text(HOSTILE_PROJECT)
    run_dir = tmp_path / "runs[" / "x]" / "old"
    run_dir.mkdir(parents=True)
    events = [{"type": "run_started", "step": 0, "max_steps": 4, "project": str(path)},
              {"type": "step", "step": 1, "loss": 2.0}, {"type": "warning", "step": 1, "message": "[/x] careful"},
              {"type": "checkpoint", "step": 1, "path": str(run_dir / "checkpoints" / "[/x]")},
              {"type": "alarm", "step": 1, "kind": "nan_loss", "action": "stop", "message": "[/x] alarm"},
              {"type": "failed", "step": 1, "reason": "[/x] boom [bold]", "traceback": "[/x]\n[/y]"}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps({"time": 1.0 + i, **e}) + "\n"
                                                  for i, e in enumerate(events)))
    app = TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        for key in ("1", "2", "3", "4", "5", "6", "4", "5"):
            await pilot.press(key)
            await settle(pilot)
        assert app.run_view is not None and app.run_view.status == "failed"  # the run opened, its text shown
        app.notify("[/x] a notification with user text")
        await pilot.pause()
        assert app.is_running and app.current_mode == "train"


async def test_a_save_that_fails_is_a_notification_and_the_edits_stay(tmp_path, monkeypatch):
    from tui_helpers import write_project

    from tunedeck.core import project as project_module

    monkeypatch.chdir(tmp_path)
    path = write_project(tmp_path)
    app = TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.edit_setting("lora.r", text="8")
        assert app.session.dirty

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(project_module.os, "fsync", full)
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.is_running and app.session.dirty and app.session.project["lora.r"] == 8
        assert any("the disk is full" in n.message for n in app._notifications)
    assert "r = 8" not in path.read_text()


@pytest.mark.slow
def test_check_of_an_unchanged_project_does_not_build_the_model_again(tmp_path, tiny_model_dir):
    """check refuses what train refuses, targets included; its answer about the targets is
    kept, so a second check does not import torch (see bench/bench_check.py for the speed)."""
    import subprocess
    import sys

    from train_support import write_project

    project = write_project(tmp_path, tiny_model_dir)
    code = ("import sys; from tunedeck.core import cli; code = cli.main(['check', sys.argv[1]] + sys.argv[2:]); "
            "print(code, 'torch' in sys.modules)")
    env = {**os.environ, "TUNEDECK_CACHE_DIR": str(tmp_path / "cache")}

    def check(*sets: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code, str(project), *sets], capture_output=True, text=True,
                             env=env, timeout=300)
        return out.stdout.split()[-2:]

    assert check() == ["0", "True"]  # the first time: the model on the meta device
    assert check() == ["0", "False"]  # unchanged: the kept answer
    assert check("--set", 'lora.target_modules=["nope"]') == ["2", "True"]
    assert check("--set", 'lora.target_modules=["nope"]') == ["2", "False"]  # the refusal is kept too


@pytest.mark.parametrize("make, words", [
    (lambda d: os.mkfifo(d / "data.jsonl"), "not a regular file"),
    (lambda d: (d / "data.jsonl").symlink_to("/dev/zero"), "not a regular file"),
])
def test_a_pipe_or_a_device_as_the_dataset_is_refused_not_read(tmp_path, make, words):
    from tui_helpers import write_project

    path = write_project(tmp_path)
    (tmp_path / "data.jsonl").unlink()
    make(tmp_path)
    code, err = run_cli("check", str(path))
    assert code == 2 and words in err and err.count("\n") == 1


def test_files_are_named_by_the_key_they_came_from(tmp_path):
    from tui_helpers import write_project

    path = write_project(tmp_path)
    code, err = run_cli("check", str(path), "--set", "dataset.eval_split=gone.jsonl")
    assert code == 2 and err.startswith("tunedeck: error: dataset.eval_split = ") and "gone.jsonl" in err
    (tmp_path / "text.gguf").write_text("not a model at all\n")
    code, err = run_cli("check", str(path), "--set", "model.source=text.gguf")
    assert code == 2 and "not a GGUF file" in err and "config.json" not in err


def test_new_refuses_folders_links_and_missing_folders(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    assert run_cli("new", str(tmp_path / "dir.toml"), "--force")[1].count("a folder") == 1
    (tmp_path / "link.toml").symlink_to(tmp_path / "nowhere" / "deep" / "p.toml")
    code, err = run_cli("new", str(tmp_path / "link.toml"))
    assert code == 2 and "symbolic link" in err and not (tmp_path / "nowhere").exists()
    code, err = run_cli("new", str(tmp_path / "missing" / "p.toml"))
    assert code == 2 and "no such folder" in err and not (tmp_path / "missing").exists()


def test_a_run_snapshot_follows_the_umask(tmp_path):
    from tui_helpers import write_project

    from tunedeck.core.rundir import prepare_run

    old = os.umask(0o022)
    try:
        with prepare_run(write_project(tmp_path), [], run_name="r", deep=False) as prepared:
            snapshot = Path(prepared.spec.run_dir) / "project.toml"
            assert snapshot.stat().st_mode & 0o777 == 0o644
            assert Path(prepared.spec.run_dir).stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "tunedeck.core", "inspect", str(tiny_model_dir), "--json",
                             "--layers"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)  # `| head -c 1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.slow
def test_markup_in_a_project_name_and_path_never_stops_a_run(tmp_path, tiny_model_dir):
    """`tunedeck train` printed the project through rich markup: "[/x]" in a name ended the
    command after the trainer had started."""
    import subprocess
    import sys

    from train_support import write_project

    folder = tmp_path / "a[bold]" / "[" / "x]"
    project = write_project(folder, tiny_model_dir, training={"max_steps": 1})
    project.write_text(project.read_text().replace('name = "t"', 'name = "[/x] [bold]"'))
    done = subprocess.run([sys.executable, "-m", "tunedeck.core", "train", str(project), "--run-name", "m"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "MarkupError" not in done.stderr
    assert str(folder / "runs" / "m") in done.stderr


def test_a_bug_in_the_app_ends_it_with_one_line_and_a_crash_log(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "bad_app.py"
    script.write_text(
        "from pathlib import Path\n"
        "import tunedeck.tui.app as app_module\n"
        "class Bad(app_module.TunedeckApp):\n"
        "    CSS_PATH = str(Path(app_module.__file__).with_name('app.tcss'))\n"
        "    def on_ready(self):\n"
        "        raise KeyError('a deliberate bug')\n"
        "app = Bad()\n"
        "app.tune_gc = True  # as run_app sets it: the app owns the process\n"
        "app.run(headless=True)\n")
    env = {**os.environ, "TUNEDECK_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "300"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    err = done.stderr.strip()
    assert err.startswith("tunedeck: internal error: KeyError: 'a deliberate bug'") and "Traceback" not in err, err
    [log] = (tmp_path / "cache" / "crashes").iterdir()
    assert "a deliberate bug" in log.read_text() and "Traceback" in log.read_text()
