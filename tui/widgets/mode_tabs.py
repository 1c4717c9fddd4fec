"""The tab bar under the header: one tab per screen, the number key that opens it, the
current one highlighted. Clicking a tab asks the app to switch screens."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.content import Content
from textual.message import Message
from textual.widget import Widget

# (mode, title) in tab order; tab N is opened with number key N
SCREENS: tuple[tuple[str, str], ...] = (
    ("models", "Models"),
    ("modules", "Modules"),
    ("dataset", "Dataset"),
    ("settings", "Settings"),
    ("train", "Train"),
    ("chat", "Chat"),
)
GAP = 1


class ModeTabs(Widget):
    """The screens of a project, with the one showing highlighted (one widget, drawn as text)."""

    DEFAULT_CSS = """
    ModeTabs {
        height: 1;
        width: 1fr;
        padding-left: 1;
        background: $panel;
    }
    """

    @dataclass
    class Selected(Message):
        """A tab was clicked: show screen ``mode``."""

        mode: str

    def __init__(self, active: str) -> None:
        super().__init__()
        self.active = active
        self._labels = [f" {number} {title} " for number, (_, title) in enumerate(SCREENS, 1)]

    def render(self) -> Content:
        parts: list[Content | str] = []
        for (mode, _), label in zip(SCREENS, self._labels):
            style = "bold $text on $primary" if mode == self.active else "$foreground-muted"
            parts += [Content.styled(label, style), " " * GAP]
        return Content.assemble(*parts)

    def on_click(self, event: events.Click) -> None:
        x = event.x - self.styles.padding.left
        for (mode, _), label in zip(SCREENS, self._labels):
            if 0 <= x < len(label):
                self.post_message(self.Selected(mode))
                return
            x -= len(label) + GAP
