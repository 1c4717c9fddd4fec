"""What every screen of an open project shares: header, tab bar, footer, reloading when
another project opens, and one place where failed background work is reported."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header
from textual.widgets._footer import FooterKey
from textual.worker import Worker, WorkerState
from tunedeck.core.errors import one_line

from ..widgets.mode_tabs import ModeTabs

if TYPE_CHECKING:
    from ..app import TunedeckApp
    from ..session import Session


class SteadyFooter(Footer):
    """The footer: the keys that fit the terminal's width, rebuilt only when they change.

    Textual's footer rebuilds all its key widgets on every change of the active bindings,
    which every focus move is: tens of milliseconds per key press on a busy screen
    (bench/bench_dashboard.py). And it lays out every key however narrow the terminal is,
    so at 80 columns the last ones are cut mid-word and spill under the palette key. Here
    the screen's own keys come first; when they do not all fit, the app-wide ones after
    them are left out from the last (ctrl+q still quits: f1 lists every key), then the
    screen's last ones: a key is shown whole or not at all.
    """

    _shown: tuple[object, ...] | None = None

    def _keys(self, screen: Screen[object]) -> list[tuple[Binding, bool, str]]:
        """The keys to show: one per action, in order, as many as fit the width."""
        seen: dict[str, tuple[Binding, bool, str]] = {}
        palette = None
        for _, binding, enabled, tooltip in screen.active_bindings.values():
            if binding.action == "command_palette":
                palette = binding
            if binding.show and binding.action not in seen:
                seen[binding.action] = (binding, enabled, tooltip)
        keys = list(seen.values())
        width = self.app.size.width
        if self.show_command_palette and self.app.ENABLE_COMMAND_PALETTE and palette is not None:
            width -= self._width(palette) + 1  # docked right, with its border
        essential = [i for i, (b, _, _) in enumerate(keys) if b.action == "keys"]
        while keys and sum(self._width(b) for b, _, _ in keys) > width:
            drop = next((i for i in reversed(range(len(keys))) if i not in essential), None)
            if drop is None:
                break
            del keys[drop]
            essential = [i for i, (b, _, _) in enumerate(keys) if b.action == "keys"]
        return keys

    def _width(self, binding: Binding) -> int:
        """Cells a compact key takes: its key, a space, its description and the margin."""
        return len(self.app.get_key_display(binding)) + 1 + len(binding.description) + 1

    def bindings_changed(self, screen: Screen[object]) -> None:
        shown = tuple((b.key, self.app.get_key_display(b), b.description, b.action, enabled, tooltip)
                      for b, enabled, tooltip in self._keys(screen))
        if self._bindings_ready and shown == self._shown:
            return
        if screen.app.app_focus and self.is_attached and screen is self.screen:
            self._shown = shown  # the footer is rebuilt with these keys
        super().bindings_changed(screen)

    def on_resize(self) -> None:
        if self.is_attached and self._bindings_ready:
            self.bindings_changed(self.screen)

    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        for binding, enabled, tooltip in self._keys(self.screen):
            yield FooterKey(binding.key, self.app.get_key_display(binding), binding.description, binding.action,
                            disabled=not enabled, tooltip=tooltip).data_bind(compact=Footer.compact)
        if self.show_command_palette and self.app.ENABLE_COMMAND_PALETTE:
            try:
                _node, binding, enabled, tooltip = self.screen.active_bindings[self.app.COMMAND_PALETTE_BINDING]
            except KeyError:
                return
            yield FooterKey(binding.key, self.app.get_key_display(binding), binding.description, binding.action,
                            classes="-command-palette", disabled=not enabled,
                            tooltip=binding.tooltip or binding.description)


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
