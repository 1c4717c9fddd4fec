"""Starting a run's trainer process and following it: the side of the run that is not the trainer.

Used by ``tunedeck train``, ``tunedeck attach`` and the app. The checks before a run are
:mod:`tunedeck.core.preflight`, the run folder :mod:`tunedeck.core.rundir`.

- :func:`start_run` checks the project and makes the run folder
  (:func:`tunedeck.core.rundir.prepare_run`), then starts the trainer as a program of its
  own (``python -m tunedeck.core.trainer``, through torchrun or accelerate for several
  processes) with plain :mod:`subprocess`, in its own session, its output in the run's
  ``trainer.log``. The trainer inherits the run's lock and holds it while it lives.
- :class:`Follower` follows any run, the one started here (:class:`RunHandle`) or one
  started elsewhere (:func:`attach`) alike: the history from ``events.jsonl``, then live
  events through the trainer's channel (:mod:`tunedeck.core.channel`), whose controls
  (stop, save, abort) are answered once the trainer has taken them. A trainer that is
  gone without a final event is found at once (the channel closes) and, once certain,
  its end is written to the run's events (:func:`tunedeck.core.runs.record_death`).

No torch here: this module is imported by the UI process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .channel import ChannelError, Client, default_address
from .errors import UserError
from .events import EVENTS_FILE, EventReader, append_event, event
from .rundir import Prepared, RunSpec, folder_reason, prepare_run
from .runs import (
    CONTROLS,
    LOG_FILE,
    Liveness,
    RunState,
    kill_if_alive,
    liveness,
    oom_kills,
    process_alive,
    process_start,
    rank_processes,
    read_record,
    record_death,
    write_record,
)

CONNECT_S = 10.0  # how long a control waits for a trainer that is still starting to listen
EXIT_GRACE_S = 60.0  # a trainer that has reported its end but does not exit is killed after this
POLL_S = 0.1  # how often a follower without a live channel reads the file


# -- starting the trainer ---------------------------------------------------------------------------


def trainer_command(spec: RunSpec, python: str = sys.executable) -> list[str]:
    """The command line of a run's trainer: one process, or several through torchrun
    (data parallel) or accelerate (an accelerate config: FSDP, DeepSpeed)."""
    program = ["-m", "tunedeck.core.trainer", "--run-dir", spec.run_dir, "--launch", json.dumps(spec.as_dict())]
    if spec.accelerate_config:
        return [python, "-m", "accelerate.commands.launch", "--config_file", spec.accelerate_config,
                "--num_processes", str(spec.processes), "--num_machines", "1", *program]
    if spec.processes > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec.processes),
                "--local-addr", "127.0.0.1", *program]
    return [python, *program]


def trainer_env(spec: RunSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if spec.gpus is not None:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers the GPUs as NVML does
        env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.gpus)
    return env


def start_run(
    project_path: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    run_name: str | None = None,
    resume: bool = False,
    *,
    deep: bool = True,
) -> RunHandle:
    """Check the project, make the run folder and start its trainer process.

    Raises UserError (one line) when the project cannot train, before anything is created;
    problems the trainer finds later arrive as a ``failed`` event with ``user_error``.
    """
    prepared = prepare_run(project_path, overrides, run_name, resume, deep=deep)
    spec = prepared.spec
    run_dir = Path(spec.run_dir)
    try:
        with open(run_dir / LOG_FILE, "ab") as log:
            process = subprocess.Popen(
                trainer_command(spec), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, pass_fds=(prepared.lock.fileno(),),
                env=trainer_env(spec), cwd=run_dir,
            )
    except OSError as exc:
        _abandon(prepared, f"cannot start the trainer process ({folder_reason(exc)})")
        prepared.release()
        raise UserError(f"{spec.name}: cannot start the trainer process ({folder_reason(exc)})") from None
    try:  # the run's record at once (the trainer writes its own as soon as it runs)
        write_record(run_dir, process.pid, leader=process.pid, leader_start=process_start(process.pid),
                     world_size=spec.processes, address=default_address(run_dir), oom_kills=oom_kills())
    except (OSError, UserError):
        pass
    finally:
        prepared.release()  # the trainer holds the run's lock now (it inherited it)
    return RunHandle(spec, process)


def _abandon(prepared: Prepared, reason: str) -> None:
    """A session that never got a trainer: a new run's folder goes, a resumed one is ended."""
    run_dir = Path(prepared.spec.run_dir)
    if not prepared.spec.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    try:
        append_event(run_dir / EVENTS_FILE, event("failed", reason=reason, failure="crash", traceback=None,
                                                  user_error=False))
    except OSError:
        pass


# -- following a run ---------------------------------------------------------------------------


class Follower:
    """A run followed from outside its trainer: its events, status and controls.

    The history comes from ``events.jsonl``; while the trainer lives, later events come
    live through its channel (the file is read up to the position the trainer names when
    the connection opens, then every event carries its own position, so none is missed or
    taken twice). Without a channel (the trainer is starting, or on another host) the file
    is read every :data:`POLL_S`. A trainer gone without a final event is reported as died
    (and recorded so in the file, once that is certain).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.name = self.run_dir.name
        self.state = RunState()
        self._reader = EventReader(self.run_dir / EVENTS_FILE)
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._live: Liveness | None = None
        self._next_connect = 0.0
        self._detached = False
        self._pending: list[dict[str, Any]] = []
        self._connect()
        self._pending = self._take(self._reader.read_new(self._client.offset if self._client else None))
        if self._client is None:
            self._pending.extend(self._check_liveness())

    # -- what callers use -----------------------------------------------------------------------

    @property
    def status(self) -> str:
        """starting | running | stopping | finished | stopped | aborted | failed | died | unknown."""
        return self.state.status(self._live)

    @property
    def final(self) -> dict[str, Any] | None:
        """The session's final event (``finished`` or ``failed``) once it has ended."""
        return self.state.final

    @property
    def ended(self) -> bool:
        return self.state.ended

    @property
    def pid(self) -> int | None:
        live = self._live or liveness(self.run_dir)
        return live.pid if live.alive else None

    @property
    def project_path(self) -> str | None:
        """The project file the run was started from (its run_started event says)."""
        return self.state.project

    def events(self, timeout: float = 0.2) -> list[dict[str, Any]]:
        """History on the first call, then what came since, waiting at most ``timeout`` seconds."""
        with self._lock:
            if self._pending:
                out, self._pending = self._pending, []
                return out
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._detached:
            out = self._poll(max(0.0, min(POLL_S, deadline - time.monotonic())))
            if out or self.ended or time.monotonic() >= deadline:
                return out
        return []

    def wait(self, timeout: float | None = None) -> str:
        """Follow the run until it has ended (or ``timeout``); returns its status. The
        events read meanwhile stay for :meth:`events`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended and (deadline is None or time.monotonic() < deadline):
            new = self._poll(POLL_S)
            with self._lock:
                self._pending.extend(new)
        return self.status

    def stop(self) -> str:
        """Save a checkpoint at the end of the current step, then end (with the adapter)."""
        return self.control("stop")

    def save_now(self) -> str:
        """Save a checkpoint at the end of the current step and keep training."""
        return self.control("save")

    def abort(self) -> str:
        """End at once, saving nothing more."""
        return self.control("abort")

    def control(self, action: str) -> str:
        """Send a control; returns once the trainer has taken it (its answer, one line).
        Raises UserError when the run has ended or its trainer cannot be reached."""
        if self.ended:
            raise UserError(f"{self.name} has ended ({self.status}); nothing to {action}")
        client = self._client
        if client is not None and not client.closed.is_set():
            try:
                return _answer(self.name, action, client.control(action))
            except ChannelError:
                pass
        return send_control(self.run_dir, action)

    def detach(self) -> None:
        """Stop following: the channel closes and nothing more is kept for this follower;
        the run goes on, and :func:`attach` follows it again."""
        self._detached = True
        client, self._client = self._client, None
        if client is not None:
            client.close()
        with self._lock:
            self._pending = []

    def kill(self) -> None:
        """Kill the trainer and every process of the run (SIGKILL)."""
        kill_run(self.run_dir)

    # -- reading -------------------------------------------------------------------------------

    def _take(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for ev in events:
            self.state.take(ev)
        return events

    def _connect(self) -> None:
        try:
            self._client = Client.connect(self.run_dir, timeout=1.0)
        except ChannelError:
            self._client = None
        self._next_connect = time.monotonic() + 0.5

    def _poll(self, timeout: float) -> list[dict[str, Any]]:
        if self._detached:
            return []
        client = self._client
        if client is not None:
            out = []
            for frame in client.events(timeout):
                if isinstance(frame.get("at"), int) and frame["at"] >= self._reader.offset:
                    out.append(frame["event"])
                    self._reader.offset = max(self._reader.offset, int(frame.get("end") or 0))
            self._take(out)
            if client.closed.is_set():  # the trainer ended (or dropped us): the file has the rest
                self._client = None
                out += self._take(self._reader.read_new())
                if not self.ended:
                    out += self._check_liveness()
            return out
        out = self._take(self._reader.read_new())
        if not self.ended:
            out += self._check_liveness()
            if not self.ended and self._live is not None and self._live.alive \
                    and time.monotonic() >= self._next_connect:
                self._connect()
                if self._client is not None:
                    out += self._take(self._reader.read_new(self._client.offset))
        if not out and timeout > 0:
            time.sleep(timeout)
        return out

    def _gone(self) -> bool:
        """Whether the trainer is certainly gone (the run's record says so on this host)."""
        return self._live is not None and self._live.dead

    def _check_liveness(self) -> list[dict[str, Any]]:
        """Look at the trainer; when it is gone, take its end from the file or write it."""
        self._live = liveness(self.run_dir)
        if not self._gone():
            return []
        out = self._take(self._reader.read_new())  # a final event written just before it ended
        if self.ended:
            return out
        written = self._record_death()
        if written is not None:
            self._reader.read_new()  # step over the line just written
            out += self._take([written])
        else:
            out += self._take(self._reader.read_new())  # another observer wrote it
        return out

    def _record_death(self) -> dict[str, Any] | None:
        return record_death(self.run_dir)


class RunHandle(Follower):
    """A run whose trainer this process started: a :class:`Follower` that also reaps the
    trainer process (in a thread, whether or not anyone follows it: no zombie is left) and
    knows its exit code. See :func:`start_run`."""

    def __init__(self, spec: RunSpec, process: subprocess.Popen[bytes]) -> None:
        self.spec = spec
        self._process = process
        self._exited = threading.Event()
        self._ended_at: float | None = None
        threading.Thread(target=self._reap, name=f"tunedeck-reap-{spec.name}", daemon=True).start()
        super().__init__(spec.run_dir)

    def _reap(self) -> None:
        self._process.wait()
        self._exited.set()

    @property
    def exit_code(self) -> int | None:
        return self._process.returncode if self._exited.is_set() else None

    @property
    def ended(self) -> bool:
        """The run has ended and its trainer process is gone."""
        return self.state.ended and self._exited.is_set()

    def wait(self, timeout: float | None = None) -> str:
        status = super().wait(timeout)
        if self.state.ended:
            self._exited.wait(None if timeout is None else max(0.0, timeout))
        return status

    def _gone(self) -> bool:
        return self._exited.is_set() or super()._gone()

    def _record_death(self) -> dict[str, Any] | None:
        if not self._exited.wait(5.0):  # the run's reporter is gone; its launcher tears the rest down
            return None
        return record_death(self.run_dir, self._process.returncode)

    def _poll(self, timeout: float) -> list[dict[str, Any]]:
        out = super()._poll(timeout)
        if self.state.ended and not self._exited.is_set():
            if self._ended_at is None:
                self._ended_at = time.monotonic()
            self._exited.wait(min(timeout, 0.2))
            if not self._exited.is_set() and time.monotonic() - self._ended_at > EXIT_GRACE_S:
                kill_run(self.run_dir)  # it said its last word long ago and hangs on exit
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except OSError:
                    pass
        return out


def _answer(name: str, action: str, ack: dict[str, Any]) -> str:
    message = str(ack.get("message") or "")
    if not ack.get("taken"):
        raise UserError(f"{name}: {message or f'{action} refused'}")
    return message


def send_control(run_dir: str | os.PathLike[str], action: str, timeout: float = CONNECT_S) -> str:
    """Ask a run's trainer to stop, save or abort; returns once it has taken the request
    (its answer). Raises UserError when the run is not going or cannot be reached."""
    run_dir = Path(run_dir)
    if action not in CONTROLS:
        raise UserError(f"{action!r}: the controls are {', '.join(CONTROLS)}")
    deadline = time.monotonic() + timeout
    why = ""
    while True:
        live = liveness(run_dir)
        if live.state == "unknown":
            raise UserError(f"{run_dir.name} trains on {live.host}; send controls from that machine")
        if not live.alive:
            raise UserError(f"{run_dir.name} is not running; nothing to {action}")
        try:
            client = Client.connect(run_dir, timeout=2.0, keep=0)
        except ChannelError as exc:
            why = str(exc)
        else:
            try:
                return _answer(run_dir.name, action, client.control(action))
            except ChannelError as exc:
                why = str(exc)
            finally:
                client.close()
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # a trainer that is still starting: its channel opens in a moment
    if action == "abort" and live.pid is not None:
        try:
            os.kill(live.pid, signal.SIGUSR1)  # the trainer aborts on SIGUSR1, even while it loads the model
            return "abort signalled (the trainer's channel did not answer)"
        except OSError as exc:
            why = exc.strerror or str(exc)
    raise UserError(f"{run_dir.name}: cannot reach its trainer ({why}); see {run_dir / LOG_FILE}")


def kill_run(run_dir: str | os.PathLike[str]) -> None:
    """SIGKILL every live process of a run on this host: its trainer, every rank, and the
    launcher's process group."""
    run_dir = Path(run_dir)
    record = read_record(run_dir) or {}
    if liveness(run_dir).state == "unknown":
        return
    if isinstance(record.get("pid"), int):
        kill_if_alive(record["pid"], record.get("start"))
    for pid, start in rank_processes(run_dir).values():
        kill_if_alive(pid, start)
    leader = record.get("leader")
    if isinstance(leader, int) and process_alive(leader, record.get("leader_start")):
        try:
            os.killpg(leader, signal.SIGKILL)
        except OSError:
            pass


def attach(run: str | os.PathLike[str], runs_dir: str | os.PathLike[str] | None = None) -> Follower:
    """Follow a run given as its folder, or as its name in ``runs_dir``. Raises UserError."""
    path = Path(run)
    if not (path / EVENTS_FILE).is_file() and runs_dir is not None and (Path(runs_dir) / str(run)).is_dir():
        path = Path(runs_dir) / str(run)
    if not path.is_dir():
        where = f" in {runs_dir}" if runs_dir is not None else ""
        raise UserError(f"{run}: no such run folder{where}; give a run folder (runs/NAME) or see `tunedeck runs`")
    if not (path / EVENTS_FILE).is_file():
        raise UserError(f"{path}: not a run folder (it has no {EVENTS_FILE})")
    return Follower(path)
