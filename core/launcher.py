"""Starting a run and watching it: the parent side of the trainer process.

Used by ``tunedeck train`` and by the app. :func:`start_run` checks what it can without
heavy imports (project, model files, dataset, settings against the machine), creates
``runs/<name>/`` with the project snapshot, and starts the trainer in a new process
(multiprocessing "spawn"). It returns a :class:`RunHandle`:

- events come back through a one-way pipe; a watchdog thread in this process drains it
  into a local queue (so the trainer never blocks on a slow reader), and notices a
  trainer that is gone without a final event (SIGKILL, the OOM killer, a segfault) as
  soon as its end of the pipe closes. That death is reported as a ``failed`` event with
  ``died = true`` and the exit code, and appended to ``events.jsonl``;
- control messages go through :func:`tunedeck.core.runs.send_control` (stop and save: the
  run's control file, read between steps; abort: SIGUSR1), the one path that also works
  for a run this process did not start;
- the trainer runs in its own session (``setsid``): the terminal's SIGHUP and Ctrl-C do
  not reach it. The caller decides what Ctrl-C means (``tunedeck train``: stop, then
  abort). :meth:`RunHandle.detach` lets the run outlive this process (``tunedeck train
  --detach``, or quitting the app with the run left going);
- :func:`attach` follows a run this process did not start: its history from
  ``events.jsonl``, then new events as they are appended, and its death by its pid.

Refusals found in the trainer (target modules that match nothing, a dataset left empty
after masking ...) come back as a ``failed`` event with ``user_error = true``.

No torch here: this module is imported by the UI process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .events import EVENTS_FILE, FAILED, FINISHED, RUN_STARTED, EventReader, append_event, event, is_final
from .runs import (
    LOG_FILE, SNAPSHOT, checkpoint_steps, latest_checkpoint, send_control, trainer_alive, write_pid_file,
)

# exit codes of the trainer process
EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_ABORTED = 0, 1, 2, 130

STARTING, RUNNING, STOPPING = "starting", "running", "stopping"
FINISHED_STATUS, FAILED_STATUS, DIED = "finished", "failed", "died"
TERMINAL = (FINISHED_STATUS, FAILED_STATUS, DIED)

# keys that must not change when a run is resumed (the checkpoint's weights depend on them)
RESUME_FIXED = ("model.source", "model.trust_remote_code", "quantization.mode", "quantization.quant_type",
                "quantization.double_quant", "lora.r", "lora.target_modules", "lora.use_dora",
                "lora.modules_to_save", "lora.bias")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# how long a trainer may take to exit after its final event before it is killed
EXIT_GRACE_S = 60.0


@dataclass(frozen=True)
class RunSpec:
    """What the trainer process needs to know; plain values (it crosses a process boundary)."""

    run_dir: str
    name: str
    resume: bool
    project_path: str
    warnings: tuple[str, ...] = ()
    cuda_visible_devices: str | None = None  # set in the trainer before torch starts

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- checks and the run folder (no heavy imports) -------------------------------------------


def load_project(project_path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Any:
    from .project import Project

    project = Project.load(project_path)
    project.apply_overrides(list(overrides))
    return project


@dataclass
class Preflight:
    """What the checks before a run found: the model's files, the resolved settings, the rows."""

    ref: Any  # tunedeck.core.models.ModelRef
    resolved: Any  # tunedeck.core.resolve.Resolved
    splits: Any  # tunedeck.core.datafile.Splits


def preflight(project: Any) -> Preflight:
    """The checks that need no torch: settings against this machine, model files, dataset.
    `tunedeck check` runs the same ones, so a project it passes is not refused here.

    Raises UserError with one line.
    """
    from .datafile import load_splits
    from .models import resolve_source
    from .resolve import resolve

    resolved = resolve(project)
    ref = resolve_source(project["model.source"], project.root, allow_pickle=project["model.allow_pickle"])
    mode = project["quantization.mode"]
    if ref.kind == "gguf" and mode != "none":
        raise UserError(
            f'quantization.mode = "{mode}" cannot be used with a .gguf source ({ref.source}): GGUF weights are '
            "already quantized and load dequantized, not through bitsandbytes; convert the model to a safetensors "
            'folder first, or set quantization.mode = "none"'
        )
    return Preflight(ref, resolved, load_splits(project))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


def prepare_run(
    project_path: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    run_name: str | None = None,
    resume: bool = False,
) -> RunSpec:
    """Check the project, pick the run folder and write its snapshot. Raises UserError."""
    project = load_project(project_path, overrides)
    found = preflight(project)
    runs_dir = project.resolve_path(project["output.runs_dir"])
    if run_name is not None and not _NAME.match(run_name):
        raise UserError(f"--run-name {run_name!r}: use letters, digits, '.', '_' and '-' (no slashes or spaces)")
    if resume:
        run_dir = _run_to_resume(runs_dir, project, run_name)
        _check_resume_compatible(run_dir, project)
    else:
        if run_name is None:
            base = f"{slug(project.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_name, n = base, 2
            while (runs_dir / run_name).exists():
                run_name, n = f"{base}-{n}", n + 1
        run_dir = runs_dir / run_name
        if run_dir.exists():
            raise UserError(f"{run_dir}: this run already exists; pick another --run-name, or pass --resume "
                            "to continue it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot create the run folder ({exc.strerror})") from None
    write_snapshot(project, run_dir)
    warnings, visible = _gpu_choice(found.resolved.device)
    return RunSpec(run_dir=str(run_dir), name=run_dir.name, resume=resume, project_path=str(project.path),
                   warnings=tuple(warnings), cuda_visible_devices=visible)


def _run_to_resume(runs_dir: Path, project: Any, run_name: str | None) -> Path:
    if run_name is not None:
        run_dir = runs_dir / run_name
        if not run_dir.is_dir():
            raise UserError(f"--resume: no run {run_name!r} in {runs_dir}")
        if not checkpoint_steps(run_dir):
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
    else:
        prefix = slug(project.name) + "-"
        candidates = [p for p in (runs_dir.iterdir() if runs_dir.is_dir() else [])
                      if p.is_dir() and p.name.startswith(prefix) and checkpoint_steps(p)]
        if not candidates:
            raise UserError(f"--resume: no run of {project.name!r} with a checkpoint in {runs_dir}; "
                            "name one with --run-name")
        run_dir = max(candidates, key=lambda p: latest_checkpoint(p).stat().st_mtime)  # type: ignore[union-attr]
    if trainer_alive(run_dir):
        raise UserError(f"--resume: {run_dir.name} is still running")
    return run_dir


def _check_resume_compatible(run_dir: Path, project: Any) -> None:
    from .models import resolve_source
    from .project import Project

    try:
        saved = Project.load(run_dir / SNAPSHOT)
    except UserError:
        return  # no readable snapshot: the checkpoint itself will tell
    changed = []
    for key in RESUME_FIXED:
        old, new = saved[key], project[key]
        if key == "model.source":
            try:
                old = str(resolve_source(old, saved.root).path.resolve())
                new = str(resolve_source(new, project.root).path.resolve())
            except UserError:
                pass
        if old != new:
            changed.append(f"{key} {saved[key]!r} -> {project[key]!r}")
    if changed:
        raise UserError(f"--resume: {run_dir.name} was trained with other settings ({'; '.join(changed)}); "
                        "resume with the same model, quantization and LoRA shape, or start a new run")


def write_snapshot(project: Any, run_dir: Path) -> Path:
    """Write the project as run: overrides applied, paths rewritten relative to the run folder,
    so ``runs/<name>/project.toml`` loads and trains as is."""
    from .models import resolve_source
    from .project import Project, atomic_write_text

    snap = Project.from_text(project.text(), project.path)
    for key in ("model.source", "dataset.path", "dataset.eval_split", "output.runs_dir"):
        value = snap[key]
        if not isinstance(value, str) or not value:
            continue
        if key == "model.source":
            ref = resolve_source(value, project.root, allow_pickle=True)
            if ref.kind not in ("dir", "gguf"):
                continue
            target = ref.path
        else:
            target = project.resolve_path(value)
        snap.set(key, os.path.relpath(target, run_dir))
    header = (f"# tunedeck run {run_dir.name}: the project as trained, from {project.path}\n"
              "# (overrides applied; paths relative to this folder)\n")
    path = run_dir / SNAPSHOT
    atomic_write_text(path, header + snap.text())
    return path


def _gpu_choice(device: str) -> tuple[list[str], str | None]:
    """One process trains on one GPU; with several visible, use the first and say how to use all."""
    if device != "cuda":
        return [], None
    from .hardware import detect

    gpus = detect().gpus
    if len(gpus) < 2:
        return [], None
    note = (f"{len(gpus)} GPUs are visible; this run uses GPU {gpus[0].index} only. To train on all of them, "
            "run it with `accelerate launch -m tunedeck.core.trainer PROJECT.toml` (see the README)")
    return [note], str(gpus[0].index)


# -- the trainer process --------------------------------------------------------------------


EARLY_ABORT = threading.Event()  # SIGUSR1 before the trainer took over its signal


def _note_abort(signum: int, frame: Any) -> None:
    EARLY_ABORT.set()


def _trainer_entry(spec: dict[str, Any], events_conn: Any, control_conn: Any) -> None:
    """Runs in the spawned process: isolate it from the terminal, then train."""
    signal.signal(signal.SIGUSR1, _note_abort)  # an abort while the libraries import
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to interpret
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        os.setsid()  # its own session: the run outlives the terminal it was started from
    except OSError:
        pass
    run_dir = Path(spec["run_dir"])
    log = open(run_dir / LOG_FILE, "a", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)  # library output (progress bars, warnings) goes to trainer.log
    os.dup2(log.fileno(), 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # nothing of the terminal (or a caller's pipe) stays open in a run that outlives it
    os.close(null)
    if spec.get("cuda_visible_devices") is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec["cuda_visible_devices"]
    from .trainer import run_spawned

    code = run_spawned(RunSpec(**{**spec, "warnings": tuple(spec["warnings"])}), events_conn, control_conn)
    sys.exit(code)


class _RunControls:
    """What RunHandle and AttachedRun share: the status and final event (set as events arrive),
    and the controls, requests through the run's control file and SIGUSR1
    (:func:`tunedeck.core.runs.send_control`), whoever started the run."""

    run_dir: Path
    _status: str
    _final: dict[str, Any] | None
    _lock: threading.Lock

    @property
    def status(self) -> str:
        """"starting" | "running" | "stopping" | "finished" | "failed" | "died"."""
        return self._status

    @property
    def final(self) -> dict[str, Any] | None:
        """The run's last event (``finished`` or ``failed``) once it has ended."""
        return self._final

    def _send(self, message: str, stopping: bool = True) -> None:
        with self._lock:
            if self._status in TERMINAL:
                return
            if stopping:
                self._status = STOPPING
        try:
            send_control(self.run_dir, message)
        except UserError:  # the trainer is gone; the next read reports it
            pass

    def stop(self) -> None:
        """Save a checkpoint at the end of the current step, then end cleanly (with the adapter)."""
        self._send("stop")

    def save_now(self) -> None:
        """Save a checkpoint at the end of the current step and keep training."""
        self._send("save", stopping=False)

    def abort(self) -> None:
        """End at once, saving nothing."""
        self._send("abort")


class RunHandle(_RunControls):
    """A running trainer: its events, its controls and its status. See :func:`start_run`."""

    def __init__(self, spec: RunSpec, process: Any, events_conn: Any, control_conn: Any = None) -> None:
        self.spec = spec
        self.run_dir = Path(spec.run_dir)
        self.name = spec.name
        self._process = process
        self._events_conn = events_conn
        self._control_conn = control_conn
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._status = STARTING
        self._final: dict[str, Any] | None = None
        self._last_step = 0
        self._done = threading.Event()
        self._log_offset = self._events_size()
        self._watchdog = threading.Thread(target=self._watch, name=f"tunedeck-watch-{self.name}", daemon=True)
        self._watchdog.start()

    # -- what callers use ----------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """True once the run has ended and its process is gone."""
        return self._done.is_set()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exit_code(self) -> int | None:
        return self._process.exitcode

    def events(self, timeout: float = 0.2) -> list[dict[str, Any]]:
        """The events that arrived since the last call, waiting at most ``timeout`` seconds for one."""
        out: list[dict[str, Any]] = []
        if not (self._done.is_set() and self._queue.empty()):
            try:
                out.append(self._queue.get(timeout=max(0.0, timeout)))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def kill(self) -> None:
        """Kill the trainer process (SIGKILL); the watchdog reports it as died."""
        if self._process.is_alive():
            self._process.kill()

    def detach(self) -> None:
        """Let the run outlive this process: it is not waited for at exit; it goes on
        reporting to its events.jsonl, and :func:`attach` follows it again."""
        mp.process._children.discard(self._process)  # multiprocessing joins its children at exit

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the run has ended and its process is gone; returns the status."""
        self._done.wait(timeout)
        return self._status

    # -- the watchdog ------------------------------------------------------------------------

    def _accept(self, ev: dict[str, Any]) -> None:
        with self._lock:
            self._last_step = max(self._last_step, int(ev.get("step") or 0))
            if ev.get("type") == RUN_STARTED and self._status == STARTING:
                self._status = RUNNING
            elif is_final(ev) and self._final is None:
                self._final = ev
                if ev["type"] == FINISHED:
                    self._status = FINISHED_STATUS
                else:
                    self._status = DIED if ev.get("died") else FAILED_STATUS
            elif is_final(ev):
                return  # only the first final event counts
        self._queue.put(ev)

    def _watch(self) -> None:
        try:
            self._read_until_closed()
            self._reap()
            if self._final is None:
                self._recover_or_report_death()
        finally:
            for conn in (self._events_conn, self._control_conn):
                try:
                    if conn is not None:
                        conn.close()
                except OSError:
                    pass
            self._done.set()

    def _read_until_closed(self) -> None:
        """Pass events on until the trainer closes its end of the pipe (it exited or died)."""
        conn = self._events_conn
        while True:
            try:
                if not conn.poll(0.2):
                    if not self._process.is_alive() and not conn.poll(0):
                        return
                    continue
                ev = conn.recv()
            except (EOFError, OSError):  # closed, or a message cut short by a kill
                return
            if isinstance(ev, dict):
                self._accept(ev)

    def _reap(self) -> None:
        """Wait for the process to exit; one that hangs after its final event is killed."""
        grace = EXIT_GRACE_S if self._final is not None else 5.0
        self._process.join(grace)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5.0)

    def _recover_or_report_death(self) -> None:
        # a final event the trainer wrote to its file but could not send
        for ev in EventReader(self.run_dir / EVENTS_FILE, offset=self._log_offset).read_new():
            if is_final(ev):
                self._accept(ev)
                return
        code = self._process.exitcode
        ev = event(FAILED, self._last_step, reason=death_reason(code, self.run_dir), traceback=None,
                   user_error=False, died=True, exit_code=code)
        try:
            append_event(self.run_dir / EVENTS_FILE, ev)
        except OSError:
            pass
        self._accept(ev)

    def _events_size(self) -> int:
        try:
            return (self.run_dir / EVENTS_FILE).stat().st_size
        except OSError:
            return 0


def death_reason(exit_code: int | None, run_dir: Path) -> str:
    """One line for a trainer that ended without saying why."""
    log = run_dir / LOG_FILE
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        if exit_code == -signal.SIGUSR1:
            return "aborted while the trainer process was starting; nothing saved"
        hint = "; often the out-of-memory killer (see `dmesg`)" if exit_code == -signal.SIGKILL else ""
        return f"the trainer process was killed by {name} (exit code {exit_code}) before it finished{hint}"
    return f"the trainer process exited with code {exit_code} without a final event; see {log}"


def start_run(
    project_path: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    run_name: str | None = None,
    resume: bool = False,
) -> RunHandle:
    """Check the project, create ``runs/<name>/`` and start the trainer process.

    Raises UserError (one line) when the project cannot train; problems the trainer finds
    later arrive as a ``failed`` event with ``user_error = true``.
    """
    spec = prepare_run(project_path, overrides, run_name, resume)
    _start_resource_tracker()
    ctx = mp.get_context("spawn")
    events_read, events_write = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_trainer_entry, args=(spec.as_dict(), events_write, None),
                          name=f"tunedeck-trainer-{spec.name}", daemon=False)
    process.start()
    _write_parent_pid(Path(spec.run_dir), process.pid)
    # keep only our end: the events pipe reads EOF the moment the trainer is gone
    events_write.close()
    return RunHandle(spec, process, events_read)


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (which lives as long as the trainer) without
    our stderr: a detached run must not hold the terminal or a caller's pipe open."""
    from multiprocessing import resource_tracker

    saved = [os.dup(fd) for fd in (0, 1, 2)]
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        resource_tracker.ensure_running()
    finally:
        for fd, old in zip((0, 1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(null)


def _write_parent_pid(run_dir: Path, pid: int | None) -> None:
    """Name the trainer in trainer.pid at once (the trainer rewrites it when it starts), so
    ``tunedeck runs`` sees the run as running while the trainer imports its libraries."""
    if pid is None:
        return
    try:
        write_pid_file(run_dir, pid)
        (run_dir / EVENTS_FILE).touch()
    except OSError:
        pass


# -- following a run this process did not start ----------------------------------------------

POLL_S = 0.1  # how often an attached run's file is read


class AttachedRun(_RunControls):
    """A run started elsewhere (``--detach``, another window, an app that quit): the same
    surface as :class:`RunHandle`, fed from its ``events.jsonl``. Its history comes first,
    then the events appended since; a trainer that is gone without a final event is
    reported as died (exit code unknown: it was not our child) and recorded in the file."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.name = self.run_dir.name
        self._reader = EventReader(self.run_dir / EVENTS_FILE)
        self._status = STARTING
        self._final: dict[str, Any] | None = None
        self._last_step = 0
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._ended = False
        self.exit_code: int | None = None
        self._pending = self._take(self._reader.read_new())
        if self._final is None and not trainer_alive(self.run_dir):
            self._pending.extend(self._death())

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def pid(self) -> int | None:
        from .runs import trainer_pid

        return trainer_pid(self.run_dir)

    def events(self, timeout: float = 0.2) -> list[dict[str, Any]]:
        """History on the first call, then what was appended, waiting at most ``timeout`` seconds."""
        with self._lock:
            if self._pending:
                out, self._pending = self._pending, []
                return out
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._ended:
            out = self._poll()
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        return []

    def _poll(self) -> list[dict[str, Any]]:
        alive = trainer_alive(self.run_dir)  # before reading: a final event written just before exit is seen
        out = self._take(self._reader.read_new())
        if self._final is None and not alive:
            out.extend(self._take(self._reader.read_new()) or self._death())
        return out

    def kill(self) -> None:
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def detach(self) -> None:
        """Nothing to let go of: the run was never this process's child."""

    def wait(self, timeout: float | None = None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ended and (deadline is None or time.monotonic() < deadline):
            new = self._poll()
            with self._lock:
                self._pending.extend(new)
            if not new:
                time.sleep(POLL_S)
        return self._status

    def _take(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for ev in events:
            self._last_step = max(self._last_step, int(ev.get("step") or 0))
            kind = ev.get("type")
            if kind == RUN_STARTED:  # a resumed run starts again after an earlier ending
                self._final, self._ended = None, False
                if self._status not in (STOPPING,):
                    self._status = RUNNING
            elif is_final(ev):
                self._final, self._ended = ev, True
                self._status = FINISHED_STATUS if kind == FINISHED else (DIED if ev.get("died") else FAILED_STATUS)
            out.append(ev)
        return out

    def _death(self) -> list[dict[str, Any]]:
        if not self._reader.path.exists():
            self._ended, self._status = True, DIED
            return []
        ev = event(FAILED, self._last_step, reason="the trainer process is gone without a final event (killed, "
                   f"out of memory or crashed); see {self.run_dir / LOG_FILE}", traceback=None, user_error=False,
                   died=True, exit_code=None)
        try:
            append_event(self.run_dir / EVENTS_FILE, ev)
        except OSError:
            pass
        return self._take([ev])


def attach(run: str | os.PathLike[str], runs_dir: str | os.PathLike[str] | None = None) -> AttachedRun:
    """Follow a run given as its folder, or as its name in ``runs_dir``. Raises UserError."""
    path = Path(run)
    if not (path / EVENTS_FILE).is_file() and runs_dir is not None and (Path(runs_dir) / str(run)).is_dir():
        path = Path(runs_dir) / str(run)
    if not path.is_dir():
        where = f" in {runs_dir}" if runs_dir is not None else ""
        raise UserError(f"{run}: no such run folder{where}; give a run folder (runs/NAME) or see `tunedeck runs`")
    if not (path / EVENTS_FILE).is_file():
        raise UserError(f"{path}: not a run folder (it has no {EVENTS_FILE})")
    return AttachedRun(path)

