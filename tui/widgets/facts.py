"""A panel of labelled facts (or a line saying they are being read, or why they could not be)."""

from __future__ import annotations

from collections.abc import Iterable

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget


class Facts(Widget):
    """Labelled values, or a line saying they are being read, or why they could not be."""

    DEFAULT_CSS = """
    Facts {
        height: auto;
        padding: 0 1;
    }
    """

    heading: reactive[str] = reactive("", layout=True)
    """What the facts are about."""
    rows: reactive[tuple[tuple[str, str], ...]] = reactive((), repaint=False)
    """(label, value) pairs, in order."""
    status: reactive[str] = reactive("", layout=True)
    """A line shown instead of the rows while they load ("reading ...")."""
    error: reactive[str] = reactive("", layout=True)
    """Why the facts could not be read (one line); replaces the rows."""

    def __init__(self, heading: str, *, status: str = "", id: str | None = None) -> None:
        super().__init__(id=id)
        self.set_reactive(Facts.heading, heading)
        self.set_reactive(Facts.status, status)

    def watch_rows(self, old: tuple[tuple[str, str], ...], new: tuple[tuple[str, str], ...]) -> None:
        # a new layout only when the shape may change (a live dashboard updates values every tick)
        same_shape = [(label, len(value)) for label, value in old] == [(label, len(value)) for label, value in new]
        self.refresh(layout=not same_shape)

    def show(self, rows: Iterable[tuple[str, str]]) -> None:
        self.rows, self.status, self.error = tuple(rows), "", ""

    def fail(self, message: str) -> None:
        self.rows, self.status, self.error = (), "", message

    def render(self) -> Content:
        lines = [Content.styled(self.heading, "bold $text-primary")]
        if self.error:
            lines.append(Content.styled(self.error, "$text-error"))
        elif self.status:
            lines.append(Content.styled(self.status, "$text-muted"))
        else:
            width = max((len(label) for label, _ in self.rows), default=0)
            lines.extend(Content.assemble((label.ljust(width + 2), "$text-muted"), value)
                         for label, value in self.rows)
        return Content("\n").join(lines)
