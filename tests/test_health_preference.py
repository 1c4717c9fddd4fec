"""Health alarms of preference runs (DPO, ORPO): reward accuracy stuck at chance, the reward
margin exploding, the chosen answers' log-prob falling; none for a healthy run or an SFT one."""

from __future__ import annotations

import math

from tunedeck.core import health
from tunedeck.core.health import Health

MAX_STEPS = 100


def pref_step(n: int, *, accuracy: float, margin: float, chosen: float, rejected: float,
              max_steps: int = MAX_STEPS, **extra: float) -> dict:
    """A DPO step event: the usual fields and the preference ones (rewards from the margin)."""
    return {"type": "step", "step": n, "loss": 0.69 - 0.002 * n, "grad_norm": 1.0, "tokens_per_s": 1000.0,
            "max_steps": max_steps, "learning_rate": 5e-6, "rewards_chosen": margin / 2,
            "rewards_rejected": -margin / 2,
            "reward_margin": margin, "reward_accuracy": accuracy, "logps_chosen": chosen, "logps_rejected": rejected,
            **extra}


def healthy(n: int) -> dict:
    """A DPO run that learns: accuracy from 0.5 to 0.9, margin from 0 to 3, chosen log-prob
    flat with noise, rejected falling."""
    f = n / MAX_STEPS
    return pref_step(n, accuracy=min(0.9, 0.5 + 0.4 * f + 0.05 * math.sin(n)), margin=3.0 * f,
                     chosen=-150.0 + 2.0 * math.sin(n / 3), rejected=-160.0 - 40.0 * f)


def kinds(h: Health, events: list[dict]) -> list[str]:
    return [alarm.kind for ev in events for alarm in h.observe(ev)]


def test_a_healthy_dpo_run_raises_nothing():
    assert kinds(Health(), [healthy(n) for n in range(1, MAX_STEPS + 1)]) == []


def test_a_healthy_run_with_the_chosen_log_prob_rising_raises_nothing():
    events = [pref_step(n, accuracy=0.5 + 0.4 * n / MAX_STEPS, margin=3.0 * n / MAX_STEPS, chosen=-150.0 + 0.3 * n,
                        rejected=-150.0 - 0.5 * n) for n in range(1, MAX_STEPS + 1)]
    assert kinds(Health(), events) == []


def test_an_sft_run_raises_no_preference_alarm():
    h = Health()
    events = [{"type": "step", "step": n, "loss": 2.0 - 0.01 * n, "grad_norm": 1.0, "tokens_per_s": 1000.0,
               "max_steps": MAX_STEPS} for n in range(1, MAX_STEPS + 1)]
    assert kinds(h, events) == []
    assert h.accuracy_steps == h.chosen_steps == 0


# -- reward accuracy stuck near 0.5 -------------------------------------------------------------


def stuck(n: int) -> dict:
    return pref_step(n, accuracy=0.5 + (0.04 if n % 2 else -0.04), margin=0.01 * (1 if n % 2 else -1),
                     chosen=-150.0 + math.sin(n), rejected=-152.0 + math.cos(n))


def test_accuracy_stuck_at_chance_is_raised_once_past_a_fifth_of_the_run():
    h = Health()
    assert kinds(h, [stuck(n) for n in range(1, 20)]) == []  # too early to judge (19 of 100 steps)
    raised = h.observe(stuck(20))
    assert [a.kind for a in raised] == [health.ACCURACY_STUCK]
    alarm = raised[0]
    assert alarm.action == "keep going" and "step 20" in alarm.message
    assert "not telling chosen from rejected apart" in alarm.message and "beta" in alarm.message
    assert "\n" not in alarm.message
    assert kinds(h, [stuck(n) for n in range(21, 60)]) == []  # once per run


def test_accuracy_stuck_needs_ten_logged_steps_even_in_a_short_run():
    h = Health()
    events = [stuck(n) | {"max_steps": 20} for n in range(1, 10)]
    assert kinds(h, events) == []  # past a fifth of 20 steps, but only 9 logged
    assert [a.kind for a in h.observe(stuck(10) | {"max_steps": 20})] == [health.ACCURACY_STUCK]


def test_accuracy_checks_are_pure_functions_with_their_edges():
    window = health.PREFERENCE_WINDOW
    far = {"step": 50, "max_steps": 100, "logged": 50}
    assert health.check_reward_accuracy(accuracies=[0.54] * window, margins=[0.05] * window, **far).kind == (
        health.ACCURACY_STUCK)
    assert health.check_reward_accuracy(accuracies=[0.46] * window, margins=[-0.05] * window, **far) is not None
    assert health.check_reward_accuracy(accuracies=[0.6] * window, margins=[0.05] * window, **far) is None
    assert health.check_reward_accuracy(accuracies=[0.5] * window, margins=[0.8] * window, **far) is None  # margin
    assert health.check_reward_accuracy(accuracies=[0.5] * window, margins=[0.0] * window, step=10, max_steps=100,
                                        logged=10) is None  # before a fifth of the run
    assert health.check_reward_accuracy(accuracies=[0.5] * 5, margins=[0.0] * 5, step=50, max_steps=100,
                                        logged=5) is None  # too few logged steps
    # rewards all exactly zero (the model never left the reference; trl counts a tie as wrong)
    assert health.check_reward_accuracy(accuracies=[0.0] * window, margins=[0.0] * window, **far) is not None


def test_accuracy_rising_out_of_chance_in_time_raises_nothing():
    events = [pref_step(n, accuracy=0.5 if n < 15 else 0.75, margin=0.0 if n < 15 else 0.4, chosen=-150.0,
                        rejected=-155.0) for n in range(1, 60)]
    assert kinds(Health(), events) == []


# -- reward margin exploding ----------------------------------------------------------------------


def test_a_margin_over_the_limit_asks_to_stop_and_says_the_rejected_log_prob_fell():
    h = Health()
    events = [pref_step(n, accuracy=1.0, margin=20.0 + 0.3 * n, chosen=-150.0, rejected=-150.0 - 30.0 * n)
              for n in range(1, 13)]
    assert kinds(h, events) == []  # 23.6 at step 12, and slowly
    raised = h.observe(pref_step(13, accuracy=1.0, margin=26.0, chosen=-150.0, rejected=-540.0))
    assert [a.kind for a in raised] == [health.MARGIN_EXPLODING]
    alarm = raised[0]
    assert alarm.action == "stop" and "26" in alarm.message and "step 13" in alarm.message
    assert "-180" in alarm.message and "-540" in alarm.message  # the rejected log-prob, first and now
    assert "reward hacking" in alarm.message and "lower the learning rate or raise beta" in alarm.message
    assert h.observe(pref_step(14, accuracy=1.0, margin=40.0, chosen=-150.0, rejected=-600.0)) == []  # once


def test_a_margin_growing_fast_is_raised_before_the_limit():
    recent = [2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    alarm = health.check_reward_margin(40, 12.0, recent)
    assert alarm is not None and alarm.kind == health.MARGIN_EXPLODING and "6x in 10 logged steps" in alarm.message
    assert health.check_reward_margin(40, 12.0, [6.0] * 10) is None  # 2x: not fast
    assert health.check_reward_margin(40, 8.0, [1.0] * 10) is None  # fast, but still small
    assert health.check_reward_margin(40, 12.0, recent[-5:]) is None  # too little history for "fast"
    assert health.check_reward_margin(40, 25.0, []) is None
    assert health.check_reward_margin(40, 25.5, []) is not None
    assert health.check_reward_margin(40, math.inf, [1.0] * 10) is None  # the NaN/inf checks are the loss's
    orpo = health.check_reward_margin(40, 30.0, [], orpo=True)
    assert "lower the learning rate or preference.beta" in orpo.message


def test_a_healthy_margin_of_three_raises_nothing():
    assert health.check_reward_margin(90, 3.0, [0.3 * i for i in range(10)]) is None


# -- the chosen answers' log-prob falling ---------------------------------------------------------


def test_the_chosen_log_prob_falling_steadily_is_raised_with_the_sft_weight_advice():
    h = Health()
    events = [pref_step(n, accuracy=0.5 + 0.4 * n / MAX_STEPS, margin=0.05 * n, chosen=-150.0 - 1.5 * n,
                        rejected=-150.0 - 2.5 * n) for n in range(1, 40)]
    alarms = [(ev["step"], a) for ev in events for a in h.observe(ev)]
    assert [(n, a.kind) for n, a in alarms] == [(21, health.CHOSEN_FALLING)]  # down 10% of its first values
    alarm = alarms[0][1]
    assert alarm.action == "keep going"
    assert "un-learning the good answers" in alarm.message and "preference.sft_weight = 0.2" in alarm.message
    assert "-158.2" in alarm.message  # the mean of its first ten values


def test_the_chosen_log_prob_check_waits_for_two_windows_and_a_fifth_of_the_run():
    window = health.PREFERENCE_WINDOW
    first = [-150.0] * window
    falling = [-165.0 - i for i in range(window)]  # down 19.5 from 150: more than a tenth
    assert health.check_chosen_logps(30, 100, first, falling, logged=30).kind == health.CHOSEN_FALLING
    assert health.check_chosen_logps(30, 100, first, falling, logged=15) is None  # the windows overlap
    assert health.check_chosen_logps(15, 100, first, falling, logged=30) is None  # before a fifth of the run
    assert health.check_chosen_logps(30, 100, first, falling[::-1], logged=30) is None  # rising at the end
    assert health.check_chosen_logps(30, 100, first, [-151.0 - 0.1 * i for i in range(window)], logged=30) is None
    # a small log-prob (ORPO averages per token): the drop must still be clear, and the advice is ORPO's
    orpo = health.check_chosen_logps(30, 100, [-1.0] * window, [-1.2 - 0.02 * i for i in range(window)], logged=30,
                                     orpo=True)
    assert orpo is not None and "preference.beta" in orpo.message and "sft_weight" not in orpo.message
    assert health.check_chosen_logps(30, 100, [-0.5] * window, [-0.55 - 0.001 * i for i in range(window)],
                                     logged=30) is None  # 0.05 nats: not clear


def test_an_orpo_run_gets_the_orpo_advice_from_the_monitor():
    h = Health()
    events = [pref_step(n, accuracy=0.7, margin=0.3, chosen=-1.0 - 0.02 * n, rejected=-1.5 - 0.03 * n,
                        nll_loss=1.0 + 0.02 * n, log_odds_ratio=-0.5) for n in range(1, 40)]
    alarms = [a for ev in events for a in h.observe(ev)]
    assert [a.kind for a in alarms] == [health.CHOSEN_FALLING] and "sft_weight" not in alarms[0].message


def test_nan_preference_fields_are_skipped():
    h = Health()
    events = [pref_step(n, accuracy=math.nan, margin=math.inf, chosen=math.nan, rejected=math.nan)
              for n in range(1, 50)]
    assert kinds(h, events) == []
    assert h.accuracy_steps == h.chosen_steps == 0
