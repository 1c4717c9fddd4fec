"""The engine: a long-lived helper process for the work that needs torch.

The UI process never imports torch, transformers, peft, trl, datasets, bitsandbytes or
accelerate (peft alone takes seconds to import). Anything that needs them is a request to
the engine, a process started with the multiprocessing *spawn* context on first need and
kept for the session.

Protocol: the client sends ``{"id": int, "op": str, "args": dict}`` down a request pipe;
the engine answers each with ``{"id": int, "ok": True, "result": dict}`` or
``{"id": int, "ok": False, "error": "one line"}`` up a reply pipe (``None`` asks it to
exit). Requests are served one at a time, in order. Results are plain dicts (JSON-able),
so reading them never imports torch in the client.

Streaming: a request to one of the :data:`STREAMS` ops answers with any number of
``{"id": int, "ok": True, "partial": dict}`` replies before its final one (chat tokens as
they are generated). ``{"cancel": id}`` on the request pipe cancels a request: a thread in
the engine reads the request pipe while the main thread works, so a cancel reaches a
running generation at once (its cancel event is checked after every token) and a request
still queued is answered "cancelled" without running. :meth:`EngineClient.stream` is the
streaming call; :meth:`EngineClient.call` also sends the cancel when its ``cancel`` is set.

:class:`EngineClient` is thread-safe: Textual thread workers call :meth:`EngineClient.call`
concurrently and each gets its own reply, matched by id. A reader thread waits on the
reply pipe with a timeout; the pipe reads end-of-file the moment the engine is gone (OOM
killer, segfault), and every request still waiting on it gets an error reply instead of
a hang. The next request starts a fresh engine. The engine, in turn, exits when the
client's end closes, so it never outlives the UI.

Ops: ``ping``; ``preflight`` (the checks before a run, :func:`tunedeck.core.launcher.preflight`);
``release`` (the chat model lets go of its GPU memory, before a run trains there);
``inspect`` (a model's layers as LoRA sees them, built on the meta device by
:mod:`tunedeck.core.inspect`); ``lora_summary`` (what a project's [lora] settings, or a pick
of layers, train: the parameters peft will report, the adapter's size, the estimated peak
memory, and why training would refuse). The engine keeps one Inspection per model, so after
the first request about a model each one costs a count (about a millisecond), not a build.
``chat`` (streams one answer of a base model or a run's adapter, :mod:`tunedeck.core.chat`),
``chat_panes`` (streams both panes' answers at once, one batch on the shared base model),
``chat_eval`` (streams the eval prompts through two models, both at once) and ``merge`` (a run's adapter
merged into a standalone model folder, :mod:`tunedeck.core.merge`) keep one base model in
the engine, with every run's adapter loaded onto it by name.
The functions behind the ops are importable and run in-process too (tests).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .kept import Kept
from .paths import cache_dir
from .preview import BACKGROUND_OPS, PREVIEW_OPS, PREVIEW_STREAMS

# how often blocking waits wake up to look at cancellation and the engine's health
POLL_S = 0.1
# how long a streaming call waits for the engine to confirm a cancel before giving up on it
CANCEL_GRACE_S = 10.0


class EngineError(UserError):
    """An engine request that failed; the message is one line."""


# -- the client (UI process) ----------------------------------------------------------


@dataclass
class _Link:
    """One engine process and the two pipes to it."""

    process: Any
    requests: Any  # Connection: the client sends requests here
    replies: Any  # Connection: the client reads replies here
    stop: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None


class EngineClient:
    """Talks to one engine process; starts it on the first request.

    Usable from several threads at once. Use as a context manager, or call :meth:`close`,
    so the process and the reader thread end with the caller.
    """

    def __init__(self, log_path: Path | None = None) -> None:
        self.log_path = log_path or cache_dir() / "logs" / "engine.log"
        self._lock = threading.Lock()  # guards _link, _pending, _closed
        self._send_lock = threading.Lock()  # one writer at a time on the request pipe
        self._ids = itertools.count(1)
        # request id -> (its reply box, the engine it went to)
        self._pending: dict[int, tuple[queue.SimpleQueue[dict[str, Any]], _Link]] = {}
        self._link: _Link | None = None
        self._closed = False

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """Whether an engine process is up now."""
        link = self._link
        return link is not None and link.process.is_alive()

    @property
    def pid(self) -> int | None:
        link = self._link
        return link.process.pid if link is not None else None

    def call(
        self,
        op: str,
        *,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
        **args: Any,
    ) -> dict[str, Any]:
        """Send one request and wait for its reply; returns the result dict.

        Raises :class:`EngineError` (one line) when the engine answers with an error, dies,
        is closed, takes longer than ``timeout`` seconds, or ``cancel`` is set.
        """
        request_id, box = self._send(op, args)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    reply = box.get(timeout=POLL_S)
                except queue.Empty:
                    if cancel is not None and cancel.is_set():
                        self._send_cancel(request_id)
                        raise EngineError(f"engine request {op!r} cancelled") from None
                    if deadline is not None and time.monotonic() > deadline:
                        raise EngineError(f"the engine did not answer {op!r} within {timeout:g} s") from None
                    continue
                if reply.get("ok"):
                    return reply["result"]
                raise EngineError(str(reply.get("error") or "the engine failed without a reason"))
        finally:
            with self._lock:
                self._pending.pop(request_id, None)

    def stream(
        self,
        op: str,
        *,
        on_partial: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
        **args: Any,
    ) -> dict[str, Any]:
        """Send one request to a streaming op; ``on_partial`` gets each partial reply (in the
        calling thread) and the final result is returned.

        When ``cancel`` is set the engine is told at once; a streaming op stops within a token
        and its final result (with what it had so far) is returned as usual. Raises
        :class:`EngineError` like :meth:`call`, and when the engine does not answer a cancel
        within :data:`CANCEL_GRACE_S`. ``timeout`` counts from the last reply received.
        """
        request_id, box = self._send(op, args)
        deadline = None if timeout is None else time.monotonic() + timeout
        cancelled_at: float | None = None
        try:
            while True:
                if cancelled_at is None and cancel is not None and cancel.is_set():
                    self._send_cancel(request_id)
                    cancelled_at = time.monotonic()
                try:
                    reply = box.get(timeout=POLL_S)
                except queue.Empty:
                    now = time.monotonic()
                    if cancelled_at is not None and now - cancelled_at > CANCEL_GRACE_S:
                        raise EngineError(f"engine request {op!r} cancelled") from None
                    if deadline is not None and now > deadline:
                        raise EngineError(f"the engine did not answer {op!r} within {timeout:g} s") from None
                    continue
                if deadline is not None:
                    deadline = time.monotonic() + timeout  # type: ignore[operator]
                if reply.get("ok") and "partial" in reply:
                    if on_partial is not None:
                        on_partial(reply["partial"])
                    continue
                if reply.get("ok"):
                    return reply["result"]
                raise EngineError(str(reply.get("error") or "the engine failed without a reason"))
        finally:
            with self._lock:
                self._pending.pop(request_id, None)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the engine (politely, then by force) and its reader thread; fail waiting calls."""
        with self._lock:
            self._closed = True
            link, self._link = self._link, None
            self._fail_pending(None, "the engine was closed")
        if link is not None:
            self._shut(link, timeout)

    # -- internals ---------------------------------------------------------------------

    def _send(self, op: str, args: dict[str, Any]) -> tuple[int, queue.SimpleQueue[dict[str, Any]]]:
        with self._lock:
            if self._closed:
                raise EngineError("the engine was closed")
            link = self._ensure_started()
            request_id = next(self._ids)
            box: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
            self._pending[request_id] = (box, link)
        try:
            with self._send_lock:
                link.requests.send({"id": request_id, "op": op, "args": args})
        except (OSError, ValueError):  # the engine is gone (its reader reports it too)
            box.put({"id": request_id, "ok": False, "error": _death_message(link.process, self.log_path)})
        return request_id, box

    def _send_cancel(self, request_id: int) -> None:
        """Tell the engine to cancel a request (nothing happens if it has answered it already)."""
        with self._lock:
            entry = self._pending.get(request_id)
        if entry is None:
            return
        try:
            with self._send_lock:
                entry[1].requests.send({"cancel": request_id})
        except (OSError, ValueError):  # the engine is gone; its reader reports it
            pass

    def _ensure_started(self) -> _Link:
        """The running engine, started if there is none (called with the lock held)."""
        link = self._link
        if link is not None and link.process.is_alive():
            return link
        if link is not None:  # it died: answer what it still owed, retire it
            self._fail_pending(link, _death_message(link.process, self.log_path))
            link.stop.set()
            link.requests.close()
            link.replies.close()
        ctx = mp.get_context("spawn")
        requests_out, requests_in = ctx.Pipe(duplex=False)  # (receive end, send end)
        replies_out, replies_in = ctx.Pipe(duplex=False)
        process = ctx.Process(target=serve, args=(requests_out, replies_in, str(self.log_path)),
                              name="tunedeck-engine", daemon=True)
        try:
            process.start()
        except (OSError, RuntimeError) as exc:
            for conn in (requests_out, requests_in, replies_out, replies_in):
                conn.close()
            raise EngineError(f"cannot start the engine process ({_first_line(exc)})") from None
        # keep only our ends: the reply pipe then reads EOF the moment the engine is gone
        requests_out.close()
        replies_in.close()
        link = _Link(process, requests_in, replies_out)
        link.reader = threading.Thread(target=self._read, args=(link,), name="tunedeck-engine-reader", daemon=True)
        link.reader.start()
        self._link = link
        return link

    def _read(self, link: _Link) -> None:
        """Route replies to their callers; report the engine's death to whoever still waits."""
        while not link.stop.is_set():
            try:
                if not link.replies.poll(POLL_S * 2):
                    continue
                reply = link.replies.recv()
            except (EOFError, OSError):  # the engine closed its end: it exited or died
                break
            with self._lock:
                entry = self._pending.get(reply.get("id"))
            if entry is not None:
                entry[0].put(reply)
        if not link.stop.is_set():
            link.process.join(1.0)  # let the exit code settle
            with self._lock:
                self._fail_pending(link, _death_message(link.process, self.log_path))

    def _fail_pending(self, link: _Link | None, message: str) -> None:
        """Answer every request sent to ``link`` (all when None) with an error (lock held)."""
        for request_id, (box, target) in list(self._pending.items()):
            if link is None or target is link:
                box.put({"id": request_id, "ok": False, "error": message})

    def _shut(self, link: _Link, timeout: float) -> None:
        link.stop.set()
        try:
            with self._send_lock:
                link.requests.send(None)
        except (OSError, ValueError):
            pass
        link.process.join(timeout)
        if link.process.is_alive():
            link.process.terminate()
            link.process.join(1.0)
        if link.process.is_alive():  # pragma: no cover - SIGTERM ignored
            link.process.kill()
            link.process.join(1.0)
        link.requests.close()
        link.replies.close()
        if link.reader is not None and link.reader is not threading.current_thread():
            link.reader.join(1.0)


def _death_message(process: Any, log_path: Path) -> str:
    code = process.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return f"the engine process stopped unexpectedly ({how}); it restarts on the next request (log: {log_path})"


# -- the engine process ------------------------------------------------------------


def serve(requests: Any, replies: Any, log_path: str) -> None:
    """The engine's main loop: answer requests in order until told to stop or the client is gone.

    A reader thread takes requests off the pipe into a queue and sets a request's cancel
    event when a ``{"cancel": id}`` arrives, so cancels reach the work while it runs.
    """
    _redirect_output(Path(log_path))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ctrl-c belongs to the UI / CLI
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    cancels: dict[Any, threading.Event] = {}
    cancels_lock = threading.Lock()

    def read() -> None:
        while True:
            try:
                message = requests.recv()
            except (EOFError, OSError):  # the client closed its end or exited
                message = None
            if message is None:
                with cancels_lock:
                    for flag in cancels.values():
                        flag.set()  # stop the work in hand: nobody waits for it
                inbox.put(None)
                return
            if "cancel" in message:
                with cancels_lock:
                    flag = cancels.get(message["cancel"])
                if flag is not None:
                    flag.set()
                continue
            with cancels_lock:
                cancels[message.get("id")] = threading.Event()
            inbox.put(message)

    threading.Thread(target=read, name="tunedeck-engine-requests", daemon=True).start()
    send_lock = threading.Lock()

    def send(reply: dict[str, Any]) -> None:
        with send_lock:
            replies.send(reply)

    while True:
        request = inbox.get()
        if request is None:
            return
        request_id = request.get("id")
        with cancels_lock:
            cancel = cancels.get(request_id) or threading.Event()
        try:
            if cancel.is_set():
                send({"id": request_id, "ok": False, "error": f"engine request {request.get('op')!r} cancelled"})
                continue

            def emit(partial: dict[str, Any], request_id: Any = request_id) -> None:
                send({"id": request_id, "ok": True, "partial": partial})

            if request.get("op") in BACKGROUND_OPS:
                # a pass over the whole dataset: in a thread of its own, so the rows asked
                # for meanwhile are answered between two rows of it, not after it
                threading.Thread(target=_in_background, args=(request, log_path, emit, cancel, send, cancels,
                                                              cancels_lock),
                                 name=f"tunedeck-engine-{request.get('op')}", daemon=True).start()
                continue
            send(handle(request, log_path, emit=emit, cancel=cancel))
        except (OSError, ValueError):
            return
        finally:
            if request.get("op") not in BACKGROUND_OPS:
                with cancels_lock:
                    cancels.pop(request_id, None)


def _in_background(request: dict[str, Any], log_path: str, emit: Callable[[dict[str, Any]], None],
                   cancel: threading.Event, send: Callable[[dict[str, Any]], None], cancels: dict[Any, Any],
                   cancels_lock: Any) -> None:
    try:
        send(handle(request, log_path, emit=emit, cancel=cancel))
    except (OSError, ValueError):  # the client has gone
        pass
    finally:
        with cancels_lock:
            cancels.pop(request.get("id"), None)


def handle(request: dict[str, Any], log_path: str = "", *, emit: Callable[[dict[str, Any]], None] | None = None,
           cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run one request; every failure becomes a one-line error reply.

    Plain ops (:data:`OPS`) return their result. Streaming ops (:data:`STREAMS`) also get
    ``emit`` (called with each partial result) and ``cancel`` (set when the client cancels).
    """
    request_id, name = request.get("id"), request.get("op")
    stream = STREAMS.get(str(name))
    op = OPS.get(str(name))
    if op is None and stream is None:
        return {"id": request_id, "ok": False, "error": f"unknown engine request {name!r}"}
    try:
        if stream is not None:
            result = stream(emit=emit or (lambda partial: None), cancel=cancel or threading.Event(),
                            **request.get("args", {}))
        else:
            result = op(**request.get("args", {}))  # type: ignore[misc]
        return {"id": request_id, "ok": True, "result": result}
    except UserError as exc:
        return {"id": request_id, "ok": False, "error": exc.message}
    except Exception as exc:  # a bug or a library failure: one line here, the traceback in the log
        traceback.print_exc()
        where = f" (traceback in {log_path})" if log_path else ""
        return {"id": request_id, "ok": False, "error": f"{name}: {exc.__class__.__name__}: {_first_line(exc)}{where}"}


def _redirect_output(log_path: Path) -> None:
    """Send the engine's stdout/stderr (library warnings, progress bars) to its log file,
    never to the terminal the UI draws on."""
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else exc.__class__.__name__


# -- the inspector, with one Inspection kept per model ----------------------------------

INSPECTIONS_KEPT = 4
"""Inspections kept in the engine (least recently used goes first); a 70B one is ~1 MB."""

_inspections: Kept[tuple[str, str, bool], Any] = Kept(INSPECTIONS_KEPT)


def inspection(source: str, root: str | None = None, *, trust_remote_code: bool = False) -> Any:
    """The :class:`~tunedeck.core.inspect.Inspection` of ``source`` (relative to ``root``).

    Built once per (source, root, trust_remote_code) and kept, so every later request about
    the same model (each toggle of the Modules screen) costs a count, not a build.
    """
    from .inspect import inspect_model

    return _inspections.get((source, root or "", trust_remote_code), lambda: inspect_model(
        source, root=Path(root) if root else None, trust_remote_code=trust_remote_code))


def project_inspection(project: Any) -> Any:
    """The kept :class:`~tunedeck.core.inspect.Inspection` of a project's model."""
    return inspection(project["model.source"], str(project.root), trust_remote_code=project["model.trust_remote_code"])


def lora_summary(project: Any, *, layers: list[str] | None = None, hardware: Any = None) -> dict[str, Any]:
    """What the project's [lora] settings train, and the estimated peak memory.

    ``layers`` (names of the inspection's layers) replaces ``lora.target_modules`` with the
    targets that select exactly them (:func:`~tunedeck.core.inspect.targets_for`: a suffix
    list for whole groups, a regex for a partial pick); ``targets`` in the reply is what to
    write to the project. Counts are :func:`~tunedeck.core.inspect.count_trainable`'s, equal
    to what peft reports after wrapping. Settings training would refuse (targets matching
    nothing, the output layer) are in ``errors``, one line each, not raised; a model that
    cannot be inspected raises UserError. ``hardware`` (a :class:`~tunedeck.core.hardware.Hardware`,
    default: this machine) decides "auto" precision and the device of the memory estimate
    (:func:`~tunedeck.core.inspect.project_memory`), made at the dataset's longest row
    (:func:`~tunedeck.core.memory.longest_row`: the rows are rendered once per model, data
    file and dataset settings, then kept).
    """
    from .inspect import project_choice, project_memory, targets_for
    from .memory import longest_row

    ins = project_inspection(project)
    choice = project_choice(project, ins, None if layers is None else targets_for(ins, layers))
    mode = project["quantization.mode"]
    memory, memory_error, base_bytes = None, "", 4 if mode != "none" else 2
    try:
        estimate = project_memory(project, ins, choice, hardware=hardware, longest_row=longest_row(project))
    except UserError as exc:  # e.g. fp16 on a CPU: the settings screen marks the key
        memory_error = exc.message
    else:
        base_bytes = 4 if mode != "none" or estimate.precision == "fp32" else 2
        memory = estimate.as_dict()
    group_of = {layer.name: layer.group for layer in ins.layers}
    adapted: dict[str, int] = {}
    for name in choice.layers:
        adapted[group_of[name]] = adapted.get(group_of[name], 0) + 1
    attention = ins.presets["attention"]
    return {
        "model": ins.source,
        "architecture": ins.architecture,
        "targets": choice.targets,
        "layers": list(choice.layers),
        "adapted": adapted,
        "adapted_layers": len(choice.layers),
        "trainable_params": choice.trainable_params,
        "total_params": choice.total_params,
        "percent": choice.percent,
        "adapter_bytes": choice.adapter_bytes(base_bytes),
        "errors": [f"lora.{e}" if e.startswith("target_modules") else e for e in choice.errors],
        "warnings": list(choice.warnings),
        "notes": list(ins.notes),
        "attention_targets": targets_for(ins, attention) if attention else None,
        "memory": memory,
        "memory_error": memory_error,
    }


def hardware_arg(hardware: Any) -> dict[str, Any] | None:
    """A :class:`~tunedeck.core.hardware.Hardware` as a request argument (plain data)."""
    return None if hardware is None else asdict(hardware)


def _hardware(arg: dict[str, Any] | None) -> Any:
    if arg is None:
        return None
    from .hardware import Gpu, Hardware

    gpus = tuple(Gpu(**{**g, "compute_capability": tuple(g["compute_capability"]),
                        "instance": tuple(g["instance"]) if g.get("instance") else None}) for g in arg["gpus"])
    return Hardware(gpus=gpus, cpu_count=arg["cpu_count"], ram_total=arg["ram_total"],
                    notes=tuple(arg.get("notes") or ()))


# -- ops: what a request may ask ------------------------------------------------------


def op_ping() -> dict[str, Any]:
    return {"pid": os.getpid()}


def op_inspect(source: str, root: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """The model's layers as LoRA sees them: ``Inspection.as_dict()`` (groups, layers, presets...)."""
    return inspection(source, root, trust_remote_code=trust_remote_code).as_dict()


def op_lora_summary(project_text: str, project_path: str | None = None, layers: list[str] | None = None,
                    hardware: dict[str, Any] | None = None) -> dict[str, Any]:
    """``project_text``: the project as the user sees it (unsaved edits included)."""
    from .project import Project

    project = Project.from_text(project_text, Path(project_path) if project_path else None)
    return lora_summary(project, layers=layers, hardware=_hardware(hardware))


def op_release() -> dict[str, Any]:
    """Let go of the chat model (before a run trains on the GPU it holds)."""
    had = chat_state().model is not None
    chat_state().release()
    return {"released": had}


def op_preflight(project_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The pre-flight of a run (:func:`tunedeck.core.launcher.preflight`, targets included),
    for the app's Train screen: it refuses, in one line, before anything is created."""
    from .launcher import load_project, preflight

    project = load_project(project_path, overrides or [])
    found = preflight(project, inspection=project_inspection(project))
    return {"counts": found.counts, "processes": found.resolved.processes, "device": found.resolved.device}


OPS: dict[str, Callable[..., dict[str, Any]]] = {
    "ping": op_ping,
    "preflight": op_preflight,
    "release": op_release,
    "inspect": op_inspect,
    "lora_summary": op_lora_summary,
    **PREVIEW_OPS,  # dataset preview
}


# -- streaming ops: chat, eval, merge ------------------------------------------------------

_chat_state: Any = None


def chat_state() -> Any:
    """The engine's :class:`~tunedeck.core.chat.ChatState`: one base model and its adapters."""
    global _chat_state
    if _chat_state is None:
        from .chat import ChatState

        _chat_state = ChatState()
    return _chat_state


def _chat_project(project_text: str | None, project_path: str | None) -> Any:
    if project_text is None and project_path is None:
        return None
    from .project import Project

    if project_text is not None:
        return Project.from_text(project_text, Path(project_path) if project_path else None)
    return Project.load(project_path)  # type: ignore[arg-type]


def _runs_dir(project: Any) -> Path | None:
    return project.resolve_path(project["output.runs_dir"]) if project is not None else None


def op_chat(emit: Callable[[dict[str, Any]], None], cancel: threading.Event, model: str,
            messages: list[dict[str, str]], settings: dict[str, Any] | None = None, partner: str | None = None,
            project_text: str | None = None, project_path: str | None = None) -> dict[str, Any]:
    """One answer of ``model`` ("base" or a run folder) to ``messages``, alone, streamed: a
    partial ``{"text": piece, "tokens": n, "tokens_per_s": x}`` per decoded piece; the final
    result is the whole answer (``cancelled`` when stopped). ``partner`` is the model of the
    other pane (base takes a run's template and system prompt from it)."""
    from .chat import GenSettings, target_for

    project = _chat_project(project_text, project_path)
    target = target_for(model, project=project, partner=partner, runs_dir=_runs_dir(project))
    gen = GenSettings.from_dict(settings)

    def on_text(piece: str, answer: Any) -> None:
        emit({"text": piece, "tokens": answer.tokens, "tokens_per_s": answer.tokens_per_s})

    return chat_state().answer(target, messages, gen, cancel=cancel, on_text=on_text).as_dict()


def op_chat_panes(emit: Callable[[dict[str, Any]], None], cancel: threading.Event, panes: list[dict[str, Any]],
                  settings: dict[str, Any] | None = None, project_text: str | None = None,
                  project_path: str | None = None) -> dict[str, Any]:
    """Every pane's answer at once: ``panes`` is ``[{"model", "messages"}, ...]`` (each pane's
    model and its conversation). Answers on one base model share a batch
    (:meth:`~tunedeck.core.chat.ChatState.answer_all`) and stream together: a partial
    ``{"pane": i, "text": piece, "tokens": n, "tokens_per_s": x}`` per decoded piece of pane
    i. The final result is ``{"answers": [answer or None], "errors": [one line or None],
    "together": bool}``: a pane whose model cannot answer gets its error, the others answer."""
    from .chat import BASE, GenSettings, target_for

    project = _chat_project(project_text, project_path)
    runs_dir = _runs_dir(project)
    gen = GenSettings.from_dict(settings)
    models = [str(pane["model"]) for pane in panes]
    asks: list[tuple[Any, list[dict[str, str]]]] = []
    where: list[int] = []  # the pane of each ask
    errors: list[str | None] = [None] * len(panes)
    for i, pane in enumerate(panes):
        partner = next((m for j, m in enumerate(models) if j != i and m != BASE), None)
        try:
            try:
                target = target_for(models[i], project=project, partner=partner, runs_dir=runs_dir)
            except UserError:
                if models[i] != BASE or partner is None or project is None:
                    raise
                # the other pane's run is unreadable (it says why): base answers as the project has it
                target = target_for(BASE, project=project, runs_dir=runs_dir)
        except UserError as exc:
            errors[i] = exc.message
            continue
        asks.append((target, list(pane["messages"])))
        where.append(i)

    def on_text(index: int, piece: str, answer: Any) -> None:
        emit({"pane": where[index], "text": piece, "tokens": answer.tokens, "tokens_per_s": answer.tokens_per_s})

    result = chat_state().answer_all(asks, gen, cancel=cancel, on_text=on_text)
    answers: list[dict[str, Any] | None] = [None] * len(panes)
    for index, pane in enumerate(where):
        answer = result.answers[index]
        answers[pane] = answer.as_dict() if answer is not None else None
        errors[pane] = result.errors[index]
    return {"answers": answers, "errors": errors, "together": result.together}


def op_chat_eval(emit: Callable[[dict[str, Any]], None], cancel: threading.Event, models: list[str],
                 settings: dict[str, Any] | None = None, prompts_file: str | None = None, limit: int | None = None,
                 project_text: str | None = None, project_path: str | None = None) -> dict[str, Any]:
    """The eval split's prompts (or a prompts file's) through each of ``models``, all models
    answering a prompt at once (one batch when they share the base model); a partial
    ``{"index", "total", "item"}`` per prompt answered by all, where ``item`` is
    ``{"messages", "reference", "answers": [answer per model]}``."""
    from .chat import GenSettings, eval_items, target_for

    project = _chat_project(project_text, project_path)
    runs_dir = _runs_dir(project)
    targets = []
    for i, model in enumerate(models):
        partner = next((m for j, m in enumerate(models) if j != i and m != "base"), None)
        targets.append(target_for(model, project=project, partner=partner, runs_dir=runs_dir))
    if project is None:
        run = next((t for t in targets if t.adapter), None)
        if run is None:
            raise UserError("eval mode needs a project or a run (its eval split)")
        project = _chat_project(None, str(Path(run.adapter).parent / "project.toml"))  # type: ignore[arg-type]
    gen = GenSettings.from_dict(settings)
    items = eval_items(project, prompts_file, limit)
    done: list[dict[str, Any]] = []
    state = chat_state()
    for index, item in enumerate(items):
        result = state.answer_all([(target, item["messages"]) for target in targets], gen, cancel=cancel)
        problem = next((e for e in result.errors if e is not None), None)
        if problem is not None:
            raise UserError(problem)
        if cancel.is_set():
            break
        done.append({**item, "answers": [a.as_dict() for a in result.answers if a is not None]})
        emit({"index": index, "total": len(items), "item": done[-1]})
    return {"items": done, "total": len(items), "cancelled": cancel.is_set()}


def op_merge(emit: Callable[[dict[str, Any]], None], cancel: threading.Event, run: str, out: str,
             cpu: bool = False, project_path: str | None = None) -> dict[str, Any]:
    """Merge a run's adapter into its base: a standalone model folder at ``out``
    (:func:`tunedeck.core.merge.merge_run`); a partial ``{"message"}`` per stage."""
    from .chat import run_folder
    from .merge import merge_run

    project = _chat_project(None, project_path)
    run_dir = run_folder(run, _runs_dir(project))
    chat_state().release()  # the chat model's GPU memory goes to the merge (it loads again on the next question)
    return merge_run(run_dir, Path(out), cpu=cpu, progress=lambda message: emit({"message": message}))


def op_export(emit: Callable[[dict[str, Any]], None], cancel: threading.Event, run: str, out: str,
              quant: str = "f16", lora: bool = False, cpu: bool = False,
              project_path: str | None = None) -> dict[str, Any]:
    """Export a run as GGUF with its Modelfile (:func:`tunedeck.core.export.export_run`); a
    partial ``{"stage", "message", "done", "total"}`` per step; ``cancel`` stops it."""
    from .chat import run_folder
    from .export import export_run

    project = _chat_project(None, project_path)
    run_dir = run_folder(run, _runs_dir(project))
    chat_state().release()  # the chat model's memory goes to the merge (it loads again on the next question)
    return export_run(run_dir, Path(out), quant=quant, lora=lora, cpu=cpu, progress=emit, cancel=cancel)


def op_hub_search(text: str, limit: int = 20) -> dict[str, Any]:
    """Hub models matching ``text`` (:func:`tunedeck.core.hub.search_models`): the network, when asked."""
    from .hub import search_models

    return {"models": search_models(text, limit)}


def op_hub_plan(repo: str, revision: str | None = None, dataset: bool = False,
                allow_pickle: bool = False) -> dict[str, Any]:
    """What pulling ``repo`` would fetch (:func:`tunedeck.core.hub.plan_pull`)."""
    from .hub import plan_pull

    return plan_pull(repo, revision, dataset=dataset, allow_pickle=allow_pickle)


def op_hub_pull(emit: Callable[[dict[str, Any]], None], cancel: threading.Event, repo: str,
                revision: str | None = None, dataset: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Download ``repo`` into the Hugging Face cache (:func:`tunedeck.core.hub.pull`); a partial per
    progress step; ``cancel`` stops it (the partial file is kept for resume)."""
    from .hub import pull

    return pull(repo, revision, dataset=dataset, allow_pickle=allow_pickle, progress=emit, cancel=cancel)


OPS.update({"hub_search": op_hub_search, "hub_plan": op_hub_plan})  # the network, only when asked


STREAMS: dict[str, Callable[..., dict[str, Any]]] = {
    "chat": op_chat,
    "chat_panes": op_chat_panes,
    "chat_eval": op_chat_eval,
    "merge": op_merge,
    "export": op_export,
    "hub_pull": op_hub_pull,
    **PREVIEW_STREAMS,  # the dataset's stats, with progress
}
"""Ops that stream partial results; each is called with ``emit`` and ``cancel`` too."""
