"""Every setting of a project in one scrolling list: name, value, where the value comes
from, a one-line help and, when there is one, the problem with it. ``/`` filters the list
by key (:class:`SettingsSearch`).

One widget for the whole list (an :class:`~textual.widgets.OptionList` whose entries lay
themselves out at the width they get), so the settings screen opens as fast as a screen
with a handful of widgets; the value is edited in one shared editor
(:mod:`tunedeck.tui.widgets.field_editor`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.content import Content
from textual.message import Message
from textual.visual import Visual
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option, OptionDoesNotExist

from tunedeck.core.schema import Field

from .keys_ahead import KeysAhead, bound_to

if TYPE_CHECKING:
    from textual.css.styles import RulesMap
    from textual.strip import Strip
    from textual.style import Style
    from textual.visual import RenderOptions

NAME_WIDTH = 24
SOURCE_WIDTH = 26


@dataclass(frozen=True)
class FieldView(Visual):
    """One setting as the list shows it (a Textual Visual: laid out at any width)."""

    name: str
    value: str
    source: str
    help: str
    edited: bool = False
    problem: str = ""
    severity: str = ""  # "error" (invalid, not saved) | "warning" (valid, will not work as it stands)

    def lines(self, width: int) -> list[Content]:
        source_width = min(SOURCE_WIDTH, max(8, width // 4))
        value_width = max(6, width - NAME_WIDTH - source_width - 2)
        name_style = "bold $text-error" if self.severity == "error" else "bold" if self.edited else ""
        value_style = "$text-error" if self.severity == "error" else "$text-accent" if self.edited else ""
        marker = "● " if self.edited else "  "
        first = Content.assemble(
            Content.styled(marker + self.name, name_style).truncate(NAME_WIDTH, ellipsis=True, pad=True),
            " ",
            Content.styled(self.value, value_style).truncate(value_width, ellipsis=True, pad=True),
            " ",
            Content.styled(self.source, "bold $text-accent" if self.edited else "dim").truncate(
                source_width, ellipsis=True),
        )
        lines = [first, Content.styled("    " + self.help, "dim").truncate(width, ellipsis=True)]
        if self.problem:
            mark, style = ("✗", "$text-error") if self.severity == "error" else ("⚠", "$text-warning")
            lines.append(Content.styled(f"    {mark} {self.problem}", style).truncate(width, ellipsis=True))
        return lines

    def render_strips(self, width: int, height: int | None, style: Style, options: RenderOptions) -> list[Strip]:
        return Content("\n").join(self.lines(width)).render_strips(width, height, style, options)

    def get_optimal_width(self, rules: RulesMap, container_width: int) -> int:
        return container_width

    def get_height(self, rules: RulesMap, width: int) -> int:
        return 3 if self.problem else 2


class SettingsList(KeysAhead, OptionList):
    """The settings, grouped by section; enter (or a click) edits the highlighted one."""

    DEFAULT_CSS = """
    SettingsList {
        height: 1fr;
        max-height: 100%;
        border: none;
        padding: 0;
        scrollbar-size-vertical: 1;
        &:focus { border: none; }
        & > .option-list--option-disabled {
            color: $text-primary;
            background: $panel;
            text-style: bold;
        }
    }
    """

    BINDINGS = [Binding("enter", "select", "Edit", id="settings.edit")]

    def __init__(self, fields: Iterable[Field], views: dict[str, FieldView], *, id: str | None = None) -> None:
        self._fields = tuple(fields)
        self._kinds = {fld.key: fld.kind for fld in self._fields}
        self._views = dict(views)
        self.query_text = ""
        super().__init__(*self._build_options(self._fields), id=id)

    def opens_a_text_field(self, key: str) -> bool:
        """Enter on a value that is typed (not a switch) opens the editor; ``/`` the search."""
        if bound_to(self, key, "search"):
            return True
        if bound_to(self, key, "select"):
            option = self.highlighted_option
            return option is not None and not option.disabled and self._kinds.get(option.id or "") != "bool"
        return False

    def _build_options(self, fields: Iterable[Field]) -> list[Option]:
        options: list[Option] = []
        section = None
        for fld in fields:
            if fld.section != section:
                section = fld.section
                options.append(Option(Content.assemble(f" {fld.group}  ", (f"[{section}]", "dim")),
                                      id=f"section:{section}", disabled=True))
            options.append(Option(self._views[fld.key], id=fld.key))
        return options

    def on_mount(self) -> None:
        self._highlight_first()

    def _highlight_first(self) -> None:
        self.highlighted = next((i for i, option in enumerate(self.options) if not option.disabled), None)

    def matching(self, text: str) -> list[str]:
        """The keys that contain ``text`` (any case; all of them for an empty text)."""
        needle = text.strip().lower()
        return [fld.key for fld in self._fields if needle in fld.key.lower()]

    def filter(self, text: str) -> int:
        """Show only the settings whose key contains ``text`` (all for ""); returns how many.
        The highlighted setting stays highlighted while it matches."""
        if text.strip() == self.query_text.strip():
            return len(self.matching(text))
        current = self.highlighted_key
        keys = set(self.matching(text))
        self.query_text = text
        self.clear_options()
        self.add_options(self._build_options(fld for fld in self._fields if fld.key in keys))
        if current in keys:
            self.highlight(current)
        else:
            self._highlight_first()
        return len(keys)

    @property
    def highlighted_key(self) -> str | None:
        """The key of the highlighted setting."""
        option = self.highlighted_option
        return option.id if option is not None else None

    def show(self, views: dict[str, FieldView]) -> None:
        """Redraw the settings whose view changed."""
        for key, view in views.items():
            if self._views.get(key) != view:
                self._views[key] = view
                try:
                    self.replace_option_prompt(key, view)
                except OptionDoesNotExist:  # filtered out: shown with its new view when it comes back
                    pass

    def highlight(self, key: str) -> None:
        """Highlight ``key``, clearing the search first when it hides that setting."""
        try:
            index = self.get_option_index(key)
        except OptionDoesNotExist:
            self.filter("")
            index = self.get_option_index(key)
        self.highlighted = index


class SettingsSearch(Horizontal):
    """The search line over the list (``/``): the text typed and how many settings match.
    Every key is applied in order (a burst of keys is not reordered); enter goes to the
    list, escape clears the search."""

    DEFAULT_CSS = """
    SettingsSearch {
        display: none;
        height: 1;
        padding: 0 1;
        background: $panel;
        &.-open { display: block; }
        #search-prompt { width: auto; color: $text-accent; text-style: bold; }
        #search-input { width: 1fr; }
        #search-count { width: auto; color: $text-muted; padding-left: 1; }
        #search-count.-none { color: $text-warning; }
    }
    """

    BINDINGS = [Binding("escape", "clear", "Clear search", id="settings.search_clear")]

    class Changed(Message):
        """The search text changed (``text``), or the search ended (``done``: enter; ``cleared``: escape)."""

        def __init__(self, text: str, *, done: bool = False, cleared: bool = False) -> None:
            super().__init__()
            self.text, self.done, self.cleared = text, done, cleared

    def __init__(self, on_text: Callable[[str], None], *, id: str | None = None) -> None:
        """``on_text(text)`` is called, synchronously, on every change of the search text."""
        super().__init__(id=id)
        self._on_text = on_text

    def compose(self) -> ComposeResult:
        from .field_editor import ValueInput

        yield Label("/", id="search-prompt")
        yield ValueInput(self._on_text, self._submit, compact=True, placeholder="part of a key, e.g. lora",
                         id="search-input")
        yield Label(id="search-count")

    @property
    def is_open(self) -> bool:
        return self.has_class("-open")

    def open(self) -> None:
        from .field_editor import ValueInput

        self.add_class("-open")
        field = self.query_one("#search-input", ValueInput)
        field.closed = False
        field.focus()

    def count(self, shown: int, total: int, text: str) -> None:
        """Say how many settings match ``text``."""
        label = self.query_one("#search-count", Label)
        if not text.strip():
            label.update(f"{total} settings")
        elif shown:
            label.update(f"{shown} of {total} match")
        else:
            label.update("no key matches")
        label.set_class(bool(text.strip()) and not shown, "-none")

    def _submit(self) -> None:
        from .field_editor import ValueInput

        field = self.query_one("#search-input", ValueInput)
        field.closed = True  # keys after enter go to the list
        self.post_message(self.Changed(field.value, done=True))

    def on_descendant_focus(self) -> None:
        from .field_editor import ValueInput

        self.query_one("#search-input", ValueInput).closed = False  # clicked back into

    def action_clear(self) -> None:
        from .field_editor import ValueInput

        field = self.query_one("#search-input", ValueInput)
        field.closed = True
        field.set_text("")
        self.remove_class("-open")
        self.post_message(self.Changed("", cleared=True))
