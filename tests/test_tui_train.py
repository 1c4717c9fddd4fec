"""The Train screen driven with Pilot: a scripted trainer process (events from a file: NaN,
an alarm, a crash, a kill) followed through its real events.jsonl and pid file; the runs
list; the controls; quitting while a run goes; and a real run of the tiny model."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Button, OptionList, RichLog, Static
from tui_helpers import CPU, InProcessEngine, settle, write_project

from tunedeck.core import launcher
from tunedeck.core.project import Project
from tunedeck.core.rundir import write_snapshot
from tunedeck.core.runs import RunInfo, run_info
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.dialogs import ChoiceScreen
from tunedeck.tui.training import (
    POINTS, RunView, Series, lr_grad_summary, read_curve, resume_refusal, settings_diff,
)
from tunedeck.tui.widgets.facts import Facts
from tunedeck.tui.widgets.run_plot import RunPlot
from tunedeck.tui.widgets.runs_list import RunsList, fit_columns

SIZE = (120, 40)
FAKE = Path(__file__).parent / "fake_trainer.py"


@pytest.fixture
def project_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_project(tmp_path)


def steps(first: int, last: int, max_steps: int = 20, loss: float = 2.0) -> list[dict[str, Any]]:
    return [{"type": "step", "step": s, "loss": loss - 0.05 * s, "learning_rate": 2e-4 * (1 - s / max_steps),
             "grad_norm": 1.0 + 0.01 * s, "tokens_per_s": 1000.0, "epoch": s / max_steps, "eta_s": 30.0,
             "max_steps": max_steps} for s in range(first, last + 1)]


STARTED = {"type": "run_started", "step": 0, "max_steps": 20, "device": {"type": "cpu"}, "trainable_params": 1000}
SYSTEM = {"type": "system", "step": 0, "rss": 2**30, "ram_used": 4 * 2**30, "ram_total": 8 * 2**30,
          "cpu_percent": 50.0}


class FakeTrainer:
    """The scripted trainer as a real process in its own session, reaped in the background
    (a zombie still reads as alive in the pid file)."""

    def __init__(self, run_dir: Path, script: list[dict[str, Any]]) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True)
        path = run_dir.parent / f"{run_dir.name}.script.jsonl"
        path.write_text("\n".join(json.dumps(item) for item in script) + "\n", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, str(FAKE), str(run_dir), str(path)], start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self.proc.wait, daemon=True).start()

    def ready(self) -> bool:
        return (self.run_dir / "trainer.pid").is_file()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.fixture
def fake_trainer():
    made: list[FakeTrainer] = []

    def start(run_dir: Path, script: list[dict[str, Any]]) -> FakeTrainer:
        made.append(FakeTrainer(run_dir, script))
        return made[-1]

    yield start
    for trainer in made:
        trainer.close()


def make_app(path: Path) -> TunedeckApp:
    return TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)


async def until(pilot, predicate, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            await pilot.pause()
            return
        await pilot.pause(0.05)
    raise AssertionError("timed out waiting")


def numbers(app: TunedeckApp) -> dict[str, str]:
    return dict(app.screen.query_one("#numbers", Facts).rows)


def log_lines(app: TunedeckApp) -> str:
    """The event log's text, its wrapped lines joined again (one space where a line broke)."""
    return re.sub(r" *\n *", " ", "\n".join(strip.text.rstrip() for strip in
                                            app.screen.query_one("#event-log", RichLog).lines))


async def follow(pilot, app: TunedeckApp, trainer: FakeTrainer) -> None:
    await until(pilot, trainer.ready)
    await pilot.press("5")
    app.open_run(trainer.run_dir)
    await until(pilot, lambda: app.run_view is not None and app.run_view.run_dir == trainer.run_dir)


async def test_a_finished_run_shows_its_history_and_plots(project_path):
    run_dir = project_path.parent / "runs" / "old"
    run_dir.mkdir(parents=True)
    events = [STARTED, SYSTEM, *steps(1, 10), {"type": "eval", "step": 5, "eval_loss": 1.9},
              {"type": "eval", "step": 10, "eval_loss": 1.7},
              {"type": "checkpoint", "step": 10, "path": str(run_dir / "checkpoints" / "checkpoint-10")},
              {"type": "finished", "step": 10, "final_loss": 1.5, "adapter": str(run_dir / "adapter")}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps({"time": 1000.0 + i, **ev}) + "\n"
                                                  for i, ev in enumerate(events)))
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        runs = app.screen.query_one("#runs", OptionList)
        assert runs.option_count == 1 and "old" in str(runs.get_option_at_index(0).prompt)
        runs.focus()
        runs.highlighted = 0
        await pilot.press("enter")
        await until(pilot, lambda: app.run_view is not None and app.run_view.ended)
        await until(pilot, lambda: numbers(app).get("step", "").startswith("10"))
        shown = numbers(app)
        assert (shown["step"], shown["loss"], shown["eval loss"], shown["last checkpoint"]) == (
            "10 / 20  (50%)", "1.5000", "1.7000", "step 10")
        assert shown["elapsed"] == "15s"  # first to last event, not the clock
        snap = app.run_view.snapshot()
        assert snap.loss[0] == list(range(1, 11)) and snap.eval_loss == ([5, 10], [1.9, 1.7])
        text = log_lines(app)
        assert "checkpoint saved: runs/old/checkpoints/checkpoint-10" in text and "eval: loss 1.7" in text
        assert "finished, final loss 1.5000" in text
        assert not app.screen.query_one("#failure").has_class("shown")
        assert not app.training  # nothing to control
        await pilot.press("x")
        assert any("no run is going" in n.message for n in app._notifications)


async def test_a_live_run_alarms_and_stops_from_the_alarm(project_path, fake_trainer):
    run_dir = project_path.parent / "runs" / "live"
    trainer = fake_trainer(run_dir, [STARTED, SYSTEM, *steps(1, 3), {"sleep": 0.3},
                                     {"type": "step", "step": 4, "loss": None, "max_steps": 20},
                                     {"type": "alarm", "step": 4, "kind": "nan_loss", "action": "stop",
                                      "message": "the loss is NaN at step 4: training has diverged"},
                                     {"wait_for_control": True}])
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await follow(pilot, app, trainer)
        bar = app.screen.query_one("#alarm-bar")
        await until(pilot, lambda: bar.has_class("shown"))
        assert "the loss is NaN at step 4" in str(app.screen.query_one("#alarm-text", Static).render())
        assert numbers(app)["loss"] == "NaN/inf" and numbers(app)["status"] == "running"
        assert any("NaN" in n.message and "Alarm" in (n.title or "") for n in app._notifications)
        assert app.screen.focused is app.screen.query_one("#alarm-stop", Button)  # stopping is advised
        assert app.training
        await pilot.press("enter")  # the focused "Stop the run"
        await until(pilot, lambda: app.run_view.ended, timeout=30)
        assert app.run_view.status == "stopped"  # an end state of its own
        await until(pilot, lambda: numbers(app)["status"] == "stopped early")
        assert not bar.has_class("shown")
        text = log_lines(app)
        assert "stop asked" in text and "stop taken: a checkpoint" in text and "finished (stopped early)" in text
        assert any("stop taken" in n.message for n in app._notifications)  # the trainer's answer
        assert trainer.proc.wait(10) == 0


async def test_keep_going_dismisses_the_alarm_and_save_then_abort_reach_the_trainer(project_path, fake_trainer):
    run_dir = project_path.parent / "runs" / "busy"
    trainer = fake_trainer(run_dir, [STARTED, *steps(1, 2),
                                     {"type": "alarm", "step": 2, "kind": "grad_spike", "action": "keep going",
                                      "message": "the grad norm jumped"},
                                     {"wait_for_control": True}])
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await follow(pilot, app, trainer)
        bar = app.screen.query_one("#alarm-bar")
        await until(pilot, lambda: bar.has_class("shown"))
        assert app.screen.focused is app.screen.query_one("#alarm-keep", Button)
        await pilot.press("enter")
        assert not bar.has_class("shown")
        await until(pilot, lambda: "kept going after the alarm" in log_lines(app))
        app.screen.query_one("#runs", OptionList).focus()
        await pilot.press("c")  # a checkpoint now: the trainer reads the control file
        await until(pilot, lambda: numbers(app)["last checkpoint"] == "step 2")
        assert app.run_view.status == "running"
        await pilot.press("A")
        await until(pilot, lambda: isinstance(app.screen, ChoiceScreen))
        await pilot.press("enter")  # "Abort, saving nothing"
        await until(pilot, lambda: app.run_view.ended)
        assert app.run_view.status == "aborted"  # not "failed"
        await until(pilot, lambda: "aborted at step 2" in str(app.screen.query_one("#failure", Static).render()))
        assert numbers(app)["status"] == "aborted" and trainer.proc.wait(10) == 130


async def test_a_crash_shows_the_reason_and_the_traceback(project_path, fake_trainer):
    trainer = fake_trainer(project_path.parent / "runs" / "crashy",
                           [STARTED, *steps(1, 2), {"sleep": 1.5},  # it crashes while followed
                            {"crash": "RuntimeError: CUDA error: an illegal memory access"}])
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await follow(pilot, app, trainer)
        await until(pilot, lambda: app.run_view.ended)
        failure = app.screen.query_one("#failure", Static)
        await until(pilot, lambda: failure.has_class("shown"))
        text = str(failure.render())
        assert "failed: RuntimeError: CUDA error" in text and "trainer.train()" in text
        assert numbers(app)["status"] == "failed" and numbers(app)["ETA"] == "-"
        assert any("crashy failed" in n.message and n.severity == "error" for n in app._notifications)


async def test_a_killed_trainer_reads_as_died_never_done(project_path, fake_trainer):
    trainer = fake_trainer(project_path.parent / "runs" / "killed", [STARTED, *steps(1, 3), {"kill": True}])
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await follow(pilot, app, trainer)
        await until(pilot, lambda: app.run_view.ended)
        assert app.run_view.status == "died"
        await until(pilot, lambda: app.screen.query_one("#failure").has_class("shown"))
        assert "gone without a final event" in str(app.screen.query_one("#failure", Static).render())
        assert numbers(app)["status"] == "died"
        await until(pilot, lambda: "died" in str(app.screen.query_one("#runs", OptionList)
                                                 .get_option_at_index(0).prompt))


async def test_the_newest_run_opens_by_itself_and_an_ended_one_is_not_news(project_path, fake_trainer):
    for name in ("older", "newer"):
        trainer = fake_trainer(project_path.parent / "runs" / name, [STARTED, *steps(1, 2)])
        trainer.proc.wait(30)
    live = fake_trainer(project_path.parent / "runs" / "live", [STARTED, *steps(1, 2), {"wait_for_control": True}])
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, live.ready)
        await pilot.press("5")  # a running run is opened first, whatever its age
        await until(pilot, lambda: app.run_view is not None and app.run_view.name == "live")
        await until(pilot, lambda: app.run_view.status == "running")
        app.open_run(project_path.parent / "runs" / "newer")  # gone without a final event: died
        await until(pilot, lambda: app.run_view.name == "newer" and app.run_view.ended)
        await pilot.pause(0.5)
        assert not any("newer" in n.message for n in app._notifications)  # it was over before it was opened
        assert any("live goes on running" in n.message for n in app._notifications)
        assert live.proc.poll() is None


@pytest.mark.parametrize("answer", ["leave", "stop"])
async def test_quitting_while_a_run_goes_asks_stop_or_leave(project_path, fake_trainer, answer):
    trainer = fake_trainer(project_path.parent / "runs" / "going", [STARTED, *steps(1, 2), {"wait_for_control": True}])
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await follow(pilot, app, trainer)
        await until(pilot, lambda: app.run_view.status == "running")
        await pilot.press("ctrl+q")
        await until(pilot, lambda: isinstance(app.screen, ChoiceScreen))
        app.screen.query_one(f"#answer-{answer}", Button).press()
        await pilot.pause(0.2)
    if answer == "leave":
        assert app._left_running and trainer.proc.poll() is None  # it goes on without the window
    else:
        assert trainer.proc.wait(10) == 0
        assert json.loads((trainer.run_dir / "events.jsonl").read_text().splitlines()[-1])["stopped"] is True


def test_series_stay_bounded_and_even():
    series = Series(cap=10)
    for x in range(1000):
        series.add(x, float(x))
    xs, _ = series.points()
    assert len(xs) < 20 and xs[0] == 0 and series.last == 999.0
    gaps = {b - a for a, b in zip(xs, xs[1:])}
    assert len(gaps) == 1  # evenly thinned over the whole run

    view = RunView("r", Path("runs/r"))
    view.fold([{"type": "step", "step": s, "loss": 1.0, "time": float(s)} for s in range(1, 20 * POINTS)]
              + [{"type": "warning", "step": s, "message": "w"} for s in range(5000)], "running")
    snap = view.snapshot()
    assert len(snap.loss[0]) < 2 * POINTS and len(snap.log) <= 400 and snap.log_total == 5000


@pytest.mark.slow
async def test_a_real_run_of_the_tiny_model_from_the_screen(tiny_model_dir, tmp_path, monkeypatch):
    from train_support import write_project as write_training_project

    monkeypatch.chdir(tmp_path)
    path = write_training_project(tmp_path, tiny_model_dir, training={"max_steps": 4, "logging_steps": 1})
    app = TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await pilot.press("s")
        await until(pilot, lambda: app.run_view is not None, timeout=60)
        await until(pilot, lambda: app.run_view.ended, timeout=240)
        assert app.run_view.status == "finished", app.run_view.snapshot().reason
        await until(pilot, lambda: numbers(app).get("status") == "finished")
        assert numbers(app)["step"].startswith("4 / 4")
        snap = app.run_view.snapshot()
        assert snap.loss[0] == [1, 2, 3, 4] and len(snap.lr[0]) == 4
        system = dict(snap.system)  # the trainer has ended: no live readings stay on the panel
        assert system["trainer"] == "ended: no live readings" and "CPU busy" not in system
        assert "finished" in log_lines(app) and (app.run_view.run_dir / "adapter").is_dir()


@pytest.mark.parametrize("edit, words", [
    (('path = "data.jsonl"', 'path = "gone.jsonl"'), "gone.jsonl"),
    # targets the Settings screen already flags: refused here too, before a trainer exists
    (('target_modules = "all-linear"', 'target_modules = ["nope"]'), "matches no layer"),
])
async def test_a_refused_start_is_the_line_of_tunedeck_train_and_nothing_runs(tmp_path, monkeypatch, edit, words):
    """The Train screen runs the pre-flight of `tunedeck train`: the same line, and no run
    folder, no trainer process."""
    from tui_helpers import PROJECT_TOML
    from tunedeck.core import launcher
    from tunedeck.core.errors import UserError
    from tunedeck.core.preflight import load_project, preflight

    monkeypatch.chdir(tmp_path)
    path = write_project(tmp_path, PROJECT_TOML.replace(*edit))
    spawned: list[Any] = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *args, **kw: spawned.append(args))
    with pytest.raises(UserError) as cli_line:
        preflight(load_project(path))
    app = make_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await settle(pilot)
        await pilot.press("s")
        await until(pilot, lambda: any(n.severity == "error" for n in app._notifications), timeout=60)
        [refusal] = [n.message for n in app._notifications if n.severity == "error"]
        assert refusal == cli_line.value.message and words in refusal
        assert "\n" not in refusal and "Traceback" not in refusal
        assert app.run_view is None and not app.training
    assert not (tmp_path / "runs").exists() and spawned == []


# -- the dashboard at 80x24, comparing runs, resuming ------------------------------------------


def write_events(run_dir: Path, events: list[dict[str, Any]], t0: float = 1000.0) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"time": t0 + i, **ev}) + "\n" for i, ev in enumerate(events))


def write_checkpoint(run_dir: Path, step: int) -> Path:
    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def finished_run(project_path: Path, name: str, *, loss: float = 2.0, eval_loss: float = 1.7,
                 sets: dict[str, Any] | None = None, t0: float = 1000.0) -> Path:
    """A finished run folder: events and its project.toml snapshot (with ``sets`` changed)."""
    run_dir = project_path.parent / "runs" / name
    write_events(run_dir, [{"type": "launched", "step": 0, "resume": False}, STARTED, *steps(1, 10, loss=loss),
                           {"type": "eval", "step": 10, "eval_loss": eval_loss},
                           {"type": "finished", "step": 10, "final_loss": loss - 0.5}], t0)
    project = Project.load(project_path)
    for key, value in (sets or {}).items():
        project.set(key, value)
    write_snapshot(project, run_dir)
    return run_dir


def runs_text(app: TunedeckApp) -> list[str]:
    runs = app.screen.query_one("#runs", RunsList)
    return [str(runs.get_option_at_index(i).prompt) for i in range(runs.option_count)]


def test_the_runs_columns_drop_the_time_and_step_before_the_losses():
    runs = [RunInfo(name="python-qa-20260101-120000", path="runs/a", status="stopped", step=100, max_steps=120,
                    final_loss=0.6123, eval_loss=0.7977, started=1.0, duration_s=220.0)]
    wide, narrow, tight = fit_columns(90, runs), fit_columns(44, runs), fit_columns(30, runs)
    assert (wide.status, wide.step, wide.time, wide.name) == (13, 7, True, 25)
    assert narrow.time is False and narrow.status == 6 and narrow.width <= 44
    assert (tight.status, tight.step, tight.time) == (0, 0, False) and tight.width <= 30


def test_settings_differences_and_resume_refusals():
    assert settings_diff([{"lora.r": 16, "lora.alpha": 32, "training.learning_rate": 2e-4},
                          {"lora.r": 32, "lora.alpha": 32, "training.learning_rate": 1e-4}]) == [
        ("lora.r", ["16", "32"]), ("training.learning_rate", ["0.0002", "0.0001"])]
    assert settings_diff([{"a": 1}, {"a": 1, "b": "x"}]) == [("b", ["-", '"x"'])]
    info = RunInfo(name="r", path="runs/r", status="failed", checkpoints=[5])
    assert resume_refusal(info) is None
    for status, checkpoints, words in [("running", [5], "is running"), ("finished", [5], "has finished"),
                                       ("died", [], "no checkpoint"), ("unknown", [5], "cannot be resumed")]:
        why = resume_refusal(RunInfo(name="r", path="runs/r", status=status, checkpoints=checkpoints, host="gpu-2"))
        assert why is not None and words in why and "\n" not in why


def test_a_damaged_or_missing_events_file_is_a_line_not_a_crash(tmp_path):
    (tmp_path / "gone").mkdir()
    assert "not a readable events file" in read_curve(tmp_path / "gone").error
    write_events(tmp_path / "bad", steps(1, 3))
    with open(tmp_path / "bad" / "events.jsonl", "a") as fh:
        fh.write('{"type": "step", "step": 4, "loss": [1e999\n\x00\xff not json\n')
    curve = read_curve(tmp_path / "bad")
    assert curve.error == "" and curve.smooth[0] == [1, 2, 3]


async def test_at_80x24_the_small_plots_give_way_to_a_summary_and_come_back(project_path):
    run_dir = finished_run(project_path, "old")
    app = make_app(project_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: app.run_view is not None and app.run_view.ended)
        await until(pilot, lambda: not app.screen.query_one("#small-plots").display)
        await pilot.pause(0.3)
        screen = app.screen
        loss = screen.query_one("#loss-plot", RunPlot)
        assert loss.display and loss.readable and loss.size.height >= 8  # the loss keeps a readable plot
        summary = str(screen.query_one("#plot-summary", Static).render())
        assert summary == lr_grad_summary(app.run_view.snapshot(), len(summary)) and "\n" not in summary
        assert summary.startswith("lr 1.9e-4") and "→1.0e-4" in summary and "(max 1.1)" in summary
        await pilot.resize_terminal(140, 45)
        await until(pilot, lambda: screen.query_one("#small-plots").display)
        await pilot.pause(0.3)
        assert all(plot.display and plot.readable for plot in screen.query(RunPlot).results(RunPlot))
        assert not screen.query_one("#plot-summary").has_class("shown")
        await pilot.resize_terminal(80, 14)  # no room for any plot: two summary lines
        await until(pilot, lambda: not screen.query_one("#loss-plot").display)
        await pilot.pause(0.3)
        lines = str(screen.query_one("#plot-summary", Static).render()).splitlines()
        assert lines[0].startswith("loss 1.") and lines[1].startswith("lr ")
        assert run_dir.name in runs_text(app)[0]


async def test_the_runs_list_shows_the_losses_at_80x24(project_path):
    finished_run(project_path, "python-qa-20260101-120000", loss=2.0, eval_loss=1.7)
    finished_run(project_path, "python-qa-20260102-090000", loss=1.5, eval_loss=1.25, t0=5000.0)
    app = make_app(project_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: app.run_view is not None and app.run_view.ended)
        await settle(pilot)
        newest, oldest = runs_text(app)
        assert "1.0000" in newest and "1.2500" in newest and "0120000" not in newest  # newest first
        assert "1.5000" in oldest and "1.7000" in oldest and oldest.rstrip().endswith("1.7000")
        assert "…" in newest  # the name gives way, never the losses
        assert "loss" in str(app.screen.query_one("#runs-title", Static).render())


async def test_picked_runs_are_overlaid_with_their_settings_differences(project_path):
    finished_run(project_path, "r16", loss=2.0)
    finished_run(project_path, "r32", loss=1.6, sets={"lora.r": 32, "training.learning_rate": 1e-4}, t0=5000.0)
    app = make_app(project_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: app.run_view is not None and app.run_view.ended)
        await pilot.press("r", "space")
        await until(pilot, lambda: any("r32 marked" in n.message for n in app._notifications))
        assert not app.screen.query_one("#compare").has_class("shown")  # one run: nothing to compare yet
        await pilot.press("down", "space")
        panel = app.screen.query_one("#compare", Static)
        await until(pilot, lambda: panel.has_class("shown"))
        text = str(panel.render())
        assert "r32" in text and "r16" in text
        assert "lora.r" in text and "32 | 16" in text and "0.0001 | 0.0002" in text and "alpha" not in text
        compared = app.screen._compared
        assert [c.name for c in compared.curves] == ["r32", "r16"]
        assert compared.curves[0].smooth[0] == list(range(1, 11)) and compared.curves[1].eval_loss == ([10], [1.7])
        runs = app.screen.query_one("#runs", RunsList)
        assert runs.color_of(compared.curves[0].run_dir) != runs.color_of(compared.curves[1].run_dir)
        loss = app.screen.query_one("#loss-plot", RunPlot)
        assert loss.display and loss.readable and "loss of 2 runs" in str(loss.render())
        await pilot.press("space")  # unpicks r16: back to the followed run's plot
        await until(pilot, lambda: not panel.has_class("shown"))
        assert app.screen._compared is None


async def test_resume_refused_in_one_line(project_path):
    finished_run(project_path, "done")
    no_save = project_path.parent / "runs" / "crashed-early"
    write_events(no_save, [{"type": "launched", "step": 0}, STARTED, *steps(1, 2),
                           {"type": "failed", "step": 2, "reason": "RuntimeError: boom"}], t0=5000.0)
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: app.run_view is not None and app.run_view.name == "crashed-early")
        await pilot.press("R")
        await until(pilot, lambda: any("no checkpoint" in n.message for n in app._notifications))
        app.open_run(project_path.parent / "runs" / "done")
        await until(pilot, lambda: app.run_view.name == "done" and app.run_view.ended)
        await pilot.press("R")
        await until(pilot, lambda: any("has finished" in n.message for n in app._notifications))
        await settle(pilot)
        assert all("\n" not in n.message and "Traceback" not in n.message for n in app._notifications)
        assert not app.training and not (no_save / "trainer.pid").exists()


async def test_resume_continues_the_run_in_its_folder_and_the_screen_follows_it(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """R on a failed run with a checkpoint: the pre-flight and the launcher of a start, with
    resume (the trainer is the scripted one), in the same folder, followed by the screen."""
    from train_support import write_project as write_training_project

    monkeypatch.chdir(tmp_path)
    project_path = write_training_project(tmp_path, tiny_model_dir, training={"max_steps": 10})
    run_dir = project_path.parent / "runs" / "crashy"
    write_events(run_dir, [{"type": "launched", "step": 0, "resume": False}, {**STARTED, "max_steps": 10},
                           *steps(1, 5, max_steps=10)])
    checkpoint = write_checkpoint(run_dir, 5)
    write_events(run_dir, [{"type": "checkpoint", "step": 5, "path": str(checkpoint)},
                           {"type": "failed", "step": 5, "reason": "RuntimeError: CUDA error", "failure": "crash"}],
                 t0=1100.0)
    write_snapshot(Project.load(project_path), run_dir)
    script = project_path.parent / "resume.script.jsonl"
    script.write_text("\n".join(json.dumps(item) for item in [
        {"type": "run_started", "step": 5, "max_steps": 10, "resumed_from": {"checkpoint": str(checkpoint), "step": 5}},
        {"sleep": 0.5}, *steps(6, 10, max_steps=10), {"type": "finished", "step": 10, "final_loss": 1.5}]) + "\n")
    started: list[list[str]] = []

    def trainer_command(spec, python=sys.executable):
        started.append([spec.run_dir, str(spec.resume)])
        return [python, str(FAKE), "--launched", spec.run_dir, str(script)]

    monkeypatch.setattr(launcher, "trainer_command", trainer_command)
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: app.run_view is not None and app.run_view.status == "failed")
        first_view = app.run_view
        await until(pilot, lambda: "R resumes it" in str(app.screen.query_one("#run-head", Static).render()))
        await pilot.press("R")
        await until(pilot, lambda: app.run_view is not first_view, timeout=120)
        assert app.run_view.run_dir == run_dir and app.training
        await until(pilot, lambda: app.run_view.ended, timeout=30)
        assert app.run_view.status == "finished"
        await until(pilot, lambda: numbers(app).get("step", "").startswith("10 / 10"))
        snap = app.run_view.snapshot()
        assert snap.loss[0] == list(range(1, 11))  # the history, then the resumed session
        text = log_lines(app)
        assert "resumed from runs/crashy/checkpoints/checkpoint-5" in text and "finished, final loss 1.5" in text
        await until(pilot, lambda: "finished" in runs_text(app)[0])
    assert started == [[str(run_dir), "True"]]
    assert [p.name for p in (project_path.parent / "runs").iterdir() if p.is_dir()] == ["crashy"]  # no new folder
    info = run_info(run_dir)
    assert (info.status, info.step, info.final_loss) == ("finished", 10, 1.5)
