"""The trainer process: a program of its own, one per session of a run.

Started by :func:`tunedeck.core.launcher.start_run` (``tunedeck train`` and the app), in
its own process session, with the run folder already made and locked::

    python -m tunedeck.core.trainer --run-dir runs/NAME --launch SPEC_JSON
    python -m torch.distributed.run --nproc_per_node 2 -m tunedeck.core.trainer --run-dir ...

or by hand, when it makes the run folder itself (rank 0, after the same pre-flight)::

    python -m tunedeck.core.trainer PROJECT.toml [--set k=v ...] [--run-name N] [--resume]
    torchrun --nproc_per_node 4 -m tunedeck.core.trainer PROJECT.toml

Before it imports anything heavy, rank 0 records itself in the run's record (pid, start
time, host, process group), opens its channel (:mod:`tunedeck.core.channel`: events out
to every follower, controls in) and keeps a little room on the run's disk, so that a full
disk still gets its final event. Then :class:`~tunedeck.core.finetune.Run` trains.

Every way out of a session ends with one final event, with its reason in words:
finished (or stopped early), aborted, failed (bad input, a crash, a full disk, out of
memory, terminated). Controls: stop and save are taken between optimizer steps (rank 0
sends them to every rank); abort (a control, or SIGUSR1) ends at once, and under several
processes rank 0 ends every other rank too. A rank other than 0 that fails writes its
reason to the run's private folder, where rank 0 reads it when it is terminated.

Light until it trains: nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .errors import UserError, one_line
from .events import (
    CHECKPOINT, CONTROL, EVAL, EVENTS_FILE, FAILED, FINISHED, RUN_STARTED, STEP, SYSTEM, WARNING, ALARM, EventLog,
    event,
)
from .health import Health
from .runs import (
    EXIT_ABORTED, EXIT_FAILED, EXIT_OK, EXIT_USER_ERROR, PRIVATE_DIR, kill_if_alive, latest_checkpoint,
    process_alive, process_start, rank_processes, read_record, write_record,
)
from .units import format_in

RESERVE_BYTES = 1 << 20  # kept free on the run's disk for the final event
EXIT_TERMINATED = 143


class Aborted(BaseException):
    """Raised in the main thread when the run is aborted (a BaseException, like
    KeyboardInterrupt, so that no library's ``except Exception`` swallows it)."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (torchrun ends the other ranks so when one fails)."""


# -- reporting ------------------------------------------------------------------------------


class Emitter:
    """Writes the session's events (rank 0): to events.jsonl and, through the channel's
    :class:`~tunedeck.core.channel.Server`, to every follower. One final event per session.

    Ranks other than 0 have no log; their final event (a failure) is written to
    ``rank_error`` instead, for rank 0 to tell.
    """

    def __init__(self, log: EventLog | None, echo: Any = None, server: Any = None,
                 rank_error: Path | None = None) -> None:
        self.log = log
        self.echo = echo
        self.server = server
        self.rank_error = rank_error
        self.reserve: Reserve | None = None
        self.lock = threading.RLock()
        self.step = 0
        self.final_sent = False
        self.health = Health()  # its alarms follow the event that raised them

    def __call__(self, type: str, step: int | None = None, **fields: Any) -> dict[str, Any]:
        if step is not None:
            self.step = max(self.step, step)
        ev = event(type, self.step if step is None else step, **fields)
        final = type in (FINISHED, FAILED)
        if self.log is None:
            if final and type == FAILED and self.rank_error is not None and not self.final_sent:
                _write_quietly(self.rank_error, json.dumps(ev))
            self.final_sent = self.final_sent or final
            return ev
        with self.lock:
            if final and self.final_sent:
                return ev
            self._write(ev, final)
            self.final_sent = self.final_sent or final
            if self.echo is not None:
                self.echo(ev)
            if type in (STEP, EVAL, SYSTEM):
                for alarm in self.health.observe(ev):
                    self(ALARM, ev["step"], **alarm.fields())
        return ev

    def _write(self, ev: dict[str, Any], final: bool) -> None:
        try:
            if self.server is not None:
                self.server.emit(ev)
            else:
                self.log.write(ev)  # type: ignore[union-attr]
        except OSError as exc:
            if not (final and disk_full(exc) and self.reserve is not None):
                raise
            self.reserve.release()  # the room kept for this very event
            self.log.write(ev)  # type: ignore[union-attr]

    def warn(self, message: str) -> None:
        self(WARNING, message=message)


def _write_quietly(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError:
        pass


class Reserve:
    """A file of :data:`RESERVE_BYTES` in the run's private folder, given back when the
    disk fills up so that the run's final event (with the reason) can still be written."""

    def __init__(self, folder: Path) -> None:
        self.path: Path | None = folder / "reserve"
        try:
            with open(self.path, "wb") as fh:
                fh.write(bytes(RESERVE_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            self.release()

    def release(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            self.path = None


class Controls:
    """The controls of a session: stop and save (flags read between optimizer steps), abort
    (SIGUSR1 to this process: :class:`Aborted` in the main thread at once, even while the
    model loads). Rank 0 takes them from its channel (:meth:`take`) and reports each as a
    ``control`` event; every rank learns them at the step's end (finetune's EventsCallback)."""

    def __init__(self, emit: Emitter | None = None) -> None:
        self.stop = threading.Event()
        self.save = threading.Event()
        self.abort = threading.Event()
        self._emit = emit

    def take(self, action: str) -> tuple[bool, str]:
        """A control from a follower; returns (taken, what happens now)."""
        emit = self._emit
        if emit is not None and emit.final_sent:
            return False, "the run has ended"
        if action == "stop":
            self.stop.set()
            message = "stop taken: a checkpoint and the adapter are saved at the end of this step, then the run ends"
        elif action == "save":
            self.save.set()
            message = "save taken: a checkpoint is saved at the end of this step; training goes on"
        elif action == "abort":
            self.abort.set()
            message = "abort taken: the run ends now, saving nothing more"
        else:
            return False, f"{action!r} is not a control (stop, save, abort)"
        if emit is not None:
            emit(CONTROL, action=action, message=message)
        if action == "abort":
            os.kill(os.getpid(), signal.SIGUSR1)
        return True, message


_SESSION: dict[str, Any] = {}  # the emitter of this process's session, for the signal handlers


def _session_ended() -> bool:
    """Whether the session is reporting its end, or has: a signal then changes nothing
    (the final event being written is not cut short)."""
    emit = _SESSION.get("emit")
    return bool(_SESSION.get("ending")) or (emit is not None and emit.final_sent)


def _on_abort(signum: int, frame: Any) -> None:
    if not _session_ended():  # too late once the run has reported its end
        raise Aborted()


def _on_term(signum: int, frame: Any) -> None:
    if not _session_ended():
        raise Terminated()


def install_signals(started_by_tunedeck: bool) -> None:
    """SIGUSR1 aborts, SIGTERM ends with a reason; the terminal's hang-up never reaches a
    run, and Ctrl-C is the launcher's to interpret when tunedeck started the trainer."""
    signal.signal(signal.SIGUSR1, _on_abort)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if started_by_tunedeck:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# -- why a run failed ----------------------------------------------------------------------------


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 20:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def failure_of(exc: BaseException, spec: Any, step: int) -> tuple[str, str]:
    """(failure, one line saying what happened and what to do) for an exception that ended
    a run: ``disk_full``, ``out_of_memory`` or ``crash``."""
    run_dir = Path(spec.run_dir)
    free = _free(run_dir)
    resume = _resume_hint(spec)
    for e in _chain(exc):
        text = str(e)
        if disk_full(e) or "No space left on device" in text or (
                "file write failed" in text and free is not None and free < 64 * 2**20):
            shown = "" if free is None else f" ({format_in(free, 'MiB')} free now)"
            return "disk_full", (f"the disk is full: writing to {run_dir} failed at step {step} (No space left on "
                                 f"device){shown}; free some space there, then {resume}")
        if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
            return "out_of_memory", (f"out of GPU memory at step {step}{_gpu_memory_context(spec)}: lower "
                                     "training.batch_size or dataset.max_length, turn on "
                                     "training.gradient_checkpointing, or train in 4-bit (quantization.mode = "
                                     f'"4bit"); then {resume}')
        if isinstance(e, MemoryError) or "can't allocate memory" in text or "not enough memory" in text:
            return "out_of_memory", (f"out of memory (RAM) at step {step}: lower training.batch_size or "
                                     f"dataset.max_length, or train in 4-bit; then {resume}")
    return "crash", one_line(exc)


def _gpu_memory_context(spec: Any) -> str:
    """" (batch 8 x 2048 tokens; estimated ~30.1 GiB, torch's peak 78.2 GiB of 79.1 GiB)", as far as known;
    and the memory torch kept is given back, so that the final event and the rest can proceed.
    The estimate is the one the run recorded when training began (the one every screen
    shows), else the project's estimate made now."""
    from .memory import MemoryEstimate
    from .units import format_gib

    parts: list[str] = []
    try:
        from .events import read_events
        from .runs import fold

        recorded = fold(read_events(Path(spec.run_dir) / EVENTS_FILE)).memory_estimate
        if recorded is None:
            from .inspect import project_report
            from .project import Project

            recorded = project_report(Project.load(Path(spec.run_dir) / "project.toml"))["memory"]
        estimate = MemoryEstimate.from_dict(recorded)
        parts.append(f"batch {estimate.batch_size} x {estimate.seq_length or estimate.max_length} tokens")
        parts.append(f"estimated ~{format_gib(estimate.total)}")
    except Exception:  # noqa: BLE001 - the reason stands without the figures
        pass
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.current_device()
            total = torch.cuda.get_device_properties(device).total_memory
            parts.append(f"torch's peak {format_gib(torch.cuda.max_memory_allocated(device))} of {format_gib(total)}")
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
    return f" ({'; '.join(parts)})" if parts else ""


def _resume_hint(spec: Any) -> str:
    run_dir = Path(spec.run_dir)
    if latest_checkpoint(run_dir) is None:
        return "start the run again"
    return (f"resume from the last checkpoint: tunedeck train {spec.project_path} --resume "
            f"--run-name {run_dir.name}")


def _terminated_reason(run_dir: Path) -> tuple[str, str]:
    """Why rank 0 got SIGTERM: torchrun ends the other processes when one of them fails,
    so first another rank that failed (its report) or died (gone without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        deadline = time.monotonic() + 1.0
        while True:
            found = failed_rank(run_dir, world)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    return "terminated", ("the trainer was terminated (SIGTERM): another process of the run failed, or the run "
                          f"was stopped from outside; see {run_dir / 'trainer.log'}")


# -- the session ------------------------------------------------------------------------------


def run(spec: Any, emit: Emitter, controls: Controls) -> int:
    """Train, reporting through ``emit``; every way out ends with one final event. Returns an exit code."""
    _SESSION["emit"] = emit
    try:
        for message in spec.warnings:
            emit.warn(message)
        from .finetune import Run

        final = Run(spec, emit, controls).execute()
    except (Aborted, KeyboardInterrupt) as exc:
        _SESSION["ending"] = True
        how = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else "aborted"
        emit(FAILED, reason=f"{how} at step {emit.step}; nothing more saved", failure="aborted", traceback=None,
             user_error=False, aborted=True)
        return EXIT_ABORTED
    except Terminated:
        _SESSION["ending"] = True
        failure, reason = _terminated_reason(Path(spec.run_dir))
        emit(FAILED, reason=reason, failure=failure, traceback=None, user_error=False)
        return EXIT_TERMINATED
    except UserError as exc:
        _SESSION["ending"] = True
        emit(FAILED, reason=exc.message, failure="user_error", traceback=None, user_error=True)
        return EXIT_USER_ERROR
    except Exception as exc:
        _SESSION["ending"] = True
        failure, reason = failure_of(exc, spec, emit.step)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and emit.log is not None and _lost_a_peer(exc):  # another rank went away: say which
            deadline = time.monotonic() + 2.0
            other = failed_rank(Path(spec.run_dir), world)
            while other is None and time.monotonic() < deadline:
                time.sleep(0.1)
                other = failed_rank(Path(spec.run_dir), world)
            failure, reason = other or (failure, reason)
        if failure == "disk_full" and emit.reserve is not None:
            emit.reserve.release()
        emit(FAILED, reason=reason, failure=failure, traceback=traceback.format_exc(), user_error=False)
        return EXIT_FAILED
    return EXIT_OK if final["type"] == FINISHED else EXIT_FAILED


def serve(spec: Any, rank: int, world: int, echo: Any = None) -> int:
    """One process of a session: rank 0 records itself, opens the channel and reports; every
    rank trains. Returns the exit code."""
    run_dir = Path(spec.run_dir)
    private = run_dir / PRIVATE_DIR
    _write_quietly(private / f"rank-{rank}.json", json.dumps({"pid": os.getpid(), "start": process_start(os.getpid())}))
    if rank != 0:
        code = run(spec, Emitter(None, rank_error=private / f"rank-{rank}.error"), Controls())
        _write_quietly(private / f"rank-{rank}.exit", str(code))
        return code
    from .channel import ChannelError, Server

    log = EventLog(run_dir / EVENTS_FILE)
    emit = Emitter(log, echo=echo)
    _SESSION["emit"] = emit
    controls = Controls(emit)
    server = None
    try:
        try:
            server = Server(run_dir, log, controls.take)
            emit.server = server
        except (ChannelError, OSError) as exc:
            emit.warn(f"the run's channel could not open ({exc}); followers read its events file")
        before = read_record(run_dir) or {}
        carried = {k: before[k] for k in ("leader", "leader_start", "oom_kills") if k in before}
        if "leader" not in carried:  # started by hand: the launcher is torchrun (or nothing)
            carried["leader"] = os.getppid() if world > 1 else os.getpid()
            carried["leader_start"] = process_start(carried["leader"])
        try:
            write_record(run_dir, world_size=world, address=server.address if server else None, **carried)
        except (OSError, UserError) as exc:  # the launcher's record stands (it names this process too)
            emit.warn(f"could not update the run's record ({exc})")
        emit.reserve = Reserve(private)
        if world > 1:
            RankWatch(run_dir, world, emit, server).start()
        code = run(spec, emit, controls)
    except (Aborted, Terminated) as exc:  # before run() took over
        _SESSION["ending"] = True
        if isinstance(exc, Aborted):
            emit(FAILED, reason="aborted before training started", failure="aborted", traceback=None,
                 user_error=False, aborted=True)
            code = EXIT_ABORTED
        else:
            emit(FAILED, reason="terminated (SIGTERM) before training started", failure="terminated",
                 traceback=None, user_error=False)
            code = EXIT_TERMINATED
    finally:
        if emit.reserve is not None:
            emit.reserve.release()
        if server is not None:
            server.close()
        log.close()
    if world > 1 and code == EXIT_ABORTED:
        end_other_ranks(run_dir)
    return code


class RankWatch(threading.Thread):
    """Rank 0's watch over the other ranks of the run. A rank that is gone without ending
    cleanly ends the run at once, with its reason: its own report (``rank-N.error``), or
    that it died. Rank 0 cannot wait for torchrun's SIGTERM to say so: stuck in a
    collective with the dead rank, it would be killed before it could write a word."""

    def __init__(self, run_dir: Path, world: int, emit: Emitter, server: Any) -> None:
        super().__init__(name="tunedeck-rank-watch", daemon=True)
        self.run_dir = run_dir
        self.world = world
        self.emit = emit
        self.server = server

    def run(self) -> None:
        while not self.emit.final_sent:
            time.sleep(1.0)
            ended = failed_rank(self.run_dir, self.world)
            if ended is not None and not self.emit.final_sent:
                failure, reason = ended
                self.emit(FAILED, reason=reason, failure=failure, traceback=None, user_error=False)
                end_other_ranks(self.run_dir)
                if self.server is not None:
                    self.server.close()
                os._exit(EXIT_FAILED)


def _lost_a_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another process of the run went away."""
    for e in _chain(exc):
        text = str(e)
        if type(e).__name__ in ("DistBackendError", "DistNetworkError") or any(
                words in text for words in ("Connection closed by peer", "remote worker", "Connection reset by peer",
                                            "NCCL communicator was aborted", "collective operation timeout")):
            return True
    return False


def failed_rank(run_dir: Path, world: int) -> tuple[str, str] | None:
    """(failure, reason) of the first rank other than 0 that is gone without a clean exit:
    its own report (``rank-N.error``), or that it died; None while they all live."""
    private = run_dir / PRIVATE_DIR
    ranks = rank_processes(run_dir)
    for rank in range(1, world):
        if rank not in ranks:
            continue  # not started yet
        pid, start = ranks[rank]
        if process_alive(pid, start):
            continue
        try:
            if int((private / f"rank-{rank}.exit").read_text(encoding="utf-8")) == EXIT_OK:
                continue
        except (OSError, ValueError):
            pass
        try:
            ev = json.loads((private / f"rank-{rank}.error").read_text(encoding="utf-8"))
            if ev.get("failure") in ("terminated", "aborted"):
                continue  # ended by the launcher, not the cause
            return str(ev.get("failure") or "crash"), f"rank {rank} failed: {ev.get('reason')}"
        except (OSError, ValueError, AttributeError):
            return "died", (f"rank {rank} (pid {pid}) ended without a report: killed (kill -9, the out-of-memory "
                            f"killer) or crashed; see {run_dir / 'trainer.log'}")
    return None


def end_other_ranks(run_dir: Path) -> None:
    """SIGKILL every other live rank of this run (an abort saves nothing: nothing to wait for)."""
    for pid, start in rank_processes(run_dir).values():
        if pid != os.getpid():
            kill_if_alive(pid, start)


# -- the console of a trainer started by hand ----------------------------------------------------


def _print_event(ev: dict[str, Any]) -> None:
    """Rank 0's console: one line per event worth reading."""
    kind, step = ev["type"], ev["step"]
    if kind == STEP:
        parts = [f"step {step}/{ev.get('max_steps')}"]
        if ev.get("loss") is not None:
            parts.append(f"loss {ev['loss']:.4f}")
        if ev.get("tokens_per_s"):
            parts.append(f"{ev['tokens_per_s']:,.0f} tok/s")
        if ev.get("eta_s") is not None:
            parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(ev['eta_s']))}")
        print("  ".join(parts), flush=True)
    elif kind == EVAL:
        print(f"eval at step {step}: loss {ev.get('eval_loss')}", flush=True)
    elif kind == CHECKPOINT:
        print(f"checkpoint: {ev['path']}", flush=True)
    elif kind in (WARNING, CONTROL):
        print(f"{kind}: {ev['message']}", file=sys.stderr, flush=True)
    elif kind == RUN_STARTED:
        print(f"run {ev['name']}: {ev['trainable_params']:,} trainable parameters, {ev['max_steps']} steps, "
              f"{ev['world_size']} process(es)", flush=True)
    elif kind == FINISHED:
        print(f"finished: adapter in {ev['adapter']}", flush=True)
    elif kind == FAILED:
        print(f"tunedeck: error: {ev['reason']}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tunedeck.core.trainer",
        description="Train a project in this process; under torchrun or `accelerate launch` every process "
        "trains and rank 0 reports. `tunedeck train` is the usual way (it starts this program).",
    )
    parser.add_argument("project", nargs="?", help="project file (when started by hand)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)  # started by tunedeck
    parser.add_argument("--launch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    install_signals(started_by_tunedeck=args.run_dir is not None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .rundir import RunSpec

    if args.run_dir is not None:
        if not args.launch:
            parser.error("--run-dir needs --launch")
        return serve(RunSpec.from_dict(json.loads(args.launch)), rank, world)
    if args.project is None:
        parser.error("give a project file")
    try:
        spec, prepared, error = _prepare_by_hand(args, rank, world)
    except (Aborted, KeyboardInterrupt, Terminated):
        return EXIT_ABORTED
    if error is not None or spec is None:
        if rank == 0:
            print(f"tunedeck: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return serve(spec, rank, world, echo=_print_event if rank == 0 else None)  # rank 0 holds `prepared`'s lock


def one_process_devices(project_path: str, overrides: list[str]) -> None:
    """A trainer started by hand as one process trains on one device: it refuses a project
    that asks for several (transformers would wrap the model in DataParallel, which trl
    refuses), and otherwise shows CUDA only the GPU it chose."""
    from .hardware import detect
    from .preflight import load_project
    from .resolve import resolve

    resolved = resolve(load_project(project_path, overrides))
    if resolved.processes > 1:
        raise UserError(f"training.devices asks for {resolved.processes} processes and this is one; start the run "
                        f"with `tunedeck train {project_path}` (it starts them), or with `torchrun --nproc_per_node "
                        f"{resolved.processes} -m tunedeck.core.trainer {project_path}`, or set training.devices = 1")
    if resolved.gpus:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(resolved.gpus)
        detect.cache_clear()


def _prepare_by_hand(args: argparse.Namespace, rank: int, world: int) -> tuple[Any, Any, str | None]:
    """Rank 0 checks the project and makes the run folder; every rank gets its spec."""
    from .rundir import RunSpec, prepare_run

    spec: Any = None
    prepared = None
    error: str | None = None
    if rank == 0:
        try:
            if world == 1:
                one_process_devices(args.project, args.overrides)
            prepared = prepare_run(args.project, args.overrides, args.run_name, args.resume)
            spec = prepared.spec
        except UserError as exc:
            error = exc.message
    if world > 1:
        import torch
        import torch.distributed as dist
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # joins the group torchrun / accelerate set up
        payload = [spec.as_dict() if spec is not None else None, error]
        dist.broadcast_object_list(payload, src=0)
        shared, error = payload
        spec = RunSpec.from_dict(shared) if shared is not None else None
    return spec, prepared, error


if __name__ == "__main__":
    sys.exit(main())
