"""The start screen, shown when tunedeck opens without a project: recent projects, new, open."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Header, Label, OptionList
from textual.widgets.option_list import Option

from tunedeck.core.paths import user_config

from ..session import display_path
from .base import SteadyFooter

if TYPE_CHECKING:
    from ..app import TunedeckApp


def recent_projects() -> list[str]:
    """Recently opened project files, newest first (from the user config)."""
    return user_config().recent_projects


class StartScreen(Screen[None]):
    """Pick a recent project, or create or open one."""

    AUTO_FOCUS = "OptionList, #new"
    app: TunedeckApp  # type: ignore[assignment]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="start"):
            yield Label("[b]tunedeck[/b]  LoRA and QLoRA fine-tuning in the terminal", id="start-title")
            recent = recent_projects()
            yield Label("Recent projects" if recent else "No recent projects yet.", classes="start-heading")
            if recent:
                options = []
                for path in recent:
                    missing = "" if Path(path).exists() else "  [dim](missing)[/dim]"
                    options.append(Option(display_path(Path(path)) + missing, id=path))
                yield OptionList(*options, id="recent")
            with Horizontal(id="start-buttons"):
                yield Button("New project (ctrl+n)", variant="primary", id="new")
                yield Button("Open… (ctrl+o)", id="open")
        yield SteadyFooter(compact=True)

    @on(OptionList.OptionSelected, "#recent")
    def _recent(self, event: OptionList.OptionSelected) -> None:
        self.app.open_path(str(event.option.id))

    @on(Button.Pressed, "#new")
    def _new(self) -> None:
        self.app.action_new()

    @on(Button.Pressed, "#open")
    def _open(self) -> None:
        self.app.action_open()
