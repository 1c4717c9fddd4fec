"""Exporting a run as GGUF from the app (llama.cpp, Ollama, LM Studio): the quantizations
offered, which runs can be exported, and what the notifications say.

The work is the engine's ``export`` op (:func:`tunedeck.core.export.export_run`, in the
engine process: it needs torch and gguf); this module only decides what the UI shows, so
it imports nothing heavy and is tested without an app.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedeck.core.runs import FAILED_ENDS, FINISHED_STATUS, LIVE, STOPPED, RunInfo
from tunedeck.core.units import format_bytes

from .session import display_path
from .training import status_label

EXPORT_QUANTS: tuple[tuple[str, str], ...] = (
    ("f16", "16-bit floats: as trained, 2 bytes a weight"),
    ("bf16", "bfloat16: as trained, for models stored in bf16"),
    ("f32", "32-bit floats: exact, twice the size of f16"),
    ("q8_0", "8-bit: close to f16 at about half its size"),
    ("q4_0", "4-bit: the smallest, the most quality lost"),
    ("q4_1", "4-bit with offsets: a little better than q4_0"),
    ("q5_0", "5-bit: between q4 and q8"),
    ("q5_1", "5-bit with offsets: a little better than q5_0"),
)
"""The quantizations the app offers, with a line each: the engine's QUANTS
(:mod:`tunedeck.core.export`) less the k-quants, which need llama.cpp's quantizer."""
QUANT_NAMES = tuple(name for name, _ in EXPORT_QUANTS)
K_QUANT_NOTE = "q4_k_m, q5_k_m, q6_k need llama.cpp's quantizer (llama-quantize)"
EXPORTABLE = (FINISHED_STATUS, STOPPED)
"""Run statuses whose adapter is the end of their training (a stopped run saved it too)."""
NOTE_EVERY_S = 2.0
"""Within a stage, a progress notification at most this often (an export reports every tensor)."""
GGUF_FOLDER = "gguf"


@dataclass(frozen=True)
class ExportChoice:
    """What the export dialog asks for: ``out`` is None for the default folder."""

    quant: str = "f16"
    out: str | None = None
    lora: bool = False


def default_out(run_dir: str | Path) -> Path:
    """Where a run's GGUF files go unless another folder is chosen: ``runs/<name>/gguf``."""
    return Path(run_dir) / GGUF_FOLDER


def export_refusal(info: RunInfo) -> str | None:
    """Why a run cannot be exported (one line), or None when it can: it has ended, finished
    or stopped, with its adapter saved."""
    if info.status not in EXPORTABLE:
        state = status_label(info.status, info.host)
        if info.status in LIVE:
            return f"{info.name} is {state}: export it once it has finished (r re-reads the list)"
        verb = "" if info.status in FAILED_ENDS else "is "
        return f"{info.name} {verb}{state}: only a finished or stopped run's adapter is exported"
    if not info.adapter:
        return f"{info.name} has no adapter (adapter/adapter_config.json): there is nothing to export"
    return None


class ProgressNotes:
    """Which of the export's progress partials become notifications: the first of each
    stage, then at most one every :data:`NOTE_EVERY_S` seconds; the "done" stage none (the
    end has its own). Call it with each partial; it answers the text to show, or None."""

    def __init__(self, every_s: float = NOTE_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._stage: object = None
        self._at = 0.0

    def __call__(self, partial: dict[str, Any]) -> str | None:
        stage = partial.get("stage")
        now = self.clock()
        if stage == "done" or (stage == self._stage and now - self._at < self.every_s):
            return None
        self._stage, self._at = stage, now
        return progress_text(partial)


def progress_text(partial: dict[str, Any]) -> str:
    """A progress partial as a line: its message, and how far through its tensors it is."""
    message = str(partial.get("message") or partial.get("stage") or "working")
    done, total = partial.get("done"), partial.get("total")
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        return f"{message} · {min(100, 100 * done // total)}%"
    return message


def done_text(name: str, result: dict[str, Any]) -> str:
    """The end of an export: the file, its size, the adapter's file, and the Ollama command."""
    gguf = Path(str(result.get("gguf", "")))
    size = result.get("size")
    facts = ", ".join(part for part in (format_bytes(size) if isinstance(size, int) else "",
                                        str(result.get("quant") or "")) if part)
    lines = [f"{name} exported: {display_path(gguf)}" + (f" ({facts})" if facts else "")]
    if result.get("lora"):
        lines.append(f"the adapter as a GGUF LoRA: {display_path(Path(str(result['lora'])))}")
    commands = result.get("commands") or []
    if commands:
        lines.append(f"Ollama: {commands[0]}")
    return "\n".join(lines)
