"""Health alarms: the pure checks, the monitor over a run's events, and alarms in events.jsonl."""

from __future__ import annotations

import math

from tunedeck.core import health
from tunedeck.core.events import EventLog, read_events
from tunedeck.core.health import Health


def step(n: int, loss: float | None = 1.0, grad: float | None = 1.0, rate: float | None = 1000.0,
         max_steps: int = 100) -> dict:
    return {"type": "step", "step": n, "loss": loss, "grad_norm": grad, "tokens_per_s": rate, "max_steps": max_steps}


def test_nan_and_inf_loss_ask_to_stop_each_time():
    h = Health()
    assert h.observe(step(1)) == []
    first = h.observe(step(2, loss=math.nan))
    assert [a.kind for a in first] == [health.NAN_LOSS] and first[0].action == "stop"
    assert "nan" in first[0].message.lower() and "step 2" in first[0].message
    assert [a.kind for a in h.observe(step(3, loss=math.inf))] == [health.NAN_LOSS]
    assert [a.kind for a in h.observe(step(4, loss=None))] == [health.NAN_LOSS]


def test_loss_near_zero_early_but_not_late():
    assert health.check_loss(5, 0.001, 100).kind == health.LOSS_ZERO
    assert health.check_loss(90, 0.001, 100) is None
    assert health.check_loss(5, 0.5, 100) is None
    h = Health()
    assert [a.kind for a in h.observe(step(1, loss=0.0))] == [health.LOSS_ZERO]
    assert h.observe(step(2, loss=0.0)) == []  # once per run


def test_grad_norm_spike_against_the_recent_median():
    h = Health()
    for n in range(1, 8):
        assert h.observe(step(n, grad=1.0 + n / 100)) == []
    spike = h.observe(step(8, grad=50.0))
    assert [a.kind for a in spike] == [health.GRAD_SPIKE] and spike[0].action == "keep going"
    assert health.check_grad_norm(3, 50.0, [1.0, 1.0]) is None  # too little history to judge


def test_eval_loss_rising_several_evals_in_a_row():
    h = Health()
    kinds = [[a.kind for a in h.observe({"type": "eval", "step": 10 * i, "eval_loss": v})]
             for i, v in enumerate([2.0, 1.5, 1.6, 1.7])]
    assert kinds == [[], [], [], []]  # two rises only
    assert [a.kind for a in h.observe({"type": "eval", "step": 50, "eval_loss": 1.8})] == [health.EVAL_RISING]
    assert health.check_eval_losses(5, [1.0, 1.1, 1.0, 1.2]) is None


def test_throughput_collapse():
    h = Health()
    for n in range(1, 8):
        assert h.observe(step(n, rate=1000.0)) == []
    assert [a.kind for a in h.observe(step(8, rate=100.0))] == [health.SLOWDOWN]
    assert health.check_throughput(8, 800.0, [1000.0] * 6) is None


def test_gpu_memory_near_full_from_a_system_event():
    h = Health()
    assert h.observe({"type": "system", "step": 1, "gpu_memory_used": 50, "gpu_memory_total": 100}) == []
    full = h.observe({"type": "system", "step": 2, "gpu_memory_used": 97, "gpu_memory_total": 100})
    assert [a.kind for a in full] == [health.GPU_MEMORY] and "97%" in full[0].message
    assert h.observe({"type": "system", "step": 3, "gpu_memory_used": None, "gpu_memory_total": None}) == []


def test_the_trainer_writes_alarms_after_the_event_that_raised_them(tmp_path):
    from tunedeck.core.trainer import Emitter

    seen: list[dict] = []
    with EventLog(tmp_path / "events.jsonl") as log:
        emit = Emitter(log, echo=seen.append)
        emit("step", 1, loss=1.0, grad_norm=1.0, tokens_per_s=10.0, max_steps=100)
        emit("step", 2, loss=float("nan"), grad_norm=1.0, tokens_per_s=10.0, max_steps=100)
    on_disk = read_events(tmp_path / "events.jsonl")
    assert [e["type"] for e in on_disk] == ["step", "step", "alarm"] == [e["type"] for e in seen]
    alarm = on_disk[-1]
    assert alarm["kind"] == "nan_loss" and alarm["action"] == "stop" and alarm["step"] == 2
