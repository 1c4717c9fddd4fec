"""The tunedeck app: screens as app modes, the open project, saving, themes, the palette.

The app owns the state every screen shares: the open project (:class:`Session`), a
revision counter bumped on every change (screens watch it), the machine's hardware, the
engine client and the run started from this window. Screens read that state and ask the
app to change it (:meth:`TunedeckApp.edit_setting`, :meth:`TunedeckApp.action_save`...).
The run this window follows, its controls, merging and exporting are
:mod:`tunedeck.tui.run_control` (mixed into the app); the garbage collector's tuning is
:mod:`tunedeck.tui.gc_tuning`.

The UI process stays light: nothing here imports torch, transformers, peft, trl,
datasets, bitsandbytes or accelerate. Work that needs them is an engine request
(:mod:`tunedeck.core.engine`) or a trainer process (:mod:`tunedeck.core.launcher`), made
from worker threads; a frame never waits on a model.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from textual import events, on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.reactive import var
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from tunedeck.core.errors import UserError
from tunedeck.core.hardware import Hardware, detect
from tunedeck.core.paths import add_recent_project, update_user_config, user_config
from tunedeck.core.project import Project

from .gc_tuning import GcTuning
from .run_control import RunControl
from .screens.base import one_line
from .session import Session, display_path
from .themes import DEFAULT_THEME, bundled_themes, user_themes
from .training import RunView
from .widgets.mode_tabs import SCREENS, ModeTabs

if TYPE_CHECKING:
    from textual.command import Provider
    from textual.theme import Theme

    from tunedeck.core.engine import EngineCalls

T = TypeVar("T")
FIRST_FRAME_ENV = "TUNEDECK_FIRST_FRAME_FILE"
"""When set, the app writes the wall-clock time of its first frame to this file (bench/)."""


def _screen(module: str, name: str) -> Callable[[], Screen[Any]]:
    """A mode's screen, imported when the mode is first shown: start-up imports only the
    first screen's module (the first frame must come fast; see bench/bench_startup.py)."""

    def make() -> Screen[Any]:
        return getattr(importlib.import_module(f"tunedeck.tui.screens.{module}"), name)()

    return make


def _commands() -> type[Provider]:
    from .commands import TunedeckCommands

    return TunedeckCommands


class TunedeckApp(RunControl, App[int]):
    """LoRA and QLoRA fine-tuning in the terminal."""

    TITLE = "tunedeck"
    CSS_PATH = "app.tcss"
    MODES = {
        "start": _screen("start", "StartScreen"),
        "models": _screen("models", "ModelsScreen"),
        "modules": _screen("modules", "ModulesScreen"),
        "dataset": _screen("dataset", "DatasetScreen"),
        "settings": _screen("settings", "SettingsScreen"),
        "train": _screen("train", "TrainScreen"),
        "chat": _screen("chat", "ChatScreen"),
    }
    COMMANDS = App.COMMANDS | {_commands}
    tune_gc = False
    """Tune Python's garbage collector for this process (:mod:`tunedeck.tui.gc_tuning`); set by
    :func:`run_app`, which owns the process (not in tests, which run many apps in one)."""
    BINDINGS = [
        *(Binding(str(number), f"switch_screen('{mode}')", title, show=False, id=f"screen.{mode}")
          for number, (mode, title) in enumerate(SCREENS, 1)),
        Binding("ctrl+s", "save", "Save", id="project.save"),
        Binding("ctrl+o", "open", "Open", id="project.open"),
        Binding("ctrl+n", "new", "New", show=False, id="project.new"),
        Binding("f1,question_mark", "keys", "Keys", id="app.keys"),
        Binding("ctrl+p", "command_palette", "Palette", show=False, priority=True, id="app.command_palette"),
        Binding("ctrl+q", "quit", "Quit", priority=True, id="app.quit"),
        Binding("ctrl+c", "help_quit", show=False, system=True, id="app.help_quit"),
    ]

    session: var[Session | None] = var(None)
    """The open project, or None on the start screen."""
    revision: var[int] = var(0)
    """Bumped on every change to the session (edits, saves); screens watch it."""
    hardware: var[Hardware | None] = var(None)
    """The machine, once detected (in a worker: NVML can take a moment)."""
    run_view: var[RunView | None] = var(None)
    """The run this window follows (started here, or opened on the Train screen): what the
    dashboard draws, folded from its events by a worker."""

    @dataclass
    class HardwareDetected(Message):
        """The machine as detected (NVML, /proc) by a worker."""

        hardware: Hardware

    def __init__(self, project: Project | None = None, *, engine: EngineCalls | None = None,
                 hardware: Hardware | None = None) -> None:
        """``engine`` and ``hardware`` are for tests; by default the app starts its own engine
        on first need and detects the hardware in the background."""
        self.DEFAULT_MODE = "settings" if project is not None else "start"  # type: ignore[misc]
        super().__init__()
        self._engine = engine
        self._owns_engine = engine is None
        self._config_lock = threading.Lock()
        self._gc_tuning = GcTuning()
        self._attach_to: Path | None = None  # a run to open on the Train screen once shown
        self._quitting = False  # the quit questions are on screen
        self._config = user_config()
        themes, self._theme_problems = user_themes()
        themes = bundled_themes() + themes
        for theme in themes:
            self.register_theme(theme)
        self.tunedeck_themes = [theme.name for theme in themes]
        wanted = self._config.theme
        self.theme = wanted if wanted in self.available_themes else DEFAULT_THEME
        if project is not None:
            self.set_reactive(TunedeckApp.session, Session(project))
        if hardware is not None:
            self.set_reactive(TunedeckApp.hardware, hardware)

    def _fatal_error(self) -> None:
        """A bug that escaped every handler: the app ends with one line naming the crash log
        that holds the traceback, as the command line does (never a traceback on screen).
        Tests keep Textual's own handling, which re-raises the error."""
        if not self.tune_gc:
            super()._fatal_error()
            return
        from rich.text import Text

        from tunedeck.core.cli import crash_log

        error = self._exception or sys.exc_info()[1] or RuntimeError("unknown error")
        line = f"tunedeck: internal error: {one_line(error)} (a bug; the traceback is in {crash_log(error)})"
        self._exit_renderables.append(Text(line))
        self._close_messages_no_wait()

    def notify(self, message: str, *, title: str = "", severity: Any = "information", timeout: float | None = None,
               markup: bool = False) -> None:
        """A notification, never read as markup: it carries the user's text (names, paths,
        reasons), where "[/x]" is text. (Widgets' notify passes markup=True: ignored.)"""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    # -- start-up and shut-down --------------------------------------------------------

    def on_mount(self) -> None:
        self._update_title()
        if self._config.keymap:
            self.set_keymap(self._config.keymap)
        for problem in self._theme_problems:
            self.notify(problem, severity="warning", timeout=10)
        self.theme_changed_signal.subscribe(self, self._theme_changed)

    def on_ready(self) -> None:
        """The first frame is on the screen: now the work that can wait for it."""
        stamp_file = os.environ.get(FIRST_FRAME_ENV)
        if stamp_file:
            Path(stamp_file).write_text(repr(time.time()), encoding="utf-8")
        _start_resource_tracker()
        if self.tune_gc:
            self._gc_tuning.start(self)
        if self.hardware is None:
            self._detect_hardware()
        if self.session is not None and self.session.path is not None:
            self._remember_recent(self.session.path)
        if self._attach_to is not None and self.session is not None:
            self.switch_mode("train")
            self.open_run(self._attach_to)

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, (events.Key, events.MouseDown)):
            self._gc_tuning.input_seen()
        await super().on_event(event)

    def on_unmount(self) -> None:
        if self._owns_engine and self._engine is not None:
            self._engine.close(timeout=0.5)

    @property
    def engine(self) -> EngineCalls:
        """The engine client (its process starts on the first request)."""
        if self._engine is None:
            from tunedeck.core.engine import EngineClient

            self._engine = EngineClient()
        return self._engine

    @work(thread=True, exit_on_error=False, group="hardware")
    def _detect_hardware(self) -> None:
        self.post_message(self.HardwareDetected(detect()))

    @on(HardwareDetected)
    def _hardware_detected(self, event: HardwareDetected) -> None:
        self.hardware = event.hardware

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one handler for the app's failed background work: one line, never a traceback."""
        if event.state == WorkerState.ERROR:
            self.notify(one_line(event.worker.error), severity="error", timeout=10)

    # -- the user config ---------------------------------------------------------------

    @work(thread=True, exit_on_error=False, group="config")
    def _remember(self, **changes: Any) -> None:
        with self._config_lock:
            update_user_config(**changes)

    @work(thread=True, exit_on_error=False, group="config")
    def _remember_recent(self, path: Path) -> None:
        with self._config_lock:
            add_recent_project(path)

    @work(thread=True, exit_on_error=False, group="config")
    def remember_model_dir(self, path: str) -> None:
        """List the models at ``path`` from now on (the user config's ``model_dirs``)."""
        with self._config_lock:
            dirs = user_config().model_dirs
            if path not in dirs:
                update_user_config(model_dirs=[*dirs, path])

    def _theme_changed(self, theme: Theme) -> None:
        if theme.name != self._config.theme:
            self._config.theme = theme.name
            self._remember(theme=theme.name)

    def set_theme(self, name: str) -> None:
        """Switch the colour theme (remembered in the user config)."""
        self.theme = name

    # -- screens -----------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Project actions need a project; the screen showing is shown as such."""
        if action in ("switch_screen", "save") and self.session is None:
            return False
        if action == "switch_screen" and parameters and parameters[0] == self.current_mode:
            return None
        return True

    def action_switch_screen(self, mode: str) -> None:
        if self.session is None:
            self.notify("open or create a project first (ctrl+o, ctrl+n)", severity="warning")
            return
        self.switch_mode(mode)

    @on(ModeTabs.Selected)
    def _tab_selected(self, event: ModeTabs.Selected) -> None:
        self.action_switch_screen(event.mode)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """Textual's own palette commands, less its keys panel (tunedeck's "Keys" lists every key)."""
        return (command for command in super().get_system_commands(screen) if command.title != "Keys")

    def action_keys(self) -> None:
        """Show every key bound where the user is now."""
        from .screens.dialogs import KeyRow, KeysScreen

        screen = self.screen
        rows = []
        for active in screen.active_bindings.values():
            binding, node = active.binding, active.node
            where = "app" if node is self else "screen" if node is screen else type(node).__name__
            rows.append(KeyRow(self.get_key_display(binding), binding.description or binding.action, where,
                               binding.id or ""))
        rows.sort(key=lambda row: not row.binding_id)  # tunedeck's own keys first, then Textual's
        self.push_screen(KeysScreen(rows))

    # -- the project -----------------------------------------------------------------------

    def _update_title(self) -> None:
        session = self.session
        if session is None:
            self.title, self.sub_title = "tunedeck", ""
            return
        self.title = session.project.name + (" *" if session.dirty else "")
        self.sub_title = display_path(session.path) if session.path else ""

    def watch_revision(self) -> None:
        self._update_title()

    def open_project(self, project: Project) -> None:
        """Make ``project`` the open one (screens reload) and remember it as recent."""
        self.session = Session(project)
        self.revision += 1
        if project.path is not None:
            self._remember_recent(project.path)
        if self.current_mode == "start":
            self.switch_mode("settings")

    def open_path(self, path: str) -> None:
        """Open the project file at ``path``; a bad file is one line in a notification."""
        try:
            project = Project.load(path)
        except UserError as exc:
            self.notify(exc.message, severity="error", timeout=10)
            return
        self.open_project(project)

    def action_open(self) -> None:
        self._open_dialog()

    def action_new(self) -> None:
        self._new_dialog()

    @work(group="dialogs", exit_on_error=False)
    async def _open_dialog(self) -> None:
        from .screens.dialogs import OpenProjectScreen

        if await self._may_replace("Open another project"):
            project = await self.push_screen_wait(OpenProjectScreen())
            if isinstance(project, Project):
                self.open_project(project)

    @work(group="dialogs", exit_on_error=False)
    async def _new_dialog(self) -> None:
        from .screens.dialogs import NewProjectScreen

        if await self._may_replace("Create another project"):
            project = await self.push_screen_wait(NewProjectScreen())
            if isinstance(project, Project):
                self.open_project(project)
                self.notify(f"wrote {display_path(project.path)}" if project.path else "created")

    async def _may_replace(self, doing: str) -> bool:
        """Before the open project goes away: save it, drop its changes, or stay."""
        from .screens.dialogs import ChoiceScreen

        session = self.session
        if session is None or not session.dirty:
            return True
        name = display_path(session.path) if session.path else session.project.name
        answer = await self.push_screen_wait(ChoiceScreen(
            "Unsaved changes", f"{name} has unsaved changes. {doing}:",
            [("Save first", "save"), ("Without saving", "discard")],
            disabled=("save",) if session.invalid else (),
        ))
        if answer == "save":
            return self.save()
        return answer == "discard"

    def action_save(self) -> None:
        self.save()

    def save(self) -> bool:
        """Save the open project (atomic write of a small file, done here so that it is ordered
        with the edits around it); refused, with the reason, while a field is invalid."""
        session = self.session
        if session is None:
            return False
        try:
            path = session.save()
        except UserError as exc:
            self.notify(exc.message, severity="error", timeout=10)
            return False
        self.revision += 1
        self.notify(f"saved {display_path(path)}", title="Saved")
        return True

    # -- editing -----------------------------------------------------------------------------

    def _change(self, edit: Callable[[Session], T]) -> T:
        session = self.session
        assert session is not None
        before = session.version
        result = edit(session)
        if session.version != before:
            self.revision += 1
        return result

    def edit_setting(self, key: str, *, text: str | None = None, value: Any = None) -> None:
        """Apply an edit from the settings editor: typed ``text``, or a chosen ``value``."""
        if text is not None:
            self._change(lambda s: s.edit_text(key, text))
        else:
            self._change(lambda s: s.edit_value(key, value))

    def edit_settings(self, values: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        """Apply several edits (a preset); returns the keys that changed and the refused ones."""
        changed: list[str] = []

        def apply(session: Session) -> dict[str, str]:
            for key, value in values.items():
                if session.edit_value(key, value):
                    changed.append(key)
            return {k: session.invalid[k].reason for k in values if k in session.invalid}

        refused = self._change(apply)
        return changed, refused

    def restore_setting(self, key: str, snapshot: tuple[bool, Any]) -> None:
        """Put ``key`` back as it was before an edit that was cancelled."""
        self._change(lambda s: s.restore(key, snapshot))

    def reset_setting(self, key: str) -> None:
        """Put ``key`` back to its default (removed from the file)."""
        self._change(lambda s: s.reset(key))

    async def apply_preset(self, name: str) -> None:
        """Apply a preset on the settings screen, where its edits are seen."""
        await self.switch_mode("settings")
        self.screen.apply_preset(name)  # type: ignore[attr-defined]

    # -- quitting -----------------------------------------------------------------------------

    async def action_quit(self) -> None:
        if not self._quitting:
            self._quit_dialog()

    @work(group="dialogs", exit_on_error=False)
    async def _quit_dialog(self) -> None:
        self._quitting = True
        try:
            await self._ask_and_quit()
        finally:
            self._quitting = False

    async def _ask_and_quit(self) -> None:
        """Quit, after asking about unsaved changes and a run that is going."""
        from .screens.dialogs import ChoiceScreen

        if self.session is not None and self.session.dirty:
            name = display_path(self.session.path) if self.session.path else self.session.project.name
            invalid = self.session.invalid
            why = f" It cannot be saved while {', '.join(invalid)} is invalid." if invalid else ""
            answer = await self.push_screen_wait(ChoiceScreen(
                "Unsaved changes", f"{name} has unsaved changes.{why}",
                [("Save and quit", "save"), ("Quit without saving", "discard")],
                disabled=("save",) if invalid else (),
            ))
            if answer is None or (answer == "save" and not self.save()):
                return
        if self.training:
            run = self._run
            answer = await self.push_screen_wait(ChoiceScreen(
                "A run is going", f"{run.name} is training. Stop it (a checkpoint and the adapter are saved "
                "first), or leave it running: it goes on without this window, and `tunedeck attach "
                f"{display_path(run.run_dir)}` follows it again.",
                [("Stop the run and quit", "stop"), ("Leave it running and quit", "leave")],
            ))
            if answer is None:
                return
            if answer == "leave":
                run.detach()
                self._left_running = True
            elif not run.ended:
                try:
                    await asyncio.to_thread(run.stop)  # returns once the trainer has taken it
                except UserError as exc:
                    self.notify(exc.message, severity="warning")
        self.exit(0)


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with the real stderr.

    Spawning a process (the engine, a trainer) first starts the tracker and hands it
    ``sys.stderr.fileno()``; while the app runs, Textual's stand-in for stderr answers -1,
    which makes every spawn fail ("bad value(s) in fds_to_keep"). Started here, on the UI
    thread before any worker spawns, the tracker is already running when they do.
    """
    from multiprocessing import resource_tracker

    captured, sys.stderr = sys.stderr, sys.__stderr__
    try:
        resource_tracker.ensure_running()
    finally:
        sys.stderr = captured


def run_app(project: str | None, attach: str | os.PathLike[str] | None = None) -> int:
    """``tunedeck [PROJECT]``: open the app (on the Train screen following the run folder
    ``attach``, when given). A project that does not load raises UserError before the
    terminal is taken over, so the shell gets one line and exit code 2."""
    loaded = Project.load(project) if project else None
    app = TunedeckApp(loaded)
    app._attach_to = Path(attach) if attach is not None else None
    app.tune_gc = True
    code = app.run()
    handle = app.run_handle
    if handle is not None and not handle.ended:
        if app._left_running:
            print(f"tunedeck: {handle.name} goes on training; follow it with: tunedeck attach "
                  f"{display_path(handle.run_dir)}", flush=True)
        else:
            print(f"tunedeck: waiting for run {handle.name} to save and stop…", flush=True)
            handle.wait()
    return code or 0
