"""The editor of one setting: a text field, or a list of choices, docked under the
settings list while it is open. It reports every keystroke (the screen validates as
you type) and closes on enter (keep) or escape (put the value back)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from tunedeck.core.schema import Field


class FieldEditor(Vertical):
    """Edits one setting at a time; hidden while no setting is being edited."""

    DEFAULT_CSS = """
    FieldEditor {
        display: none;
        height: auto;
        padding: 0 1;
        border-top: solid $accent;
        background: $surface;
        &.-open { display: block; }
        #editor-title { width: 1fr; text-style: bold; }
        #editor-input { width: 1fr; }
        #editor-choices { height: auto; max-height: 7; }
        #editor-note { width: 1fr; color: $text-muted; text-wrap: nowrap; text-overflow: ellipsis; }
        #editor-note.-error { color: $text-error; }
    }
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel edit", id="editor.cancel")]

    @dataclass
    class Typed(Message):
        """The text of setting ``key`` changed."""

        key: str
        text: str

    @dataclass
    class Chosen(Message):
        """A value was picked for setting ``key``."""

        key: str
        value: Any

    @dataclass
    class Closed(Message):
        """Editing ``key`` ended: kept (enter), or ``cancelled`` (escape)."""

        key: str
        cancelled: bool

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.key: str | None = None
        self._values: list[Any] = []

    def compose(self) -> ComposeResult:
        yield Label(id="editor-title")
        yield Input(compact=True, id="editor-input")
        yield OptionList(compact=True, id="editor-choices")
        yield Label(id="editor-note")

    def edit_text(self, fld: Field, text: str) -> None:
        """Open for typing a value, starting from ``text``."""
        self._open(fld, typing=True)
        field = self.query_one("#editor-input", Input)
        field.placeholder = fld.expected()
        with field.prevent(Input.Changed):
            field.value = text
        field.focus()

    def edit_choice(self, fld: Field, choices: Sequence[tuple[str, Any]], current: Any) -> None:
        """Open for picking one of ``choices`` ((label, value) pairs)."""
        self._open(fld, typing=False)
        self._values = [value for _, value in choices]
        options = self.query_one("#editor-choices", OptionList)
        options.set_options(Option(label) for label, _ in choices)
        options.highlighted = next((i for i, v in enumerate(self._values) if v == current), 0)
        options.focus()

    def note(self, text: str, *, error: bool = False) -> None:
        """The line under the editor: the help, or why the value is refused."""
        label = self.query_one("#editor-note", Label)
        label.update(text)
        label.set_class(error, "-error")

    def close(self) -> None:
        self.key = None
        self.remove_class("-open")

    def _open(self, fld: Field, *, typing: bool) -> None:
        self.key = fld.key
        how = "enter keeps · esc puts it back" if typing else "enter picks · esc keeps it as it was"
        self.query_one("#editor-title", Label).update(f"{fld.key}  [dim]{how}[/dim]")
        self.query_one("#editor-input").display = typing
        self.query_one("#editor-choices").display = not typing
        self.add_class("-open")

    @on(Input.Changed, "#editor-input")
    def _typed(self, event: Input.Changed) -> None:
        event.stop()
        if self.key is not None:
            self.post_message(self.Typed(self.key, event.value))

    @on(Input.Submitted, "#editor-input")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self.key is not None:
            self.post_message(self.Closed(self.key, cancelled=False))

    @on(OptionList.OptionSelected, "#editor-choices")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if self.key is not None:
            self.post_message(self.Chosen(self.key, self._values[event.option_index]))
            self.post_message(self.Closed(self.key, cancelled=False))

    def action_cancel(self) -> None:
        if self.key is not None:
            self.post_message(self.Closed(self.key, cancelled=True))
