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
- control messages (stop, save, abort) go the other way through a second pipe;
- the trainer ignores SIGINT (Ctrl-C reaches the whole process group): the caller decides
  what Ctrl-C means (``tunedeck train``: stop, then abort).

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
from .runs import LOG_FILE, SNAPSHOT, checkpoint_steps, latest_checkpoint, trainer_alive, write_pid_file

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


def _trainer_entry(spec: dict[str, Any], events_conn: Any, control_conn: Any) -> None:
    """Runs in the spawned process: isolate it from the terminal, then train."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to interpret
    run_dir = Path(spec["run_dir"])
    log = open(run_dir / LOG_FILE, "a", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)  # library output (progress bars, warnings) goes to trainer.log
    os.dup2(log.fileno(), 2)
    if spec.get("cuda_visible_devices") is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec["cuda_visible_devices"]
    from .trainer import run_spawned

    code = run_spawned(RunSpec(**{**spec, "warnings": tuple(spec["warnings"])}), events_conn, control_conn)
    sys.exit(code)


class RunHandle:
    """A running trainer: its events, its controls and its status. See :func:`start_run`."""

    def __init__(self, spec: RunSpec, process: Any, events_conn: Any, control_conn: Any) -> None:
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
    def status(self) -> str:
        """"starting" | "running" | "stopping" | "finished" | "failed" | "died"."""
        return self._status

    @property
    def final(self) -> dict[str, Any] | None:
        """The run's last event (``finished`` or ``failed``) once it has ended."""
        return self._final

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

    def stop(self) -> None:
        """Save a checkpoint at the end of the current step, then end cleanly (with the adapter)."""
        self._send("stop")

    def save_now(self) -> None:
        """Save a checkpoint at the end of the current step and keep training."""
        self._send("save", stopping=False)

    def abort(self) -> None:
        """End at once, saving nothing."""
        self._send("abort")

    def kill(self) -> None:
        """Kill the trainer process (SIGKILL); the watchdog reports it as died."""
        if self._process.is_alive():
            self._process.kill()

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the run has ended and its process is gone; returns the status."""
        self._done.wait(timeout)
        return self._status

    # -- the watchdog ------------------------------------------------------------------------

    def _send(self, message: str, stopping: bool = True) -> None:
        with self._lock:
            if self._status in TERMINAL:
                return
            if stopping:
                self._status = STOPPING
        try:
            self._control_conn.send(message)
        except (OSError, ValueError):  # the trainer is gone; the watchdog reports it
            pass

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
    ctx = mp.get_context("spawn")
    events_read, events_write = ctx.Pipe(duplex=False)
    control_read, control_write = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_trainer_entry, args=(spec.as_dict(), events_write, control_read),
                          name=f"tunedeck-trainer-{spec.name}", daemon=False)
    process.start()
    # keep only our ends: the events pipe reads EOF the moment the trainer is gone
    events_write.close()
    control_read.close()
    handle = RunHandle(spec, process, events_read, control_write)
    _write_parent_pid(Path(spec.run_dir), process.pid)
    return handle


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
