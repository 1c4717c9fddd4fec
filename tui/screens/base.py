"""What every screen of an open project shares: header, tab bar, footer, reloading when
another project opens, and one place where failed background work is reported."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, Header
from textual.worker import Worker, WorkerState

from tunedeck.core.errors import one_line

from ..widgets.mode_tabs import ModeTabs

if TYPE_CHECKING:
    from ..app import TunedeckApp
    from ..session import Session


class SteadyFooter(Footer):
    """The footer, rebuilt only when the keys it shows change. Textual's footer rebuilds all
    its key widgets on every change of the active bindings, which every focus move is: tens
    of milliseconds per key press on a busy screen (bench/bench_dashboard.py)."""

    _shown: tuple[object, ...] | None = None

    def bindings_changed(self, screen: Screen[object]) -> None:
        shown = tuple((b.key, self.app.get_key_display(b), b.description, b.action, enabled, tooltip,
                       b.group.description if b.group else None)
                      for _, b, enabled, tooltip in screen.active_bindings.values() if b.show)
        if self._bindings_ready and shown == self._shown:
            return
        if screen.app.app_focus and self.is_attached and screen is self.screen:
            self._shown = shown  # the footer is rebuilt with these keys
        super().bindings_changed(screen)


class ProjectScreen(Screen[None]):
    """A screen of the open project (one per app mode)."""

    MODE: ClassVar[str]
    app: TunedeckApp  # type: ignore[assignment]

    def compose(self) -> ComposeResult:
        yield Header()
        yield ModeTabs(self.MODE)
        yield from self.compose_body()
        yield SteadyFooter(compact=True)

    def compose_body(self) -> ComposeResult:
        """The screen's own widgets, between the tab bar and the footer."""
        yield from ()

    @property
    def session(self) -> Session:
        """The open project (project screens are only reachable with one open)."""
        session = self.app.session
        assert session is not None
        return session

    def on_mount(self) -> None:
        self.watch(self.app, "session", self._session_replaced, init=False)

    async def _session_replaced(self) -> None:
        self.forget_project()
        await self.recompose()
        self.project_shown()

    def forget_project(self) -> None:
        """Another project opened: drop what was read for the last one (the widgets are rebuilt)."""

    def on_screen_resume(self) -> None:
        self.project_shown()

    def project_shown(self) -> None:
        """The screen is showing, or another project opened: refresh what depends on the project."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one handler for this screen's failed background work."""
        if event.state == WorkerState.ERROR:
            self.work_failed(event.worker, one_line(event.worker.error))

    def work_failed(self, worker: Worker[object], message: str) -> None:
        """Show a failure of ``worker``; screens that show it in place override this."""
        self.notify(message, severity="error", timeout=10)
