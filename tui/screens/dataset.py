"""The Dataset screen: what the trainer learns from, row by row and token by token.

The engine reads and renders the rows (:mod:`tunedeck.core.preview`, the trainer's own
render-and-mask, so the highlighted tokens are the trained labels). A legend says which
style is which; rows held out for evaluation (``dataset.eval_split``, split as the trainer
splits it) are marked; a search highlights its matches and says which match of how many
the row is. A row shows as its
tokens (trained highlighted, masked dimmed, special tokens visible, the truncation point
marked; tool calls, tool results, reasoning and the tool schemas each in their colour,
marked where they start), its templated text, or its raw fields. The first row shows as
soon as it is rendered; the whole set's stats (rows, skipped rows and why, a token length
histogram, truncation, the share of tokens trained, each source's share of the mix)
stream in from a second request, the count so far shown as it runs. Changing the dataset
or model settings on the Settings screen reads the data again (a count still running is
cancelled). ``m`` maps the file's columns to a format's fields (:mod:`.column_map`), which
the screen offers when the format cannot be told or the fields fit several formats.
A preference (DPO, ORPO) project's rows are pairs: the prompt once, the chosen and the
rejected answer side by side (stacked in a narrow terminal), and the stats compare the
answers' lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Static
from textual.worker import Worker, get_current_worker

from ..widgets.dataset_stats import DatasetStats
from ..widgets.keys_ahead import KeysAhead, bound_to
from ..widgets.tokens_view import SIDES, VIEWS, RowView, legend, row_parts
from .base import ProjectScreen

READING = "reading the first row… (the first time, the engine process starts and loads the tokenizer)"
# the settings the preview depends on
KEYS = ("model.source", "model.trust_remote_code", "model.allow_pickle", "model.chat_template", "dataset.path",
        "dataset.format", "dataset.columns", "dataset.system_prompt", "dataset.eval_split", "dataset.max_length",
        "dataset.loss_on", "dataset.reasoning", "training.method")

PreviewKey = tuple[Any, ...]


def pair_state(row: dict[str, Any]) -> str:
    """A preference pair in the row status: each side's tokens and trained tokens, and
    which side the cut at max_length falls in."""
    sides = [(name, row[name]) for name in SIDES]
    counts = " · ".join(f"{name} {len(side['tokens'])} tokens, {side['trained']} trained" for name, side in sides)
    cut = [name for name, side in sides if side["truncated_at"] is not None]
    truncated = f" · truncated: {' and '.join(cut)}" if cut else ""
    return f"pair · {counts}{truncated}"


class RowScroll(KeysAhead, VerticalScroll):
    """The row's scroll area: keys typed right after ``/`` or ``g`` are the text field's."""

    def opens_a_text_field(self, key: str) -> bool:
        return bound_to(self, key, "ask('row')", "ask('search')")


class DatasetScreen(ProjectScreen):
    """The project's training data, as the trainer sees it."""

    MODE = "dataset"
    BINDINGS = [
        Binding("n,right", "step(1)", "Next", id="dataset.next"),
        Binding("p,left", "step(-1)", "Previous", id="dataset.previous"),
        Binding("v", "switch_view", "Tokens/text/fields", id="dataset.view"),
        Binding("g", "ask('row')", "Go to row", id="dataset.goto"),
        Binding("slash", "ask('search')", "Search", id="dataset.search"),
        Binding("m", "map_columns", "Map columns", show=False, id="dataset.columns"),
        Binding("N", "search_again(1)", "Next match", show=False, id="dataset.search_next"),
        Binding("escape", "close_input", "Close", show=False, id="dataset.close_input"),
    ]

    @dataclass
    class RowRead(Message):
        """The engine rendered a row."""

        key: PreviewKey
        row: dict[str, Any]

    @dataclass
    class StatsRead(Message):
        """The engine counted the whole set."""

        key: PreviewKey
        stats: dict[str, Any]

    @dataclass
    class StatsCounting(Message):
        """The count so far, while the engine reads the whole set (a newer one replaces it)."""

        key: PreviewKey
        stats: dict[str, Any]

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, DatasetScreen.StatsCounting)

    @dataclass
    class FormatsRead(Message):
        """Sources whose fields fit several formats: (where, the formats, the one read)."""

        key: PreviewKey
        ambiguous: list[tuple[str, list[str], str]]

    @dataclass
    class MarksRead(Message):
        """The rows held out for evaluation, and the rows matching the search ``text``."""

        key: PreviewKey
        text: str
        eval_rows: Any  # the held-out row positions (``position in eval_rows``)
        matches: list[int]

    @dataclass
    class Found(Message):
        """A search (or a jump to a row number) found ``index`` (None: no such row)."""

        key: PreviewKey
        index: int | None
        what: str

    def __init__(self) -> None:
        super().__init__()
        self._key: PreviewKey | None = None  # the settings shown
        self._row: dict[str, Any] | None = None
        self._index = 0  # the row shown, or asked for
        self._row_key: PreviewKey | None = None  # the settings the row shown was read at
        self._view = VIEWS[0]
        self._asking = ""  # "row" or "search" while the input is open
        self._search = ""
        self._eval_rows: Any = frozenset()  # row positions held out for evaluation
        self._matches: list[int] | None = None  # positions of the rows matching the search
        self._told: set[tuple[str, tuple[str, ...], str]] = set()  # fields fitting several formats, said

    def compose_body(self) -> ComposeResult:
        yield Static(READING, id="dataset-status", classes="screen-status", markup=False)
        field = Input(id="dataset-input", disabled=True)
        field.display = False
        yield field
        with Horizontal(id="dataset-body"):
            with RowScroll(id="dataset-row"):
                yield Static(legend(), id="dataset-legend", markup=False)
                yield RowView(id="row-view")
            yield DatasetStats(id="dataset-stats")

    def on_mount(self) -> None:
        super().on_mount()
        self.watch(self.app, "revision", self._sync, init=False)

    def project_shown(self) -> None:
        self._sync()

    def forget_project(self) -> None:
        self._key, self._row, self._index = None, None, 0
        self._told.clear()

    # -- what the project asks for ------------------------------------------------------

    def _current_key(self) -> PreviewKey:
        project = self.session.project
        return (str(project.root),) + tuple(repr(project[k]) for k in KEYS)

    def _request(self) -> dict[str, Any]:
        session = self.session
        return {"project_text": session.project.text(),
                "project_path": str(session.path) if session.path else None}

    def _sync(self) -> None:
        """Read the data again when a setting it depends on changed."""
        if not self.is_current or self.app.session is None:
            return
        key = self._current_key()
        if key == self._key:
            return
        self._key = key
        project = self.session.project
        if not project["dataset.path"]:
            self._status("no training data set; set dataset.path on the Settings screen (4)", error=True)
            self._row = None
            self.query_one(RowView).show(None)
            self.query_one(DatasetStats).status("no rows")
            return
        index = self._index
        self._status(READING)
        self.query_one(DatasetStats).status("counting the rows and tokens…")
        self._read_row(key, self._request(), index, fallback=True)
        self._read_stats(key, self._request())
        self._read_marks(key, self._search)
        self._read_formats(key)

    # -- engine requests ------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="row", exit_on_error=False)
    def _read_row(self, key: PreviewKey, request: dict[str, Any], index: int | None = None,
                  row: int | None = None, fallback: bool = False, source: int = 0) -> None:
        """Read a row; ``fallback``: the first row when that one is gone (the data changed)."""
        worker = get_current_worker()
        try:
            result = self.app.engine.preview_row(**request, index=index, row=row, source=source,
                                          cancel=worker.cancelled_event)
        except Exception:
            if worker.is_cancelled:
                return
            if fallback and index:
                result = self.app.engine.preview_row(**request, index=0, cancel=worker.cancelled_event)
            else:
                raise
        if not worker.is_cancelled:
            self.post_message(self.RowRead(key, result))

    @work(thread=True, exclusive=True, group="stats", exit_on_error=False)
    def _read_stats(self, key: PreviewKey, request: dict[str, Any]) -> None:
        """The whole set's stats, streamed: the count so far twice a second, then the whole.
        A newer request (the settings changed) cancels this one, in the engine too."""
        worker = get_current_worker()

        def counting(partial: dict[str, Any]) -> None:
            if not worker.is_cancelled:
                self.post_message(self.StatsCounting(key, partial))

        result = self.app.engine.preview_stats(**request, on_progress=counting,
                                        cancel=worker.cancelled_event)
        if not worker.is_cancelled:
            self.post_message(self.StatsRead(key, result))

    @work(thread=True, exclusive=True, group="formats", exit_on_error=False)
    def _read_formats(self, key: PreviewKey) -> None:
        """Sources read with format "auto" whose first row fits several formats; raw rows
        only (no tokenizer), read here. What cannot be read is the row's and stats' to say."""
        from tunedeck.core.datafile import RowError, candidates, detect_format, read_source
        from tunedeck.core.errors import UserError
        from tunedeck.core.sources import project_sources, source_columns, source_format

        project = self.session.project
        ambiguous = []
        try:
            sources = project_sources(project)
            for source in sources:
                if source_format(source, project) != "auto":
                    continue
                rows = [r for _, r in read_source(source, 20) if not isinstance(r, RowError)]
                columns = source_columns(source, project)
                fits = candidates(rows, columns)
                if len(fits) > 1:
                    where = source.key if len(sources) > 1 else source.spec
                    ambiguous.append((where, fits, detect_format(rows, columns) or fits[0]))
        except UserError:
            return
        if ambiguous and not get_current_worker().is_cancelled:
            self.post_message(self.FormatsRead(key, ambiguous))

    @work(thread=True, exclusive=True, group="search", exit_on_error=False)
    def _find(self, key: PreviewKey, request: dict[str, Any], text: str, start: int, backward: bool) -> None:
        worker = get_current_worker()
        result = self.app.engine.preview_search(**request, text=text, start=start, backward=backward,
                                      cancel=worker.cancelled_event)
        if not worker.is_cancelled:
            self.post_message(self.Found(key, result["index"], text))

    @work(thread=True, exclusive=True, group="marks", exit_on_error=False)
    def _read_marks(self, key: PreviewKey, text: str) -> None:
        """Which rows are held out for evaluation (the trainer's own split) and which match
        ``text``; raw rows only, no tokenizer, so this is read here rather than in the engine."""
        from tunedeck.core.errors import UserError
        from tunedeck.core.preview import held_out, rows_matching

        project = self.session.project
        worker = get_current_worker()
        eval_rows: Any = frozenset()
        try:  # one streaming pass, kept per dataset, split and seed (no whole-file read)
            eval_rows = held_out(project, cancel=worker.cancelled_event) or frozenset()
        except UserError:  # the data cannot train: the stats say why
            pass
        matches: list[int] = []
        if text.strip():
            try:
                found = rows_matching(project, text, worker.cancelled_event)
            except UserError:
                found = []
            if found is None:  # cancelled
                return
            matches = found
        if not worker.is_cancelled:
            self.post_message(self.MarksRead(key, text, eval_rows, matches))

    @on(FormatsRead)
    def _formats_read(self, event: FormatsRead) -> None:
        if event.key != self._key:
            return
        for where, fits, chosen in event.ambiguous:
            if (where, tuple(fits), chosen) in self._told:  # said once, not at every settings change
                continue
            self._told.add((where, tuple(fits), chosen))
            self.notify(f"{where}: the fields fit several formats ({', '.join(fits)}); read as {chosen}. "
                        "Press m to choose the format and its columns", severity="warning", timeout=12,
                        markup=False)

    @on(MarksRead)
    def _marks_read(self, event: MarksRead) -> None:
        if event.key != self._key:
            return
        self._eval_rows = event.eval_rows
        if event.text == self._search:
            self._matches = event.matches if event.text else None
        if self._row:
            self._show_row(self._row)

    def _show_row(self, row: dict[str, Any]) -> None:
        eval_row = row["index"] in self._eval_rows
        key = self.query_one("#dataset-legend", Static)
        key.update(legend(eval_row=eval_row, parts=row_parts(row)))
        key.display = self._view != "fields" and not row["error"] and not row["unrendered"]
        self.query_one(RowView).show(row, self._view, self._search)
        self.query_one(DatasetStats).show_source(row["source"]["index"] if row.get("source") else None)
        self._status(self._row_status(row))

    @on(RowRead)
    def _row_read(self, event: RowRead) -> None:
        if event.key != self._key:
            return
        row = self._row = event.row
        self._row_key = event.key
        self._index = row["index"]
        self._show_row(row)
        self.query_one("#dataset-row", VerticalScroll).scroll_home(animate=False)

    @on(StatsCounting)
    def _stats_counting(self, event: StatsCounting) -> None:
        stats = self.query_one(DatasetStats)
        if event.key == self._key and stats.stats is None:  # not after the whole set's
            stats.show(event.stats)

    @on(StatsRead)
    def _stats_read(self, event: StatsRead) -> None:
        if event.key != self._key:
            return
        self.query_one(DatasetStats).show(event.stats)
        if self._row:
            self._status(self._row_status(self._row))

    @on(Found)
    def _found(self, event: Found) -> None:
        if event.key != self._key:
            return
        if event.index is None:
            self.notify(f"no row contains {event.what!r}", severity="warning", markup=False)
            return
        self._go(event.index)

    # -- navigation ------------------------------------------------------------------------

    def _go(self, index: int | None = None, row: int | None = None, source: int | None = None) -> None:
        if self._key is None or not self.session.project["dataset.path"]:
            return
        if index is not None:
            self._index = index
        if source is None:  # a row number is the shown row's source's
            source = self._row["source"]["index"] if self._row and self._row.get("source") else 0
        self._read_row(self._key, self._request(), index, row, source=source)

    def action_step(self, delta: int) -> None:
        row = self._row
        if row is None:
            return
        at_last = row["last"] and self._index >= row["index"]
        if delta > 0 and at_last:
            self.notify("this is the last row", timeout=3)
            return
        if delta < 0 and self._index == 0:
            self.notify("this is the first row", timeout=3)
            return
        self._go(self._index + delta)

    def action_switch_view(self) -> None:
        self._view = VIEWS[(VIEWS.index(self._view) + 1) % len(VIEWS)]
        self.query_one(RowView).show(self._row, self._view)
        if self._row:
            self._show_row(self._row)

    def action_ask(self, what: str) -> None:
        field = self.query_one("#dataset-input", Input)
        self._asking = what
        several = bool(self._row and self._row.get("sources", 1) > 1)
        field.placeholder = (("row number in this source, or SOURCE:ROW (2:15), enter to go" if several else
                              "row number (as in the skipped list; the line number for JSONL), enter to go")
                             if what == "row" else "text to find in the rows, enter to search")
        field.value = self._search if what == "search" else ""
        field.disabled = False
        field.display = True  # an inline style: in effect at once, unlike a class's rule
        # focused now, not after a refresh: keys typed in the same burst as "/" or "g" (a
        # terminal read over SSH delivers many) are the field's, not the screen's n, p, v
        self.set_focus(field)

    def action_close_input(self) -> None:
        field = self.query_one("#dataset-input", Input)
        if not field.display and self._search:  # escape with the input closed: the search ends
            self._search, self._matches = "", None
            if self._row:
                self._show_row(self._row)
            return
        field.display = False
        field.disabled = True
        self._asking = ""
        self.query_one("#dataset-row").focus()

    def action_search_again(self, delta: int) -> None:
        if self._search and self._key is not None:
            start = (self._row["index"] + 1) if self._row else 0
            self._find(self._key, self._request(), self._search, start, False)

    @on(Input.Submitted, "#dataset-input")
    def _submitted(self, event: Input.Submitted) -> None:
        text, what = event.value.strip(), self._asking
        self.action_close_input()
        if not text or self._key is None:
            return
        if what == "row":
            source_text, _, row_text = text.rpartition(":")
            try:
                number = int(row_text)
                source = int(source_text) if source_text else None
            except ValueError:
                several = bool(self._row and self._row.get("sources", 1) > 1)
                self.notify(f"{text!r} is not a row number: type a number, e.g. 12"
                            + (" (or 2:12 for row 12 of the second source)" if several else ""),
                            severity="error", markup=False)
                return
            if number < 1:
                self.notify(f"row {number}: rows are numbered from 1", severity="error")
                return
            if source is not None and source < 1:
                self.notify(f"source {source}: sources are numbered from 1", severity="error")
                return
            self._go(row=number, source=None if source is None else source - 1)
        else:
            if text != self._search:
                self._search, self._matches = text, None
                self._read_marks(self._key, text)
            start = (self._row["index"] + 1) if self._row else 0
            self._find(self._key, self._request(), text, start, False)

    # -- showing ---------------------------------------------------------------------------

    def _row_status(self, row: dict[str, Any]) -> str:
        stats = self.query_one(DatasetStats).stats
        total = f" of {stats['rows']:,}" if stats else ""
        if row["error"]:
            state = f"skipped: {row['error']}"
        elif row["unrendered"]:
            state = "not rendered (see below)"
        elif row.get("pair"):
            state = pair_state(row)
        else:
            cut = f", truncated at {row['truncated_at']}" if row["truncated_at"] is not None else ""
            state = f"{len(row['tokens'])} tokens, {row['trained']} trained{cut}"
        marks = " · EVAL row (held out, not trained)" if row["index"] in self._eval_rows else ""
        if self._search:
            matches = self._matches
            if matches is None:
                marks += f" · {self._search!r}: counting…"
            elif row["index"] in matches:
                marks += f" · {self._search!r}: {matches.index(row['index']) + 1} of {len(matches)} (N next)"
            else:
                marks += f" · {self._search!r}: {len(matches)} rows match (N next)"
        source = row.get("source")
        where = f" of {source['path']}" if source and row.get("sources", 1) > 1 else ""
        return (f"row {row['row']}{where} (#{row['index'] + 1}{total}, {row['format']}) · {state}{marks} · "
                f"view: {self._view} · n/p next/previous · g go to · / search · v view · m columns")

    def _app_wording(self, message: str) -> str:
        """The engine's message in the app's words (the CLI's says ``--row``)."""
        import re

        message = message.replace("(the Dataset screen's m key maps them)", "(press m to map them)")
        source = re.search(r"--source (-?\d+): the project has (\d+) source", message)
        if source is not None:
            return f"there is no source {source.group(1)} (the project has {source.group(2)})"
        match = re.search(r"--row (-?\d+): (?:\S+ has no row \d+|row numbers start at 1)", message)
        if match is None:
            return message
        number = int(match.group(1))
        if number < 1:
            return f"row {number}: rows are numbered from 1"
        stats = self.query_one(DatasetStats).stats
        last = stats.get("last_row", stats.get("rows")) if stats else None
        return f"row {number} is past the last row ({last:,})" if last else f"there is no row {number}"

    def _status(self, text: str, *, error: bool = False) -> None:
        status = self.query_one("#dataset-status", Static)
        status.update(text)
        status.set_class(error, "-error")

    # -- the column map ----------------------------------------------------------------------

    def action_map_columns(self) -> None:
        """Open the column map for the shown row's source (or the one whose format is unclear)."""
        if not self.session.project["dataset.path"]:
            self.notify("no training data set; set dataset.path on the Settings screen (4)", severity="warning")
            return
        source = self._row["source"]["index"] if self._row and self._row.get("source") else None
        self._map_columns(source)

    @work(group="dialogs", exit_on_error=False)
    async def _map_columns(self, source: int | None) -> None:
        from tunedeck.core.schema import toml_repr

        from .column_map import ColumnMapScreen

        values = await self.app.push_screen_wait(ColumnMapScreen(self.session.project, source))
        if not values:
            return
        changed, refused = self.app.edit_settings(values)
        if refused:
            key, reason = next(iter(refused.items()))
            self.notify(f"{key}: {reason}", severity="error", timeout=10, markup=False)
        elif changed:
            said = ", ".join(f"{k} = {toml_repr(values[k])}" for k in changed)
            self.notify(f"{said} (unsaved; ctrl+s saves)", title="Columns", timeout=8, markup=False)
        else:
            self.notify("nothing changed: the columns were already mapped that way", timeout=4)

    def work_failed(self, worker: Worker[object], message: str) -> None:
        if worker.is_cancelled:  # a newer request replaced it
            return
        if worker.group == "row":
            message = self._app_wording(message)
            if self._row is not None and self._row_key == self._key:  # a jump or step: stay on the row
                self._index = self._row["index"]
            else:  # the data cannot be read at these settings
                self._row = None
                self.query_one(RowView).show(None)
                self._status(message, error=True)
            self.notify(message, severity="error", timeout=10, markup=False)
        elif worker.group == "stats":
            self.query_one(DatasetStats).status(self._app_wording(message))
        elif worker.group == "marks":
            self._matches = None
        elif worker.group == "search":
            self.notify(message, severity="error", timeout=10)
        else:
            super().work_failed(worker, message)
