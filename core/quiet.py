"""Library output to a log file: what a command prints stays its own.

transformers, peft, bitsandbytes, accelerate and torch write loading bars, kernel notices
and deprecation warnings to the process's stdout and stderr, from Python and from C. A
command that loads a model (``tunedeck chat``, ``tunedeck merge``) runs that work inside
:func:`library_output`: file descriptors 1 and 2, and Python's ``sys.stdout`` and
``sys.stderr``, point at the log while it runs, so every such line lands there whatever
writes it; the command writes its own lines to the streams it is handed, which reach the
real stdout and stderr (or a test's capture). Both are put back on the way out, so an
error the command raises is printed where the user sees it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

_LOGS: dict[str, TextIO] = {}


def _log_stream(path: Path) -> TextIO:
    """The log at ``path``, opened once per process (for appending) and kept open: the
    libraries' log handlers keep the stream they first wrote to. /dev/null when it cannot
    be opened: the libraries' output is dropped, never shown."""
    key = str(path)
    if key not in _LOGS:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _LOGS[key] = open(path, "a", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115
        except OSError:
            _LOGS[key] = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    return _LOGS[key]


def _fileno(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None


@contextlib.contextmanager
def library_output(log_path: Path) -> Iterator[tuple[TextIO, TextIO]]:
    """Send everything written to stdout and stderr while the block runs to ``log_path``
    (appended), at the Python and the file-descriptor level; yields the streams for the
    command's own stdout and stderr."""
    real_out, real_err = sys.stdout, sys.stderr
    for stream in (real_out, real_err):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    log = _log_stream(log_path)
    saved: dict[int, int] = {}
    mine: list[TextIO] = []
    try:
        shown = []
        for fd, stream in ((1, real_out), (2, real_err)):
            saved[fd] = os.dup(fd)
            if _fileno(stream) == fd:  # the stream writes to the descriptor that moves: keep its old target
                copy = os.fdopen(os.dup(fd), "w", encoding=getattr(stream, "encoding", None) or "utf-8",
                                 errors="replace", buffering=1)
                mine.append(copy)
                shown.append(copy)
            else:  # a stream of its own (a pipe set up by a caller, a test's capture)
                shown.append(stream)
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        sys.stdout = sys.stderr = log
        yield shown[0], shown[1]
    finally:
        for stream in (log, *mine):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        sys.stdout, sys.stderr = real_out, real_err
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for stream in mine:
            with contextlib.suppress(OSError, ValueError):  # its reader went away: the caller hears of it
                stream.close()
