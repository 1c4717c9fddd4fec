"""The engine process: its main loop, the lanes its requests run on, and one request's run.

:func:`main` is what the client starts (spawn): it sends the process's output to the log
and ignores ctrl-c (that belongs to the UI or the CLI), then :func:`serve` answers
requests until the client says stop or goes away.

A reader thread takes requests off the pipe, and sets a request's cancel event when a
``{"cancel": id}`` arrives, so a cancel reaches the work while it runs. Each request then
goes to its lane (:data:`tunedeck.core.engine.ops.LANES`):

- quick requests (an inspection, a count of trainable parameters, one dataset row, a Hub
  plan) are answered in order by the main loop;
- requests that load models (chat, eval, merge, export, releasing the chat model) take
  turns on the ``models`` lane, a thread of its own: they share the chat model and its GPU
  memory, and a merge or an export that takes minutes never holds up an inspection or a
  preview asked for meanwhile;
- downloads take turns on the ``downloads`` lane;
- a pass over a whole dataset (:data:`tunedeck.core.engine.ops.OWN_THREAD`) gets a thread
  of its own, so rows asked for meanwhile are answered between two rows of it.

A request cancelled while it waits for its turn is answered "cancelled" without running.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError, first_line
from . import ops

Reply = dict[str, Any]
Send = Callable[[Reply], None]


def main(requests: Any, replies: Any, log_path: str) -> None:
    """The engine process: set up, then :func:`serve`."""
    _redirect_output(Path(log_path))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ctrl-c belongs to the UI / CLI
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    serve(requests, replies, log_path)


class _Cancels:
    """The cancel event of each request not yet answered."""

    def __init__(self) -> None:
        self._events: dict[Any, threading.Event] = {}
        self._lock = threading.Lock()

    def add(self, request_id: Any) -> None:
        with self._lock:
            self._events[request_id] = threading.Event()

    def get(self, request_id: Any) -> threading.Event:
        with self._lock:
            return self._events.get(request_id) or threading.Event()

    def set(self, request_id: Any) -> None:
        with self._lock:
            flag = self._events.get(request_id)
        if flag is not None:
            flag.set()

    def set_all(self) -> None:
        with self._lock:
            for flag in self._events.values():
                flag.set()

    def done(self, request_id: Any) -> None:
        with self._lock:
            self._events.pop(request_id, None)


class _Lane:
    """A thread that serves its requests one at a time, in order."""

    def __init__(self, name: str, run: Callable[[Reply], None]) -> None:
        self._inbox: queue.SimpleQueue[Reply | None] = queue.SimpleQueue()
        self._run = run
        self._thread = threading.Thread(target=self._serve, name=f"tunedeck-engine-{name}", daemon=True)
        self._thread.start()

    def put(self, request: Reply | None) -> None:
        self._inbox.put(request)

    def _serve(self) -> None:
        while (request := self._inbox.get()) is not None:
            self._run(request)


def serve(requests: Any, replies: Any, log_path: str) -> None:
    """Answer requests until told to stop (``None``) or the client is gone."""
    inbox: queue.SimpleQueue[Reply | None] = queue.SimpleQueue()
    cancels = _Cancels()

    def read() -> None:
        while True:
            try:
                message = requests.recv()
            except (EOFError, OSError):  # the client closed its end or exited
                message = None
            if message is None:
                cancels.set_all()  # stop the work in hand: nobody waits for it
                inbox.put(None)
                return
            if "cancel" in message:
                cancels.set(message["cancel"])
                continue
            cancels.add(message.get("id"))
            inbox.put(message)

    threading.Thread(target=read, name="tunedeck-engine-requests", daemon=True).start()
    send_lock = threading.Lock()

    def send(reply: Reply) -> None:
        with send_lock:
            replies.send(reply)

    def run(request: Reply) -> None:
        request_id = request.get("id")
        cancel = cancels.get(request_id)
        try:
            if cancel.is_set():
                send({"id": request_id, "ok": False, "error": f"engine request {request.get('op')!r} cancelled"})
                return

            def emit(partial: dict[str, Any]) -> None:
                send({"id": request_id, "ok": True, "partial": partial})

            send(handle(request, log_path, emit=emit, cancel=cancel))
        except (OSError, ValueError):  # the client has gone
            pass
        finally:
            cancels.done(request_id)

    lanes: dict[str, _Lane] = {}
    try:
        while (request := inbox.get()) is not None:
            op = str(request.get("op"))
            lane = ops.LANES.get(op)
            if op in ops.OWN_THREAD:
                threading.Thread(target=run, args=(request,), name=f"tunedeck-engine-{op}", daemon=True).start()
            elif lane is not None:
                if lane not in lanes:
                    lanes[lane] = _Lane(lane, run)
                lanes[lane].put(request)
            else:
                run(request)
    finally:
        for lane_ in lanes.values():
            lane_.put(None)


def handle(request: Reply, log_path: str = "", *, emit: Callable[[dict[str, Any]], None] | None = None,
           cancel: threading.Event | None = None) -> Reply:
    """Run one request; every failure becomes a one-line error reply.

    Plain ops (:data:`~tunedeck.core.engine.ops.OPS`) return their result. Streaming ops
    (:data:`~tunedeck.core.engine.ops.STREAMS`) also get ``emit`` (called with each partial
    result) and ``cancel`` (set when the client cancels).
    """
    request_id, name = request.get("id"), request.get("op")
    stream = ops.STREAMS.get(str(name))
    op = ops.OPS.get(str(name))
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
        return {"id": request_id, "ok": False, "error": f"{name}: {exc.__class__.__name__}: {first_line(exc)}{where}"}


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
