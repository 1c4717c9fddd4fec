"""The editor of one setting: a text field, or a list of choices, docked under the
settings list while it is open. It reports every keystroke (the screen validates as
you type) and closes on enter (keep) or escape (put the value back).

Keys often arrive many at a time (a fast typist over SSH, a paste, tmux ``send-keys``).
Textual inserts a typed character as soon as the field reads the key, but runs a key
binding (backspace, delete, home, enter...) only once the key has travelled up to the
app and back, so in a burst ``16``, four backspaces, ``64`` became ``1664`` with the
backspaces applied after it. :class:`ValueInput` runs its own bindings and the editor's
(escape) the moment it reads the key, and reports the text synchronously, so the setting
holds the last typed text before any later key (ctrl+s) leaves the field. Keys that reach
the field after it closed (enter, then down in the same burst) go on to the widget that
has the focus next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option
from tunedeck.core.schema import Field


class ValueInput(Input):
    """A text field that applies every key in the order it arrived and reports each change
    at once to ``on_text`` (not through a message that later keys could overtake)."""

    def __init__(self, on_text: Callable[[str], None], on_submit: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_text = on_text
        self._on_submit = on_submit
        self._quiet = False
        self._ahead: list[tuple[str, str | None]] = []  # keys typed after the field closed
        self.closed = True

    def set_text(self, text: str) -> None:
        """Show ``text`` without reporting it (the value the field opens with)."""
        self._quiet = True
        try:
            with self.prevent(Input.Changed):
                self.value = text
        finally:
            self._quiet = False

    def _watch_value(self, value: str) -> None:
        super()._watch_value(value)
        if not self._quiet and not self.closed:
            self._on_text(value)

    async def action_submit(self) -> None:
        if not self.closed:
            self._on_submit()

    async def _on_key(self, event: events.Key) -> None:
        if self.closed:  # typed ahead of the focus: the key is for whatever has the focus next
            event.stop()
            event.prevent_default()
            if self.has_focus or self._ahead:  # passed on, in order, once the focus has moved
                self._ahead.append((event.key, event.character))
            else:
                self._pass_on(event.key, event.character)
            return
        if event.is_printable:
            await super()._on_key(event)
            return
        self._restart_blink()
        nodes = [self] + ([self.parent] if self.parent is not None else [])
        for node in nodes:
            for binding in node._bindings.key_to_bindings.get(event.key, ()):
                if not binding.priority and await self.app.run_action(binding.action, node):
                    event.stop()
                    event.prevent_default()
                    return
        # anything else goes up to the screen and the app, with the text already applied

    def _on_blur(self, event: events.Blur) -> None:
        super()._on_blur(event)
        keys, self._ahead = self._ahead, []
        for key, character in keys:
            self._pass_on(key, character)

    def _pass_on(self, key: str, character: str | None) -> None:
        focused = self.screen.focused
        if focused is not None and focused is not self:
            focused._forward_event(events.Key(key, character))


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
        #editor-note { width: 1fr; height: auto; max-height: 3; color: $text-muted; }  /* whole: a reason is read here */
        #editor-note.-error { color: $text-error; }
    }
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel edit", id="editor.cancel")]

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

    def __init__(self, on_text: Callable[[str, str], None], *, id: str | None = None) -> None:
        """``on_text(key, text)`` is called, synchronously, on every change of the typed text."""
        super().__init__(id=id)
        self.key: str | None = None
        self._values: list[Any] = []
        self._report = on_text

    def compose(self) -> ComposeResult:
        yield Label(id="editor-title")
        yield ValueInput(self._typed, lambda: self._finish(cancelled=False), compact=True, id="editor-input")
        yield OptionList(compact=True, id="editor-choices")
        yield Label(id="editor-note")

    def edit_text(self, fld: Field, text: str) -> None:
        """Open for typing a value, starting from ``text``."""
        self._open(fld, typing=True)
        field = self.query_one("#editor-input", ValueInput)
        field.placeholder = fld.expected()
        field.set_text(text)
        field.closed = False
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
        self.query_one("#editor-input", ValueInput).closed = True
        self.remove_class("-open")

    def _open(self, fld: Field, *, typing: bool) -> None:
        self.key = fld.key
        how = "enter keeps · esc puts it back" if typing else "enter picks · esc keeps it as it was"
        self.query_one("#editor-title", Label).update(f"{fld.key}  [dim]{how}[/dim]")
        self.query_one("#editor-input").display = typing
        self.query_one("#editor-choices").display = not typing
        self.add_class("-open")

    def _typed(self, text: str) -> None:
        if self.key is not None:
            self._report(self.key, text)

    @on(Input.Changed, "#editor-input")
    def _changed(self, event: Input.Changed) -> None:
        event.stop()  # reported synchronously by the field itself

    def _finish(self, *, cancelled: bool) -> None:
        """Close at once (later keys of a burst go elsewhere) and say so to the screen."""
        key = self.key
        if key is not None:
            self.query_one("#editor-input", ValueInput).closed = True
            self.post_message(self.Closed(key, cancelled=cancelled))

    @on(OptionList.OptionSelected, "#editor-choices")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if self.key is not None:
            self.post_message(self.Chosen(self.key, self._values[event.option_index]))
            self.post_message(self.Closed(self.key, cancelled=False))

    def action_cancel(self) -> None:
        self._finish(cancelled=True)
