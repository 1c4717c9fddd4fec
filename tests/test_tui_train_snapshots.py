"""Snapshots of the Train screen (pytest-textual-snapshot): a finished run's dashboard and a
failed one's. Deterministic: events with fixed times and values written to a run folder,
the working folder set to the project's (paths show relative), a fixed CPU machine."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from tui_helpers import CPU, InProcessEngine, settle, write_project

from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp


def write_run(run_dir: Path, end: dict) -> None:
    run_dir.mkdir(parents=True)
    events = [{"type": "run_started", "step": 0, "max_steps": 120, "device": {"type": "cpu"}},
              {"type": "system", "step": 0, "rss": 2**30, "ram_used": 5 * 2**30, "ram_total": 24 * 2**30,
               "cpu_percent": 93.5},
              {"type": "warning", "step": 0, "message": "1 of 13 rows skipped (row 13: no assistant answer)"}]
    for s in range(1, 101):
        events.append({"type": "step", "step": s, "loss": 2.5 * math.exp(-s / 40) + 0.3 + 0.15 * math.sin(s * 1.7),
                       "learning_rate": 2e-4 * min(1, s / 10) * (1 - s / 120), "grad_norm": 1 + 0.4 * math.cos(s / 6),
                       "tokens_per_s": 1800.0, "epoch": s / 60, "eta_s": (120 - s) * 2.0, "max_steps": 120})
        if s % 20 == 0:
            events.append({"type": "eval", "step": s, "eval_loss": 2.2 * math.exp(-s / 50) + 0.5})
        if s % 50 == 0:
            events.append({"type": "checkpoint", "step": s,
                           "path": str(run_dir / "checkpoints" / f"checkpoint-{s}")})
    events.append({"step": 100, **end})
    (run_dir / "events.jsonl").write_text("".join(json.dumps({"time": 1000.0 + 2 * i, **ev}) + "\n"
                                                  for i, ev in enumerate(events)))


@pytest.fixture
def make_app(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_project(tmp_path)

    def make() -> TunedeckApp:
        return TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)

    return make


def open_run(name: str):
    async def run_before(pilot) -> None:
        app = pilot.app
        await pilot.press("5")
        await settle(pilot)
        app.open_run(Path("runs") / name)
        while app.run_view is None or not app.run_view.ended or app.screen._drawn != app.run_view.revision:
            await asyncio.sleep(0.05)
        await settle(pilot)
        app.clear_notifications()
        await pilot.pause(0.3)

    return run_before


def test_finished_run(make_app, snap_compare, tmp_path):
    write_run(tmp_path / "runs" / "demo-1", {"type": "finished", "final_loss": 0.61,
                                             "adapter": str(tmp_path / "runs" / "demo-1" / "adapter")})
    assert snap_compare(make_app(), terminal_size=(120, 40), run_before=open_run("demo-1"))


def test_failed_run(make_app, snap_compare, tmp_path):
    write_run(tmp_path / "runs" / "demo-2", {
        "type": "failed", "reason": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "traceback": "Traceback (most recent call last):\n  File \"trainer.py\", line 88, in run\n"
                     "    trainer.train()\ntorch.OutOfMemoryError: CUDA out of memory.\n", "user_error": False})
    assert snap_compare(make_app(), terminal_size=(120, 40), run_before=open_run("demo-2"))
