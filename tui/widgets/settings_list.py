"""Every setting of a project in one scrolling list: name, value, where the value comes
from, a one-line help and, when there is one, the problem with it.

One widget for the whole list (an :class:`~textual.widgets.OptionList` whose entries lay
themselves out at the width they get), so the settings screen opens as fast as a screen
with a handful of widgets; the value is edited in one shared editor
(:mod:`tunedeck.tui.widgets.field_editor`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual.binding import Binding
from textual.content import Content
from textual.visual import Visual
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from tunedeck.core.schema import Field

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


class SettingsList(OptionList):
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
        options: list[Option] = []
        section = None
        for fld in fields:
            if fld.section != section:
                section = fld.section
                options.append(Option(Content.assemble(f" {fld.group}  ", (f"[{section}]", "dim")),
                                      id=f"section:{section}", disabled=True))
            options.append(Option(views[fld.key], id=fld.key))
        super().__init__(*options, id=id)
        self._views = dict(views)

    def on_mount(self) -> None:
        first_field = next(i for i, option in enumerate(self.options) if not option.disabled)
        self.highlighted = first_field

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
                self.replace_option_prompt(key, view)

    def highlight(self, key: str) -> None:
        self.highlighted = self.get_option_index(key)
