"""Exporting a run as GGUF from the app: ``e`` on the Train screen's runs list opens the
dialog, the choice reaches the engine's ``export`` op, its progress and its end are
notifications (one per stage, not one per tensor), a refusal is one line, a cancel stops
it; the palette's "Export run: NAME" and "Cancel export". A stand-in engine plays the op."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Button, Checkbox, Input, OptionList
from tui_helpers import CPU, InProcessEngine, settle, write_project, write_run

from tunedeck.core.engine import EngineCalls, EngineError
from tunedeck.core.project import Project
from tunedeck.core.runs import run_info
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.commands import TunedeckCommands
from tunedeck.tui.exporting import (
    EXPORT_QUANTS, QUANT_NAMES, ExportChoice, ProgressNotes, done_text, export_refusal,
)
from tunedeck.tui.screens.dialogs import ExportDialog
from tunedeck.tui.widgets.runs_list import RunsList

STAGES = ("merge", "convert", "write")
TENSORS = 40


class ExportEngine(EngineCalls):
    """A stand-in engine with the ``export`` op: many partials a stage (one per tensor),
    then the result dict of :func:`tunedeck.core.export.export_run`. ``error`` makes it
    refuse as the engine does (an EngineError, one line); ``hold`` stops it after its first
    partial until the request is cancelled (then "export cancelled", as the op says)."""

    def __init__(self, *, error: str | None = None, hold: bool = False) -> None:
        self.requests: list[dict[str, Any]] = []
        self.error = error
        self.hold = hold
        self.started = threading.Event()

    def call(self, op: str, *, timeout: float | None = None, cancel: threading.Event | None = None,
             **args: Any) -> dict[str, Any]:
        raise EngineError(f"unknown engine request {op!r}")

    def stream(self, op: str, *, on_partial: Any = None, timeout: float | None = None,
               cancel: threading.Event | None = None, **args: Any) -> dict[str, Any]:
        if op != "export":
            raise EngineError(f"unknown engine request {op!r}")
        self.requests.append(args)
        self.started.set()
        if self.error:
            raise EngineError(self.error)
        cancel = cancel or threading.Event()
        emit = on_partial or (lambda partial: None)
        for stage in STAGES:
            for done in range(TENSORS):
                emit({"stage": stage, "message": f"{stage} {Path(args['run']).name}", "done": done,
                      "total": TENSORS})
                if self.hold:
                    cancel.wait(30)
                if cancel.is_set():
                    raise EngineError("export cancelled")
        emit({"stage": "done", "message": "done", "done": 0, "total": 0})
        name, quant, out = Path(args["run"]).name, args["quant"], Path(args["out"])
        gguf = out / f"{name}-{quant}.gguf"
        return {"out": str(out), "gguf": str(gguf), "modelfile": str(out / "Modelfile"),
                "lora": str(out / f"{name}-lora-f16.gguf") if args["lora"] else None, "quant": quant,
                "arch": "llama", "size": 3 * 2**20 + 2**19,
                "commands": [f"ollama create {name} -f {out / 'Modelfile'}", f"llama-cli -m {gguf}"]}

    def close(self, timeout: float = 0.0) -> None:
        pass


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """The app's small project with a finished run, a stopped one, and one without an adapter."""
    monkeypatch.chdir(tmp_path)
    path = write_project(tmp_path)
    runs = tmp_path / "runs"
    write_run(runs, "tuned", started=1_700_000_300)
    write_run(runs, "early", status="stopped", started=1_700_000_200)
    write_run(runs, "oom", status="failed", adapter=False, loss=None, started=1_700_000_100)
    return path


def notes(app: TunedeckApp) -> list[Any]:
    return [n for n in app._notifications if n.title == "Export"]


async def until(pilot, check, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await pilot.pause(0.05)


async def runs_list_on(pilot, name: str) -> RunsList:
    """The Train screen, its runs list focused with ``name`` highlighted."""
    await pilot.press("5")
    await settle(pilot)
    runs = pilot.app.screen.query_one("#runs", RunsList)
    runs.focus()
    runs.highlighted = [info.name for info in runs.runs].index(name)
    await pilot.pause()
    return runs


async def test_e_opens_the_dialog_and_q8_0_goes_to_the_engine_with_the_default_folder(project):
    engine = ExportEngine()
    app = TunedeckApp(Project.load(project), engine=engine, hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        await runs_list_on(pilot, "tuned")
        await pilot.press("e")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, ExportDialog)
        assert dialog.query_one("#export-out", Input).value == "runs/tuned/gguf"
        quants = dialog.query_one("#export-quant", OptionList)
        assert quants.has_focus and quants.highlighted_option.id == "f16"
        await pilot.press(*["down"] * QUANT_NAMES.index("q8_0"))
        await pilot.press("enter")
        await settle(pilot)
        assert not isinstance(app.screen, ExportDialog)
        run_dir = project.parent / "runs" / "tuned"
        assert engine.requests == [{"run": str(run_dir), "out": str(run_dir / "gguf"), "quant": "q8_0",
                                    "lora": False, "cpu": False, "project_path": None}]
        shown = [n.message for n in notes(app)]
        # the start, the first partial of each stage (not one per tensor: 3 x 40 were sent), the end
        assert len(shown) == 2 + len(STAGES), shown
        assert shown[0].startswith("exporting tuned as q8_0 GGUF into runs/tuned/gguf")
        assert [m.split(" · ")[0] for m in shown[1:-1]] == [f"{stage} tuned" for stage in STAGES]
        end = shown[-1]
        assert end.startswith("tuned exported: runs/tuned/gguf/tuned-q8_0.gguf (3.5 MiB, q8_0)")
        assert f"Ollama: ollama create tuned -f {run_dir / 'gguf' / 'Modelfile'}" in end
        assert all(n.severity == "information" for n in notes(app))
        assert app.exporting is None


async def test_the_dialog_s_folder_and_lora_reach_the_engine_and_esc_cancels(project, tmp_path):
    engine = ExportEngine()
    app = TunedeckApp(Project.load(project), engine=engine, hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        await runs_list_on(pilot, "early")  # stopped early: its adapter was saved too
        await pilot.press("e")
        await pilot.pause()
        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, ExportDialog) and engine.requests == []
        await pilot.press("e")
        await pilot.pause()
        dialog = app.screen
        dialog.query_one("#export-out", Input).value = "~/elsewhere"
        box = dialog.query_one("#export-lora", Checkbox)
        box.focus()
        await pilot.press("space")
        assert box.value
        await pilot.press("ctrl+s")
        await settle(pilot)
        [request] = engine.requests
        assert request["out"] == str(Path("~/elsewhere").expanduser()) and request["lora"] is True
        assert request["quant"] == "f16"
        assert "the adapter as a GGUF LoRA: " in notes(app)[-1].message


async def test_a_run_without_an_adapter_is_a_notification_not_a_dialog(project):
    engine = ExportEngine()
    app = TunedeckApp(Project.load(project), engine=engine, hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        await runs_list_on(pilot, "oom")
        await pilot.press("e")
        await settle(pilot)
        assert not isinstance(app.screen, ExportDialog)
        [note] = notes(app)
        assert note.message.startswith("oom failed: only a finished or stopped run") and note.severity == "warning"
        assert engine.requests == []


async def test_an_engine_refusal_is_one_error_notification(project):
    engine = ExportEngine(error="tuned: gpt-oss models cannot be converted to GGUF here (no llama.cpp mapping)")
    app = TunedeckApp(Project.load(project), engine=engine, hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.export_run(str(project.parent / "runs" / "tuned"), quant="q4_0")
        await settle(pilot)
        errors = [n for n in app._notifications if n.severity == "error"]
        assert [n.message for n in errors] == [engine.error]
        assert errors[0].title == "Export"
        assert not any("Traceback" in n.message for n in app._notifications)
        assert app.exporting is None


@pytest.mark.slow
async def test_cancel_export_from_the_palette_and_one_export_at_a_time(project):
    engine = ExportEngine(hold=True)
    app = TunedeckApp(Project.load(project), engine=engine, hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        names = [name for name, _, _ in TunedeckCommands(app.screen).commands()]
        assert "Cancel export" not in names
        app.export_run(str(project.parent / "runs" / "tuned"))
        await until(pilot, lambda: engine.started.is_set() and app.exporting == "tuned")
        names = [name for name, _, _ in TunedeckCommands(app.screen).commands()]
        assert "Cancel export" in names
        # a second export is refused while the first goes; so is the dialog
        app.export_run(str(project.parent / "runs" / "early"))
        await until(pilot, lambda: any("one export at a time" in n.message for n in notes(app)))
        app.export_dialog(run_info(project.parent / "runs" / "early"))
        await pilot.pause()
        assert not isinstance(app.screen, ExportDialog)
        assert len(engine.requests) == 1
        await pilot.press("ctrl+p", *"Cancel export")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: app.exporting is None)
        await settle(pilot)
        assert any(n.message == "tuned: export cancelled; nothing half-written is left" and n.severity == "warning"
                   for n in notes(app))
        assert not any(n.severity == "error" for n in app._notifications)
        assert "Cancel export" not in [name for name, _, _ in TunedeckCommands(app.screen).commands()]


async def test_the_palette_lists_export_run_per_exportable_run_and_opens_the_dialog(project):
    app = TunedeckApp(Project.load(project), engine=ExportEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        names = [name for name, _, _ in TunedeckCommands(app.screen).commands()]
        assert [n for n in names if n.startswith("Export run: ")] == ["Export run: tuned", "Export run: early"]
        await pilot.press("ctrl+p", *"Export run: tuned")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ExportDialog) and app.screen.run_name == "tuned"


@pytest.mark.parametrize("size", [(80, 24), (100, 30), (120, 40)])
async def test_the_dialog_fits(project, size):
    """Every control of the dialog, the Export and Cancel buttons included, and every
    quantization lie inside the dialog's box, and the box inside the terminal."""
    app = TunedeckApp(Project.load(project), engine=ExportEngine(), hardware=CPU)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        app.export_dialog(run_info(project.parent / "runs" / "tuned"))
        await pilot.pause()
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, ExportDialog)
        box = dialog.query_one(".dialog")
        screen = dialog.region

        def inside(inner, outer) -> bool:
            return (inner.x >= outer.x and inner.y >= outer.y and inner.right <= outer.right
                    and inner.bottom <= outer.bottom and inner.width > 0 and inner.height > 0)

        assert inside(box.region, screen), box.region
        buttons = {str(b.id) for b in dialog.query(Button)}
        assert buttons == {"export", "cancel"}
        for widget in [w for w in dialog.query("*") if w.can_focus]:
            assert inside(widget.region, box.content_region), (widget, widget.region, box.content_region)
        quants = dialog.query_one("#export-quant", OptionList)
        assert quants.option_count == len(EXPORT_QUANTS)
        assert quants.max_scroll_y == 0  # every quantization shows, none scrolled away
        assert all(label.region.height > 0 for label in dialog.query(".dialog-help, .export-note"))


def test_the_quantizations_offered_are_the_engine_s_less_the_k_quants():
    assert QUANT_NAMES[:4] == ("f16", "bf16", "f32", "q8_0")
    assert {"q4_0", "q4_1", "q5_0", "q5_1"} <= set(QUANT_NAMES)
    assert not any("_k" in name for name in QUANT_NAMES)
    try:
        from tunedeck.core import export
    except ImportError:
        return  # the core side is not in this tree yet
    quants = getattr(export, "QUANTS", None)
    if quants is not None:
        assert set(QUANT_NAMES) == {name for name in quants if "_k" not in name}


def test_progress_notes_one_per_stage_then_every_two_seconds():
    clock = [0.0]
    pick = ProgressNotes(clock=lambda: clock[0])
    shown = []
    for stage in ("merge", "convert"):
        for done in range(40):
            clock[0] += 0.125  # 5 s a stage
            text = pick({"stage": stage, "message": stage, "done": done, "total": 40})
            if text is not None:
                shown.append(text)
    assert pick({"stage": "done", "message": "done", "done": 0, "total": 0}) is None
    assert shown == ["merge · 0%", "merge · 40%", "merge · 80%", "convert · 0%", "convert · 40%", "convert · 80%"]
    assert ProgressNotes()({"stage": "write", "message": "writing x.gguf", "done": 0, "total": 0}) == "writing x.gguf"


def test_the_end_names_the_file_its_size_and_the_ollama_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = done_text("tuned", {"gguf": str(tmp_path / "out" / "tuned-f16.gguf"), "size": 3 * 2**30, "quant": "f16",
                               "lora": None, "commands": ["ollama create tuned -f out/Modelfile", "llama-cli"]})
    assert text == "tuned exported: out/tuned-f16.gguf (3.0 GiB, f16)\nOllama: ollama create tuned -f out/Modelfile"


def test_which_runs_can_be_exported(tmp_path):
    runs = tmp_path / "runs"
    for name, status, adapter in (("done", "finished", True), ("early", "stopped", True),
                                  ("bare", "finished", False), ("oom", "failed", False), ("going", "running", False)):
        write_run(runs, name, status=status, adapter=adapter)
    refusals = {name: export_refusal(run_info(runs / name)) for name in ("done", "early", "bare", "oom", "going")}
    assert refusals["done"] is None and refusals["early"] is None
    assert "has no adapter" in refusals["bare"]
    assert refusals["oom"].startswith("oom failed:")
    assert refusals["going"].startswith("going is running: export it once it has finished")
    assert ExportChoice() == ExportChoice("f16", None, False)


@pytest.mark.slow
async def test_a_real_run_exported_from_the_screen_through_the_engine_op(tiny_model_dir, tmp_path, monkeypatch):
    """The engine's own ``export`` op (run in-process) on a real run of the tiny model: the
    dialog's choice reaches it, the GGUF file is written, a few notifications tell it."""
    from train_support import counting_rows, sharpened_copy, train_inprocess
    from train_support import write_project as write_train_project

    monkeypatch.chdir(tmp_path)
    model = sharpened_copy(tiny_model_dir, tmp_path / "sharp")
    path = write_train_project(tmp_path, model, counting_rows(), training={"max_steps": 2})
    code, events, run_dir = train_inprocess(path, run_name="real")
    assert code == 0, events[-1]
    app = TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        await runs_list_on(pilot, "real")
        await pilot.press("e")
        await pilot.pause()
        await pilot.press(*["down"] * QUANT_NAMES.index("q8_0"), "enter")
        await until(pilot, lambda: app.exporting is None and any("exported" in n.message for n in notes(app)),
                    timeout=300)
        await settle(pilot)
        assert (run_dir / "gguf" / "real-q8_0.gguf").is_file() and (run_dir / "gguf" / "Modelfile").is_file()
        shown = [n.message for n in notes(app)]
        assert not any(n.severity == "error" for n in app._notifications), shown
        assert len(shown) < 15, shown  # the stages, not one a tensor
        assert any(m.startswith("converting ") for m in shown)
        assert "Ollama: ollama create real -f " in shown[-1]


def test_the_ui_side_of_export_imports_nothing_heavy():
    code = ("import sys; import tunedeck.tui.app, tunedeck.tui.exporting, tunedeck.tui.commands, "
            "tunedeck.tui.screens.dialogs, tunedeck.tui.screens.train; "
            "print([m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'gguf') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
