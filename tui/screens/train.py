"""Train screen: the live dashboard of the run this window follows, and the project's runs.

The run's events are folded into a :class:`~tunedeck.tui.training.RunView` by the app's
follower thread; this screen only draws, on a timer, from a snapshot of it: numbers and
the machine panel every tick, plots (training loss with a smoothed line and the eval loss
on the same axes, learning rate, grad norm) at most once a second, new event-log lines as
they come. However fast the trainer reports, a frame draws the latest state once.

A plot is drawn only when it has room to be read (:class:`~tunedeck.tui.widgets.run_plot.RunPlot`,
decided on its size as the terminal changes): the learning rate and grad norm go first,
then the loss, each replaced by a one-line summary.

A preference run (DPO, ORPO) has two more rows of plots between the loss and the learning
rate: its reward margin and preference accuracy (0..1; eval points too), then the rewards
and log-probs of the chosen answers against the rejected ones; the loss plot shares its
rows with them evenly. They give way after the learning rate and grad norm and before the
loss, the rewards and log-probs first; the run panel adds the latest accuracy and margin.
An SFT run's dashboard is as it always was.

The runs list (below) shows each run's status, step, final loss, eval loss and training
time, its columns fitted to its width. Space marks runs for comparison: the loss plot
then draws each marked run's smoothed loss (read from its events.jsonl by a worker) in
its own colour, and a panel lists the settings that differ between them (their
``project.toml`` snapshots).

Controls: ``s`` start (the same pre-flight as ``tunedeck train``), ``x`` stop (a
checkpoint and the adapter, then the end), ``c`` save a checkpoint now, ``A`` abort
(asks first), ``R`` resume a stopped or failed run from its latest checkpoint, in its
folder (``tunedeck train --resume``), ``r`` re-read the runs list. Enter on a run in the
list opens it: a live one re-attaches (history, then live, with the controls), an ended
one shows its plots; ``e`` on it exports it as GGUF (a dialog: the quantization, the
folder; the work is the engine's, the progress is notifications).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Button, Label, OptionList, RichLog, Static
from textual.worker import Worker

from tunedeck.core.runs import (
    FAILED_ENDS, RESUMABLE, RUNNING, STARTING, STOPPING, RunInfo, list_runs, run_info,
)

from ..training import (
    LIVE, LOG_LINES, LogLine, RunCurve, RunView, Snapshot, fitted, launch, loss_summary, lr_grad_summary,
    margin_accuracy_summary, number, read_curve, read_settings, resume_refusal, rewards_logps_summary, settings_diff,
    status_label,
)
from ..widgets.facts import Facts
from ..widgets.run_plot import MIN_HEIGHT, PlotsColumn, RunPlot
from ..widgets.runs_list import STATUS_STYLE, RunsList, hex_color, middle
from .base import ProjectScreen

TICK_S = 0.5  # numbers, machine panel, log
PLOT_EVERY_S = 1.0  # plots, while the run is live
FIT_AFTER_S = 0.05  # plots are fitted to their room this long after a size changes
LEGEND_ROWS = 10  # a plot with fewer canvas rows has its legend in the title (plotext's would cover it)
DIFF_ROWS = 5  # settings that differ, shown in the comparison panel (then "… N more")

LOG_STYLE = {"warning": "yellow", "alarm": "bold red", "failed": "bold red", "checkpoint": "cyan",
             "eval": "magenta", "finished": "green", "started": "green", "control": "blue"}


def log_text(line: LogLine) -> Text:
    return Text.assemble((f"{line.step:>6} ", "dim"), (line.text, LOG_STYLE.get(line.kind, "")))


LOG_BURST = 60  # at most this many new log lines written per tick; the rest are counted

Points = tuple[list[float], list[float]]
Color = str | tuple[int, int, int]


def thin(points: Points, width: int) -> Points:
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


def draw(plot: RunPlot, title: str, lines: list[tuple[Points, str, Color]], *, empty: str,
         scatters: list[tuple[Points, str, Color]] = (), legend: bool = True,
         ylim: tuple[float, float] | None = None) -> None:
    """Redraw ``plot``: ``lines`` as (points, label, colour), ``scatters`` as markers; with
    plotext's legend when ``legend`` (and the plot has the rows for it); ``ylim`` fixes the
    y axis (once there are points)."""
    plt = plot.plt
    plt.clear_data()
    plt.clear_figure()
    width = plot.size.width or 80
    legend = legend and plot.canvas_rows >= LEGEND_ROWS
    lines = [(thin(points, width), label, color) for points, label, color in lines]
    scatters = [(thin(points, width), label, color) for points, label, color in scatters]
    has_data = any(xs for (xs, _), _, _ in lines) or any(xs for (xs, _), _, _ in scatters)
    plt.title(title if has_data else f"{title}: {empty}")
    for (xs, ys), label, color in lines:
        if xs:
            plt.plot(xs, ys, label=label if legend else None, color=color, marker="braille")
    for (xs, ys), label, color in scatters:
        if xs:
            (plt.plot if len(xs) > 1 else plt.scatter)(xs, ys, label=label if legend else None, color=color,
                                                         marker="dot")
    if has_data and ylim is not None:
        plt.ylim(*ylim)
    if has_data and plot.canvas_rows >= LEGEND_ROWS:
        plt.xlabel("step")
    plot.refresh()


def pair_title(name: str, width: int, legend: bool) -> str:
    """The title of a chosen-against-rejected plot: its colours said where no legend is drawn."""
    if legend:
        return name
    return fitted([f"{name}: chosen green, rejected red", f"{name} (green chosen, red rej.)",
                   f"{name} green/red"], max(0, width - 4))


def legend_line(runs: list[tuple[str, tuple[int, int, int] | None]], width: int) -> Content:
    """The compared runs in their curves' colours, names shortened to fit ``width``."""
    names = [name for name, _ in runs]
    prefix = "comparing "
    for size in (max(map(len, names)), 24, 16, 12, 8, 5):
        shown = [middle(name, size) for name in names]
        if sum(4 + len(name) for name in shown) + len(prefix) <= width:
            break
        if sum(4 + len(name) for name in shown) <= width:
            prefix = ""
            break
    else:
        prefix = ""
    parts: list[str | tuple[str, str]] = [(prefix, "$text-muted")] if prefix else []
    for (_, color), name in zip(runs, shown):
        parts += [("━━ ", hex_color(color) if color else ""), (name, "bold"), " "]
    return Content.assemble(*parts)


def diff_lines(diff: list[tuple[str, list[str]]], width: int, rows: int) -> list[Content]:
    """The settings that differ, one a line ("lora.r  16 | 32"), at most ``rows`` lines;
    a key loses its section where the line would not fit."""
    shown = diff if len(diff) <= rows else diff[:max(0, rows - 1)]
    keys = [key for key, _ in shown]
    values = [" | ".join(v) for _, v in shown]
    # the longest keys lose their section while the lines are too wide ("learning_rate", not "r")
    while keys and max(map(len, keys)) + 2 + max(map(len, values)) > width:
        longest = max((k for k in keys if "." in k), key=len, default=None)
        if longest is None:
            break
        keys = [k.rsplit(".", 1)[-1] if k == longest else k for k in keys]
    lines = []
    if shown:
        pad = max(len(k) for k in keys) + 2
        lines = [Content.assemble((key.ljust(pad), "$text-muted"), value) for key, value in zip(keys, values)]
    if len(shown) < len(diff):
        lines.append(Content.styled(f"… {len(diff) - len(shown)} more settings differ", "$text-muted"))
    return lines


class TrainScreen(ProjectScreen):
    """The dashboard of the followed run, its controls, and the runs folder."""

    MODE = "train"
    BINDINGS = [
        Binding("s", "app.start_training", "Start", id="train.start"),
        Binding("x", "app.stop_training", "Stop", id="train.stop"),
        Binding("c", "app.save_checkpoint", "Checkpoint", id="train.checkpoint"),
        Binding("A", "app.abort_training", "Abort", id="train.abort"),
        Binding("R", "resume_run", "Resume", id="train.resume"),
        Binding("r", "reload_runs", "Runs", id="train.runs"),
    ]
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-short"), (32, "-tall")]  # a short terminal: no padding round the body

    @dataclass
    class Listed(Message):
        """The runs found in the project's runs folder."""

        runs: list[RunInfo]

    @dataclass
    class Compared(Message):
        """The picked runs' curves and settings, read by a worker."""

        picks: tuple[Path, ...]
        curves: list[RunCurve]
        diff: list[tuple[str, list[str]]]
        problems: list[str]

    def __init__(self) -> None:
        super().__init__()
        self._shown: RunView | None = None
        self._drawn = -1  # revision drawn (numbers, log)
        self._plotted = -1  # revision plotted
        self._plot_time = 0.0
        self._log_written = 0
        self._alarms_dismissed = 0
        self._status = ""
        self._head: tuple[str, ...] | None = None
        self._opened_newest = False  # the newest run is opened once, when nothing is followed
        self._aside: set[str] = set()  # plots with no room to be read: "loss", "small", "pref-plots", "pref-more"
        self._preference = False  # the preference rows are shown (the followed run is DPO or ORPO)
        self._compared: TrainScreen.Compared | None = None  # the comparison drawn (two runs or more picked)
        self._fit_timer: Timer | None = None

    def compose_body(self) -> ComposeResult:
        with Vertical(classes="body", id="train-body"):
            yield Static(id="run-head", markup=False)
            with Horizontal(id="alarm-bar"):
                yield Static(id="alarm-text", markup=False)
                yield Button("Stop the run", id="alarm-stop", variant="error")
                yield Button("Keep going", id="alarm-keep")
            with Horizontal(id="train-main"):
                with VerticalScroll(id="train-side"):
                    yield Facts("run", status="no run followed: s starts one, or open one below", id="numbers")
                    yield Facts("machine", status="", id="system")
                with PlotsColumn(id="train-plots"):
                    yield RunPlot(id="loss-plot")
                    yield Static(id="compare")
                    # a preference run's rows go here (mounted when the first one is shown)
                    with Horizontal(id="small-plots"):
                        yield RunPlot(id="lr-plot")
                        yield RunPlot(id="grad-plot")
                    yield Static(id="plot-summary", markup=False)
                    yield Static(id="failure", markup=False)
            with Horizontal(id="train-bottom"):
                with Vertical(id="runs-box"):
                    yield Label("runs", id="runs-title", markup=False)
                    yield RunsList(id="runs")
                yield RichLog(id="event-log", max_lines=LOG_LINES, wrap=True, markup=False, min_width=20)

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
        self._draw_plots(None)

    def _draw_numbers(self, snap: Snapshot) -> None:
        style = STATUS_STYLE.get(snap.status, "")
        resumable = snap.status in RESUMABLE and bool(snap.last_checkpoint)
        keys = {STARTING: "x stop · A abort", RUNNING: "x stop · c checkpoint · A abort",
                STOPPING: "saving, then ending · A abort"}.get(
            snap.status, "R resumes it · s starts a new run" if resumable else "s starts a new run")
        method = snap.method.upper() if snap.preference_run else ""
        head = (snap.name, snap.status, keys, method)
        if head != self._head:  # the one-line header is re-laid only when it changes
            self._head = head
            self.query_one("#run-head", Static).update(Content.assemble(
                ("run ", "$text-muted"), (snap.name, "bold"), (f" {method}" if method else "", "$text-accent"), "  ",
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
        if snap.status in FAILED_ENDS:
            lines = [f"{snap.status}: {snap.reason}"]
            if snap.traceback:
                lines += ["last lines of the traceback (full in trainer.log and events.jsonl):",
                          *("  " + line for line in snap.traceback)]
            failure.update("\n".join(lines))
            failure.add_class("shown")
        else:
            failure.remove_class("shown")

    # -- the plots ----------------------------------------------------------------------------

    def _snapshot(self) -> Snapshot | None:
        return self._shown.snapshot() if self._shown is not None else None

    def _draw_plots(self, snap: Snapshot | None) -> None:
        loss = self.query_one("#loss-plot", RunPlot)
        lr, grad = self.query_one("#lr-plot", RunPlot), self.query_one("#grad-plot", RunPlot)
        if self._compared is not None:
            self._draw_compared(loss, snap)
        elif snap is None:
            draw(loss, "loss", [], empty="no run")
        else:
            legend = loss.canvas_rows >= LEGEND_ROWS
            draw(loss, "loss" if legend else "loss (smoothed in cyan, eval •)",
                 [(snap.loss, "train", "gray"), (snap.smooth, "smoothed", "cyan")],
                 empty="waiting for the first step", scatters=[(snap.eval_loss, "eval", "orange")])
        if snap is None:
            draw(lr, "learning rate", [], empty="no run")
            draw(grad, "grad norm", [], empty="no run")
        else:
            draw(lr, "learning rate", [(snap.lr, "lr", "green")], empty="waiting", legend=False)
            draw(grad, "grad norm", [(snap.grad_norm, "grad norm", "magenta")], empty="waiting", legend=False)
        preference = snap is not None and snap.preference_run
        if preference != self._preference:
            self._show_preference(preference)
        if snap is not None and preference:
            self._draw_preference(snap)
        self._summarize(snap)

    def _draw_preference(self, snap: Snapshot) -> None:
        """A preference run's plots: margin, accuracy (0..1), and the rewards and
        log-probs of the chosen answers (green) against the rejected ones (red); eval points orange.
        Nothing before the rows have mounted (their first size draws them)."""
        plots = {plot.id: plot for plot in self.query(".pref-row RunPlot").results(RunPlot)}
        if len(plots) < 4:
            return
        margin, accuracy, rewards, logps = (plots[name] for name in ("margin-plot", "accuracy-plot", "rewards-plot",
                                                                     "logps-plot"))
        evals = bool(snap.series("eval_reward_margin")[0] or snap.series("eval_reward_accuracy")[0])
        draw(margin, "reward margin" + (" (eval •)" if evals else ""),
             [(snap.series("reward_margin"), "margin", "cyan")], empty="waiting",
             scatters=[(snap.series("eval_reward_margin"), "eval", "orange")], legend=False)
        draw(accuracy, "accuracy" + (" (eval •)" if evals else ""),
             [(snap.series("reward_accuracy"), "accuracy", "green")], empty="waiting",
             scatters=[(snap.series("eval_reward_accuracy"), "eval", "orange")], legend=False, ylim=(0, 1))
        for plot, name, chosen, rejected in ((rewards, "rewards", "rewards_chosen", "rewards_rejected"),
                                             (logps, "log-probs", "logps_chosen", "logps_rejected")):
            legend = plot.canvas_rows >= LEGEND_ROWS
            draw(plot, pair_title(name, plot.size.width, legend),
                 [(snap.series(chosen), "chosen", "green"), (snap.series(rejected), "rejected", "red")],
                 empty="waiting")

    def _show_preference(self, shown: bool) -> None:
        """Show or hide the preference rows (the followed run is, or is no longer, DPO or ORPO)
        and fit the plots again. They are mounted the first time (an SFT run's screen never has them)."""
        self._preference = shown
        column = self.query_one("#train-plots")
        if shown and not column.query("#pref-plots"):
            column.mount(Horizontal(RunPlot(id="margin-plot"), RunPlot(id="accuracy-plot"), id="pref-plots",
                                    classes="pref-row"),
                         Horizontal(RunPlot(id="rewards-plot"), RunPlot(id="logps-plot"), id="pref-more",
                                    classes="pref-row"), before="#small-plots")
        column.set_class(shown, "preference")  # the loss shares its rows
        self._aside.clear()
        self._apply_aside()
        self._fit_soon()

    def _summarize(self, snap: Snapshot | None) -> None:
        """The one-line summaries of the plots that have no room."""
        summary = self.query_one("#plot-summary", Static)
        width = summary.content_region.width or self.query_one("#train-plots").size.width - 2
        lines = []
        if "loss" in self._aside:
            lines.append(self._compared_summary(snap, width) if self._compared is not None else
                         loss_summary(snap, width) if snap is not None else "loss: no run")
        if snap is not None and self._preference:
            if "pref-plots" in self._aside:
                lines.append(margin_accuracy_summary(snap, width))
            if "pref-more" in self._aside:
                lines.append(rewards_logps_summary(snap, width))
        if "small" in self._aside:
            lines.append(lr_grad_summary(snap, width) if snap is not None else "learning rate, grad norm: no run")
        summary.update("\n".join(lines))

    def _curves(self, snap: Snapshot | None) -> list[tuple[RunCurve, tuple[int, int, int]]]:
        """The compared runs' curves with their colours; the followed run's from its live view."""
        assert self._compared is not None
        runs = self.query_one("#runs", RunsList)
        out = []
        for curve in self._compared.curves:
            if snap is not None and self._shown is not None and curve.run_dir.resolve() == self._shown.run_dir.resolve():
                curve = RunCurve(curve.name, curve.run_dir, snap.smooth, snap.eval_loss)
            out.append((curve, runs.color_of(curve.run_dir) or (200, 200, 200)))
        return out

    def _draw_compared(self, plot: RunPlot, snap: Snapshot | None) -> None:
        curves = self._curves(snap)
        draw(plot, f"loss of {len(curves)} runs (smoothed; • eval)",
             [(curve.smooth, curve.name, color) for curve, color in curves], empty="no steps yet",
             scatters=[(curve.eval_loss, f"{curve.name} eval", color) for curve, color in curves], legend=False)

    def _compared_summary(self, snap: Snapshot | None, width: int) -> str:
        last = [(curve.name, number(curve.smooth[1][-1]) if curve.smooth[1] else "-") for curve, _ in self._curves(snap)]
        variants = [" · ".join(f"{middle(name, size)} {value}" for name, value in last) for size in (40, 16, 10, 6)]
        return fitted(["loss (smoothed): " + variants[0], *variants], width)

    @on(RunPlot.Resized)
    def _plot_resized(self, event: RunPlot.Resized) -> None:
        self._fit_soon()
        if event.plot.readable:
            self._draw_plots(self._snapshot())  # the legend goes where there are rows for it

    @on(PlotsColumn.Resized)
    def _column_resized(self) -> None:
        if self._compared is not None:
            self._show_compared()  # fitted to the new width, and refits
        else:
            self._refit()

    def _refit(self) -> None:
        """The room for the plots changed: try every plot again."""
        if self._aside:
            self._aside.clear()
            self._apply_aside()
        self._fit_soon()

    def _fit_soon(self) -> None:
        """Fit the plots once the layout has settled (sizes read before it may be stale)."""
        if self._fit_timer is not None:
            self._fit_timer.stop()
        self._fit_timer = self.set_timer(FIT_AFTER_S, self._fit_plots)

    def _groups(self) -> list[tuple[str, str]]:
        """The plots as (name in ``_aside``, selector), in the order they give way: the learning
        rate and grad norm, a preference run's rewards and log-probs then its margin and
        accuracy, the loss last."""
        groups = [("small", "#small-plots")]
        if self._preference:
            groups += [("pref-more", "#pref-more"), ("pref-plots", "#pref-plots")]
        return [*groups, ("loss", "#loss-plot")]

    def _fit_plots(self) -> None:
        """Put aside the plots that have no room to be read, in the order of :meth:`_groups`:
        the first group still shown goes when any plot shown is unreadable (those after it
        then have its rows too, and are tried again); each is replaced by a line of the summary."""
        self._fit_timer = None
        groups = [(name, selector) for name, selector in self._groups() if name not in self._aside]
        if not groups:
            return
        plots = []
        for _, selector in groups:
            widget = self.query_one(selector)
            plots += [widget] if isinstance(widget, RunPlot) else list(widget.query(RunPlot).results(RunPlot))
        if not all(plot.readable for plot in plots):
            self._aside.add(groups[0][0])
            self._apply_aside()
            if len(groups) > 1:
                self._fit_soon()

    def _apply_aside(self) -> None:
        self.query_one("#small-plots").display = "small" not in self._aside
        for row in self.query(".pref-row"):
            row.display = self._preference and row.id not in self._aside
        self.query_one("#loss-plot").display = "loss" not in self._aside
        self.query_one("#plot-summary").set_class(bool(self._aside), "shown")
        self._summarize(self._snapshot())

    # -- comparing runs -----------------------------------------------------------------------

    @on(RunsList.PicksChanged)
    def _picks_changed(self, event: RunsList.PicksChanged) -> None:
        if len(event.picks) == 1 and event.runs_list.has_focus:
            self.notify(f"{event.picks[0].name} marked: space on another run overlays their loss curves",
                        timeout=4)
        self._compare(event.picks)

    def _compare(self, picks: tuple[Path, ...]) -> None:
        if len(picks) >= 2:
            self._read_compared(picks)
        elif self._compared is not None:
            self._compared = None
            self._show_compared()

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False)
    def _read_compared(self, picks: tuple[Path, ...]) -> None:
        curves, settings, problems = [], [], []
        for run_dir in picks:
            curve = read_curve(run_dir)
            curves.append(curve)
            if curve.error:
                problems.append(f"{run_dir.name}: {curve.error}")
            values, why = read_settings(run_dir)
            if values is None:
                problems.append(f"{run_dir.name}: settings not compared ({why})")
            else:
                settings.append(values)
        diff = settings_diff(settings) if len(settings) == len(picks) else []
        self.post_message(self.Compared(picks, curves, diff, problems))

    @on(Compared)
    def _compared_read(self, event: Compared) -> None:
        if event.picks != self.query_one("#runs", RunsList).picks:
            return  # the picks changed meanwhile: a newer read is on its way
        self._compared = event
        self._show_compared()

    def _show_compared(self) -> None:
        panel = self.query_one("#compare", Static)
        compared = self._compared
        if compared is None:
            panel.remove_class("shown")
        else:
            column = self.query_one("#train-plots")
            width = max(20, column.size.width - 2)
            # the differences take what the loss plot can spare (it keeps MIN_HEIGHT rows)
            rows = max(1, min(DIFF_ROWS, column.size.height - MIN_HEIGHT - 3))
            runs = self.query_one("#runs", RunsList)
            lines = [legend_line([(curve.name, runs.color_of(curve.run_dir)) for curve in compared.curves], width)]
            lines += diff_lines(compared.diff, width, rows)
            if not compared.diff and not compared.problems:
                lines.append(Content.styled("the same settings (project.toml)", "$text-muted"))
            lines += [Content.styled(problem, "$text-error") for problem in compared.problems]
            panel.update(Content("\n").join(lines))
            panel.add_class("shown")
        self._refit()
        self._draw_plots(self._snapshot())

    # -- resuming -----------------------------------------------------------------------------

    def action_resume_run(self) -> None:
        runs = self.query_one("#runs", RunsList)
        option = runs.highlighted_option if runs.has_focus else None
        if option is not None and option.id is not None:
            run_dir = Path(option.id)
        elif self._shown is not None:
            run_dir = self._shown.run_dir
        else:
            self.notify("no run to resume: open one from the runs list first", severity="warning")
            return
        session = self.session
        if session.path is None:
            self.notify("save the project first: a run resumes with its settings", severity="warning")
            return
        if session.invalid:
            self.notify(f"fix the invalid settings first: {', '.join(session.invalid)}", severity="error")
            return
        if self.app.training:
            self.notify(f"{self.app.run_handle.name} is still running; stop it first", severity="warning")
            return
        project = session.project
        runs_dir = project.resolve_path(project["output.runs_dir"])
        self._resume(run_dir, runs_dir, str(session.path), tuple(session.overrides()))

    @work(thread=True, exclusive=True, group="resume", exit_on_error=False)
    def _resume(self, run_dir: Path, runs_dir: Path, project_path: str, overrides: tuple[str, ...]) -> None:
        """Check the run can be resumed (its events, off the UI thread), then resume it the
        way a run starts (:func:`tunedeck.tui.training.launch`) and follow it."""
        info = run_info(run_dir)
        why = resume_refusal(info)
        if why is None and run_dir.resolve().parent != runs_dir.resolve():
            why = (f"{info.name} is not in this project's runs folder; resume it with "
                   f"`tunedeck train PROJECT --resume --run-name {info.name}`")
        if why is not None:
            self.app.notify(why, title="Resume", severity="warning")
            return
        self.app.notify(f"checking the project and resuming {info.name} from checkpoint-{info.checkpoints[-1]}…",
                        title="Training")
        handle = launch(self.app.engine, project_path, overrides, run_name=info.name, resume=True)
        self.app.post_message(self.app.RunFollowed(handle, RunView(handle.name, handle.run_dir), started_here=True))

    # -- the alarm ----------------------------------------------------------------------------

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
        self._compared, self._aside = None, set()
        self._preference = False  # the new widgets have no preference rows

    def project_shown(self) -> None:
        self._list_runs()

    def action_reload_runs(self) -> None:
        self._list_runs()
        self.query_one("#runs", RunsList).focus()

    def _runs_title(self) -> str:
        return f"runs in {self.session.project['output.runs_dir']}/"

    def _list_runs(self) -> None:
        project = self.session.project
        self._list(project.resolve_path(project["output.runs_dir"]))

    @work(thread=True, exclusive=True, group="runs", exit_on_error=False)
    def _list(self, runs_dir: Path) -> None:
        self.post_message(self.Listed(list_runs(runs_dir)))

    @on(Listed)
    def _listed(self, event: Listed) -> None:
        runs_list = self.query_one("#runs", RunsList)
        followed = self._shown.run_dir if self._shown is not None else None
        runs = list(reversed(event.runs))  # newest first
        runs_list.show_runs(runs, followed, self._runs_title())
        if runs and self.app.run_view is None and not self._opened_newest:  # show something: a live run first
            self._opened_newest = True
            live = [info for info in runs if info.status == RUNNING]
            self.app.open_run((live or runs)[0].path)
        if self._compared is not None:  # their curves may have grown
            self._compare(runs_list.picks)

    @on(RunsList.Laid)
    def _runs_laid(self, event: RunsList.Laid) -> None:
        self.query_one("#runs-title", Label).update(event.header)

    @on(OptionList.OptionSelected, "#runs")
    def _open(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None:
            self.app.open_run(event.option.id)

    @on(RunsList.ExportAsked)
    def _export_asked(self, event: RunsList.ExportAsked) -> None:
        self.app.export_dialog(event.run)

    def work_failed(self, worker: Worker[Any], message: str) -> None:
        if worker.group == "runs":
            self.query_one("#runs", RunsList).show_message(Content.styled(message, "$text-error"),
                                                           self._runs_title())
        else:
            super().work_failed(worker, message)
