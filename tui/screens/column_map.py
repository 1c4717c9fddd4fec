"""The column map: which of a file's fields each field of a dataset format reads.

For a file whose field names no format has (``{"question": ..., "answer": ...}``), or
whose fields fit several formats. The dialog offers every format (those the file's fields
already fit first) and, for each field the format reads (its required ones, then the
optional ``system`` and ``tools``), the file's columns, read from its first rows here
(raw rows: no tokenizer, no engine). As the choice changes, the first rows are rendered
by the engine with the chosen settings, as the trainer would render them (debounced;
what cannot be read is one line). Apply writes the choice as an edit of the open project
(unsaved, as an edit on the Settings screen): ``dataset.format`` and ``dataset.columns``
when ``dataset.path`` is one source; when it is a list, the source's own ``format`` and
``columns`` in its table in ``dataset.path``, so the other sources stay as they are. The
source mapped is the first whose format cannot be told, else the one of the row shown
(:func:`pick_source`). Escape cancels and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Button, Label, Select, Static
from textual.worker import Worker, WorkerState, get_current_worker
from tunedeck.core.datafile import (
    FORMAT_FIELDS,
    FORMATS,
    REQUIRED_FIELDS,
    RowError,
    candidates,
    read_source,
)
from tunedeck.core.errors import UserError, one_line
from tunedeck.core.project import Project
from tunedeck.core.sources import Source, project_sources, source_columns, source_format

from ..widgets.tokens_view import templated_text
from .dialogs import Dialog

COLUMN_ROWS = 20  # the first rows, whose field names are offered
PREVIEW_ROWS = 2  # the first rows, rendered as the choice changes
PREVIEW_DELAY_S = 0.3
# the fields a format reads besides its own (FORMAT_FIELDS), when the file has them
OPTIONAL_FIELDS = {"system": ("messages", "sharegpt", "alpaca"),
                   "tools": ("messages", "sharegpt", "alpaca", "prompt_completion")}
# names a file commonly gives a field, for a first guess (the user picks)
NAME_HINTS = {
    "prompt": ("prompt", "question", "query", "instruction", "input", "problem", "user", "human", "q"),
    "instruction": ("instruction", "question", "prompt", "query", "task", "problem", "q"),
    "completion": ("completion", "answer", "response", "output", "solution", "reply", "assistant", "target", "a"),
    "output": ("output", "answer", "response", "completion", "solution", "reply", "target", "a"),
    "text": ("text", "content", "body", "document", "passage"),
}


def format_fields(fmt: str) -> list[tuple[str, bool]]:
    """The fields ``fmt`` reads, as (name, required): its own, then the optional ones."""
    own = [(name, name in REQUIRED_FIELDS[fmt]) for name in FORMAT_FIELDS[fmt]]
    return own + [(name, False) for name, formats in OPTIONAL_FIELDS.items() if fmt in formats]


def field_names(rows: list[dict[str, Any]]) -> list[str]:
    """Every field of ``rows``, in the order they first appear."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names)


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        first = value[0] if value else None
        return "turns" if isinstance(first, dict) and "from" in first else "list"
    return "other"


def column_kinds(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each field's kind in the first row that has it: text, list (of messages), turns
    (ShareGPT's from/value list) or other."""
    kinds: dict[str, str] = {}
    for row in rows:
        for name, value in row.items():
            kinds.setdefault(name, _kind(value))
    return kinds


def suggest_format(rows: list[dict[str, Any]], columns: dict[str, str] | None = None) -> str:
    """A first guess: a format the fields fit as they are, else one their kinds suggest."""
    fits = candidates(rows, columns)
    if fits:
        return fits[0]
    kinds = column_kinds(rows).values()
    if "turns" in kinds:
        return "sharegpt"
    if "list" in kinds:
        return "messages"
    return "prompt_completion" if list(kinds).count("text") >= 2 else "text"


def suggest_columns(fmt: str, rows: list[dict[str, Any]], columns: dict[str, str] | None = None
                    ) -> dict[str, str | None]:
    """A first guess at each of ``fmt``'s fields' column: the one the project maps it to,
    the field's own name, and for a required field a column whose name or kind fits."""
    columns = columns or {}
    kinds = column_kinds(rows)
    taken: set[str] = set()
    out: dict[str, str | None] = {}
    for name, _ in format_fields(fmt):  # mapped or same-named columns first: guesses take the rest
        column = columns.get(name) if columns.get(name) in kinds else (name if name in kinds else None)
        out[name] = column
        if column:
            taken.add(column)
    for name, required in format_fields(fmt):
        if out[name] or not required:
            continue
        free = [c for c in kinds if c not in taken]
        lowered = {c.lower(): c for c in free}
        guess = next((lowered[h] for h in NAME_HINTS.get(name, ()) if h in lowered), None)
        if guess is None:
            wanted = ("list", "turns") if fmt in ("messages", "sharegpt") else ("text",)
            guess = next((c for c in free if kinds[c] in wanted), None)
        out[name] = guess
        if guess:
            taken.add(guess)
    return out


def mapping_values(project: Project, source: int, fmt: str, mapping: dict[str, str | None]) -> dict[str, Any]:
    """The edits that read source ``source`` (from 0) with ``fmt`` and ``mapping`` (a field
    to a column, None for none): ``dataset.format`` and ``dataset.columns`` for a project of
    one source; for a list of sources, that source's table in ``dataset.path``."""
    columns = {name: column for name, column in mapping.items() if column and column != name}
    value = project["dataset.path"]
    if isinstance(value, str):
        return {"dataset.format": fmt, "dataset.columns": columns}
    entries = [dict(e) if isinstance(e, dict) else e for e in value]
    entry = entries[source]
    table: dict[str, Any] = {"path": entry} if isinstance(entry, str) else dict(entry)
    table["format"] = fmt
    if columns or project["dataset.columns"]:  # an empty table: the [dataset] columns do not apply
        table["columns"] = columns
    else:
        table.pop("columns", None)
    entries[source] = table
    return {"dataset.path": entries}


def mapped_project(project: Project, values: dict[str, Any]) -> Project:
    """A copy of ``project`` with ``values`` set; UserError (one line) when they do not validate."""
    candidate = Project.from_text(project.text(), project.path)
    candidate.set_many(list(values.items()))
    return candidate


@dataclass
class SourceRows:
    """The source to map and its first rows."""

    index: int
    count: int  # sources in the project
    source: Source
    rows: list[dict[str, Any]]
    numbers: list[int]  # the first rows' numbers (to render them)


def pick_source(project: Project, wanted: int | None) -> SourceRows:
    """The source to map, with its first rows: the first whose format cannot be told (read
    with "auto", its first row fits no format), else source ``wanted`` (from 0), else the
    first whose fields fit several formats, else the first. UserError when a source cannot
    be read."""
    sources = project_sources(project)
    read: list[SourceRows] = []
    for k, source in enumerate(sources):
        entries = list(read_source(source, COLUMN_ROWS))
        read.append(SourceRows(k, len(sources), source, [r for _, r in entries if not isinstance(r, RowError)],
                               [n for n, _ in entries][:PREVIEW_ROWS]))

    def fits(found: SourceRows) -> int | None:
        """How many formats the source's fields fit, read as "auto"; None: its format is set."""
        if source_format(found.source, project) != "auto":
            return None
        return len(candidates(found.rows, source_columns(found.source, project)))

    unknown = next((found for found in read if fits(found) == 0 and found.rows), None)
    if unknown is not None:
        return unknown
    if wanted is not None and 0 <= wanted < len(read):
        return read[wanted]
    return next((found for found in read if (fits(found) or 0) > 1), read[0])


class ColumnMapScreen(Dialog):
    """Pick a format and the file's column for each of its fields; dismisses with the
    edits to apply ({key: value}), or None."""

    @dataclass
    class RowsRead(Message):
        """The source's first rows were read (or ``error`` says why not)."""

        rows: SourceRows | None
        error: str | None

    @dataclass
    class Rendered(Message):
        """The first rows rendered with the choice numbered ``seq``."""

        seq: int
        rows: list[dict[str, Any]]

    def __init__(self, project: Project, source: int | None = None) -> None:
        super().__init__()
        self.project = Project.from_text(project.text(), project.path)  # as it is now
        self.wanted = source
        self.source: SourceRows | None = None
        self.fmt: str | None = None
        self.mapping: dict[str, str | None] = {}
        self._seq = 0  # the choice's number: a rendering of an older one is dropped
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog -colmap"):
            yield Label("Map the dataset's columns", classes="dialog-title")
            yield Label("reading the first rows…", id="colmap-where", classes="dialog-help")
            with Horizontal(classes="colmap-line"):
                yield Label("format", classes="colmap-name")
                yield Select([(f, f) for f in FORMATS], id="colmap-format", compact=True, allow_blank=False,
                             disabled=True)
            yield Vertical(id="colmap-fields")
            with VerticalScroll(id="colmap-preview-box"):
                yield Static("", id="colmap-preview", markup=False)
            yield Label("", id="colmap-problem", classes="dialog-problem", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply", variant="primary", id="apply", disabled=True)
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        super().on_mount()
        self._read_rows(self.wanted)

    # -- the file's first rows (raw, here) -------------------------------------------------

    @work(thread=True, exclusive=True, group="colmap-rows", exit_on_error=False)
    def _read_rows(self, wanted: int | None) -> None:
        try:
            found = pick_source(self.project, wanted)
        except UserError as exc:
            self.post_message(self.RowsRead(None, exc.message))
            return
        self.post_message(self.RowsRead(found, None))

    @on(RowsRead)
    async def _rows_read(self, event: RowsRead) -> None:
        if event.rows is None:
            self._problem(event.error or "the data cannot be read")
            self.query_one("#colmap-where", Label).update("")
            return
        found = self.source = event.rows
        project = self.project
        names = field_names(found.rows)
        if not names:
            self._problem(f"{found.source.spec}: no rows to read the field names from")
            return
        where = (f"source {found.index + 1} of {found.count} ({found.source.key}): {found.source.spec}; written "
                 "into its table" if found.count > 1 or not isinstance(project["dataset.path"], str)
                 else f"{found.source.spec}; writes dataset.format and dataset.columns")
        self.query_one("#colmap-where", Label).update(Text(f"{where} · fields: {', '.join(names)}"))
        columns = source_columns(found.source, project)
        fits = candidates(found.rows)
        now = source_format(found.source, project)
        fmt = now if now != "auto" else suggest_format(found.rows, columns)
        choice = self.query_one("#colmap-format", Select)
        choice.set_options([(f"{f}  (fits the fields)" if f in fits else f, f)
                            for f in [*fits, *(f for f in FORMATS if f not in fits)]])
        choice.disabled = False
        self.query_one("#apply", Button).disabled = False
        await self._show_format(fmt, suggest_columns(fmt, found.rows, columns))
        choice.value = fmt  # its Changed finds the format shown
        choice.focus()

    async def _show_format(self, fmt: str, mapping: dict[str, str | None]) -> None:
        """One line per field of ``fmt``, each with the file's columns to pick from."""
        assert self.source is not None
        self.fmt, self.mapping = fmt, dict(mapping)
        names = field_names(self.source.rows)
        lines = []
        for name, required in format_fields(fmt):
            blank = not required and name not in names  # a same-named column is read anyway
            select = Select([(n, n) for n in names], value=mapping.get(name) or Select.NULL, compact=True,
                            allow_blank=blank or mapping.get(name) is None,
                            prompt="(none)" if not required else "(pick a column)", id=f"colmap-{name}")
            label = Label(name + ("" if required else " (optional)"), classes="colmap-name", markup=False)
            lines.append(Horizontal(label, select, classes="colmap-line"))
        fields = self.query_one("#colmap-fields", Vertical)
        await fields.remove_children()
        await fields.mount_all(lines)
        self._schedule()

    @on(Select.Changed, "#colmap-format")
    async def _format_chosen(self, event: Select.Changed) -> None:
        if self.source is None or event.value is Select.NULL or event.value == self.fmt:
            return
        fmt = str(event.value)
        await self._show_format(fmt, suggest_columns(fmt, self.source.rows,
                                                     source_columns(self.source.source, self.project)))

    @on(Select.Changed, "#colmap-fields Select")
    def _column_chosen(self, event: Select.Changed) -> None:
        name = str(event.select.id).removeprefix("colmap-")
        if name not in self.mapping:  # a line of the format shown before
            return
        self.mapping[name] = None if event.value is Select.NULL else str(event.value)
        self._schedule()

    # -- the first rows, rendered with the choice (the engine) ------------------------------

    def _missing(self) -> str | None:
        """The first required field without a column, or None."""
        if self.fmt is None:
            return None
        return next((name for name, required in format_fields(self.fmt) if required and not self.mapping.get(name)),
                    None)

    def _values(self) -> dict[str, Any]:
        assert self.source is not None and self.fmt is not None
        return mapping_values(self.project, self.source.index, self.fmt, self.mapping)

    def _schedule(self) -> None:
        self._seq += 1
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(PREVIEW_DELAY_S, self._render_now)

    def _render_now(self) -> None:
        self._timer = None
        missing = self._missing()
        preview = self.query_one("#colmap-preview", Static)
        if missing:
            self.workers.cancel_group(self, "colmap-preview")
            preview.update(Text(f"pick the column {missing} is read from", style="dim"))
            self._problem("")
            return
        try:
            candidate = mapped_project(self.project, self._values())
        except UserError as exc:
            self._problem(exc.message)
            return
        preview.update(Text("rendering the first rows…", style="dim"))
        assert self.source is not None
        self._render_rows(self._seq, candidate.text(), str(candidate.path) if candidate.path else None,
                     self.source.index, list(self.source.numbers))

    @work(thread=True, exclusive=True, group="colmap-preview", exit_on_error=False)
    def _render_rows(self, seq: int, text: str, path: str | None, source: int, numbers: list[int]) -> None:
        worker = get_current_worker()
        rows = []
        for number in numbers:
            rows.append(self.app.engine.preview_row(project_text=text, project_path=path, row=number,
                                             source=source, cancel=worker.cancelled_event))
            if worker.is_cancelled:
                return
        self.post_message(self.Rendered(seq, rows))

    @on(Rendered)
    def _rendered(self, event: Rendered) -> None:
        if event.seq != self._seq:
            return
        out = Text()
        for row in event.rows:
            out.append(f"row {row['row']}\n", style="bold")
            if row["error"]:
                out.append(f"skipped: {row['error']}\n", style="red")
            elif row["unrendered"]:
                out.append(f"not rendered: {row['unrendered']}\n", style="red")
            else:
                out.append_text(templated_text(row))
                out.append("\n")
        self.query_one("#colmap-preview", Static).update(out)
        self._problem("")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and not event.worker.is_cancelled:
            self._problem(one_line(event.worker.error))
            if event.worker.group == "colmap-preview":
                self.query_one("#colmap-preview", Static).update("")

    def _problem(self, message: str) -> None:
        self.query_one("#colmap-problem", Label).update(message)

    # -- the answer --------------------------------------------------------------------------

    @on(Button.Pressed, "#apply")
    def _apply(self) -> None:
        if self.source is None or self.fmt is None:
            return
        missing = self._missing()
        if missing:
            self._problem(f"pick the column {missing} is read from (format {self.fmt})")
            return
        values = self._values()
        try:
            mapped_project(self.project, values)
        except UserError as exc:
            self._problem(exc.message)
            return
        self.dismiss(values)
