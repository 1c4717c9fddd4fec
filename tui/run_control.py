"""Run control: starting, following, stopping and ending runs, and merging and exporting them.

:class:`RunControl` is mixed into :class:`~tunedeck.tui.app.TunedeckApp`: the run this window
follows (a trainer started here, or a run of the runs folder opened on the Train screen),
its controls (start, stop, save a checkpoint, abort), the worker that folds its events into
the app's ``run_view`` and the notifications of its alarms and its end; merging a run's
adapter into its base model and exporting a run as GGUF, both in the engine process. Its
actions, workers and message handlers are the app's: the mixin is a Textual message pump,
so its ``@on`` handlers are registered as the app's own.

The UI process stays light: nothing here imports torch or the libraries that need it. A run
starts through :func:`tunedeck.tui.training.launch` (the pre-flight in the engine process,
then :mod:`tunedeck.core.launcher`), from worker threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import on, work
from textual.message import Message
from textual.message_pump import MessagePump
from textual.worker import get_current_worker

from tunedeck.core.errors import UserError
from tunedeck.core.runs import FINISHED_STATUS, STOPPED

from .session import display_path
from .training import RunView, launch, status_label

if TYPE_CHECKING:
    from tunedeck.core.runs import RunInfo


class RunControl(MessagePump):
    """The run side of :class:`~tunedeck.tui.app.TunedeckApp` (mixed in before ``App``,
    which gives it ``notify``, ``push_screen_wait``, workers and the app's ``engine`` and
    ``run_view``)."""

    @dataclass
    class RunFollowed(Message):
        """A run to follow: a trainer started here (a launcher RunHandle) or one attached to
        (an AttachedRun, from its events.jsonl)."""

        handle: Any
        view: RunView
        started_here: bool

    @dataclass
    class RunAlarm(Message):
        """A health alarm of the followed run (an ``alarm`` event)."""

        view: RunView
        alarm: dict[str, Any]

    @dataclass
    class RunEnded(Message):
        """The followed run has ended (finished, failed or died) and its process is gone."""

        view: RunView

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._run: Any = None
        self._left_running = False  # quit with "leave it running"
        self._export_lock = threading.Lock()  # one GGUF export at a time
        self._exporting: str | None = None  # the run being exported

    # -- training ---------------------------------------------------------------------------------

    @property
    def run_handle(self) -> Any:
        """The run this window follows (a launcher RunHandle or AttachedRun), if any."""
        return self._run

    @property
    def training(self) -> bool:
        """The run this window follows is going."""
        return self._run is not None and not self._run.ended

    def action_start_training(self) -> None:
        session = self.session
        if session is None or session.path is None:
            self.notify("open a project first", severity="warning")
            return
        if session.invalid:
            self.notify(f"fix the invalid settings first: {', '.join(session.invalid)}", severity="error")
            return
        if self.training:
            self.notify(f"{self._run.name} is still running; stop it first", severity="warning")
            return
        self.notify("checking the project and starting the trainer…", title="Training")
        self._start_run(str(session.path), tuple(session.overrides()))

    def _control(self, what: str) -> Any:
        """The live run to send ``what`` to, or None (and a notification saying why not)."""
        if not self.training:
            self.notify(f"no run is going: nothing to {what}", severity="warning")
            return None
        return self._run

    def action_stop_training(self) -> None:
        run = self._control("stop")
        if run is not None:
            self._log_control("stop asked: a checkpoint and the adapter are saved at the end of this step")
            self._send_control(run, "stop")

    def action_save_checkpoint(self) -> None:
        run = self._control("save")
        if run is not None:
            self._log_control("checkpoint asked: saved at the end of this step; training goes on")
            self._send_control(run, "save")

    def action_abort_training(self) -> None:
        if self._control("abort") is not None:
            self._abort_dialog()

    @work(thread=True, group="run-control", exit_on_error=False)
    def _send_control(self, run: Any, action: str) -> None:
        """Send a control to the run's trainer (off the UI thread: it waits for the answer);
        the answer, or why it could not be sent, is a notification."""
        try:
            message = run.control(action)
        except UserError as exc:
            self.notify(exc.message, title="Training", severity="warning", timeout=10)
            return
        self.notify(f"{run.name}: {message}", title="Training", severity="warning" if action == "abort" else
                    "information")

    @work(group="dialogs", exit_on_error=False)
    async def _abort_dialog(self) -> None:
        from .screens.dialogs import ChoiceScreen

        run = self._run
        answer = await self.push_screen_wait(ChoiceScreen(
            "Abort the run", f"{run.name} ends at once and nothing more is saved (checkpoints already written "
            "stay). Stop saves a checkpoint and the adapter first.",
            [("Abort, saving nothing", "abort"), ("Stop with a checkpoint", "stop")],
        ))
        if answer == "abort" and not run.ended:
            self._log_control("abort asked: ending now, saving nothing")
            self._send_control(run, "abort")
        elif answer == "stop":
            self.action_stop_training()

    def _log_control(self, text: str) -> None:
        if self.run_view is not None:
            self.run_view.note("control", text)

    def open_run(self, run_dir: str | Path) -> None:
        """Follow a run of the runs folder: a live one re-attaches (history, then live, with
        the controls); an ended one shows its plots."""
        if self.run_view is not None and Path(run_dir).resolve() == self.run_view.run_dir.resolve():
            return
        self._attach_run(str(run_dir))

    @work(thread=True, exclusive=True, group="run-start", exit_on_error=False)
    def _start_run(self, project_path: str, overrides: tuple[str, ...]) -> None:
        """The pre-flight of `tunedeck train` in the engine process (the target check needs
        torch), then the run folder and the trainer: a refusal creates nothing."""
        handle = launch(self.engine, project_path, overrides)
        self.post_message(self.RunFollowed(handle, RunView(handle.name, handle.run_dir), started_here=True))

    @work(thread=True, exclusive=True, group="run-start", exit_on_error=False)
    def _attach_run(self, run_dir: str) -> None:
        from tunedeck.core.launcher import attach

        handle = attach(run_dir)
        view = RunView(handle.name, handle.run_dir)
        alarms = view.fold(handle.events(timeout=0), handle.status)  # its history, before it is shown
        self.post_message(self.RunFollowed(handle, view, started_here=False))
        for alarm in alarms[-3:]:
            self.post_message(self.RunAlarm(view, alarm))

    @on(RunFollowed)
    def _run_followed(self, event: RunFollowed) -> None:
        handle, before = event.handle, self._run
        if before is not None and before is not handle and not before.ended:
            before.detach()  # it goes on; the runs list opens it again
            self.notify(f"{before.name} goes on running; open it from the Train screen's list to follow it",
                        title="Training")
        self._run = handle
        self._left_running = False
        self.run_view = event.view
        self._follow_run(handle, event.view)
        if event.started_here:
            self.notify(f"{handle.name} started; the Train screen (5) shows it", title="Training")

    @work(thread=True, exclusive=True, group="run-follow", exit_on_error=False)
    def _follow_run(self, handle: Any, view: RunView) -> None:
        """Fold the run's events into its view until it ends (the screen redraws on a timer);
        alarms and the end are posted as they come."""
        worker = get_current_worker()
        was_live = not view.ended  # an ended run opened to look at is not news
        while not worker.is_cancelled:
            events = handle.events(timeout=0.2)
            for alarm in view.fold(events, handle.status):
                self.post_message(self.RunAlarm(view, alarm))
            was_live = was_live or not view.ended
            if handle.ended and not events:
                view.fold([], handle.status)
                if was_live:
                    self.post_message(self.RunEnded(view))
                return

    @on(RunAlarm)
    def _run_alarm(self, event: RunAlarm) -> None:
        if event.view is self.run_view and not event.view.ended:
            self.notify(f"{event.alarm.get('message', '')}", title=f"Alarm: {event.view.name}",
                        severity="warning", timeout=10)

    @on(RunEnded)
    def _run_ended(self, event: RunEnded) -> None:
        view = event.view
        if view is not self.run_view:
            return
        snap = view.snapshot()
        failed = view.status not in (FINISHED_STATUS, STOPPED)
        note = snap.reason if failed else ""
        self.notify(f"{view.name} {status_label(view.status)}" + (f": {note}" if note else ""),
                    severity="error" if failed else "information", title="Training", timeout=15)

    # -- merging ---------------------------------------------------------------------------------

    @work(thread=True, group="merge", exit_on_error=False)
    def merge_run(self, run_dir: str, out: str | None = None) -> None:
        """Merge a run's adapter into its base model (in the engine): a standalone model folder,
        ``runs/<name>/merged`` unless ``out`` is given; the stages and the end are notifications."""
        out = out or str(Path(run_dir) / "merged")
        name = Path(run_dir).name
        self.notify(f"merging {name} into {display_path(Path(out))}…", title="Merge")
        result = self.engine.merge(run_dir, out,
                                   on_progress=lambda p: self.notify(p["message"], title="Merge", timeout=4))
        self.notify(f"{name} merged: {display_path(Path(result['out']))} ({result['params']:,} parameters, "
                    f"{result['dtype']}); it loads with AutoModelForCausalLM.from_pretrained", title="Merge",
                    timeout=15)

    # -- exporting as GGUF ---------------------------------------------------------------------

    @property
    def exporting(self) -> str | None:
        """The name of the run being exported as GGUF now, or None."""
        return self._exporting

    def export_dialog(self, run: RunInfo) -> None:
        """Ask how to export ``run`` as GGUF (the quantization, the folder), then export it;
        a run that cannot be exported, or an export already going, is a notification."""
        from .exporting import default_out, export_refusal
        from .screens.dialogs import ExportDialog

        why = export_refusal(run)
        if why is None and self._exporting is not None:
            why = f"{self._exporting} is being exported: one export at a time (Cancel export in the palette stops it)"
        if why is not None:
            self.notify(why, title="Export", severity="warning")
            return

        def chosen(choice: Any) -> None:
            if choice is not None:
                self.export_run(run.path, out=choice.out, quant=choice.quant, lora=choice.lora)

        self.push_screen(ExportDialog(run.name, display_path(default_out(run.path))), chosen)

    @work(thread=True, group="export", exit_on_error=False)
    def export_run(self, run_dir: str, out: str | None = None, quant: str = "f16", lora: bool = False) -> None:
        """Export a run as GGUF (in the engine: its adapter merged into the base, converted,
        ``quant``; ``lora``: the adapter as a GGUF LoRA too) into ``out``, ``runs/<name>/gguf``
        unless given. The stages (at most one notification per stage and every two seconds)
        and the end (the file, its size, the ``ollama create`` command) are notifications; a
        refusal is one error notification. One export at a time: a second one is refused
        (Textual's ``exclusive`` would cancel the first instead). :meth:`cancel_export` stops it."""
        from .exporting import ProgressNotes, default_out, done_text

        name = Path(run_dir).name
        if not self._export_lock.acquire(blocking=False):
            self.notify(f"{self._exporting} is being exported: one export at a time (Cancel export in the palette "
                        "stops it)", title="Export", severity="warning")
            return
        try:
            self._exporting = name
            worker = get_current_worker()
            out = out or str(default_out(run_dir))
            self.notify(f"exporting {name} as {quant} GGUF into {display_path(Path(out))}… (Cancel export in the "
                        "palette stops it)", title="Export")
            notes = ProgressNotes()

            def progress(partial: dict[str, Any]) -> None:
                text = notes(partial)
                if text is not None:
                    self.notify(text, title="Export", timeout=4)

            try:
                result = self.engine.export(run_dir, out, quant=quant, lora=lora, on_progress=progress,
                                            cancel=worker.cancelled_event)
            except UserError as exc:
                if worker.is_cancelled:
                    self.notify(f"{name}: export cancelled; nothing half-written is left", title="Export",
                                severity="warning")
                else:
                    self.notify(exc.message, title="Export", severity="error", timeout=10)
                return
            self.notify(done_text(name, result), title="Export", timeout=30)
        finally:
            self._exporting = None
            self._export_lock.release()

    def cancel_export(self) -> None:
        """Stop the export going (the engine stops between tensors and removes what it wrote)."""
        going = [w for w in self.workers if w.group == "export" and w.is_running]
        if not going or self._exporting is None:
            self.notify("no export is going", title="Export", severity="warning")
            return
        self.notify(f"cancelling the export of {self._exporting}…", title="Export")
        for worker in going:
            worker.cancel()
