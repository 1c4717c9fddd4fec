"""The Train screen of a preference run (DPO, ORPO): its rewards, margin, accuracy and
log-probs kept from the step and eval events, their plots (or one-line summaries where they
have no room), the latest accuracy and margin in the run panel, and its health alarms; an
SFT run opened after it looks as it always did."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from test_tui_train import (  # noqa: F401 - fixtures
    STARTED, fake_trainer, follow, log_lines, make_app, numbers, project_path, steps, until, write_events,
)
from textual.widgets import Button, Static

from tunedeck.core import health
from tunedeck.core.health import Health
from tunedeck.tui.training import RunView, Snapshot, Stats, margin_accuracy_summary, rewards_logps_summary
from tunedeck.tui.widgets.run_plot import RunPlot

MAX_STEPS = 100
PREF_PLOTS = ("#margin-plot", "#accuracy-plot", "#rewards-plot", "#logps-plot")


def dpo_started(method: str = "dpo", max_steps: int = MAX_STEPS) -> dict[str, Any]:
    return {"type": "run_started", "step": 0, "max_steps": max_steps, "device": {"type": "cpu"},
            "config": {"training": {"method": method, "lr_scheduler": "cosine"}, "preference": {"beta": 0.1}},
            "data": {"method": method}}


def dpo_step(n: int, *, accuracy: float, margin: float, chosen: float, rejected: float,
             max_steps: int = MAX_STEPS) -> dict[str, Any]:
    return {"type": "step", "step": n, "loss": 0.69 * math.exp(-2 * n / max_steps), "learning_rate": 5e-6,
            "grad_norm": 1.0, "tokens_per_s": 900.0, "epoch": n / max_steps, "max_steps": max_steps,
            "rewards_chosen": 0.2 * margin, "rewards_rejected": -0.8 * margin, "reward_margin": margin,
            "reward_accuracy": accuracy, "logps_chosen": chosen, "logps_rejected": rejected}


def learning(n: int) -> dict[str, Any]:
    """A DPO run that learns: accuracy 0.5 -> 0.9, margin 0 -> 3, the chosen log-prob flat."""
    f = n / MAX_STEPS
    return dpo_step(n, accuracy=min(0.9, 0.5 + f), margin=3.0 * f, chosen=-150.0 + math.sin(n),
                    rejected=-150.0 - 60.0 * f)


def with_alarms(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events with the alarms the trainer's health monitor adds after the events that raise them."""
    monitor, out = Health(), []
    for ev in events:
        out.append(ev)
        if ev["type"] in ("step", "eval", "system"):
            out += [{"type": "alarm", "step": ev["step"], **alarm.fields()} for alarm in monitor.observe(ev)]
    return out


def dpo_run(project_path: Path, name: str = "dpo-1", last: int = 60,
            step: Any = learning) -> tuple[Path, list[dict[str, Any]]]:
    """A finished DPO run folder (steps 1..``last``, an eval every 20 steps) and its events."""
    events: list[dict[str, Any]] = [{"type": "launched", "step": 0, "resume": False}, dpo_started()]
    for n in range(1, last + 1):
        events.append(step(n))
        if n % 20 == 0:
            events.append({"type": "eval", "step": n, "eval_loss": 0.6, "eval_reward_accuracy": 0.8,
                           "eval_reward_margin": 2.0, "eval_rewards_chosen": 0.4, "eval_rewards_rejected": -1.6,
                           "eval_logps_chosen": -151.0, "eval_logps_rejected": -190.0})
    events.append({"type": "finished", "step": last, "final_loss": 0.3})
    events = with_alarms(events)
    run_dir = project_path.parent / "runs" / name
    write_events(run_dir, events)
    return run_dir, events


def falling_chosen(n: int) -> dict[str, Any]:
    """DPO learning the preference by pushing both answers down: the chosen log-prob falls."""
    f = n / MAX_STEPS
    return dpo_step(n, accuracy=min(0.9, 0.5 + f), margin=3.0 * f, chosen=-150.0 - 80.0 * f,
                    rejected=-150.0 - 140.0 * f)


def plot(app, selector: str) -> RunPlot:
    return app.screen.query_one(selector, RunPlot)


def summary(app) -> list[str]:
    return str(app.screen.query_one("#plot-summary", Static).render()).splitlines()


async def open_ended(pilot, app, name: str) -> None:
    app.open_run(Path("runs") / name)
    await until(pilot, lambda: app.run_view is not None and app.run_view.name == name and app.run_view.ended)
    await until(pilot, lambda: app.screen._drawn == app.run_view.revision)
    await pilot.pause(0.4)  # the plots fitted to their room


# -- the run as the dashboard folds it -----------------------------------------------------------


def test_a_dpo_run_keeps_its_preference_series_and_method():
    view = RunView("r", Path("runs/r"))
    events = with_alarms([dpo_started(), *(learning(n) for n in range(1, 41)),
                          {"type": "eval", "step": 40, "eval_loss": 0.6, "eval_reward_accuracy": 0.8,
                           "eval_reward_margin": 2.0, "eval_logps_chosen": -151.0}])
    view.fold([{"time": 1000.0 + i, **ev} for i, ev in enumerate(events)], "finished")
    snap = view.snapshot()
    assert snap.method == "dpo" and snap.preference_run
    assert snap.series("reward_accuracy")[0] == list(range(1, 41))
    assert snap.series("reward_margin")[1][-1] == learning(40)["reward_margin"]
    assert snap.series("eval_reward_accuracy") == ([40], [0.8]) and snap.series("eval_logps_chosen") == ([40], [-151.0])
    assert snap.series("eval_rewards_rejected") == ([], [])  # not reported
    assert snap.stats["reward_accuracy"].last == 0.9 and snap.stats["reward_accuracy"].first == 0.51
    shown = dict(snap.numbers)
    assert shown["accuracy"] == "0.90 (eval 0.80)" and shown["margin"] == "1.20 (eval 2.00)"
    labels = [label for label, _ in snap.numbers]
    assert labels.index("accuracy") == labels.index("eval loss") + 1  # next to the losses
    # the eval's log line: accuracy and margin by short names, the rest left to the plots
    assert [line.text for line in snap.log if line.kind == "eval"] == ["eval: loss 0.6, accuracy 0.8, margin 2"]


def test_an_sft_run_has_no_preference_numbers():
    view = RunView("r", Path("runs/r"))
    view.fold([STARTED, *steps(1, 5)], "finished")
    snap = view.snapshot()
    assert snap.method == "sft" and not snap.preference_run and snap.preference == {}
    assert "accuracy" not in dict(snap.numbers) and "margin" not in dict(snap.numbers)
    assert set(snap.stats) == {"loss", "smooth", "eval_loss", "lr", "grad_norm"}


def test_an_orpo_run_before_its_first_step_is_a_preference_run():
    view = RunView("r", Path("runs/r"))
    view.fold([dpo_started("orpo")], "running")
    snap = view.snapshot()
    assert snap.method == "orpo" and snap.preference_run
    assert dict(snap.numbers)["accuracy"] == "-" and dict(snap.numbers)["margin"] == "-"
    assert margin_accuracy_summary(snap, 40) == "accuracy, margin: waiting"
    assert rewards_logps_summary(snap) == "rewards, log-probs (chosen, rejected): waiting for the first step"


def test_the_preference_summaries_fit_their_width():
    snap = Snapshot(name="r", run_dir=Path("runs/r"), status="running", revision=1, numbers=[], system=[],
                    loss=([], []), smooth=([], []), eval_loss=([], []), lr=([], []), grad_norm=([], []), log=[],
                    log_total=0, method="dpo", stats={
                        "reward_accuracy": Stats(0.5, 0.4, 0.9, 0.875), "reward_margin": Stats(0.0, 0.0, 3.1, 2.91),
                        "eval_reward_accuracy": Stats(0.8, 0.8, 0.85, 0.85),
                        "eval_reward_margin": Stats(2.7, 2.7, 2.7, 2.7),
                        "rewards_chosen": Stats(0.0, 0.0, 0.82, 0.82), "rewards_rejected": Stats(0.0, -2.1, 0.0, -2.1),
                        "logps_chosen": Stats(-150.0, -152.0, -149.0, -152.0),
                        "logps_rejected": Stats(-150.0, -210.0, -150.0, -210.0)})
    assert margin_accuracy_summary(snap) == "accuracy 0.88 (eval 0.85) · margin 2.91 (max 3.1, eval 2.7)"
    assert rewards_logps_summary(snap) == (
        "rewards chosen 0.82, rejected -2.1 · logp chosen -152 (from -150), rejected -210")
    for width in (70, 50, 40, 36):  # the plots column is 41 cells at 80 columns
        for text in (margin_accuracy_summary(snap, width), rewards_logps_summary(snap, width)):
            assert len(text) <= width, (width, text)
    assert margin_accuracy_summary(snap, 40) == "accuracy 0.88 (eval 0.85) · margin 2.91"
    assert rewards_logps_summary(snap, 40) == "rewards 0.82/-2.1 · logp -152/-210"


# -- the screen --------------------------------------------------------------------------------


async def test_a_finished_dpo_run_shows_its_preference_plots_and_numbers(project_path):
    run_dir, events = dpo_run(project_path, step=falling_chosen)
    alarms = [ev for ev in events if ev["type"] == "alarm"]
    assert [a["kind"] for a in alarms] == [health.CHOSEN_FALLING]  # the real monitor's alarm
    app = make_app(project_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("5")
        await open_ended(pilot, app, run_dir.name)
        screen = app.screen
        assert "dpo-1 DPO" in str(screen.query_one("#run-head", Static).render())
        shown = numbers(app)
        assert shown["accuracy"] == "0.90 (eval 0.80)" and shown["margin"] == "1.80 (eval 2.00)"
        # the loss and the margin and accuracy plots have room; the rewards, log-probs and lr have lines
        assert plot(app, "#loss-plot").display and plot(app, "#loss-plot").readable
        for selector in ("#margin-plot", "#accuracy-plot"):
            assert plot(app, selector).readable and screen.query_one("#pref-plots").display
        assert "reward margin" in str(plot(app, "#margin-plot").render())
        assert "accuracy" in str(plot(app, "#accuracy-plot").render())
        assert not screen.query_one("#pref-more").display and not screen.query_one("#small-plots").display
        snap = app.run_view.snapshot()
        lines = summary(app)
        assert lines[0] == rewards_logps_summary(snap, len(lines[0]))
        assert lines[0].startswith("rewards chosen 0.36, rejected -1.44 · logp chosen -198")
        assert lines[1].startswith("lr 5.0e-6")
        assert "un-learning the good answers" in log_lines(app) and "preference.sft_weight = 0.2" in log_lines(app)
        await pilot.resize_terminal(170, 56)  # room for every plot
        await until(pilot, lambda: screen.query_one("#pref-more").display and screen.query_one("#small-plots").display)
        await pilot.pause(0.4)
        assert all(plot(app, selector).readable for selector in (*PREF_PLOTS, "#loss-plot", "#lr-plot"))
        assert not screen.query_one("#plot-summary").has_class("shown")
        rewards = str(plot(app, "#rewards-plot").render())
        assert "rewards" in rewards and "chosen" in rewards and "rejected" in rewards
        assert "log-probs" in str(plot(app, "#logps-plot").render())


async def test_at_80x24_a_dpo_run_keeps_its_loss_plot_and_summarises_the_rest(project_path):
    run_dir, _ = dpo_run(project_path)
    app = make_app(project_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await open_ended(pilot, app, run_dir.name)
        screen = app.screen
        loss = plot(app, "#loss-plot")
        assert loss.display and loss.readable
        assert not screen.query_one("#pref-plots").display and not screen.query_one("#pref-more").display
        snap = app.run_view.snapshot()
        lines = summary(app)
        width = screen.query_one("#plot-summary", Static).content_region.width
        assert lines == [margin_accuracy_summary(snap, width), rewards_logps_summary(snap, width),
                         lines[2]] and lines[2].startswith("lr ")
        assert lines[0].startswith("accuracy 0.90") and "margin 1.8" in lines[0]
        assert all(len(line) <= width for line in lines)
        shown = numbers(app)  # the run panel scrolls; its rows are there
        assert shown["accuracy"].startswith("0.90") and shown["margin"].startswith("1.80")


async def test_an_sft_run_opened_after_a_dpo_run_looks_as_before(project_path):
    dpo_dir, _ = dpo_run(project_path)
    sft_dir = project_path.parent / "runs" / "sft-1"
    write_events(sft_dir, [{"type": "launched", "step": 0, "resume": False}, STARTED, *steps(1, 10),
                           {"type": "finished", "step": 10, "final_loss": 1.5}], t0=5000.0)
    app = make_app(project_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("5")
        await open_ended(pilot, app, dpo_dir.name)
        screen = app.screen
        assert screen.query_one("#pref-plots").display and screen.query_one("#train-plots").has_class("preference")
        await open_ended(pilot, app, sft_dir.name)
        assert not screen.query_one("#pref-plots").display and not screen.query_one("#pref-more").display
        assert not screen.query_one("#train-plots").has_class("preference")
        assert "accuracy" not in numbers(app) and "DPO" not in str(screen.query_one("#run-head", Static).render())
        assert all(plot(app, selector).readable for selector in ("#loss-plot", "#lr-plot", "#grad-plot"))
        assert not screen.query_one("#plot-summary").has_class("shown")


async def test_a_live_dpo_run_raises_the_margin_alarm_and_stops_from_it(project_path, fake_trainer):
    """The trainer's health monitor over a DPO run whose margin explodes: the alarm bar asks to stop."""
    def exploding(n: int) -> dict[str, Any]:
        return dpo_step(n, accuracy=1.0, margin=5.0 + 2.0 * n, chosen=-150.0, rejected=-150.0 - 40.0 * n,
                        max_steps=40)

    script = with_alarms([dpo_started(max_steps=40), *(exploding(n) for n in range(1, 13))])
    assert [item["kind"] for item in script if item["type"] == "alarm"] == [health.MARGIN_EXPLODING]
    trainer = fake_trainer(project_path.parent / "runs" / "hacking", [*script, {"wait_for_control": True}])
    app = make_app(project_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await follow(pilot, app, trainer)
        bar = app.screen.query_one("#alarm-bar")
        await until(pilot, lambda: bar.has_class("shown"))
        text = str(app.screen.query_one("#alarm-text", Static).render())
        assert "reward margin is 27" in text and "reward hacking" in text and "stopping is advised" in text
        assert app.screen.focused is app.screen.query_one("#alarm-stop", Button)
        await until(pilot, lambda: numbers(app).get("margin") == "29.00")
        assert numbers(app)["accuracy"] == "1.00" and app.run_view.snapshot().method == "dpo"
        await pilot.press("enter")  # the focused "Stop the run"
        await until(pilot, lambda: app.run_view.ended, timeout=30)
        assert app.run_view.status == "stopped" and trainer.proc.wait(10) == 0
    assert json.loads((trainer.run_dir / "events.jsonl").read_text().splitlines()[-1])["stopped"] is True
