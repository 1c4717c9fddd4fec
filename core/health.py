"""Health alarms of a training run: pure checks over the numbers the trainer reports.

The trainer feeds every step, eval and system event to a :class:`Health` monitor and
writes what it raises as ``alarm`` events to events.jsonl, so a run started with
``--detach`` gets the same alarms as one watched in the app. Each alarm carries a
``kind``, a one-line ``message`` and the ``action`` it suggests (``stop`` or ``keep going``).
An alarm of one kind is raised once per run, except the NaN/inf loss alarm, raised on
each bad loss. No torch here.

A preference run (DPO, ORPO) reports its rewards, margin, accuracy and log-probs with each
step (``reward_accuracy``, ``reward_margin``, ``logps_chosen``, ...); three more checks read
them: an accuracy stuck at chance, a margin exploding, the chosen answers' log-prob falling.
An SFT run's steps have none of these fields and raise none of them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from .events import finite_number

NAN_LOSS, LOSS_ZERO, GRAD_SPIKE, EVAL_RISING, SLOWDOWN, GPU_MEMORY = (
    "nan_loss", "loss_near_zero", "grad_norm_spike", "eval_loss_rising", "throughput_collapse", "gpu_memory_full")

LOSS_ZERO_BELOW = 0.01  # a training loss under this ...
EARLY_FRACTION = 0.2  # ... in the first fifth of the run is suspicious (data leak, masking everything but a token)
GRAD_SPIKE_FACTOR = 10.0  # grad norm over this many times the median of the recent ones
GRAD_WINDOW = 20
GRAD_MIN_HISTORY = 5
EVAL_RISES = 3  # eval loss higher than the previous one this many evals in a row
SLOWDOWN_FRACTION = 0.3  # tokens/s below this fraction of the median of the recent rates
RATE_WINDOW = 20
RATE_MIN_HISTORY = 5
GPU_MEMORY_FULL = 0.95  # used / total on the trainer's GPU

ACCURACY_STUCK, MARGIN_EXPLODING, CHOSEN_FALLING = (
    "reward_accuracy_stuck", "reward_margin_exploding", "chosen_logps_falling")

PREFERENCE_WINDOW = 10  # logged steps the preference checks average or fit over
PREFERENCE_MIN_FRACTION = 0.2  # the accuracy and log-prob checks wait for this share of max_steps ...
PREFERENCE_MIN_STEPS = 10  # ... and this many logged steps
CHANCE_ACCURACY = 0.5  # reward accuracy of a model that cannot tell chosen from rejected
CHANCE_BAND = 0.05  # a mean accuracy within CHANCE_ACCURACY +- this is chance
MARGIN_NEAR_ZERO = 0.1  # a mean reward margin under this (in size): no preference learnt
MARGIN_HIGH = 25.0  # a reward margin over this: over-optimisation
MARGIN_FAST_ABOVE = 10.0  # a margin over this ...
MARGIN_FAST_FACTOR = 4.0  # ... and this many times the one PREFERENCE_WINDOW logged steps before: growing too fast
CHOSEN_DROP_FRACTION = 0.1  # the chosen log-prob down by this share of its first values ...
CHOSEN_DROP_MIN = 0.1  # ... and by at least this many nats


@dataclass(frozen=True)
class Alarm:
    kind: str
    message: str
    action: str  # "stop" | "keep going"

    def fields(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "action": self.action}


def _median(values: Any) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def check_loss(step: int, loss: float | None, max_steps: int | None) -> Alarm | None:
    """NaN/inf loss, or a loss near zero early in the run."""
    if loss is None or not math.isfinite(loss):
        return Alarm(NAN_LOSS, f"the loss is {loss if loss is not None else 'NaN'} at step {step}: training has "
                     "diverged (lower the learning rate, or check the data)", "stop")
    if max_steps and step <= max(1, int(max_steps * EARLY_FRACTION)) and 0 <= loss < LOSS_ZERO_BELOW:
        return Alarm(LOSS_ZERO, f"the loss is {loss:.4g} at step {step} of {max_steps}, already near zero: the "
                     "answers may leak into the prompts, or almost every token is masked", "stop")
    return None


def check_grad_norm(step: int, grad_norm: float | None, recent: list[float]) -> Alarm | None:
    """A grad norm far above the median of the recent ones."""
    if grad_norm is None or not math.isfinite(grad_norm) or len(recent) < GRAD_MIN_HISTORY:
        return None
    median = _median(recent)
    if median > 0 and grad_norm > GRAD_SPIKE_FACTOR * median:
        return Alarm(GRAD_SPIKE, f"the grad norm jumped to {grad_norm:.4g} at step {step} ({grad_norm / median:.0f}x "
                     f"the recent {median:.3g}); a loss spike may follow", "keep going")
    return None


def check_eval_losses(step: int, eval_losses: list[float]) -> Alarm | None:
    """Eval loss rising for EVAL_RISES evals in a row (overfitting)."""
    tail = eval_losses[-(EVAL_RISES + 1):]
    if len(tail) == EVAL_RISES + 1 and all(b > a for a, b in zip(tail, tail[1:])):
        return Alarm(EVAL_RISING, f"the eval loss rose {EVAL_RISES} evals in a row ({tail[0]:.4f} -> {tail[-1]:.4f} "
                     f"at step {step}): the model is overfitting; the last good checkpoint is earlier", "stop")
    return None


def check_throughput(step: int, rate: float | None, recent: list[float]) -> Alarm | None:
    """Tokens/s collapsed against the median of the recent rates."""
    if rate is None or len(recent) < RATE_MIN_HISTORY:
        return None
    median = _median(recent)
    if median > 0 and rate < SLOWDOWN_FRACTION * median:
        return Alarm(SLOWDOWN, f"throughput fell to {rate:,.0f} tokens/s at step {step} (recently {median:,.0f}): "
                     "another process on the machine, thermal throttling, or swapping", "keep going")
    return None


def check_gpu_memory(step: int, system: dict[str, Any]) -> Alarm | None:
    """The trainer's GPU nearly full, from a ``system`` event: what torch has allocated plus
    what the other processes hold, over the total. Memory torch keeps cached for reuse is
    not "full" (NVML counts it as used); NVML's figure is used only without torch's."""
    total, allocated = system.get("gpu_memory_total"), system.get("torch_allocated")
    if isinstance(allocated, int):
        used = allocated + int(system.get("gpu_memory_others") or 0)
    else:
        used = system.get("gpu_memory_used")
    if used and total and used / total >= GPU_MEMORY_FULL:
        return Alarm(GPU_MEMORY, f"GPU memory is {used / total:.0%} full at step {step}: an out-of-memory error "
                     "is close (lower batch_size or max_length)", "keep going")
    return None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _slope(values: list[float]) -> float:
    """The least-squares slope of ``values`` against their positions (per logged step)."""
    n = len(values)
    x_mean, y_mean = (n - 1) / 2, _mean(values)
    spread = sum((x - x_mean) ** 2 for x in range(n))
    return sum((x - x_mean) * (y - y_mean) for x, y in enumerate(values)) / spread if spread else 0.0


def _far_enough(step: int, max_steps: int | None, logged: int) -> bool:
    """The run is far enough in for the slow preference checks to judge it."""
    if logged < PREFERENCE_MIN_STEPS:
        return False
    return not max_steps or step >= PREFERENCE_MIN_FRACTION * max_steps


def check_reward_accuracy(step: int, max_steps: int | None, accuracies: list[float], margins: list[float],
                          logged: int) -> Alarm | None:
    """The reward accuracy stuck at chance with the margin near zero, over the last
    PREFERENCE_WINDOW logged steps (``accuracies``, ``margins``), once the run is far enough
    in (``logged`` steps with an accuracy so far). Rewards that are all exactly zero (the
    model has not moved from the reference; trl counts a tie as wrong) are stuck too."""
    if not _far_enough(step, max_steps, logged) or len(accuracies) < PREFERENCE_WINDOW or not margins:
        return None
    accuracy, margin = _mean(accuracies[-PREFERENCE_WINDOW:]), _mean(margins[-PREFERENCE_WINDOW:])
    tied = all(m == 0 for m in margins[-PREFERENCE_WINDOW:])
    if tied or (abs(accuracy - CHANCE_ACCURACY) <= CHANCE_BAND and abs(margin) < MARGIN_NEAR_ZERO):
        return Alarm(ACCURACY_STUCK, f"the reward accuracy is {accuracy:.2f} and the margin {margin:.3g} over the "
                     f"last {PREFERENCE_WINDOW} logged steps (step {step}): the model is not telling chosen from "
                     "rejected apart (raise the learning rate or beta, check that chosen and rejected differ)",
                     "keep going")
    return None


def check_reward_margin(step: int, margin: float | None, recent: list[float],
                        rejected: tuple[float, float] | None = None, orpo: bool = False) -> Alarm | None:
    """A reward margin over MARGIN_HIGH, or over MARGIN_FAST_ABOVE and MARGIN_FAST_FACTOR times
    the one PREFERENCE_WINDOW logged steps before (``recent``: the margins before this one, the
    oldest first). ``rejected``: the rejected answers' first and latest log-prob, to say how
    far it fell; ``orpo``: the advice for ORPO, whose beta weighs the preference."""
    if margin is None or not math.isfinite(margin):
        return None
    before = recent[-PREFERENCE_WINDOW] if len(recent) >= PREFERENCE_WINDOW else None
    fast = before is not None and before > 0 and margin > MARGIN_FAST_ABOVE and margin >= MARGIN_FAST_FACTOR * before
    if margin <= MARGIN_HIGH and not fast:
        return None
    growth = f", {margin / before:.0f}x in {PREFERENCE_WINDOW} logged steps" if fast and before else ""
    fell = ""
    if rejected is not None and rejected[1] < rejected[0]:
        fell = f"; the rejected answers' log-prob fell from {rejected[0]:.4g} to {rejected[1]:.4g}"
    advice = "lower the learning rate or preference.beta" if orpo else "lower the learning rate or raise beta"
    return Alarm(MARGIN_EXPLODING, f"the reward margin is {margin:.3g} at step {step}{growth}{fell}: the model is "
                 "over-optimising (reward hacking), driving the rejected answers' probability to nothing rather "
                 f"than learning the preference ({advice})", "stop")


def check_chosen_logps(step: int, max_steps: int | None, first: list[float], recent: list[float], logged: int,
                       orpo: bool = False) -> Alarm | None:
    """The chosen answers' log-prob falling steadily: a least-squares slope below zero over
    ``recent`` (the last PREFERENCE_WINDOW logged values) and their mean down from the mean of
    ``first`` (the run's first PREFERENCE_WINDOW values) by CHOSEN_DROP_FRACTION of its size
    and at least CHOSEN_DROP_MIN, once ``logged`` covers both windows apart and the run is
    far enough in."""
    if (not _far_enough(step, max_steps, logged) or logged < 2 * PREFERENCE_WINDOW
            or len(first) < PREFERENCE_WINDOW or len(recent) < PREFERENCE_WINDOW):
        return None
    start, now = _mean(first[:PREFERENCE_WINDOW]), _mean(recent[-PREFERENCE_WINDOW:])
    drop = start - now
    if _slope(recent[-PREFERENCE_WINDOW:]) >= 0 or drop < max(CHOSEN_DROP_MIN, CHOSEN_DROP_FRACTION * abs(start)):
        return None
    advice = ("lower the learning rate or preference.beta (ORPO's weight of the preference against its SFT part)"
              if orpo else "add sft_weight (preference.sft_weight = 0.2) or lower the learning rate")
    return Alarm(CHOSEN_FALLING, f"the chosen answers' log-prob fell from {start:.4g} to {now:.4g} by step {step}: "
                 "the model is un-learning the good answers along with the bad ones (a known DPO failure); "
                 f"{advice}", "keep going")


class Health:
    """Feeds the checks with a run's history; :meth:`observe` returns the alarms one event raises."""

    def __init__(self) -> None:
        self.grad_norms: deque[float] = deque(maxlen=GRAD_WINDOW)
        self.rates: deque[float] = deque(maxlen=RATE_WINDOW)
        self.eval_losses: list[float] = []
        self.raised: set[str] = set()
        # a preference run's steps (none in an SFT run)
        self.accuracies: deque[float] = deque(maxlen=PREFERENCE_WINDOW)
        self.margins: deque[float] = deque(maxlen=PREFERENCE_WINDOW)
        self.accuracy_steps = 0
        self.chosen_first: list[float] = []
        self.chosen: deque[float] = deque(maxlen=PREFERENCE_WINDOW)
        self.chosen_steps = 0
        self.rejected_first: float | None = None
        self.rejected_last: float | None = None

    def observe(self, ev: dict[str, Any]) -> list[Alarm]:
        kind, step = ev.get("type"), int(ev.get("step") or 0)
        found: list[Alarm | None] = []
        if kind == "step":
            found.append(check_loss(step, ev.get("loss"), ev.get("max_steps")))
            grad = ev.get("grad_norm")
            found.append(check_grad_norm(step, grad, list(self.grad_norms)))
            if grad is not None and math.isfinite(grad):
                self.grad_norms.append(grad)
            rate = ev.get("tokens_per_s")
            found.append(check_throughput(step, rate, list(self.rates)))
            if rate:
                self.rates.append(rate)
            found.extend(self._preference(step, ev))
        elif kind == "eval" and ev.get("eval_loss") is not None and math.isfinite(ev["eval_loss"]):
            self.eval_losses.append(ev["eval_loss"])
            found.append(check_eval_losses(step, self.eval_losses))
        elif kind == "system":
            found.append(check_gpu_memory(step, ev))
        out = []
        for alarm in found:
            if alarm is None or (alarm.kind in self.raised and alarm.kind != NAN_LOSS):
                continue
            self.raised.add(alarm.kind)
            out.append(alarm)
        return out

    def _preference(self, step: int, ev: dict[str, Any]) -> list[Alarm | None]:
        """The preference checks of a step event (none for a step without their fields)."""
        found: list[Alarm | None] = []
        max_steps = ev.get("max_steps") if isinstance(ev.get("max_steps"), int) else None
        orpo = "nll_loss" in ev or "log_odds_ratio" in ev
        rejected = finite_number(ev.get("logps_rejected"))
        if rejected is not None:
            if self.rejected_first is None:
                self.rejected_first = rejected
            self.rejected_last = rejected
        margin = finite_number(ev.get("reward_margin"))
        if margin is not None:
            fell = None if self.rejected_first is None else (self.rejected_first, self.rejected_last)
            found.append(check_reward_margin(step, margin, list(self.margins), fell, orpo))
            self.margins.append(margin)
        accuracy = finite_number(ev.get("reward_accuracy"))
        if accuracy is not None:
            self.accuracy_steps += 1
            self.accuracies.append(accuracy)
            found.append(check_reward_accuracy(step, max_steps, list(self.accuracies), list(self.margins),
                                               self.accuracy_steps))
        chosen = finite_number(ev.get("logps_chosen"))
        if chosen is not None:
            self.chosen_steps += 1
            if len(self.chosen_first) < PREFERENCE_WINDOW:
                self.chosen_first.append(chosen)
            self.chosen.append(chosen)
            found.append(check_chosen_logps(step, max_steps, self.chosen_first, list(self.chosen), self.chosen_steps,
                                            orpo))
        return found
