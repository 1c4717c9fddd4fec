"""Runs on disk: ``runs/<name>/`` folders, their status and their numbers.

A run folder holds ``project.toml`` (the snapshot), ``env.json``, ``events.jsonl``,
``trainer.pid``, ``trainer.log``, ``checkpoints/`` and, once finished, ``adapter/``.
A run's status comes from its events and, while it has no final event, from whether the
process in ``trainer.pid`` is still alive:

- ``running``: no final event yet and the trainer process is alive,
- ``finished``: ended with a ``finished`` event (``note`` says "stopped" when it was
  stopped early; its adapter holds the weights of the step it reached),
- ``failed``: ended with a ``failed`` event (bad input, an error, or aborted),
- ``died``: the process is gone without a final event (killed, out of memory, a crash),
  or the launcher's watchdog recorded its death.

No torch here; the UI lists runs with this module.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .events import EVENTS_FILE, FAILED, FINISHED, RUN_STARTED, STEP, read_events

PID_FILE = "trainer.pid"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
SNAPSHOT = "project.toml"
ENV_FILE = "env.json"
LOG_FILE = "trainer.log"
CONTROL_FILE = "control"  # a stop / save request for the trainer, read between steps
CONTROLS = ("stop", "save", "abort")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class RunInfo:
    name: str
    path: str
    status: str  # running | finished | failed | died
    step: int = 0
    max_steps: int | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    started: float | None = None  # Unix time of the first run_started
    duration_s: float = 0.0  # training time over every session (resumes included)
    adapter: str | None = None
    checkpoints: list[int] = field(default_factory=list)
    note: str = ""  # "stopped", "aborted", the failure reason

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the trainer's pid file ---------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ")"
    rest = data.rpartition(")")[2].split()
    return rest[19] if len(rest) > 19 else None


def write_pid_file(run_dir: Path, pid: int | None = None) -> None:
    """Name the trainer process (this one by default) in the run's pid file."""
    pid = os.getpid() if pid is None else pid
    info = {"pid": pid, "start": _proc_start(pid), "host": socket.gethostname(), "time": time.time()}
    (Path(run_dir) / PID_FILE).write_text(json.dumps(info), encoding="utf-8")


def trainer_alive(run_dir: Path) -> bool:
    """Whether the process named in the run's pid file is alive (False when unknown)."""
    try:
        info = json.loads((Path(run_dir) / PID_FILE).read_text(encoding="utf-8"))
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if info.get("host") not in (None, socket.gethostname()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    start = _proc_start(pid)
    if start is None:
        # a zombie or no /proc: alive as far as we can tell
        return not Path("/proc").is_dir()
    return info.get("start") in (None, start)


def trainer_pid(run_dir: Path) -> int | None:
    """The pid of the run's live trainer, or None when it is not running."""
    if not trainer_alive(run_dir):
        return None
    try:
        return int(json.loads((Path(run_dir) / PID_FILE).read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- controls for a run that is not our child -----------------------------------------------
#
# One path for every run, attached or not: stop and save are a word in the run's control
# file, which the trainer reads (and removes) between optimizer steps, when it can act on
# them anyway; abort is SIGUSR1, which interrupts the trainer at once, even while it loads
# the model. A file needs no reader to be present (a FIFO blocks or fails without one),
# survives the UI going away, and can be written by hand (`echo stop > runs/NAME/control`).


def send_control(run_dir: str | os.PathLike[str], message: str) -> None:
    """Ask a running trainer to stop, save or abort. Raises UserError when it is not running."""
    import signal

    from .errors import UserError

    run_dir = Path(run_dir)
    if message not in CONTROLS:
        raise UserError(f"{message!r}: the controls are {', '.join(CONTROLS)}")
    pid = trainer_pid(run_dir)
    if pid is None:
        raise UserError(f"{run_dir.name} is not running; nothing to {message}")
    if message == "abort":
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError as exc:
            raise UserError(f"{run_dir.name}: cannot signal its trainer ({exc.strerror})") from None
        return
    tmp = run_dir / f".{CONTROL_FILE}.tmp"
    try:
        tmp.write_text(message + "\n", encoding="utf-8")
        os.replace(tmp, run_dir / CONTROL_FILE)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write its control file ({exc.strerror})") from None


def take_control(run_dir: Path) -> str | None:
    """The request in the run's control file, removing it (the trainer's side)."""
    path = Path(run_dir) / CONTROL_FILE
    try:
        message = path.read_text(encoding="utf-8").strip()
        path.unlink()
    except OSError:
        return None
    return message if message in CONTROLS else None


# -- checkpoints ----------------------------------------------------------------------------


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    steps = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = _CHECKPOINT.match(entry.name)
        if m and (entry / "trainer_state.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = checkpoint_steps(run_dir)
    return Path(run_dir) / CHECKPOINTS / f"checkpoint-{steps[-1]}" if steps else None


# -- status -----------------------------------------------------------------------------------


def run_info(run_dir: str | os.PathLike[str]) -> RunInfo:
    """Status and numbers of one run folder."""
    run_dir = Path(run_dir)
    events = read_events(run_dir / EVENTS_FILE)
    info = RunInfo(name=run_dir.name, path=str(run_dir), status="died")
    info.checkpoints = checkpoint_steps(run_dir)
    session_start: float | None = None
    last_time: float | None = None
    final: dict[str, Any] | None = None
    for ev in events:
        t = ev.get("time")
        kind = ev.get("type")
        if kind == RUN_STARTED:
            if info.started is None:
                info.started = t
            if session_start is not None and last_time is not None:  # an earlier session that vanished
                info.duration_s += max(0.0, last_time - session_start)
            session_start = t
            final = None
            info.max_steps = ev.get("max_steps", info.max_steps)
        elif kind == STEP:
            info.step = max(info.step, int(ev.get("step") or 0))
            if ev.get("loss") is not None:
                info.final_loss = ev["loss"]
            info.max_steps = ev.get("max_steps", info.max_steps)
        elif kind == "eval" and ev.get("eval_loss") is not None:
            info.eval_loss = ev["eval_loss"]
        elif kind in (FINISHED, FAILED):
            final = ev
            if session_start is not None and t is not None:
                info.duration_s += max(0.0, t - session_start)
            session_start = None
        if isinstance(t, (int, float)):
            last_time = t
    if final is None:
        if trainer_alive(run_dir):
            info.status = "running"
            if session_start is not None:
                info.duration_s += max(0.0, time.time() - session_start)
        else:
            info.status = "died"
            info.note = "the trainer process is gone without a final event" if events else "no events"
            if session_start is not None and last_time is not None:
                info.duration_s += max(0.0, last_time - session_start)
    elif final["type"] == FINISHED:
        info.status = "finished"
        info.note = "stopped" if final.get("stopped") else ""
        if final.get("final_loss") is not None:
            info.final_loss = final["final_loss"]
    else:
        info.status = "died" if final.get("died") else "failed"
        info.note = "aborted" if final.get("aborted") else str(final.get("reason") or "")
    adapter = run_dir / ADAPTER / "adapter_config.json"
    info.adapter = str(adapter.parent) if adapter.is_file() else None
    return info


def list_runs(runs_dir: str | os.PathLike[str]) -> list[RunInfo]:
    """Every run in a runs folder, oldest first (folders without events.jsonl are not runs)."""
    runs_dir = Path(runs_dir)
    try:
        folders = [p for p in runs_dir.iterdir() if p.is_dir() and (p / EVENTS_FILE).is_file()]
    except OSError:
        return []
    infos = [run_info(p) for p in folders]
    infos.sort(key=lambda i: (i.started or 0.0, i.name))
    return infos
