"""The engine's client, in the UI process (and the CLI): it starts the engine and talks to it.

The UI process never imports torch, transformers, peft, trl, datasets, bitsandbytes or
accelerate (peft alone takes seconds to import). Anything that needs them is a request to
the engine, a process started with the multiprocessing *spawn* context on first need and
kept for the session (:mod:`tunedeck.core.engine.server`).

Protocol: the client sends ``{"id": int, "op": str, "args": dict}`` down a request pipe;
the engine answers each with ``{"id": int, "ok": True, "result": dict}`` or
``{"id": int, "ok": False, "error": "one line"}`` up a reply pipe (``None`` asks it to
exit). A streaming op answers with any number of ``{"id": int, "ok": True, "partial":
dict}`` replies before its final one. ``{"cancel": id}`` cancels a request: a running one
stops at its next check (a generation after every token), a queued one is answered
"cancelled" without running. Results are plain dicts (JSON-able), so reading them never
imports torch here.

:class:`EngineClient` is thread-safe: Textual thread workers call it concurrently and each
gets its own reply, matched by id. A reader thread waits on the reply pipe with a timeout;
the pipe reads end-of-file the moment the engine is gone (OOM killer, segfault), and every
request still waiting on it gets an error reply instead of a hang. The next request starts
a fresh engine. The engine, in turn, exits when the client's end closes, so it never
outlives the UI. Its typed calls (``engine.inspect(...)``, ``engine.merge(...)``) are
:class:`~tunedeck.core.engine.calls.EngineCalls`'.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import first_line
from ..paths import cache_dir
from .calls import EngineCalls, EngineError

# how often blocking waits wake up to look at cancellation and the engine's health
POLL_S = 0.1
# how long a streaming call waits for the engine to confirm a cancel before giving up on it
CANCEL_GRACE_S = 10.0


@dataclass
class _Link:
    """One engine process and the two pipes to it."""

    process: Any
    requests: Any  # Connection: the client sends requests here
    replies: Any  # Connection: the client reads replies here
    stop: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None


class EngineClient(EngineCalls):
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
        from .server import main

        ctx = mp.get_context("spawn")
        requests_out, requests_in = ctx.Pipe(duplex=False)  # (receive end, send end)
        replies_out, replies_in = ctx.Pipe(duplex=False)
        process = ctx.Process(target=main, args=(requests_out, replies_in, str(self.log_path)),
                              name="tunedeck-engine", daemon=True)
        try:
            process.start()
        except (OSError, RuntimeError) as exc:
            for conn in (requests_out, requests_in, replies_out, replies_in):
                conn.close()
            raise EngineError(f"cannot start the engine process ({first_line(exc)})") from None
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
