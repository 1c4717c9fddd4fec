"""The run started from this window, as the app follows it (until the Train screen has its dashboard)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .session import display_path

ENDED = ("finished", "failed", "died")


@dataclass(frozen=True)
class RunState:
    """What the app knows of a run: its status and latest numbers, from its events."""

    name: str
    run_dir: Path
    status: str
    step: int = 0
    max_steps: int | None = None
    loss: float | None = None
    note: str = ""

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def advance(self, ev: dict[str, Any]) -> RunState:
        """The state after one of the run's events."""
        kind = ev.get("type")
        step = max(self.step, int(ev.get("step") or 0))
        max_steps = ev.get("max_steps") or self.max_steps
        if kind == "step":
            loss = ev.get("loss")
            return replace(self, step=step, max_steps=max_steps,
                           loss=float(loss) if isinstance(loss, (int, float)) else self.loss)
        if kind == "finished":
            return replace(self, step=step, note="stopped early" if ev.get("stopped") else "")
        if kind == "failed":
            return replace(self, step=step, note=str(ev.get("reason") or ""))
        return replace(self, step=step, max_steps=max_steps)

    def rows(self) -> list[tuple[str, str]]:
        steps = f"{self.step} / {self.max_steps}" if self.max_steps else str(self.step)
        rows = [("run", self.name), ("status", self.status), ("step", steps),
                ("loss", "-" if self.loss is None else f"{self.loss:.4f}"), ("folder", display_path(self.run_dir))]
        if self.note:
            rows.append(("note", self.note))
        return rows
