"""Health alarms of a training run: pure checks over the numbers the trainer reports.

The trainer feeds every step, eval and system event to a :class:`Health` monitor and
writes what it raises as ``alarm`` events to events.jsonl, so a run started with
``--detach`` gets the same alarms as one watched in the app. Each alarm carries a
``kind``, a one-line ``message`` and the ``action`` it suggests (``stop`` or ``keep going``).
An alarm of one kind is raised once per run, except the NaN/inf loss alarm, raised on
each bad loss. No torch here.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

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


class Health:
    """Feeds the checks with a run's history; :meth:`observe` returns the alarms one event raises."""

    def __init__(self) -> None:
        self.grad_norms: deque[float] = deque(maxlen=GRAD_WINDOW)
        self.rates: deque[float] = deque(maxlen=RATE_WINDOW)
        self.eval_losses: list[float] = []
        self.raised: set[str] = set()

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
