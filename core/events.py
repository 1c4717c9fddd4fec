"""Training events: what a trainer reports, one flat JSON object per line.

Every event has ``type``, ``time`` (Unix seconds) and ``step`` (the optimizer step it
belongs to), plus fields by type:

=============  ================================================================================
launched       name, resume, processes (written by whoever started this session of the run,
               before the trainer exists: a new session begins here)
run_started    config (the project's settings), resolved ("auto" made concrete), versions,
               device, trainable_params, total_params, train_rows, eval_rows, max_steps,
               resumed_from ({checkpoint, step} or null), run_dir, pid
step           loss, learning_rate, grad_norm, tokens (non-pad tokens seen so far, over all
               processes), tokens_per_s (non-pad tokens per second since the previous step
               event), epoch, eta_s, max_steps, plus trl's mean_token_accuracy and entropy
eval           eval_loss (and any other eval_* metric)
checkpoint     path, step
system         gpu_memory_used, gpu_memory_total, gpu_utilization, gpu_temperature (°C),
               gpu_memory_others (other processes on the same GPU) (NVML, null when not
               available), gpus (the same per visible GPU, with its NVML index; [] on a CPU), torch_peak_memory (bytes, null on a CPU), rss (this process,
               bytes), ram_used, ram_total (bytes), cpu_percent (the machine, since the
               previous system event)
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
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                continue  # a torn line (e.g. a full disk): skip it, keep the rest
            if isinstance(ev, dict) and "type" in ev:
                out.append(ev)
        self.offset += consumed
        return out


# -- what the machine says ----------------------------------------------------------------


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a run depends on (read from metadata, nothing imported)."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import platform

    out["python"] = platform.python_version()
    return out


GPU_FIELDS = ("gpu_memory_used", "gpu_memory_total", "gpu_utilization", "gpu_temperature", "gpu_memory_others")


class _Nvml:
    """NVML, initialised on first use; every query may answer None ("not available")."""

    def __init__(self) -> None:
        self._lib: Any = None
        self._tried = False

    def _init(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._lib = pynvml
            except Exception:  # no driver or no library: a CPU machine
                self._lib = None
        return self._lib

    def gpu(self, index: int) -> dict[str, int | None]:
        out: dict[str, int | None] = dict.fromkeys(GPU_FIELDS)
        nv = self._init()
        if nv is None:
            return out
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return out
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            out["gpu_memory_used"], out["gpu_memory_total"] = int(mem.used), int(mem.total)
        except Exception:
            pass
        try:
            out["gpu_utilization"] = int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            pass
        try:
            out["gpu_temperature"] = int(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
        except Exception:
            pass
        try:  # a shared box: what the other processes on this GPU hold
            procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
            out["gpu_memory_others"] = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid != os.getpid())
        except Exception:
            pass
        return out


_NVML = _Nvml()


def _physical_gpu_index(index: int) -> int:
    """The NVML index of CUDA device ``index`` (CUDA_VISIBLE_DEVICES renumbers devices)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return index
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    try:
        return int(ids[index])
    except (IndexError, ValueError):
        return index


def _meminfo() -> tuple[int | None, int | None]:
    """(used, total) system RAM in bytes from /proc/meminfo; (None, None) elsewhere."""
    try:
        fields: dict[str, int] = {}
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
        total = fields["MemTotal"]
        return total - fields.get("MemAvailable", fields.get("MemFree", 0)), total
    except (OSError, KeyError, ValueError, IndexError):
        return None, None


def _rss() -> int | None:
    """Resident memory of this process in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak, in KiB on Linux
    except (ImportError, OSError):
        return None


def system_fields(gpu_index: int | None = None, torch_peak_memory: int | None = None) -> dict[str, Any]:
    """The fields of a ``system`` event. ``gpu_index`` is the CUDA device index (None on a CPU);
    ``torch_peak_memory`` comes from the caller, which is the one that has torch."""
    gpus: list[dict[str, Any]] = []
    if gpu_index is None:
        gpu: dict[str, int | None] = dict.fromkeys(GPU_FIELDS)
    else:
        gpu = _NVML.gpu(_physical_gpu_index(gpu_index))
        gpus = [{"index": index, **_NVML.gpu(index)} for index in _visible_gpus()]
    used, total = _meminfo()
    return {**gpu, "gpus": gpus, "torch_peak_memory": torch_peak_memory, "rss": _rss(), "ram_used": used,
            "ram_total": total, "cpu_percent": _CPU.percent()}


def _visible_gpus() -> list[int]:
    """NVML indices of the GPUs this process may use (CUDA_VISIBLE_DEVICES, else all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        try:
            return [int(v) for v in visible.split(",") if v.strip()]
        except ValueError:  # GPU UUIDs: not mapped here
            return []
    nv = _NVML._init()
    try:
        return list(range(int(nv.nvmlDeviceGetCount()))) if nv is not None else []
    except Exception:
        return []


class _CpuLoad:
    """The machine's CPU use (all cores, percent) since the previous call, from /proc/stat."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None

    def percent(self) -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                values = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle, total = values[3] + (values[4] if len(values) > 4 else 0), sum(values)
        last, self._last = self._last, (idle, total)
        if last is None or total <= last[1]:
            return None
        return round(100.0 * (1 - (idle - last[0]) / (total - last[1])), 1)


_CPU = _CpuLoad()
