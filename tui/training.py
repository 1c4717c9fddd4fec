"""A run as the app follows it: everything the Train screen shows, folded from the run's
events (:mod:`tunedeck.core.events`) by a worker thread and read by the UI thread.

Memory stays bounded however long a run goes and however fast it reports: each plotted
series keeps at most ``2 * POINTS`` points (every other point is dropped when it fills,
and from then on every second point is kept: an even thinning over the whole run), the
event log keeps its last ``LOG_LINES`` lines. Light: no torch here.

A preference run (DPO, ORPO: ``training.method`` in its ``run_started`` event) also keeps
the series of its step events' preference fields (rewards, margin, accuracy and log-probs
of the chosen and rejected answers) and of its eval events' ``eval_`` ones; an SFT run's
events have none of them.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunedeck.core.errors import UserError, os_reason
from tunedeck.core.events import (
    ALARM, CHECKPOINT, CONTROL, EVAL, EVENTS_FILE, FAILED, FINISHED, RUN_STARTED, STEP, SYSTEM, WARNING, finite_number,
    read_events,
)
from tunedeck.core.memory import estimate_vs_peak
from tunedeck.core.runs import (
    ENDED, FINISHED_STATUS, LIVE, SNAPSHOT, STARTING, STOPPED, UNKNOWN, RunInfo, RunState, final_status,
)
from tunedeck.core.units import GIB, format_bytes, format_in

from .session import display_path

if TYPE_CHECKING:
    from tunedeck.core.engine import EngineCalls

POINTS = 600  # per plotted series, before thinning
LOG_LINES = 400
SMOOTHING = 0.9  # exponential moving average of the training loss
TRACEBACK_LINES = 8
PREFERENCE_METHODS = ("dpo", "orpo")
# a preference run's step fields kept as series (and their eval_ twins)
PREFERENCE_SERIES = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                     "logps_rejected")
EVAL_PREFERENCE_SERIES = tuple(f"eval_{key}" for key in PREFERENCE_SERIES)
# an eval's line in the event log: a preference run's accuracy and margin by short names, its
# rewards and log-probs left to the plots
EVAL_NAMES = {"eval_reward_accuracy": "accuracy", "eval_reward_margin": "margin"}
EVAL_PLOTTED = frozenset(EVAL_PREFERENCE_SERIES) - set(EVAL_NAMES)


class Series:
    """(step, value) points, thinned evenly to stay under ``2 * cap``; the latest value kept apart."""

    __slots__ = ("xs", "ys", "stride", "seen", "cap", "last", "first", "low", "high")

    def __init__(self, cap: int = POINTS) -> None:
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.stride = 1
        self.seen = 0
        self.cap = cap
        self.last: float | None = None
        self.first: float | None = None
        self.low: float | None = None  # the extremes seen (thinning may drop them from the points)
        self.high: float | None = None

    def add(self, x: float, y: float) -> None:
        self.last = y
        if self.first is None:
            self.first = y
        if self.low is None or y < self.low:
            self.low = y
        if self.high is None or y > self.high:
            self.high = y
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        self.xs.append(x)
        self.ys.append(y)
        if len(self.xs) >= 2 * self.cap:
            del self.xs[1::2], self.ys[1::2]
            self.stride *= 2

    def points(self) -> tuple[list[float], list[float]]:
        return list(self.xs), list(self.ys)

    def stats(self) -> Stats:
        return Stats(self.first, self.low, self.high, self.last)


@dataclass(frozen=True)
class Stats:
    """A series in four numbers (None before its first point)."""

    first: float | None = None
    low: float | None = None
    high: float | None = None
    last: float | None = None


@dataclass(frozen=True)
class LogLine:
    time: float
    step: int
    kind: str  # warning | checkpoint | eval | alarm | started | finished | failed | control
    text: str


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of a :class:`RunView` for drawing (taken under its lock)."""

    name: str
    run_dir: Path
    status: str
    revision: int
    numbers: list[tuple[str, str]]
    system: list[tuple[str, str]]
    loss: tuple[list[float], list[float]]
    smooth: tuple[list[float], list[float]]
    eval_loss: tuple[list[float], list[float]]
    lr: tuple[list[float], list[float]]
    grad_norm: tuple[list[float], list[float]]
    log: list[LogLine]
    log_total: int
    alarm_count: int = 0
    last_alarm: dict[str, Any] | None = None
    reason: str = ""
    traceback: list[str] = field(default_factory=list)
    stats: dict[str, Stats] = field(default_factory=dict)  # loss, smooth, eval_loss, lr, grad_norm
    scheduler: str = ""  # training.lr_scheduler, from the run's run_started event
    last_checkpoint: str = ""  # "step N", or "" before the first
    method: str = "sft"  # training.method, from the run's run_started event
    # a preference run's series by field (PREFERENCE_SERIES, EVAL_PREFERENCE_SERIES), those with points;
    # their Stats in ``stats`` under the same names
    preference: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)

    @property
    def preference_run(self) -> bool:
        """A DPO or ORPO run: its method says so, or its steps carry preference fields."""
        return self.method in PREFERENCE_METHODS or bool(self.preference)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """A preference series' points (none where the run has not reported it)."""
        return self.preference.get(key, ([], []))


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


STATUS_LABELS = {STOPPED: "stopped early"}


def status_label(status: str, host: str = "") -> str:
    """A status as the dashboard says it ("unknown (on HOST)" for a run on another host)."""
    if status == UNKNOWN:
        return f"unknown (on {host})" if host else "unknown (another host)"
    return STATUS_LABELS.get(status, status)


SYSTEM_NUMBERS = ("gpu_memory_used", "gpu_memory_total", "gpu_utilization", "gpu_temperature", "gpu_memory_others",
                  "torch_peak_memory", "torch_reserved", "torch_allocated", "rss", "ram_used", "ram_total",
                  "cpu_percent", "index")


def _clean_system(ev: dict[str, Any]) -> dict[str, Any]:
    """A system event's readings, each a finite number or None (an events file can say anything)."""
    out: dict[str, Any] = {k: _positive(ev.get(k)) for k in SYSTEM_NUMBERS}
    gpus = ev.get("gpus") if isinstance(ev.get("gpus"), list) else []
    out["gpus"] = [{**{k: _positive(g.get(k)) for k in SYSTEM_NUMBERS}, "label": str(g.get("label") or "")}
                   for g in gpus if isinstance(g, dict)]
    return out


def _positive(value: Any) -> float | None:
    v = finite_number(value)
    return v if v is not None and v >= 0 else None


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def gib(n: Any) -> str:
    """The machine panel's memory figures: "3.2 GiB", "-" when not measured."""
    return format_bytes(n, smallest="GiB", missing="-")


class RunView:
    """Everything the dashboard shows of one run. ``fold`` runs on the follower thread,
    ``snapshot`` on the UI thread; ``revision`` says whether anything changed since.

    The step and the numbers of the run list come from :class:`tunedeck.core.runs.RunState`,
    the fold every view uses; the status is the follower's (the same fold, with the
    trainer's liveness). The ETA is recomputed at each snapshot from the measured time per
    step, so it counts down between steps."""

    def __init__(self, name: str, run_dir: Path, status: str = STARTING) -> None:
        self.name = name
        self.run_dir = Path(run_dir)
        self.status = status
        self.revision = 0
        self._lock = threading.Lock()
        self.state = RunState()
        self.epoch: float | None = None
        self.tokens_per_s: float | None = None
        self.eta_s: float | None = None  # the trainer's, at its last step event
        self.started: float | None = None
        self.last_time: float | None = None
        self._pace: tuple[float, int] | None = None  # (time, step) of this session's first step event
        self._last_step: tuple[float, int] | None = None  # (time, step) of the latest step event
        self.last_checkpoint: str = ""
        self.stopped = False
        self.reason = ""
        self.traceback: list[str] = []
        self.system: dict[str, Any] = {}
        self.loss_value: float | None = None
        self.loss = Series()
        self.smooth = Series()
        self.eval_loss = Series()
        self.lr = Series()
        self.grad_norm = Series()
        self._ema: float | None = None
        self._ema_n = 0
        self.log: deque[LogLine] = deque(maxlen=LOG_LINES)
        self.log_total = 0  # lines ever added (the deque keeps the last LOG_LINES)
        self.events_seen = 0
        self.alarm_count = 0
        self.last_alarm: dict[str, Any] | None = None
        self.scheduler = ""
        self.method = "sft"
        self.preference = {key: Series() for key in (*PREFERENCE_SERIES, *EVAL_PREFERENCE_SERIES)}

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def max_steps(self) -> int | None:
        return self.state.max_steps

    def fold(self, events: list[dict[str, Any]], status: str | None = None) -> list[dict[str, Any]]:
        """Take a batch of events (and the run's status after them); returns the alarms among them."""
        alarms: list[dict[str, Any]] = []
        with self._lock:
            for ev in events:
                alarm = self._take(ev)
                if alarm is not None:
                    alarms.append(alarm)
            changed = status is not None and status != self.status
            if changed:
                self.status = status
            if events or changed:
                self.revision += 1
        return alarms

    def _note(self, ev: dict[str, Any], kind: str, text: str) -> None:
        self.log_total += 1
        step = ev.get("step") if isinstance(ev.get("step"), int) else 0
        self.log.append(LogLine(_float(ev.get("time")) or time.time(), step, kind, text))

    def _take(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        self.events_seen += 1
        self.state.take(ev)
        kind = ev.get("type")
        step = ev["step"] if isinstance(ev.get("step"), int) else 0
        t = _float(ev.get("time"))
        if t is not None:
            self.last_time = t
        if kind == STEP:
            if t is not None:
                if self._pace is None:
                    self._pace = (t, step)
                self._last_step = (t, step)
            loss = _float(ev.get("loss"))
            # a step with a null loss: the trainer's NaN/inf (JSON has neither)
            self.loss_value = math.nan if loss is None and "loss" in ev else loss
            if loss is not None and math.isfinite(loss):
                self.loss.add(step, loss)
                # an exponential moving average from zero, debiased (as TensorBoard smooths): the
                # first points are not pulled towards zero or towards the first loss
                self._ema_n += 1
                self._ema = SMOOTHING * (self._ema or 0.0) + (1 - SMOOTHING) * loss
                self.smooth.add(step, self._ema / (1 - SMOOTHING ** min(self._ema_n, 1000)))
            for series, key in ((self.lr, "learning_rate"), (self.grad_norm, "grad_norm")):
                value = finite_number(ev.get(key))
                if value is not None:
                    series.add(step, value)
            self._take_preference(step, ev, PREFERENCE_SERIES)
            for attr in ("epoch", "tokens_per_s", "eta_s"):
                value = _float(ev.get(attr))
                if value is not None:
                    setattr(self, attr, value)
        elif kind == SYSTEM:
            self.system = _clean_system(ev)
        elif kind == EVAL:
            value = finite_number(ev.get("eval_loss"))
            if value is not None:
                self.eval_loss.add(step, value)
            self._take_preference(step, ev, EVAL_PREFERENCE_SERIES)
            shown = ", ".join(f"{EVAL_NAMES.get(k, k[5:])} {v:.4g}" for k, v in ev.items()
                              if k.startswith("eval_") and isinstance(v, (int, float)) and k != "eval_runtime"
                              and not k.endswith("per_second") and k not in EVAL_PLOTTED)
            self._note(ev, "eval", f"eval: {shown}" if shown else "eval")
        elif kind == CHECKPOINT:
            self.last_checkpoint = f"step {step}"
            self._note(ev, "checkpoint", f"checkpoint saved: {display_path(Path(str(ev.get('path', ''))))}")
        elif kind == WARNING:
            self._note(ev, "warning", str(ev.get("message", "")))
        elif kind == ALARM:
            self.alarm_count += 1
            self.last_alarm = dict(ev)
            self._note(ev, "alarm", str(ev.get("message", "")))
            return ev
        elif kind == CONTROL:
            self._note(ev, "control", str(ev.get("message", "")))
        elif kind == RUN_STARTED:
            self._pace = self._last_step = None
            if self.started is None or ev.get("resumed_from"):
                self.started = t  # a resumed run's elapsed time counts from the resume
            self.reason, self.traceback, self.stopped = "", [], False
            config = ev.get("config")
            training = config.get("training") if isinstance(config, dict) else None
            if isinstance(training, dict) and isinstance(training.get("lr_scheduler"), str):
                self.scheduler = training["lr_scheduler"]
            if isinstance(training, dict) and isinstance(training.get("method"), str) and training["method"]:
                self.method = training["method"].lower()
            resumed = ev.get("resumed_from")
            self._note(ev, "started", f"started at step {step}" + (
                f", resumed from {display_path(Path(str(resumed.get('checkpoint'))))}"
                if isinstance(resumed, dict) else ""))
        elif kind == FINISHED:
            self.stopped = bool(ev.get("stopped"))
            final = _float(ev.get("final_loss"))
            self._note(ev, "finished", "finished" + (" (stopped early)" if self.stopped else "")
                       + (f", final loss {final:.4f}" if final is not None else "")
                       + (f"; adapter in {display_path(Path(str(ev['adapter'])))}" if ev.get("adapter") else ""))
        elif kind == FAILED:
            self.reason = str(ev.get("reason") or "")
            tb = ev.get("traceback")
            self.traceback = str(tb).rstrip().splitlines()[-TRACEBACK_LINES:] if tb else []
            self._note(ev, "failed", f"{final_status(ev)}: {self.reason}")
        return None

    def _take_preference(self, step: int, ev: dict[str, Any], keys: tuple[str, ...]) -> None:
        for key in keys:
            value = finite_number(ev.get(key))
            if value is not None:
                self.preference[key].add(step, value)

    def note(self, kind: str, text: str) -> None:
        """A line in the event log from the app itself (a control sent)."""
        with self._lock:
            self.log_total += 1
            self.log.append(LogLine(time.time(), self.step, kind, text))
            self.revision += 1

    # -- what the dashboard draws -----------------------------------------------------------

    def snapshot(self, now: float | None = None) -> Snapshot:
        with self._lock:
            return Snapshot(
                name=self.name, run_dir=self.run_dir, status=self.status, revision=self.revision,
                numbers=self._numbers(time.time() if now is None else now), system=self._system(),
                loss=self.loss.points(), smooth=self.smooth.points(), eval_loss=self.eval_loss.points(),
                lr=self.lr.points(), grad_norm=self.grad_norm.points(), log=list(self.log), log_total=self.log_total,
                alarm_count=self.alarm_count, last_alarm=self.last_alarm,
                reason=self.reason, traceback=list(self.traceback),
                stats={**{name: getattr(self, name).stats()
                          for name in ("loss", "smooth", "eval_loss", "lr", "grad_norm")},
                       **{key: series.stats() for key, series in self.preference.items() if series.seen}},
                scheduler=self.scheduler, last_checkpoint=self.last_checkpoint, method=self.method,
                preference={key: series.points() for key, series in self.preference.items() if series.seen},
            )

    def _eta(self, now: float) -> float | None:
        """Seconds left: the steps to go at the measured time per step, less the time since
        the last step (so it counts down between steps); the trainer's own until a second
        step has been timed."""
        if self.max_steps is None or self._last_step is None:
            return self.eta_s
        t_last, step = self._last_step
        left = max(0, self.max_steps - step)
        per_step = None
        if self._pace is not None and step > self._pace[1]:
            per_step = (t_last - self._pace[0]) / (step - self._pace[1])
        if per_step is None:
            if self.eta_s is None:
                return None
            return max(0.0, self.eta_s - max(0.0, now - t_last))
        return max(0.0, left * per_step - max(0.0, now - t_last))

    def _numbers(self, now: float) -> list[tuple[str, str]]:
        live = self.status in LIVE
        end = now if live else (self.last_time or now)
        elapsed = end - self.started if self.started is not None else None
        steps = f"{self.step} / {self.max_steps}" if self.max_steps else str(self.step)
        if self.max_steps:
            steps += f"  ({100 * self.step / self.max_steps:.0f}%)"
        rows = [
            ("status", status_label(self.status)),
            ("step", steps),
            ("epoch", "-" if self.epoch is None else f"{self.epoch:.2f}"),
            ("loss", "-" if self.loss_value is None else ("NaN/inf" if not math.isfinite(self.loss_value)
                                                           else f"{self.loss_value:.4f}")),
            ("eval loss", "-" if self.eval_loss.last is None else f"{self.eval_loss.last:.4f}"),
            *self._preference_numbers(),
            ("learning rate", "-" if self.lr.last is None else f"{self.lr.last:.3g}"),
            ("grad norm", "-" if self.grad_norm.last is None else f"{self.grad_norm.last:.3g}"),
            ("tokens/s", "-" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}"),
            ("elapsed", duration(elapsed)),
            ("ETA", duration(self._eta(now)) if live else "-"),
            ("last checkpoint", self.last_checkpoint or "none yet"),
            ("folder", display_path(self.run_dir)),
        ]
        return rows

    def _preference_numbers(self) -> list[tuple[str, str]]:
        """A preference run's latest accuracy and margin (with the eval's); none for an SFT run."""
        pref = self.preference
        if self.method not in PREFERENCE_METHODS and not any(series.seen for series in pref.values()):
            return []

        def shown(key: str, form: str) -> str:
            value, ev = pref[key].last, pref[f"eval_{key}"].last
            if value is None:
                return "-" if ev is None else f"- (eval {ev:{form}})"
            return f"{value:{form}}" + (f" (eval {ev:{form}})" if ev is not None else "")

        return [("accuracy", shown("reward_accuracy", ".2f")), ("margin", shown("reward_margin", ".2f"))]

    def _system(self) -> list[tuple[str, str]]:
        rows = self._readings()
        # the estimate the run recorded next to the peak it measured: how far to trust the next one
        total = (self.state.memory_estimate or {}).get("total")
        memory = estimate_vs_peak(total if isinstance(total, int) else None, self.state.memory_peak)
        if memory:
            rows.append(("memory", memory))
        return rows

    def _readings(self) -> list[tuple[str, str]]:
        s = self.system
        if self.ended:  # no live readings once the trainer is gone: what it measured, and that it ended
            rows = [("trainer", "ended: no live readings")]
            if s.get("torch_peak_memory"):
                rows.append(("torch peak", gib(s.get("torch_peak_memory"))))
            if s.get("rss"):
                rows.append(("last trainer RSS", gib(s.get("rss"))))
            return rows
        if not s:
            return [("device", "waiting for the trainer's first report")]
        rows: list[tuple[str, str]] = []
        gpus = [g for g in s.get("gpus") or [] if isinstance(g, dict) and g.get("gpu_memory_total")]
        if len(gpus) > 1:  # one line per device; the trainer's own details below
            for g in gpus:
                used, total = g.get("gpu_memory_used") or 0, g["gpu_memory_total"]
                extra = "".join(f" {v:.0f}{unit}" for v, unit in ((g.get("gpu_utilization"), "%"),
                                                                   (g.get("gpu_temperature"), "°C")) if v is not None)
                index = g.get("index")
                rows.append((g["label"] or f"GPU {int(index) if index is not None else '?'}",
                             f"{used / GIB:.1f}/{format_in(total, 'GiB', '.0f')}{extra}"))
        if s.get("gpu_memory_total"):
            used, total = s.get("gpu_memory_used") or 0, s["gpu_memory_total"]
            rows.append(("GPU memory", f"{gib(used)} / {gib(total)} ({100 * used / total:.0f}%)"))
            if s.get("gpu_memory_others") is not None:
                rows.append(("other processes", gib(s["gpu_memory_others"])))
            if s.get("gpu_utilization") is not None:
                rows.append(("GPU busy", f"{s['gpu_utilization']:.0f}%"))
            if s.get("gpu_temperature") is not None:
                rows.append(("temperature", f"{s['gpu_temperature']:.0f} °C"))
            rows.append(("torch peak", gib(s.get("torch_peak_memory"))))
        else:
            rows.append(("device", "CPU (this run uses no GPU)"))
            if s.get("cpu_percent") is not None:
                rows.append(("CPU busy", f"{s['cpu_percent']:.0f}%"))
        if s.get("ram_total"):
            rows.append(("RAM", f"{gib(s.get('ram_used'))} / {gib(s['ram_total'])}"))
        rows.append(("trainer RSS", gib(s.get("rss"))))
        return rows


# -- what a plot with no room says in one line ------------------------------------------------


def number(value: float | None) -> str:
    """A reading in a few characters: 0.557, 12.4, 2.0e-4."""
    if value is None or not math.isfinite(value):
        return "-"
    if value != 0 and (abs(value) < 0.01 or abs(value) >= 1e5):
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.3g}"


def fitted(variants: list[str], width: int | None) -> str:
    """The first of ``variants`` (longest first) that fits in ``width`` cells, else the last."""
    for text in variants:
        if width is None or len(text) <= width:
            return text
    return variants[-1]


def lr_grad_summary(snap: Snapshot, width: int | None = None) -> str:
    """The learning rate and grad norm plots in one line of at most ``width`` cells:
    "lr 2.0e-4 → 1.1e-4 (cosine) · grad norm 0.84 (max 3.1)"."""
    lr, grad = snap.stats.get("lr", Stats()), snap.stats.get("grad_norm", Stats())
    if lr.last is None and grad.last is None:
        return fitted(["learning rate, grad norm: waiting for the first step", "lr, grad norm: waiting"], width)
    start = number(lr.high if lr.high is not None else lr.first)
    lr_long = lr_short = ""
    if lr.last is not None:
        lr_short = f"lr {start}→{number(lr.last)}"
        lr_long = f"lr {start} → {number(lr.last)}" + (f" ({snap.scheduler})" if snap.scheduler else "")
    grad_long = grad_short = ""
    if grad.last is not None:
        grad_long = f"grad norm {number(grad.last)} (max {number(grad.high)})"
        grad_short = f"grad {number(grad.last)} (max {number(grad.high)})"

    def join(*parts: str) -> str:
        return " · ".join(part for part in parts if part)

    return fitted([join(lr_long, grad_long), join(lr_short, grad_long), join(lr_short, grad_short)], width)


def loss_summary(snap: Snapshot, width: int | None = None) -> str:
    """The loss plot in one line of at most ``width`` cells:
    "loss 0.557 · smoothed 0.61 (low 0.52) · eval 0.798 (low 0.79)"."""
    loss, smooth, ev = (snap.stats.get(k, Stats()) for k in ("loss", "smooth", "eval_loss"))
    if loss.last is None:
        return "loss: waiting for the first step"
    evals = ev.last is not None
    return fitted([
        f"loss {number(loss.last)} · smoothed {number(smooth.last)} (low {number(smooth.low)})"
        + (f" · eval {number(ev.last)} (low {number(ev.low)})" if evals else ""),
        f"loss {number(loss.last)} · smoothed {number(smooth.last)}" + (f" · eval {number(ev.last)}" if evals else ""),
        f"loss {number(smooth.last)}" + (f" · eval {number(ev.last)}" if evals else ""),
    ], width)


def margin_accuracy_summary(snap: Snapshot, width: int | None = None) -> str:
    """A preference run's margin and accuracy plots in one line of at most ``width`` cells:
    "accuracy 0.88 (eval 0.85) · margin 2.91 (max 3.1, eval 2.7)"."""
    acc, margin, eval_acc, eval_margin = (snap.stats.get(key, Stats()) for key in (
        "reward_accuracy", "reward_margin", "eval_reward_accuracy", "eval_reward_margin"))
    if acc.last is None and margin.last is None:
        return fitted(["preference accuracy, reward margin: waiting for the first step", "accuracy, margin: waiting"],
                      width)
    acc_text = "-" if acc.last is None else f"{acc.last:.2f}"
    margin_text = number(margin.last)
    acc_eval = f" (eval {eval_acc.last:.2f})" if eval_acc.last is not None else ""
    margin_extra = ", ".join(part for part in (f"max {number(margin.high)}" if margin.high is not None else "",
                                               f"eval {number(eval_margin.last)}" if eval_margin.last is not None
                                               else "") if part)
    return fitted([
        f"accuracy {acc_text}{acc_eval} · margin {margin_text}" + (f" ({margin_extra})" if margin_extra else ""),
        f"accuracy {acc_text}{acc_eval} · margin {margin_text}",
        f"accuracy {acc_text} · margin {margin_text}",
        f"acc {acc_text} · margin {margin_text}",
    ], width)


def rewards_logps_summary(snap: Snapshot, width: int | None = None) -> str:
    """A preference run's rewards and log-prob plots (chosen against rejected) in one line of
    at most ``width`` cells: "rewards chosen 0.82, rejected -2.1 · logp chosen -152 (from -150), rejected -210"."""
    stats = snap.stats
    rc, rr, lc, lr = (stats.get(key, Stats()) for key in ("rewards_chosen", "rewards_rejected", "logps_chosen",
                                                           "logps_rejected"))
    if rc.last is None and lc.last is None:
        return fitted(["rewards, log-probs (chosen, rejected): waiting for the first step",
                       "rewards, log-probs: waiting"], width)

    def pair(label: str, chosen: Stats, rejected: Stats, trend: bool) -> tuple[str, str]:
        if chosen.last is None and rejected.last is None:
            return "", ""
        start = f" (from {number(chosen.first)})" if trend and chosen.first is not None else ""
        return (f"{label} chosen {number(chosen.last)}{start}, rejected {number(rejected.last)}",
                f"{label} {number(chosen.last)}/{number(rejected.last)}")

    rewards_long, rewards_short = pair("rewards", rc, rr, False)
    logps_long, logps_short = pair("logp", lc, lr, True)
    logps_mid = pair("logp", lc, lr, False)[0]

    def join(*parts: str) -> str:
        return " · ".join(part for part in parts if part)

    return fitted([join(rewards_long, logps_long), join(rewards_long, logps_mid), join(rewards_short, logps_long),
                   "chosen/rejected: " + join(rewards_short, logps_short), join(rewards_short, logps_short)], width)


# -- comparing runs: their loss curves and their settings ---------------------------------------


@dataclass(frozen=True)
class RunCurve:
    """One run's loss, read from its events.jsonl for the comparison plot."""

    name: str
    run_dir: Path
    smooth: tuple[list[float], list[float]] = ([], [])
    eval_loss: tuple[list[float], list[float]] = ([], [])
    error: str = ""  # why the events could not be read (one line)


def read_curve(run_dir: str | Path) -> RunCurve:
    """A run's smoothed training loss and eval loss, folded as the dashboard folds a run
    (a slow read for a long run: call it from a worker)."""
    run_dir = Path(run_dir)
    path = run_dir / EVENTS_FILE
    if not path.is_file():  # a pipe would block, a folder is not a file
        return RunCurve(run_dir.name, run_dir, error=f"{display_path(path)}: not a readable events file")
    view = RunView(run_dir.name, run_dir, status="")
    try:
        view.fold(read_events(path))
    except OSError as exc:
        return RunCurve(run_dir.name, run_dir, error=f"{display_path(path)}: {os_reason(exc)}")
    snap = view.snapshot()
    return RunCurve(run_dir.name, run_dir, snap.smooth, snap.eval_loss)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: {"lora": {"r": 16}} -> {"lora.r": 16}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:  # a section (a mapping value in it stays whole)
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def read_settings(run_dir: str | Path) -> tuple[dict[str, Any] | None, str]:
    """A run's settings as trained (its project.toml snapshot, defaults filled in) as dotted
    keys; or None and why they could not be read (one line)."""
    from tunedeck.core.project import Project

    try:
        return flatten(Project.load(Path(run_dir) / SNAPSHOT).as_dict()), ""
    except UserError as exc:
        return None, exc.message


_ABSENT = object()


def settings_diff(settings: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The keys whose values differ between runs, each with its value per run as TOML
    writes it ("-" where a run has no such key), in the order the keys come."""
    from tunedeck.core.schema import toml_repr

    keys: dict[str, None] = {}
    for values in settings:
        keys.update(dict.fromkeys(values))
    out = []
    for key in keys:
        values = [run.get(key, _ABSENT) for run in settings]
        shown = ["-" if v is _ABSENT else toml_repr(v) for v in values]
        if len(set(shown)) > 1:
            out.append((key, shown))
    return out


# -- resuming a run ----------------------------------------------------------------------------


def resume_refusal(info: RunInfo) -> str | None:
    """Why a run cannot be resumed (one line), or None when it can: it has ended without
    finishing and has a checkpoint."""
    if info.status in LIVE:
        return f"{info.name} is {status_label(info.status)}: there is nothing to resume (x stops it)"
    if info.status == UNKNOWN:
        return f"{info.name} is {status_label(info.status, info.host)}: it cannot be resumed from here"
    if info.status == FINISHED_STATUS:
        return f"{info.name} has finished: there is nothing to resume; s starts a new run"
    if not info.checkpoints:
        return f"{info.name} has no checkpoint to resume from (it ended before its first save); s starts a new run"
    return None


def launch(engine: EngineCalls, project_path: str, overrides: tuple[str, ...] = (), run_name: str | None = None,
           resume: bool = False) -> Any:
    """Start a run as ``tunedeck train`` does (``resume``: continue ``run_name`` from its
    latest checkpoint, in its folder): the pre-flight in the engine process (the target
    check needs torch), then the run folder and the trainer. A refusal is a UserError and
    creates nothing. Returns the launcher's RunHandle. Blocks: call it from a worker."""
    from tunedeck.core import launcher

    found = engine.preflight(project_path, overrides)
    if found.get("device") == "cuda":
        engine.release()  # the chat model's GPU memory goes to the run
    try:
        options: dict[str, Any] = {"run_name": run_name} if run_name is not None else {}
        if resume:
            options["resume"] = True
        return launcher.start_run(project_path, overrides, deep=False, **options)
    except UserError as exc:
        message = exc.message.removeprefix("--resume: ") if resume else exc.message
        raise UserError(message) from None
