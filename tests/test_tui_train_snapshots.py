"""Snapshots of the Train screen (pytest-textual-snapshot): a finished run's dashboard and a
failed one's; at 80x24 a running run, a finished one, and two runs compared. Deterministic:
events with fixed times and values written to a run folder, the working folder set to the
project's (paths show relative), a fixed CPU machine, and for the running run a fixed clock."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from tui_helpers import CPU, InProcessEngine, settle, write_project

from tunedeck.core.project import Project
from tunedeck.core.rundir import write_snapshot
from tunedeck.core.runs import write_record
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.training import RunView


def write_run(run_dir: Path, end: dict | None, scale: float = 1.0) -> None:
    run_dir.mkdir(parents=True)
    events = [{"type": "run_started", "step": 0, "max_steps": 120, "device": {"type": "cpu"}},
              {"type": "system", "step": 0, "rss": 2**30, "ram_used": 5 * 2**30, "ram_total": 24 * 2**30,
               "cpu_percent": 93.5},
              {"type": "warning", "step": 0, "message": "1 of 13 rows skipped (row 13: no assistant answer)"}]
    for s in range(1, 101):
        events.append({"type": "step", "step": s, "loss": scale * (2.5 * math.exp(-s / 40) + 0.3 + 0.15 * math.sin(s * 1.7)),
                       "learning_rate": 2e-4 * min(1, s / 10) * (1 - s / 120), "grad_norm": 1 + 0.4 * math.cos(s / 6),
                       "tokens_per_s": 1800.0, "epoch": s / 60, "eta_s": (120 - s) * 2.0, "max_steps": 120})
        if s % 20 == 0:
            events.append({"type": "eval", "step": s, "eval_loss": 2.2 * math.exp(-s / 50) + 0.5})
        if s % 50 == 0:
            events.append({"type": "checkpoint", "step": s,
                           "path": str(run_dir / "checkpoints" / f"checkpoint-{s}")})
    if end is not None:
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


def open_run(name: str, *keys: str, live: bool = False):
    async def run_before(pilot) -> None:
        app = pilot.app
        await pilot.press("5")
        if not live:
            await settle(pilot)
        app.open_run(Path("runs") / name)
        while (app.run_view is None or app.run_view.name != name or app.run_view.ended == live
               or app.screen._drawn != app.run_view.revision):
            await asyncio.sleep(0.05)
        if live:  # its follower goes on: wait for the rest of the work alone
            while any(w.is_running for w in app.workers if w.group != "run-follow"):
                await asyncio.sleep(0.05)
            await pilot.pause(1.2)  # a plot timer tick
        else:
            await settle(pilot)
        if keys:
            await pilot.press(*keys)
            while app.screen._compared is None:
                await asyncio.sleep(0.05)
            await settle(pilot)
        app.clear_notifications()
        await pilot.pause(0.5)

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


def test_running_run_80x24(make_app, snap_compare, tmp_path, monkeypatch):
    """A run that goes on (its trainer's record names this live process), on a fixed clock."""
    run_dir = tmp_path / "runs" / "demo-3"
    write_run(run_dir, None)
    write_record(run_dir)
    snapshot = RunView.snapshot
    monkeypatch.setattr(RunView, "snapshot", lambda self, now=None: snapshot(self, now=1000.0 + 2 * 120))
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=open_run("demo-3", live=True))


def test_finished_run_80x24(make_app, snap_compare, tmp_path):
    write_run(tmp_path / "runs" / "demo-1", {"type": "finished", "final_loss": 0.61,
                                             "adapter": str(tmp_path / "runs" / "demo-1" / "adapter")})
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=open_run("demo-1"))


@pytest.mark.slow
def test_two_runs_compared_80x24(make_app, snap_compare, tmp_path):
    """Two runs picked in the list (space): both loss curves, and the settings that differ."""
    project = Project.load(tmp_path / "demo.toml")
    write_run(tmp_path / "runs" / "demo-r16", {"type": "finished", "final_loss": 0.61})
    write_snapshot(project, tmp_path / "runs" / "demo-r16")
    write_run(tmp_path / "runs" / "demo-r32", {"type": "finished", "final_loss": 0.49}, scale=0.8)
    project.set("lora.r", 32)
    project.set("training.learning_rate", 1e-4)
    write_snapshot(project, tmp_path / "runs" / "demo-r32")
    assert snap_compare(make_app(), terminal_size=(80, 24),
                        run_before=open_run("demo-r16", "r", "space", "down", "space"))
