"""The Models screen's Hugging Face Hub search and download, driven with Pilot against a
stand-in engine (scripted ``hub_search``, ``hub_plan`` and ``hub_pull`` answers: no network)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Button, DataTable, Input, ProgressBar, Static
from textual.widgets._footer import FooterKey
from tui_helpers import CPU, settle, write_project, write_tiny_model

from tunedeck.core import models
from tunedeck.core.engine import EngineCalls, EngineError
from tunedeck.core.project import Project
from tunedeck.core.units import format_count
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.dialogs import ChoiceScreen, HubPlanDialog
from tunedeck.tui.screens.models import ModelsScreen
from tunedeck.tui.widgets.hub_search import HubDownload, gated_text, hub_size

SIZE = (80, 24)
MiB, GiB = 2**20, 2**30

FOUND = [
    {"id": "Qwen/Qwen2.5-0.5B-Instruct", "downloads": 4_321_000, "likes": 512, "gated": False,
     "license": "apache-2.0", "size": 988 * MiB, "pipeline_tag": "text-generation"},
    {"id": "meta-llama/Llama-3.2-1B-Instruct-with-a-rather-long-name", "downloads": 2_100_000, "likes": 900,
     "gated": "manual", "license": "llama3.2", "size": int(2.3 * GiB), "pipeline_tag": "text-generation"},
    {"id": "someone/no-size", "downloads": 12, "likes": None, "gated": "auto", "license": None, "size": None,
     "pipeline_tag": "text-generation"},
]

PLAN = {"repo": "org/tiny", "kind": "model", "revision": "0123456789abcdef0123", "files": [
    {"name": "config.json", "size": 700}, {"name": "model.safetensors", "size": 4 * MiB},
    {"name": "tokenizer.json", "size": 2 * MiB}], "total": 6 * MiB + 700, "cached": 0, "free": 40 * GiB,
    "skipped": ["pytorch_model.bin"], "source": "org/tiny", "gated": False}


class HubEngine(EngineCalls):
    """A stand-in for the engine's Hub ops. ``hub_pull`` streams each file in 1 MiB pieces;
    with ``hold`` it waits half-way through (``halfway`` set) until ``go`` is set or the
    request is cancelled, and a cancel ends it as the core does: a UserError that says so."""

    def __init__(self, *, found: list[dict[str, Any]] | None = None, error: str = "",
                 plan: dict[str, Any] | None = None, hold: bool = False) -> None:
        self.found = FOUND if found is None else found
        self.error = error
        self.plan = plan or PLAN
        self.hold = hold
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.halfway, self.go, self.cancelled, self.done = (threading.Event() for _ in range(4))

    def call(self, op: str, *, timeout: float | None = None, cancel: threading.Event | None = None,
             **args: Any) -> dict[str, Any]:
        self.calls.append((op, args))
        if self.error:
            raise EngineError(self.error)
        if op == "hub_search":
            return {"models": self.found}
        if op == "hub_plan":
            return dict(self.plan)
        raise EngineError(f"unknown engine request {op!r}")

    def stream(self, op: str, *, on_partial: Any = None, timeout: float | None = None,
               cancel: threading.Event | None = None, **args: Any) -> dict[str, Any]:
        self.calls.append((op, args))
        assert op == "hub_pull"
        cancel = cancel or threading.Event()
        plan, done = self.plan, 0
        files = plan["files"]
        for index, entry in enumerate(files):
            size, got = entry["size"], 0
            while got < size:
                if self.hold and index == 1 and got >= MiB:
                    self.halfway.set()
                    while not (self.go.is_set() or cancel.is_set()):
                        self.go.wait(0.02)
                if cancel.is_set():
                    self.cancelled.set()
                    raise EngineError(f"{plan['repo']}: download cancelled at {entry['name']}; pull again to "
                                      "resume where it stopped")
                step = min(MiB, size - got)
                got, done = got + step, done + step
                on_partial({"file": entry["name"], "file_done": got, "file_total": size, "done": done,
                            "total": plan["total"], "files_done": index, "files_total": len(files)})
        on_partial({"file": None, "file_done": 0, "file_total": 0, "done": plan["total"], "total": plan["total"],
                    "files_done": len(files), "files_total": len(files)})
        self.done.set()
        return {"repo": plan["repo"], "kind": "model", "revision": plan["revision"], "path": "/cache/snap",
                "files": [f["name"] for f in files], "bytes": plan["total"], "source": plan["source"]}

    def close(self, timeout: float = 0.0) -> None:
        pass


@pytest.fixture
def project_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "_scan_hf_cache", lambda: [])
    return write_project(tmp_path)


def make_app(path: Path, engine: HubEngine) -> TunedeckApp:
    return TunedeckApp(Project.load(path), engine=engine, hardware=CPU)  # type: ignore[arg-type]


async def search(pilot, text: str = "qwen") -> ModelsScreen:
    await pilot.press("1")
    await settle(pilot)
    await pilot.press("slash")
    screen = pilot.app.screen
    assert isinstance(screen, ModelsScreen)
    query = screen.query_one("#hub-query", Input)
    assert screen.focused is query
    query.cursor_blink = False
    await pilot.press(*text, "enter")
    await settle(pilot)
    return screen


def text_of(widget: Static) -> str:
    return str(widget.render())


def notes(app: TunedeckApp) -> list[str]:
    return [n.message for n in app._notifications]


def test_sizes_counts_and_gated_in_words():
    assert hub_size(None) == "?" and hub_size(988 * MiB) == "988.0 MiB" and hub_size(int(2.3 * GiB)) == "2.3 GiB"
    assert format_count(4_321_000, spec=".1f") == "4.3M" and format_count(12, spec=".1f") == "12"
    assert format_count(None, spec=".1f") == "?"
    assert [gated_text(g) for g in (False, "auto", "manual", True)] == ["no", "auto", "manual", "yes"]


async def test_search_shows_the_results_and_the_highlighted_one(project_path):
    engine = HubEngine()
    app = make_app(project_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await search(pilot, "qwen")
        assert ("hub_search", {"text": "qwen", "limit": 30}) in engine.calls
        table = screen.query_one("#hub-results", DataTable)
        rows = [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]
        assert rows[0] == ["Qwen/Qwen2.5-0.5B-Instruct", "4.3M", "988.0 MiB", "no", "apache-2.0"]
        assert rows[1][0].endswith("…") and len(rows[1][0]) == 32 and rows[1][2:4] == ["2.3 GiB", "manual"]
        assert rows[2][1:] == ["12", "?", "auto", "?"]
        assert screen.focused is table
        line = text_of(screen.query_one("#hub-line", Static))
        assert "Qwen/Qwen2.5-0.5B-Instruct" in line and "512 likes" in line
        await pilot.press("down")
        line = text_of(screen.query_one("#hub-line", Static))
        assert "gated (manual)" in line
        # every column is readable at 80 columns: the table fits, nothing cut off on the right
        assert table.virtual_size.width <= table.size.width
        assert [k.description for k in screen.query(FooterKey)][:3] == ["Add path", "Rescan", "Hub search"]
        await pilot.press("escape")  # back to the local list
        assert screen.focused is screen.query_one("#models-table", DataTable)
        await pilot.press("slash")  # and the results are still there
        assert table.row_count == 3 and screen.focused is screen.query_one("#hub-query", Input)
        await pilot.press("escape")  # esc from the search field too
        assert screen.focused is screen.query_one("#models-table", DataTable)


async def test_an_engine_error_is_one_notification_and_the_screen_stays_usable(project_path):
    engine = HubEngine(error="search 'qwen': no network (cannot reach https://huggingface.co); check the "
                       "connection or set HF_ENDPOINT")
    app = make_app(project_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await search(pilot, "qwen")
        assert notes(app) == [engine.error]
        line = screen.query_one("#hub-line", Static)
        assert text_of(line) == engine.error and line.has_class("-error")
        engine.error = ""
        query = screen.query_one("#hub-query", Input)
        query.focus()
        await pilot.press("enter")  # the same search again, now answered
        await settle(pilot)
        assert screen.query_one("#hub-results", DataTable).row_count == 3
        assert len(notes(app)) == 1


async def test_enter_on_a_result_shows_the_plan_size_against_free_space(project_path):
    plan = {**PLAN, "total": 50 * GiB, "free": 10 * GiB, "cached": 2 * GiB, "gated": "manual"}
    engine = HubEngine(plan=plan)
    app = make_app(project_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await search(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert engine.calls[-1] == ("hub_plan", {"repo": "Qwen/Qwen2.5-0.5B-Instruct", "revision": None,
                                                 "dataset": False, "allow_pickle": False})
        dialog = app.screen
        assert isinstance(dialog, HubPlanDialog)
        text = " ".join(str(label.render()) for label in dialog.query(".hub-plan-line"))
        assert "3 files, 50.0 GiB (2.0 GiB already in the cache)" in text
        assert "48.0 GiB to fetch · 10.0 GiB free on the cache's disk · not enough space" in text
        assert "left out: pytorch_model.bin (pickle weights" in text
        assert "gated (manual): accept its terms on the Hub page" in text
        files = dialog.query_one("#hub-plan-files", DataTable)
        assert [str(files.get_row_at(i)[0]) for i in range(files.row_count)] == [f["name"] for f in PLAN["files"]]
        assert dialog.query_one("#hub-download", Button).disabled  # too big for the disk
        for widget in dialog.query("Button, DataTable, .hub-plan-line"):  # all of it inside 80x24
            region = widget.region
            assert region.right <= SIZE[0] and region.bottom <= SIZE[1] and region.height > 0, widget
        await pilot.press("escape")
        assert isinstance(app.screen, ModelsScreen)
        assert not any(op == "hub_pull" for op, _ in engine.calls)


@pytest.mark.slow
async def test_download_shows_progress_and_ends_by_listing_the_model(project_path, monkeypatch, tmp_path):
    engine = HubEngine(hold=True)
    snapshot = write_tiny_model(tmp_path / "hub-cache" / "snapshot")
    monkeypatch.setattr(models, "_scan_hf_cache", lambda: [models.describe_dir(snapshot, source="org/tiny",
                                                                                kind="hub")]
                        if engine.done.is_set() else [])
    app = make_app(project_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await search(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, HubPlanDialog)
        await pilot.press("enter")  # Download
        assert await asyncio.to_thread(engine.halfway.wait, 10)
        await pilot.pause(0.2)
        panel = screen.query_one("#hub-pull", HubDownload)
        assert panel.display and screen.pulling == "org/tiny"
        file_bar, total_bar = screen.query_one("#hub-file-bar", ProgressBar), screen.query_one("#hub-total-bar",
                                                                                               ProgressBar)
        assert (file_bar.progress, file_bar.total) == (MiB, 4 * MiB)
        assert (total_bar.progress, total_bar.total) == (MiB + 700, PLAN["total"])
        assert "model.safetensors (4.0 MiB)" in str(screen.query_one("#hub-file-text").render())
        assert "file 2/3" in str(screen.query_one("#hub-total-text").render())
        assert "Cancel download" in [k.description for k in screen.query(FooterKey)]
        assert panel.query_one("#hub-pull-cancel", Button).region.right <= SIZE[0]
        engine.go.set()
        await settle(pilot)
        assert engine.calls[-1][0] == "hub_pull" and engine.calls[-1][1]["revision"] == PLAN["revision"]
        assert not panel.display and screen.pulling is None
        assert any("org/tiny downloaded" in n and "model.source = 'org/tiny'" in n for n in notes(app))
        # the list is read again: the pulled repo is a local model now, the cursor on it
        assert any(info.kind == "hub" and info.source == "org/tiny" for info in screen._infos)
        assert screen._highlighted_info().source == "org/tiny"
        offer = app.screen
        assert isinstance(offer, ChoiceScreen) and "org/tiny" in offer.message
        await pilot.press("enter")  # Use it
        await settle(pilot)
        assert app.session.project["model.source"] == "org/tiny" and app.session.dirty


@pytest.mark.slow
async def test_esc_cancels_the_download_and_says_how_to_resume(project_path):
    engine = HubEngine(hold=True)
    app = make_app(project_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await search(pilot)
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("enter")
        assert await asyncio.to_thread(engine.halfway.wait, 10)
        await pilot.press("escape")
        assert await asyncio.to_thread(engine.cancelled.wait, 10)  # the cancel reached the request
        await settle(pilot)
        assert screen.pulling is None and not screen.query_one("#hub-pull", HubDownload).display
        assert any("download cancelled; pull again to resume" in n for n in notes(app))
        assert not engine.done.is_set()
        assert isinstance(app.screen, ModelsScreen)  # no "use it" offered
        assert "Cancel download" not in [k.description for k in screen.query(FooterKey)]


@pytest.mark.slow
async def test_the_cancel_button_and_the_palette_cancel_too(project_path):
    engine = HubEngine(hold=True)
    app = make_app(project_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await search(pilot)
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("enter")
        assert await asyncio.to_thread(engine.halfway.wait, 10)
        await pilot.pause(0.1)
        await pilot.click("#hub-pull-cancel")
        assert await asyncio.to_thread(engine.cancelled.wait, 10)
        await settle(pilot)
        assert screen.pulling is None
        # again, cancelled from the palette this time
        engine.halfway.clear()
        engine.cancelled.clear()
        screen.query_one("#hub-results", DataTable).focus()
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("enter")
        assert await asyncio.to_thread(engine.halfway.wait, 10)
        await pilot.press("ctrl+p")
        await pilot.press(*"cancel download")
        await pilot.pause(0.5)
        await pilot.press("enter")
        assert await asyncio.to_thread(engine.cancelled.wait, 10)
        await settle(pilot)
        assert screen.pulling is None
        assert sum("download cancelled" in n for n in notes(app)) == 2


def test_the_hub_search_at_80x24(project_path, snap_compare):
    async def run_before(pilot) -> None:
        await search(pilot)

    assert snap_compare(make_app(project_path, HubEngine()), terminal_size=SIZE, run_before=run_before)


@pytest.mark.slow
async def test_a_refused_download_is_one_error_and_another_can_start(project_path):
    engine = HubEngine()
    app = make_app(project_path, engine)

    def no_space(op: str, **args: Any) -> dict[str, Any]:
        engine.calls.append((op, args))
        raise EngineError("org/tiny: 6.0 MiB to download but 1.0 MiB free in /cache; free some space (or set "
                          "HF_HUB_CACHE to a bigger disk)")

    engine.stream = no_space  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        screen = await search(pilot)
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert notes(app) == ["org/tiny: 6.0 MiB to download but 1.0 MiB free in /cache; free some space (or set "
                              "HF_HUB_CACHE to a bigger disk)"]
        assert screen.pulling is None and not screen.query_one("#hub-pull", HubDownload).display
        await pilot.press("enter")  # the plan again: the screen is still usable
        await settle(pilot)
        assert isinstance(app.screen, HubPlanDialog)
