"""Runs on disk: ``runs/<name>/`` folders, who is training them, and what their events say.

A run folder holds ``project.toml`` (the snapshot), ``env.json``, ``events.jsonl``,
``trainer.pid`` (the record of the trainer process), ``trainer.log``, ``checkpoints/``,
``adapter/`` once finished, a lock file and ``.trainer/`` (readable by its owner alone:
the key and socket of the trainer's channel, see :mod:`tunedeck.core.channel`).

The folder is the one truth about a run:

- **One fold.** :class:`RunState` folds a run's events into its status, step, losses and
  times; every view (``tunedeck runs``, ``attach``, the Train screen) calls it.
- **Liveness without guessing.** The trainer's record names its pid, the process's start
  time, the host and the process group, written atomically. :func:`liveness` says
  ``alive``, ``dead`` (same host, and the process is gone, a zombie, or another process
  with a reused pid) or ``unknown`` (the run is on another host: it is never declared dead
  from here).
- **One trainer per run.** :class:`RunLock` is an exclusive lock on the run folder, taken
  before a trainer starts and held by it while it lives (it dies with the process). A
  second trainer on the same run is refused; an observer writes a run's end only while it
  holds the lock itself (:func:`record_death`), so it never writes over a live trainer.

No torch here; the UI lists runs with this module.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .events import (
    CONTROL, EVAL, EVENTS_FILE, FAILED, FINISHED, LAUNCHED, RUN_STARTED, STEP, SYSTEM, append_event, event,
    read_events,
)
from .memory import estimate_vs_peak

RECORD_FILE = "trainer.pid"  # JSON: the trainer process (see write_record)
LOCK_FILE = ".lock"
PRIVATE_DIR = ".trainer"  # mode 0700: the channel's key and socket, the ranks' records
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
SNAPSHOT = "project.toml"
ENV_FILE = "env.json"
LOG_FILE = "trainer.log"
CONTROLS = ("stop", "save", "abort")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# statuses: what a run is, from its events and its trainer's liveness (RunState.status)
STARTING, RUNNING, STOPPING = "starting", "running", "stopping"
FINISHED_STATUS, STOPPED, ABORTED, FAILED_STATUS, DIED, UNKNOWN = (
    "finished", "stopped", "aborted", "failed", "died", "unknown")
LIVE = (STARTING, RUNNING, STOPPING)
ENDED = (FINISHED_STATUS, STOPPED, ABORTED, FAILED_STATUS, DIED)
FAILED_ENDS = (ABORTED, FAILED_STATUS, DIED)  # ended by a failure: no adapter of the whole run
RESUMABLE = (STOPPED, *FAILED_ENDS)  # ended without finishing: a checkpoint of it can be resumed

# exit codes of the trainer process (and of `tunedeck train`)
EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_ABORTED = 0, 1, 2, 130


# -- the trainer's record ------------------------------------------------------------------


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def process_alive(pid: int, start: Any) -> bool:
    """Whether ``pid`` on this host is the process that started at ``start`` and has not
    ended. A zombie has ended (it only waits to be reaped)."""
    import psutil

    if isinstance(start, bool) or not isinstance(start, (int, float)):
        start = None  # not recorded (or a record of another tunedeck): the pid alone
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return start is None or abs(proc.create_time() - start) < 0.05
    except psutil.AccessDenied:
        return True  # someone else's live process
    except (psutil.Error, OSError):
        return False


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has ended since boot (Linux), or None
    elsewhere. Read from /proc/vmstat (``oom_kill``) here and nowhere else: psutil has no such
    counter."""
    try:
        with open("/proc/vmstat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def write_record(run_dir: str | os.PathLike[str], pid: int | None = None, **fields: Any) -> dict[str, Any]:
    """Name the trainer process (this one by default) in the run's record, atomically:
    pid, its start time, host, process group, plus ``fields`` (leader, world_size...)."""
    from .project import atomic_write_text

    pid = os.getpid() if pid is None else pid
    try:
        pgid: int | None = os.getpgid(pid)
    except OSError:
        pgid = None
    record = {"pid": pid, "start": process_start(pid), "host": socket.gethostname(), "pgid": pgid,
              "time": time.time(), **fields}
    atomic_write_text(Path(run_dir) / RECORD_FILE, json.dumps(record))
    return record


def read_record(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(run_dir) / RECORD_FILE).read_text(encoding="utf-8"))
        int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class Liveness:
    """Whether a run's trainer lives: ``alive``, ``dead`` or ``unknown`` (another host)."""

    state: str
    pid: int | None = None
    host: str = ""

    @property
    def alive(self) -> bool:
        return self.state == "alive"

    @property
    def dead(self) -> bool:
        return self.state == "dead"


def liveness(run_dir: str | os.PathLike[str]) -> Liveness:
    """Is the run's trainer alive? Certain on this host; ``unknown`` for a run on another."""
    record = read_record(run_dir)
    if record is None:
        return Liveness("dead")
    pid, host = int(record["pid"]), str(record.get("host") or "")
    if host and host != socket.gethostname():
        return Liveness("unknown", pid, host)
    return Liveness("alive" if process_alive(pid, record.get("start")) else "dead", pid, host)


def rank_processes(run_dir: str | os.PathLike[str]) -> dict[int, tuple[int, Any]]:
    """The processes of the current session's ranks, by rank: (pid, start time), as each
    recorded itself in the run's private folder (``rank-N.json``)."""
    out: dict[int, tuple[int, Any]] = {}
    for path in (Path(run_dir) / PRIVATE_DIR).glob("rank-*.json"):
        try:
            rank = int(path.stem.split("-", 1)[1])
            info = json.loads(path.read_text(encoding="utf-8"))
            out[rank] = (int(info["pid"]), info.get("start"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
            continue
    return out


def kill_if_alive(pid: int, start: Any) -> None:
    """SIGKILL ``pid`` when it is still the process that started at ``start``."""
    import signal

    if process_alive(pid, start):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def trainer_pid(run_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the run's live trainer on this host, or None."""
    live = liveness(run_dir)
    return live.pid if live.alive else None


# -- one trainer per run ----------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run folder (``flock`` on its lock file). The trainer holds it
    for its whole life; the kernel drops it when the process ends, however it ends."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd = -1

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock, trying for up to ``wait`` seconds; False when another holds it."""
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def fileno(self) -> int:
        return self._fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


# -- checkpoints ----------------------------------------------------------------------------


def checkpoint_steps(run_dir: str | os.PathLike[str]) -> list[int]:
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


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    steps = checkpoint_steps(run_dir)
    return Path(run_dir) / CHECKPOINTS / f"checkpoint-{steps[-1]}" if steps else None


# -- the fold ------------------------------------------------------------------------------------


def final_status(final: dict[str, Any]) -> str:
    """How a session ended, from its final event (``finished`` or ``failed``): finished |
    stopped (early, on request) | aborted | failed | died (gone without a report)."""
    if final.get("type") == FINISHED:
        return STOPPED if final.get("stopped") else FINISHED_STATUS
    if final.get("died"):
        return DIED
    return ABORTED if final.get("aborted") else FAILED_STATUS


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class RunState:
    """A run's events folded: what every view shows of its status, step and numbers.

    Feed events in file order with :meth:`take`; :meth:`status` adds the trainer's liveness.
    A session starts at ``launched`` (or, in runs written before that event existed, at
    ``run_started``) and ends at its final event; a resumed run is a new session.
    """

    step: int = 0
    max_steps: int | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    started: float | None = None  # Unix time of the first session's start
    session_start: float | None = None  # this session's, while it goes
    duration_s: float = 0.0  # training time of the ended sessions
    last_time: float | None = None
    final: dict[str, Any] | None = None  # this session's final event
    training: bool = False  # run_started seen in this session
    stopping: bool = False  # a stop or abort taken in this session
    project: str | None = None  # the project file the run was started from
    events: int = 0
    memory_estimate: dict[str, Any] | None = None  # the training session's estimate (run_started), bytes by part
    memory_peak: int | None = None  # its measured peak: torch's allocations on a GPU, the trainer's RSS on a CPU
    memory_peak_source: str | None = None  # "torch" | "rss"
    method: str = "sft"  # training.method of the run ("sft" | "dpo" | "orpo")
    reward_accuracy: float | None = None  # a preference run's last logged preference accuracy
    _launched: bool = False  # this session began with launched and has not started training yet

    def take(self, ev: dict[str, Any]) -> None:
        self.events += 1
        kind = ev.get("type")
        t = _number(ev.get("time"))
        step = ev.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            self.step = max(self.step, step)
        if isinstance(ev.get("max_steps"), int) and ev["max_steps"] > 0:
            self.max_steps = ev["max_steps"]
        if kind == LAUNCHED:  # a new session: the previous one's end no longer holds
            self._close_session()
            self.final, self.stopping, self.training, self._launched = None, False, False, True
        elif kind == RUN_STARTED:
            if not self._launched:  # a session with no launched event (runs written before it existed)
                self._close_session()
                self.final, self.stopping = None, False
            self._launched, self.training, self.session_start = False, True, t
            if self.started is None:
                self.started = t
            if isinstance(ev.get("project"), str):
                self.project = ev["project"]
            estimate = ev.get("memory_estimate")
            self.memory_estimate = estimate if isinstance(estimate, dict) else None
            training = (ev.get("config") or {}).get("training") if isinstance(ev.get("config"), dict) else None
            if isinstance(training, dict) and isinstance(training.get("method"), str):
                self.method = training["method"]
            self.memory_peak = self.memory_peak_source = None
        elif kind == SYSTEM:
            self._take_peak(ev)
        elif kind == STEP and _number(ev.get("loss")) is not None:
            self.final_loss = ev["loss"]
            if _number(ev.get("reward_accuracy")) is not None:
                self.reward_accuracy = ev["reward_accuracy"]
        elif kind == EVAL and _number(ev.get("eval_loss")) is not None:
            self.eval_loss = ev["eval_loss"]
        elif kind == CONTROL and ev.get("action") in ("stop", "abort"):
            self.stopping = True
        elif kind in (FINISHED, FAILED) and self.final is None:
            self.final = ev
            if kind == FINISHED and _number(ev.get("final_loss")) is not None:
                self.final_loss = ev["final_loss"]
            if t is not None:
                self.last_time = t
            self._close_session()
            return
        if t is not None:
            self.last_time = t

    def _take_peak(self, ev: dict[str, Any]) -> None:
        """The measured peak of the session: torch's peak allocation on a GPU; on a CPU the
        trainer's peak resident memory since training began (``rss_peak``), or the highest
        ``rss`` sampled where that is not known."""
        for source, value in (("torch", ev.get("torch_peak_memory")), ("rss", ev.get("rss_peak")),
                              ("rss", ev.get("rss"))):
            number = _number(value)
            if number is not None and number > 0:
                if self.memory_peak_source in (None, source):
                    self.memory_peak = int(max(number, self.memory_peak or 0))
                    self.memory_peak_source = source
                return

    def _close_session(self) -> None:
        if self.session_start is not None and self.last_time is not None:
            self.duration_s += max(0.0, self.last_time - self.session_start)
        self.session_start = None

    @property
    def ended(self) -> bool:
        return self.final is not None

    def end_status(self) -> str | None:
        """finished | stopped | aborted | failed | died, once the session has its final event."""
        return None if self.final is None else final_status(self.final)

    def status(self, live: Liveness | None) -> str:
        """The run's status, given its trainer's liveness (None: assume alive)."""
        ended = self.end_status()
        if ended is not None:
            return ended
        if live is not None and live.state == "unknown":
            return UNKNOWN
        if live is not None and live.dead:
            return DIED
        if self.stopping:
            return STOPPING
        return RUNNING if self.training else STARTING

    def note(self, live: Liveness | None) -> str:
        """A few words on the status: the failure reason, "on HOST"..."""
        final = self.final
        if final is not None:
            if final.get("type") == FINISHED:
                return "stopped early" if final.get("stopped") else ""
            return str(final.get("reason") or "")
        if live is not None and live.state == "unknown":
            return f"on {live.host}"
        if live is not None and live.dead:
            return "the trainer process is gone without a final event" if self.events else "no events"
        return ""

    def duration(self, now: float | None = None, live: bool = True) -> float:
        """Training time over every session; a live session counts until ``now``."""
        total = self.duration_s
        if self.session_start is not None:
            end = (time.time() if now is None else now) if live else (self.last_time or self.session_start)
            total += max(0.0, end - self.session_start)
        return total


def fold(events: list[dict[str, Any]]) -> RunState:
    state = RunState()
    for ev in events:
        state.take(ev)
    return state


# -- an observer's part: the end of a trainer that died -----------------------------------------


def death_reason(run_dir: str | os.PathLike[str], exit_code: int | None = None,
                 oom_before: int | None = None) -> tuple[str, str]:
    """(failure, one line) for a trainer that ended without saying why. ``oom_before`` is
    the kernel's out-of-memory kill count when the run started (its record keeps it)."""
    import signal

    log = Path(run_dir) / LOG_FILE
    if oom_before is None:
        record = read_record(run_dir) or {}
        oom_before = record.get("oom_kills") if isinstance(record.get("oom_kills"), int) else None
    now = oom_kills()
    oom = oom_before is not None and now is not None and now > oom_before
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        if exit_code == -signal.SIGKILL and oom:
            return "oom_killed", (f"the trainer process was killed by SIGKILL (exit code {exit_code}): the kernel's "
                                  "out-of-memory killer ended a process meanwhile, so most likely the machine ran out "
                                  "of RAM; lower training.batch_size or dataset.max_length, or use 4-bit")
        hint = "; often the out-of-memory killer (see `dmesg`)" if exit_code == -signal.SIGKILL else ""
        return "died", f"the trainer process was killed by {name} (exit code {exit_code}) before it finished{hint}"
    if exit_code is not None:
        return "died", f"the trainer process exited with code {exit_code} without a final event; see {log}"
    if oom:
        return "oom_killed", ("the trainer process is gone without a final event, and the kernel's out-of-memory "
                              "killer ended a process meanwhile: most likely the machine ran out of RAM")
    return "died", (f"the trainer process is gone without a final event (killed, out of memory or crashed); "
                    f"see {log}")


def record_death(run_dir: str | os.PathLike[str], exit_code: int | None = None) -> dict[str, Any] | None:
    """Append the ``failed`` event (``died = true``) of a trainer that is gone without a
    final event, when that is certain: on this host, the trainer process gone (or a
    zombie), nobody holding the run's lock, and no final event in the current session.
    Returns the event written, or None when it was not (not certain, or already ended)."""
    run_dir = Path(run_dir)
    if not (run_dir / EVENTS_FILE).is_file():
        return None
    lock = RunLock(run_dir)
    try:
        if not lock.acquire():
            return None  # a trainer (or a launcher starting one) holds the run
        if not liveness(run_dir).dead:
            return None
        state = fold(read_events(run_dir / EVENTS_FILE))
        if state.final is not None:
            return None
        failure, reason = death_reason(run_dir, exit_code)
        ev = event(FAILED, state.step, reason=reason, failure=failure, traceback=None, user_error=False, died=True,
                   exit_code=exit_code)
        append_event(run_dir / EVENTS_FILE, ev)
        return ev
    except OSError:
        return None
    finally:
        lock.release()


# -- status -----------------------------------------------------------------------------------


@dataclass
class RunInfo:
    name: str
    path: str
    status: str  # starting | running | stopping | finished | stopped | aborted | failed | died | unknown
    step: int = 0
    max_steps: int | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    started: float | None = None  # Unix time of the first run_started
    duration_s: float = 0.0  # training time over every session (resumes included)
    adapter: str | None = None
    checkpoints: list[int] = field(default_factory=list)
    note: str = ""  # the failure reason, "on HOST" for a run on another host
    host: str = ""
    memory_estimate: int | None = None  # bytes: the estimate the run recorded when training began
    memory_peak: int | None = None  # bytes: its measured peak (RunState.memory_peak)
    memory_peak_source: str | None = None  # "torch" (a GPU's allocations) | "rss" (the trainer's, on a CPU)
    memory: str = ""  # "estimated 6.13 GiB · measured peak 4.60 GiB", as far as known
    method: str = "sft"  # training.method: "sft" | "dpo" | "orpo"
    reward_accuracy: float | None = None  # a preference run's last preference accuracy

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_info(run_dir: str | os.PathLike[str]) -> RunInfo:
    """Status and numbers of one run folder."""
    run_dir = Path(run_dir)
    state = fold(read_events(run_dir / EVENTS_FILE))
    live = None if state.ended else liveness(run_dir)
    status = state.status(live)
    adapter = run_dir / ADAPTER / "adapter_config.json"
    total = (state.memory_estimate or {}).get("total")
    estimate = int(total) if _number(total) is not None else None
    return RunInfo(
        name=run_dir.name, path=str(run_dir), status=status, step=state.step, max_steps=state.max_steps,
        final_loss=state.final_loss, eval_loss=state.eval_loss, started=state.started,
        duration_s=state.duration(live=status in LIVE), adapter=str(adapter.parent) if adapter.is_file() else None,
        checkpoints=checkpoint_steps(run_dir), note=state.note(live), host=live.host if live is not None else "",
        memory_estimate=estimate, memory_peak=state.memory_peak, memory_peak_source=state.memory_peak_source,
        memory=estimate_vs_peak(estimate, state.memory_peak), method=state.method,
        reward_accuracy=state.reward_accuracy,
    )


def list_runs(runs_dir: str | os.PathLike[str]) -> list[RunInfo]:
    """Every run in a runs folder, oldest first (folders without events.jsonl are not runs)."""
    runs_dir = Path(runs_dir)
    try:
        folders = [p for p in runs_dir.iterdir()
                   if not p.name.startswith(".") and p.is_dir() and (p / EVENTS_FILE).is_file()]
    except OSError:
        return []
    infos = [run_info(p) for p in folders]
    infos.sort(key=lambda i: (i.started or 0.0, i.name))
    return infos
