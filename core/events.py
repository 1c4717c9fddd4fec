"""Training events: what a trainer reports, one flat JSON object per line.

Every event has ``type``, ``time`` (Unix seconds) and ``step`` (the optimizer step it
belongs to), plus fields by type:

=============  ================================================================================
launched       name, resume, processes (written by whoever started this session of the run,
               before the trainer exists: a new session begins here)
run_started    config (the project's settings), resolved ("auto" made concrete), versions,
               device, trainable_params, total_params, train_rows, eval_rows, max_steps,
               resumed_from ({checkpoint, step} or null), run_dir, pid, memory_estimate (the
               peak memory estimate at the run's settings: core.memory's breakdown, bytes)
step           loss, learning_rate, grad_norm, tokens (non-pad tokens seen so far, over all
               processes), tokens_per_s (non-pad tokens per second since the previous step
               event), epoch, eta_s, max_steps, plus trl's mean_token_accuracy and entropy
eval           eval_loss (and any other eval_* metric)
checkpoint     path, step
system         gpu_memory_used, gpu_memory_total, gpu_utilization, gpu_temperature (°C),
               gpu_memory_others (other processes on the same GPU) (NVML, null when not
               available), gpus (the same per visible GPU, with its NVML index, label and
               UUID; [] on a CPU), torch_peak_memory (since training began),
               torch_reserved, torch_allocated (bytes, null on a CPU), rss (this process,
               bytes), rss_peak (its peak resident memory since training began), ram_used,
               ram_total (bytes), cpu_percent (the machine, since the previous system event)
warning        message
finished       adapter, run_dir, checkpoints, final_loss, train_loss, runtime_s, tokens and
               tokens_per_s (this session's), stopped
alarm          kind, message, action (see tunedeck.core.health)
control        action (stop | save | abort), message: a control the trainer has taken
failed         reason (one line), failure (user_error | aborted | terminated | disk_full |
               out_of_memory | crash | died), traceback (null for user errors), user_error,
               aborted, and for a trainer that vanished: died = true, exit_code
=============  ================================================================================

:class:`EventLog` appends events to ``runs/<name>/events.jsonl`` (one write per event, so
the file is readable while a run is going, and it knows the file's length after each
event: followers of a live run take the events up to that point from the file and the
rest live); :func:`read_events` and :class:`EventReader` read it back, skipping a
half-written last line.

Light on purpose: no torch here (the UI process imports this module).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RUN_STARTED = "run_started"
STEP = "step"
EVAL = "eval"
CHECKPOINT = "checkpoint"
SYSTEM = "system"
WARNING = "warning"
FINISHED = "finished"
FAILED = "failed"
ALARM = "alarm"  # a health alarm (tunedeck.core.health): kind, message, action
LAUNCHED = "launched"  # a session of the run begins (before its trainer process exists)
CONTROL = "control"  # a control the trainer has taken: action, message
TYPES = (LAUNCHED, RUN_STARTED, STEP, EVAL, CHECKPOINT, SYSTEM, WARNING, ALARM, CONTROL, FINISHED, FAILED)
#: events that end a run (the last event of a trainer process)
FINAL = (FINISHED, FAILED)

EVENTS_FILE = "events.jsonl"

LIBRARIES = ("tunedeck", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")


def event(type: str, step: int = 0, **fields: Any) -> dict[str, Any]:
    """A new event: ``{"type", "time", "step", **fields}`` with non-finite floats as null."""
    if type not in TYPES:
        raise ValueError(f"unknown event type {type!r}")
    out: dict[str, Any] = {"type": type, "time": time.time(), "step": int(step)}
    for key, value in fields.items():
        out[key] = _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN/inf become null (JSON has neither), paths become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def finite_number(value: Any) -> float | None:
    """A finite number read from an event, or None (an events file can say anything)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def is_final(ev: dict[str, Any]) -> bool:
    return ev.get("type") in FINAL


class EventLog:
    """Appends events to a JSONL file, one line each, written as one ``write`` call. Thread-safe.

    :attr:`offset` is the file's length after the last event written here (a follower that
    reads the file up to it has every event before it). A write that fails (a full disk)
    raises OSError; the offset is then read back from the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self.offset = os.fstat(self._fd).st_size
        self._lock = threading.Lock()

    def write(self, ev: dict[str, Any]) -> None:
        data = encode_line(ev)
        with self._lock:
            if self._fd < 0:
                return
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
            except OSError:
                self.offset = os.fstat(self._fd).st_size
                raise
            self.offset += len(data)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_line(ev: dict[str, Any]) -> bytes:
    """One event as a line of UTF-8 JSON (text with a lone surrogate is written escaped)."""
    try:
        return (json.dumps(ev, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(ev, default=str) + "\n").encode("ascii")


def append_event(path: str | os.PathLike[str], ev: dict[str, Any]) -> None:
    """Append one event to a file (for a writer that is not the trainer, e.g. the watchdog)."""
    with EventLog(path) as log:
        log.write(ev)


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete event in a file; [] when the file does not exist."""
    return EventReader(path).read_new()


class EventReader:
    """Reads the events appended to a file since the last call (to follow a run's file).
    :attr:`offset` is how many bytes were taken, always at a line's end."""

    def __init__(self, path: str | os.PathLike[str], offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset

    def read_new(self, upto: int | None = None) -> list[dict[str, Any]]:
        """The complete events after :attr:`offset` (and before byte ``upto``, when given)."""
        if upto is not None and upto <= self.offset:
            return []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read() if upto is None else fh.read(upto - self.offset)
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        consumed = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a line still being written
            consumed += len(line)
            try:
                ev = json.loads(line)
            except (ValueError, RecursionError):  # JSON errors, bad UTF-8, numbers JSON cannot hold
                continue  # a torn line (e.g. a full disk) or a damaged one: skip it, keep the rest
            if isinstance(ev, dict) and "type" in ev:
                out.append(ev)
        self.offset += consumed
        return out


# -- what the machine says ----------------------------------------------------------------


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions of ``names`` (by default the libraries a run depends on), and
    Python's; read from metadata, nothing imported."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import platform

    out["python"] = platform.python_version()
    return out


def system_fields(gpu_index: int | None = None, torch_peak_memory: int | None = None, *,
                  torch_reserved: int | None = None, torch_allocated: int | None = None) -> dict[str, Any]:
    """The fields of a ``system`` event. ``gpu_index`` is this process's CUDA device index
    (None on a CPU), mapped to its NVML device through ``CUDA_VISIBLE_DEVICES`` (indices or
    UUIDs, MIG slices included: :mod:`tunedeck.core.hardware`); the torch numbers come from
    the caller, which is the one that has torch."""
    import psutil

    from .hardware import GPU_FIELDS, NVML, detect

    visible = detect().gpus
    own = {"reserved": torch_reserved} if torch_reserved else None
    gpu: dict[str, Any] = dict.fromkeys(GPU_FIELDS)
    gpus: list[dict[str, Any]] = []
    if gpu_index is not None:
        gpus = [{"index": g.index, "label": g.label, "uuid": g.uuid, **NVML.readings(g, own)} for g in visible]
        if gpu_index < len(gpus):
            gpu = {k: gpus[gpu_index][k] for k in GPU_FIELDS}
    memory = psutil.virtual_memory()
    try:
        rss: int | None = psutil.Process().memory_info().rss
    except psutil.Error:
        rss = None
    cpu = psutil.cpu_percent(interval=None)  # the machine, since the previous call
    return {**gpu, "gpus": gpus, "torch_peak_memory": torch_peak_memory, "torch_reserved": torch_reserved,
            "torch_allocated": torch_allocated, "rss": rss, "ram_used": int(memory.total - memory.available),
            "ram_total": int(memory.total), "cpu_percent": cpu if _CPU_PRIMED.is_set() else _prime_cpu()}


_CPU_PRIMED = threading.Event()


def _prime_cpu() -> None:
    """The first reading has nothing to compare with: none."""
    _CPU_PRIMED.set()
    return None
