"""The Models screen's Hugging Face Hub widgets: a search (a field, the models found, one
line about the highlighted one) and a download's progress (the current file and the whole
download, each a progress bar, and a Cancel button).

Presentation only: the screen asks the engine (``hub_search``, ``hub_plan``, stream
``hub_pull``) from worker threads and hands the answers here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, Static

from tunedeck.core.units import format_bytes, format_count

ID_WIDTH = 32
LICENSE_WIDTH = 12
HUB_COLUMNS = (("model", "id"), ("downloads", "downloads"), ("size", "size"), ("gated", "gated"),
               ("license", "license"))
SEARCH_HELP = "type part of a model's name, enter searches the Hub · enter on a result shows what it would fetch · esc back"


def hub_size(size: int | None) -> str:
    """The Hub's sizes: GiB from 1 GiB up, else MiB, else whole KiB; "?" when the Hub does not say."""
    return format_bytes(size, smallest="KiB", specs={"KiB": ".0f"})


def gated_text(gated: object) -> str:
    """The Hub's gated state in a word: no, auto (access granted on asking) or manual (reviewed)."""
    return str(gated) if gated in ("auto", "manual") else ("yes" if gated else "no")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class HubSearch(Vertical):
    """A search field, the models found (id, downloads, size, gated, license) and a line on
    the highlighted one. Enter in the field posts :class:`Search`, enter on a model
    :class:`Chosen`."""

    DEFAULT_CSS = """
    HubSearch {
        height: 1fr;
        #hub-query { margin: 0 1; }
        #hub-results { height: 1fr; }
        #hub-line { height: auto; padding: 0 1; color: $text-muted; }
        #hub-line.-error { color: $text-error; }
    }
    """

    @dataclass
    class Search(Message):
        """Search the Hub for ``text``."""

        text: str

    @dataclass
    class Chosen(Message):
        """A model of the results was chosen (enter on it): one of ``hub_search``'s dicts."""

        model: dict[str, Any]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.results: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search the Hugging Face Hub (e.g. Qwen2.5-0.5B) · enter searches", id="hub-query",
                    compact=True)
        table: DataTable[Any] = DataTable(cursor_type="row", zebra_stripes=True, id="hub-results")
        for label, key in HUB_COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static(SEARCH_HELP, id="hub-line", markup=False)

    def focus_query(self) -> None:
        query = self.query_one("#hub-query", Input)
        query.focus()
        query.select_all()

    @on(Input.Submitted, "#hub-query")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if not text:
            self.show_line("type part of a model's name to search, e.g. Qwen2.5-0.5B", error=True)
            return
        self.show_line(f"searching the Hub for {text!r}…")
        self.post_message(self.Search(text))

    def show_line(self, text: str, *, error: bool = False) -> None:
        line = self.query_one("#hub-line", Static)
        line.update(Text(text))
        line.set_class(error, "-error")

    def show_results(self, text: str, models: list[dict[str, Any]]) -> None:
        """The models found for ``text``, most downloaded first; the cursor on the first."""
        self.results = list(models)
        table = self.query_one("#hub-results", DataTable)
        table.clear()
        for index, model in enumerate(self.results):
            gated = gated_text(model.get("gated"))
            table.add_row(
                Text(_clip(str(model.get("id", "?")), ID_WIDTH)),
                Text(format_count(model.get("downloads"), spec=".1f"), justify="right"),
                Text(hub_size(model.get("size")), justify="right"),
                Text(gated, style="" if gated == "no" else "yellow"),
                Text(_clip(model.get("license") or "?", LICENSE_WIDTH)),
                key=str(index),
            )
        if not self.results:
            self.show_line(f"no text-generation model on the Hub matches {text!r}")
            return
        table.move_cursor(row=0)
        table.focus()
        self._describe(0)

    @on(DataTable.RowHighlighted, "#hub-results")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self._describe(event.cursor_row)

    def _describe(self, row: int) -> None:
        if not 0 <= row < len(self.results):
            return
        model = self.results[row]
        likes = model.get("likes")
        parts = [str(model.get("id", "?")), f"{format_count(model.get('downloads'), spec='.1f')} downloads"]
        if likes is not None:
            parts.append(f"{format_count(likes, spec='.1f')} likes")
        parts += [f"weights {hub_size(model.get('size'))}", f"license {model.get('license') or 'not given'}"]
        gated = gated_text(model.get("gated"))
        if gated != "no":
            parts.append(f"gated ({gated}): accept its terms on the Hub page first")
        self.show_line(" · ".join(parts) + " · enter: what a download fetches")

    @on(DataTable.RowSelected, "#hub-results")
    def _selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if 0 <= event.cursor_row < len(self.results):
            self.post_message(self.Chosen(self.results[event.cursor_row]))


class HubDownload(Vertical):
    """A download going: what it is fetching, a bar for the current file and one for the
    whole download, and Cancel (posts :class:`CancelPressed`)."""

    DEFAULT_CSS = """
    HubDownload {
        height: auto;
        padding: 0 1;
        border-top: solid $primary;
        background: $surface;
        #hub-pull-line { height: 1; }
        .hub-bar-row { height: 1; }
        .hub-bar-label { width: 7; color: $text-muted; }
        .hub-bar-row ProgressBar { width: auto; }
        .hub-bar-row Bar { width: 24; }
        .hub-bar-text { width: 1fr; padding-left: 1; color: $text-muted; }
        #hub-pull-cancel { height: 1; min-width: 10; border: none; margin-left: 1; }
    }
    """

    class CancelPressed(Message):
        """The Cancel button was pressed."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.repo = ""

    def compose(self) -> ComposeResult:
        yield Label("", id="hub-pull-line", markup=False)
        with Horizontal(classes="hub-bar-row"):
            yield Label("file", classes="hub-bar-label")
            yield ProgressBar(show_eta=False, id="hub-file-bar")
            yield Label("", id="hub-file-text", classes="hub-bar-text", markup=False)
        with Horizontal(classes="hub-bar-row"):
            yield Label("total", classes="hub-bar-label")
            yield ProgressBar(show_eta=False, id="hub-total-bar")
            yield Label("", id="hub-total-text", classes="hub-bar-text", markup=False)
            yield Button("Cancel", id="hub-pull-cancel", compact=True)

    def start(self, repo: str, total: int, files: int) -> None:
        """A new download of ``repo``: ``total`` bytes in ``files`` files, nothing yet."""
        self.repo = repo
        self.query_one("#hub-pull-line", Label).update(
            f"downloading {repo} ({hub_size(total)}, {files} files) · esc cancels")
        self.query_one("#hub-file-bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#hub-total-bar", ProgressBar).update(total=max(total, 1), progress=0)
        self.query_one("#hub-file-text", Label).update("starting…")
        self.query_one("#hub-total-text", Label).update(f"0 of {hub_size(total)}")

    def progress(self, partial: dict[str, Any]) -> None:
        """One of ``hub_pull``'s progress dicts."""
        file_total, total = int(partial.get("file_total") or 0), int(partial.get("total") or 0)
        file_bar, total_bar = self.query_one("#hub-file-bar", ProgressBar), self.query_one("#hub-total-bar",
                                                                                           ProgressBar)
        name = partial.get("file")
        if name:
            file_bar.update(total=max(file_total, 1), progress=min(int(partial.get("file_done") or 0),
                                                                   max(file_total, 1)))
            self.query_one("#hub-file-text", Label).update(
                f"{_clip(str(name), 28)} ({hub_size(file_total)})")
        else:
            file_bar.update(total=1, progress=1)
            self.query_one("#hub-file-text", Label).update("all files fetched")
        total_bar.update(total=max(total, 1), progress=min(int(partial.get("done") or 0), max(total, 1)))
        self.query_one("#hub-total-text", Label).update(
            f"{hub_size(int(partial.get('done') or 0))} of {hub_size(total)} · file "
            f"{min(int(partial.get('files_done') or 0) + (1 if name else 0), int(partial.get('files_total') or 0))}"
            f"/{partial.get('files_total', '?')}")

    def stopping(self) -> None:
        self.query_one("#hub-pull-line", Label).update(f"cancelling the download of {self.repo}…")
        self.query_one("#hub-pull-cancel", Button).disabled = True

    @on(Button.Pressed, "#hub-pull-cancel")
    def _cancel(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.CancelPressed())
