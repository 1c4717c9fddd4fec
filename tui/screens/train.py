"""Train screen: the live dashboard of the run this window follows, and the project's runs.

The run's events are folded into a :class:`~tunedeck.tui.training.RunView` by the app's
follower thread; this screen only draws, on a timer, from a snapshot of it: numbers and
the machine panel every tick, plots (training loss with a smoothed line and the eval loss
on the same axes, learning rate, grad norm) at most once a second, new event-log lines as
they come. However fast the trainer reports, a frame draws the latest state once.

Controls: ``s`` start (the same pre-flight as ``tunedeck train``), ``x`` stop (a
checkpoint and the adapter, then the end), ``c`` save a checkpoint now, ``A`` abort
(asks first), ``r`` re-read the runs list. Enter on a run in the list opens it: a live
one re-attaches (history, then live, with the controls), an ended one shows its plots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import Button, Label, OptionList, RichLog, Static
from textual.widgets.option_list import Option
from textual.worker import Worker
from textual_plotext import PlotextPlot

from tunedeck.core.runs import RunInfo, list_runs

from ..training import LIVE, LOG_LINES, LogLine, RunView, Snapshot, status_label
from ..widgets.facts import Facts
from .base import ProjectScreen

TICK_S = 0.5  # numbers, machine panel, log
PLOT_EVERY_S = 1.0  # plots, while the run is live

STATUS_STYLE = {"starting": "$text-warning", "running": "$text-success", "stopping": "$text-warning",
                "finished": "$text-primary", "stopped": "$text-primary", "aborted": "$text-warning",
                "failed": "$text-error", "died": "$text-error", "unknown": "$text-muted"}
LOG_STYLE = {"warning": "yellow", "alarm": "bold red", "failed": "bold red", "checkpoint": "cyan",
             "eval": "magenta", "finished": "green", "started": "green", "control": "blue"}


def run_option(info: RunInfo, followed: Path | None) -> Option:
    loss = "" if info.final_loss is None else f"  loss {info.final_loss:.4f}"
    mark = "●" if followed is not None and Path(info.path).resolve() == followed.resolve() else " "
    style = STATUS_STYLE.get(info.status, "")
    prompt = Content.assemble(f"{mark} {info.name}  ", (status_label(info.status, info.host), style),
                              f"  step {info.step}{loss}")
    return Option(prompt, id=str(info.path))


def log_text(line: LogLine) -> Text:
    return Text.assemble((f"{line.step:>6} ", "dim"), (line.text, LOG_STYLE.get(line.kind, "")))


LOG_BURST = 60  # at most this many new log lines written per tick; the rest are counted


def thin(points: tuple[list[float], list[float]], width: int) -> tuple[list[float], list[float]]:
    """Every k-th point (and the last), at most about two per column: braille draws two."""
    xs, ys = points
    limit = max(2 * width, 20)
    if len(xs) <= limit:
        return xs, ys
    k = -(-len(xs) // limit)
    keep = list(range(0, len(xs), k))
    if keep[-1] != len(xs) - 1:
        keep.append(len(xs) - 1)
    return [xs[i] for i in keep], [ys[i] for i in keep]


def draw(plot: PlotextPlot, title: str, lines: list[tuple[tuple[list[float], list[float]], str, str]],
         *, empty: str, scatter: tuple[tuple[list[float], list[float]], str, str] | None = None) -> None:
    """Redraw ``plot``: ``lines`` as (points, label, colour), ``scatter`` as markers."""
    plt = plot.plt
    plt.clear_data()
    plt.clear_figure()
    width = plot.size.width or 80
    lines = [(thin(points, width), label, color) for points, label, color in lines]
    if scatter is not None:
        scatter = (thin(scatter[0], width), scatter[1], scatter[2])
    has_data = any(xs for (xs, _), _, _ in lines) or (scatter is not None and scatter[0][0])
    plt.title(title if has_data else f"{title}: {empty}")
    for (xs, ys), label, color in lines:
        if xs:
            plt.plot(xs, ys, label=label, color=color, marker="braille")
    if scatter is not None and scatter[0][0]:
        (xs, ys), label, color = scatter
        plt.plot(xs, ys, label=label, color=color, marker="dot") if len(xs) > 1 else \
            plt.scatter(xs, ys, label=label, color=color, marker="dot")
    if has_data:
        plt.xlabel("step")
    plot.refresh()


class TrainScreen(ProjectScreen):
    """The dashboard of the followed run, its controls, and the runs folder."""

    MODE = "train"
    BINDINGS = [
        Binding("s", "app.start_training", "Start", id="train.start"),
        Binding("x", "app.stop_training", "Stop", id="train.stop"),
        Binding("c", "app.save_checkpoint", "Checkpoint", id="train.checkpoint"),
        Binding("A", "app.abort_training", "Abort", id="train.abort"),
        Binding("r", "reload_runs", "Runs", id="train.runs"),
    ]
    DEFAULT_CSS = """
    TrainScreen #run-head { height: 1; padding: 0 1; background: $boost; }
    TrainScreen #alarm-bar { height: 3; display: none; background: $error 20%; padding: 0 1; }
    TrainScreen #alarm-bar.shown { display: block; }
    TrainScreen #alarm-text { width: 1fr; height: 3; content-align: left middle; color: $text-error; }
    TrainScreen #alarm-bar Button { margin: 0 0 0 1; min-width: 14; }
    TrainScreen #train-main { height: 1fr; }
    TrainScreen #train-side { width: 38%; max-width: 46; min-width: 30; height: 1fr; border-right: vkey $surface-lighten-2; }
    TrainScreen #runs-title { padding: 1 1 0 1; text-style: bold; color: $text-primary; }
    TrainScreen #runs { height: auto; max-height: 12; border: none; padding: 0; }
    TrainScreen #train-plots { width: 1fr; height: 1fr; }
    TrainScreen #loss-plot { height: 2fr; min-height: 6; }
    TrainScreen #small-plots { height: 1fr; min-height: 5; }
    TrainScreen #small-plots PlotextPlot { width: 1fr; }
    TrainScreen #failure { height: auto; max-height: 10; display: none; color: $text-error; padding: 0 1; }
    TrainScreen #failure.shown { display: block; }
    TrainScreen #event-log { height: 1fr; min-height: 3; max-height: 9; border-top: hkey $surface-lighten-2; padding: 0 1; }
    """

    @dataclass
    class Listed(Message):
        """The runs found in the project's runs folder."""

        runs: list[RunInfo]

    def __init__(self) -> None:
        super().__init__()
        self._shown: RunView | None = None
        self._drawn = -1  # revision drawn (numbers, log)
        self._plotted = -1  # revision plotted
        self._plot_time = 0.0
        self._log_written = 0
        self._alarms_dismissed = 0
        self._status = ""
        self._head: tuple[str, str] | None = None
        self._opened_newest = False  # the newest run is opened once, when nothing is followed

    def compose_body(self) -> ComposeResult:
        with Vertical(classes="body"):
            yield Static(id="run-head", markup=False)
            with Horizontal(id="alarm-bar"):
                yield Static(id="alarm-text", markup=False)
                yield Button("Stop the run", id="alarm-stop", variant="error")
                yield Button("Keep going", id="alarm-keep")
            with Horizontal(id="train-main"):
                with VerticalScroll(id="train-side"):
                    yield Facts("run", status="no run followed: s starts one, or open one below", id="numbers")
                    yield Facts("machine", status="", id="system")
                    yield Label("runs", id="runs-title", markup=False)
                    yield OptionList(id="runs")
                with Vertical(id="train-plots"):
                    yield PlotextPlot(id="loss-plot")
                    with Horizontal(id="small-plots"):
                        yield PlotextPlot(id="lr-plot")
                        yield PlotextPlot(id="grad-plot")
                    yield Static(id="failure", markup=False)
                    yield RichLog(id="event-log", max_lines=LOG_LINES, wrap=True, markup=False)

    def on_mount(self) -> None:
        super().on_mount()
        self.set_interval(TICK_S, self._tick)
        self.watch(self.app, "run_view", self._view_changed)

    # -- the followed run ---------------------------------------------------------------------

    def _view_changed(self, view: RunView | None) -> None:
        if view is not self._shown:
            self._shown = view
            self._drawn = self._plotted = -1
            self._log_written = 0
            self._alarms_dismissed = 0
            self._status = ""
            self._head = None
            self.query_one("#event-log", RichLog).clear()
            self.project_shown()
        self._tick()

    def _tick(self) -> None:
        view = self.app.run_view
        if view is not self._shown:
            self._view_changed(view)
            return
        if view is None:
            self._draw_empty()
            return
        snap = view.snapshot()
        live = snap.status in LIVE
        if snap.revision == self._drawn and not live:
            return
        self._draw_numbers(snap)
        if snap.revision != self._drawn:
            self._draw_log(snap)
            self._draw_alarm(snap)
            self._draw_failure(snap)
            self._drawn = snap.revision
        now = time.monotonic()
        if snap.revision != self._plotted and (not live or now - self._plot_time >= PLOT_EVERY_S):
            self._draw_plots(snap)
            self._plotted, self._plot_time = snap.revision, now
        if snap.status != self._status:
            if self._status:  # started, ended: the list says so
                self._list_runs()
            self._status = snap.status

    def _draw_empty(self) -> None:
        if self._drawn == -2:
            return
        self._drawn = -2
        self._head = None
        self.query_one("#run-head", Static).update("no run followed · s starts one with the settings shown · "
                                                   "enter on a run in the list opens it", layout=False)
        self.query_one("#numbers", Facts).status = "no run followed: s starts one, or open one below"
        self.query_one("#system", Facts).status = "what the trainer reports: GPU or CPU, memory"
        for plot_id, title in (("#loss-plot", "loss"), ("#lr-plot", "learning rate"), ("#grad-plot", "grad norm")):
            draw(self.query_one(plot_id, PlotextPlot), title, [], empty="no run")

    def _draw_numbers(self, snap: Snapshot) -> None:
        style = STATUS_STYLE.get(snap.status, "")
        keys = {"starting": "x stop · A abort", "running": "x stop · c checkpoint · A abort",
                "stopping": "saving, then ending · A abort"}.get(snap.status, "s starts a new run")
        head = (snap.name, snap.status)
        if head != self._head:  # the one-line header is re-laid only when it changes
            self._head = head
            self.query_one("#run-head", Static).update(Content.assemble(
                ("run ", "$text-muted"), (snap.name, "bold"), "  ",
                (status_label(snap.status).upper(), f"bold {style}"),
                ("  ·  " + keys, "$text-muted")), layout=False)
        self.query_one("#numbers", Facts).show(snap.numbers)
        self.query_one("#system", Facts).show(snap.system)

    def _draw_log(self, snap: Snapshot) -> None:
        new = snap.log_total - self._log_written
        if new <= 0:
            return
        log = self.query_one("#event-log", RichLog)
        shown = min(new, len(snap.log), LOG_BURST)
        if new > shown:  # a burst: the screen shows the latest; events.jsonl has them all
            log.write(Text(f"… {new - shown:,} more lines (all in events.jsonl)", style="dim"))
        for line in snap.log[-shown:]:
            log.write(log_text(line))
        self._log_written = snap.log_total

    def _draw_alarm(self, snap: Snapshot) -> None:
        bar = self.query_one("#alarm-bar")
        alarm = snap.last_alarm
        if alarm is not None and snap.alarm_count > self._alarms_dismissed and snap.status in LIVE:
            advice = "stopping is advised" if alarm.get("action") == "stop" else "it can keep going"
            self.query_one("#alarm-text", Static).update(f"⚠ step {alarm.get('step', 0)}: "
                                                         f"{alarm.get('message', '')} ({advice})")
            if not bar.has_class("shown"):
                bar.add_class("shown")
                button = "#alarm-stop" if alarm.get("action") == "stop" else "#alarm-keep"
                self.query_one(button, Button).focus()
        else:
            bar.remove_class("shown")

    def _draw_failure(self, snap: Snapshot) -> None:
        failure = self.query_one("#failure", Static)
        if snap.status in ("failed", "died", "aborted"):
            lines = [f"{snap.status}: {snap.reason}"]
            if snap.traceback:
                lines += ["last lines of the traceback (full in trainer.log and events.jsonl):",
                          *("  " + line for line in snap.traceback)]
            failure.update("\n".join(lines))
            failure.add_class("shown")
        else:
            failure.remove_class("shown")

    def _draw_plots(self, snap: Snapshot) -> None:
        draw(self.query_one("#loss-plot", PlotextPlot), "loss", [
            (snap.loss, "train", "gray"), (snap.smooth, "smoothed", "cyan")],
            empty="waiting for the first step", scatter=(snap.eval_loss, "eval", "orange"))
        draw(self.query_one("#lr-plot", PlotextPlot), "learning rate", [(snap.lr, "lr", "green")],
             empty="waiting")
        draw(self.query_one("#grad-plot", PlotextPlot), "grad norm", [(snap.grad_norm, "grad norm", "magenta")],
             empty="waiting")

    @on(Button.Pressed, "#alarm-stop")
    def _alarm_stop(self) -> None:
        self._dismiss_alarm()
        self.app.action_stop_training()

    @on(Button.Pressed, "#alarm-keep")
    def _alarm_keep(self) -> None:
        view = self._dismiss_alarm()
        if view is not None:
            view.note("control", "kept going after the alarm")

    def _dismiss_alarm(self) -> RunView | None:
        view = self._shown
        if view is not None:
            self._alarms_dismissed = view.alarm_count
        self.query_one("#alarm-bar").remove_class("shown")
        return view

    # -- the runs folder ----------------------------------------------------------------------

    def forget_project(self) -> None:
        self._opened_newest = False
        self._shown, self._drawn = None, -1  # the next tick draws the new widgets afresh

    def project_shown(self) -> None:
        self._list_runs()

    def action_reload_runs(self) -> None:
        self._list_runs()
        self.query_one("#runs", OptionList).focus()

    def _list_runs(self) -> None:
        project = self.session.project
        runs_dir = project.resolve_path(project["output.runs_dir"])
        self.query_one("#runs-title", Label).update(f"runs in {project['output.runs_dir']}/ (enter opens)")
        self._list(runs_dir)

    @work(thread=True, exclusive=True, group="runs", exit_on_error=False)
    def _list(self, runs_dir: Path) -> None:
        self.post_message(self.Listed(list_runs(runs_dir)))

    @on(Listed)
    def _listed(self, event: Listed) -> None:
        options = self.query_one("#runs", OptionList)
        highlighted = options.highlighted_option.id if options.highlighted_option is not None else None
        followed = self._shown.run_dir if self._shown is not None else None
        options.clear_options()
        if not event.runs:
            options.add_option(Option(Content.styled("no runs yet: s starts one", "$text-muted"), disabled=True))
            return
        runs = list(reversed(event.runs))  # newest first
        options.add_options([run_option(info, followed) for info in runs])
        if self.app.run_view is None and not self._opened_newest:  # show something: a live run first
            self._opened_newest = True
            live = [info for info in runs if info.status == "running"]
            self.app.open_run((live or runs)[0].path)
        ids = [str(info.path) for info in runs]
        if highlighted in ids:
            options.highlighted = ids.index(highlighted)

    @on(OptionList.OptionSelected, "#runs")
    def _open(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None:
            self.app.open_run(event.option.id)

    def work_failed(self, worker: Worker[Any], message: str) -> None:
        if worker.group == "runs":
            options = self.query_one("#runs", OptionList)
            options.clear_options()
            options.add_option(Option(Content.styled(message, "$text-error"), disabled=True))
        else:
            super().work_failed(worker, message)
