"""The Dataset screen and `tunedeck preview` on tool-calling and multi-source data: tool
calls, tool results, reasoning and the tool schemas told apart (colours and markers in the
app, markers in plain text), each source's share of the mix and the source of the row
shown, `--source`, the stats counted with progress and cancelled when the settings change,
and fields that fit several formats said in one line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Static
from test_tui_dataset import open_dataset
from tui_helpers import CPU, InProcessEngine, settle
from tunedeck.core.commands.preview import PLAIN_NOTATION
from tunedeck.core.engine import EngineError
from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.dataset import DatasetScreen
from tunedeck.tui.widgets.dataset_stats import DatasetStats
from tunedeck.tui.widgets.tokens_view import PART_COLOURS, TRAINED, RowView

SIZE = (100, 30)
TOOL_ROW = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."},
    ],
    "tools": '[{"name": "get_weather", "description": "w", "parameters": {"type": "object", '
             '"properties": {"city": {"type": "string"}}}}]',
}
REASONING_ROW = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                              {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "4"}]}


def chat_row(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}]}


def write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_project(folder: Path, model_dir: Path, path: str, **dataset: Any) -> Path:
    """A project of the bundled model with the tool-calling template; ``path`` as TOML."""
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in dataset.items())
    project = folder / "p.toml"
    project.write_text(f'schema = 1\nname = "tools"\n[model]\nsource = {json.dumps(str(model_dir))}\n'
                       'chat_template = "chatml-tools"\n[quantization]\nmode = "none"\n'
                       f"[dataset]\npath = {path}\neval_split = 0.0\n{extra}", encoding="utf-8")
    return project


@pytest.fixture
def tools_project(tmp_path, monkeypatch, default_model_dir) -> Path:
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "tools.jsonl", [TOOL_ROW])
    return write_project(tmp_path, default_model_dir, '"tools.jsonl"')


@pytest.fixture
def multi_project(tmp_path, monkeypatch, default_model_dir) -> Path:
    """Two sources: one tool row used twice per epoch, and three chat rows (40% and 60%)."""
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "tools.jsonl", [TOOL_ROW])
    write_lines(tmp_path / "chat.jsonl", [chat_row(i) for i in range(1, 4)])
    return write_project(tmp_path, default_model_dir, '[{path = "tools.jsonl", weight = 2}, "chat.jsonl"]')


def make_app(path: Path, engine: Any = None) -> TunedeckApp:
    return TunedeckApp(Project.load(path), engine=engine or InProcessEngine(), hardware=CPU)


def text_of(screen: DatasetScreen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


def styled(text) -> list[tuple[str, str]]:
    """(text, style) of each span of a rich Text."""
    return [(text.plain[s.start:s.end], str(s.style)) for s in text.spans]


# -- parts told apart in the app ---------------------------------------------------------------


@pytest.mark.slow
async def test_tool_calls_results_and_schemas_are_told_apart(tools_project):
    app = make_app(tools_project)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        view = screen.query_one(RowView)
        row = view.row
        assert row["error"] is None and row["format"] == "sharegpt"
        parts = {t["part"] for t in row["tokens"]}
        assert {"tools", "user", "tool_call", "tool_result", "assistant"} <= parts
        text = view.content()
        plain = text.plain
        # a marker where each marked part starts, in the order the row has them
        assert plain.index("⟨tools⟩") < plain.index("⟨tool call⟩") < plain.index("⟨tool result⟩")
        spans = styled(text)
        assert ("⟨tool call⟩", f"bold {PART_COLOURS['tool_call']}") in spans
        by_part: dict[tuple[str, bool], set[str]] = {}
        for token in row["tokens"]:
            by_part.setdefault((token["part"], token["trained"]), set()).add(token["text"])
        # the call trains (filled with its colour), the answer trains (green), the result and the
        # tool schemas are masked (dimmed in their colours): trained and masked stay apart
        call_style = f"bold black on {PART_COLOURS['tool_call']}"
        assert any(piece == "get" and style == call_style for piece, style in spans)
        assert any(piece == "·degrees" and style == TRAINED for piece, style in spans)
        assert any(piece == "temp" and style == f"dim {PART_COLOURS['tool_result']}" for piece, style in spans)
        assert any(piece == "description" and style == f"dim {PART_COLOURS['tools']}" for piece, style in spans)
        assert ("tool_result", True) not in by_part and ("tools", True) not in by_part
        legend = screen.query_one("#dataset-legend", Static).render()
        assert "⟨tool call⟩ ⟨tool result⟩ ⟨tools⟩" in str(legend) and "⟨reasoning⟩" not in str(legend)
        await pilot.press("v")  # the templated text: the same markers and colours
        text = view.content()
        assert "⟨tool call⟩<|im_start|>assistant\n<tool_call>" in text.plain
        call = "".join(piece for piece, style in styled(text) if style == call_style)
        assert call == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


@pytest.mark.slow
async def test_reasoning_is_marked_and_a_plain_row_has_no_markers(tmp_path, monkeypatch, default_model_dir):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "r.jsonl", [REASONING_ROW, chat_row(1)])
    app = make_app(write_project(tmp_path, default_model_dir, '"r.jsonl"'))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        view = screen.query_one(RowView)
        text = view.content()
        assert "⟨reasoning⟩ " in text.plain
        assert any(piece == "·four" and style == f"bold black on {PART_COLOURS['reasoning']}"
                   for piece, style in styled(text))
        assert "⟨reasoning⟩" in str(screen.query_one("#dataset-legend", Static).render())
        await pilot.press("n")
        await settle(pilot)
        assert view.row["row"] == 2
        assert "⟨" not in view.content().plain and "⟨" not in str(screen.query_one("#dataset-legend", Static)
                                                                    .render())


# -- sources -------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_each_source_shows_its_share_and_the_row_its_source(multi_project):
    app = make_app(multi_project)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        stats = screen.query_one(DatasetStats)
        assert [(s["rows"], s["share"]) for s in stats.stats["sources"]] == [(1, 0.4), (3, 0.6)]
        lines = text_of(screen, "#stats-lines").splitlines()
        first, second = lines.index("▸1 tools.jsonl ×2"), lines.index(" 2 chat.jsonl")
        assert "40.0% · 1 row" in lines[first + 1] and "60.0% · 3 rows" in lines[second + 1]
        status = text_of(screen, "#dataset-status")
        assert status.startswith("row 1 of tools.jsonl (#1 of 4, sharegpt)")
        await pilot.press("n")
        await settle(pilot)
        assert text_of(screen, "#dataset-status").startswith("row 1 of chat.jsonl (#2 of 4, messages)")
        lines = text_of(screen, "#stats-lines").splitlines()
        assert " 1 tools.jsonl ×2" in lines and "▸2 chat.jsonl" in lines
        # go to row 3 of the second source; a bare number counts in the source shown
        await pilot.press("g", "2", ":", "3", "enter")
        await settle(pilot)
        row = screen.query_one(RowView).row
        assert (row["source"]["index"], row["row"], row["messages"][0]["content"]) == (1, 3, "Hi 3")
        await pilot.press("g", "1", "enter")
        await settle(pilot)
        assert screen.query_one(RowView).row["messages"][0]["content"] == "Hi 1"
        await pilot.press("g", "3", ":", "1", "enter")
        await settle(pilot)
        assert screen.query_one(RowView).row["messages"][0]["content"] == "Hi 1"  # stays
        assert any(str(n.message) == "there is no source 3 (the project has 2)" for n in app._notifications)


# -- the stats stream in --------------------------------------------------------------------------


class HeldStatsEngine(InProcessEngine):
    """The in-process engine whose stats stream sends a first count (12 rows so far) and then
    holds until ``go`` is set or the request is cancelled (cancelled: the engine's error)."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.cancels: list[threading.Event] = []

    def stream(self, op: str, *, on_partial: Any = None, timeout: float | None = None,
               cancel: threading.Event | None = None, **args: Any) -> dict[str, Any]:
        result = super().stream(op, on_partial=None, timeout=timeout, cancel=cancel, **args)
        cancel = cancel or threading.Event()
        self.cancels.append(cancel)
        on_partial({**result, "rows": 12, "done": False})
        while not (self.go.is_set() or cancel.is_set()):
            self.go.wait(0.05)
        if cancel.is_set():
            raise EngineError(f"engine request {op!r} cancelled")
        return result


async def wait_for(pilot, check, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await pilot.pause(0.05)


@pytest.mark.slow
async def test_stats_show_the_count_so_far_and_a_settings_change_cancels_it(multi_project):
    engine = HeldStatsEngine()
    app = make_app(multi_project, engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        screen = app.screen
        stats = screen.query_one(DatasetStats)
        await wait_for(pilot, lambda: "reading… 12 rows so far" in text_of(screen, "#stats-lines")
                       and screen.query_one(RowView).row is not None)
        assert stats.stats is None and stats.partial["rows"] == 12
        assert " of 4" not in text_of(screen, "#dataset-status")  # no total before the count ends
        app.edit_setting("dataset.max_length", value=64)  # the data is read again: the count restarts
        await wait_for(pilot, lambda: len(engine.cancels) == 2)
        assert engine.cancels[0].is_set() and not engine.cancels[1].is_set()
        engine.go.set()
        await wait_for(pilot, lambda: stats.stats is not None)
        assert stats.stats["done"] and stats.stats["max_length"] == 64 and stats.partial is None
        assert "reading…" not in text_of(screen, "#stats-lines")
        await wait_for(pilot, lambda: "(#1 of 4, sharegpt)" in text_of(screen, "#dataset-status"))


@pytest.mark.slow
async def test_fields_that_fit_several_formats_are_said_with_the_key_that_maps_them(tmp_path, monkeypatch,
                                                                                    default_model_dir):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "both.jsonl", [{**chat_row(1), "text": "a document"}])
    app = make_app(write_project(tmp_path, default_model_dir, '"both.jsonl"'))
    async with app.run_test(size=SIZE) as pilot:
        await open_dataset(pilot)
        said = [str(n.message) for n in app._notifications]
        assert ("both.jsonl: the fields fit several formats (messages, text); read as messages. Press m to choose "
                "the format and its columns") in said


# -- `tunedeck preview` ------------------------------------------------------------------------------


def preview(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run([sys.executable, "-m", "tunedeck.core", "preview", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


@pytest.mark.slow
def test_cli_plain_text_marks_tool_calls_results_and_schemas(tools_project):
    proc = preview(str(tools_project))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b[" not in out
    notation = " ".join(out.split("row 1 (sharegpt)")[0].split())
    assert notation == " ".join(PLAIN_NOTATION.split()) and "⟨tool call⟩" in notation
    text = out.split("templated text (trained tokens in «…»):\n", 1)[1].split("\ntokens: ", 1)[0]
    assert text.startswith("⟨tools⟩<|im_start|>system")
    assert "<|im_end|>\n⟨/tools⟩<|im_start|>user" in text
    # the call is trained («…» inside its markers), the result is not
    assert "⟨tool call⟩<|im_start|>assistant\n«<tool_call>" in text
    assert "</tool_call><|im_end|>»\n⟨/tool call⟩⟨tool result⟩<|im_start|>tool" in text
    assert "</tool_response><|im_end|>\n⟨/tool result⟩<|im_start|>assistant\n«It is 21 degrees.<|im_end|>»" in text
    tokens = " ".join(out.split("\ntokens: ", 1)[1].split("the whole set:")[0].split())
    assert "⟨tool call⟩ (<|im_start|>) (ass) (istant) (↵) [<] [tool] [_] [call] [>]" in tokens
    assert "[<|im_end|>] (↵) ⟨/tool call⟩ ⟨tool result⟩ (<|im_start|>) (tool)" in tokens


@pytest.mark.slow
def test_cli_source_picks_the_source_a_row_is_counted_in(multi_project):
    proc = preview(str(multi_project), "--source", "2", "--row", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    row = report["row"]
    assert row["source"]["index"] == 1 and row["source"]["path"] == "chat.jsonl" and row["sources"] == 2
    assert row["row"] == 3 and row["messages"][0]["content"] == "Hi 3"
    assert all(t["part"] in ("user", "assistant", "template") for t in row["tokens"])
    assert [s["share"] for s in report["stats"]["sources"]] == [0.4, 0.6]
    proc = preview(str(multi_project), "--source", "2")  # its first row
    assert proc.returncode == 0, proc.stderr
    assert "row 1 of source 2, chat.jsonl (messages)" in proc.stdout and "Hi 1" in proc.stdout
    assert "⟨" not in proc.stdout.split("templated text (trained", 1)[1].split("the whole set:")[0]


@pytest.mark.parametrize("args, message", [
    (["--source", "3"], "--source 3: the project has 2 sources; sources are numbered from 1"),
    (["--source", "0", "--row", "1"], "--source 0: the project has 2 sources"),
    pytest.param(["--source", "1", "--row", "9"], "--row 9: tools.jsonl has no row 9", marks=pytest.mark.slow),
])
def test_cli_a_missing_source_or_row_is_one_line(multi_project, args, message):
    proc = preview(str(multi_project), *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tunedeck: error: ") and message in proc.stderr and proc.stderr.count("\n") == 1
