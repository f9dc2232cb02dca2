"""Tests of lib_lora.plateau with synthetic loss sequences."""

from __future__ import annotations

import json
import math

import pytest

from lib_lora.errors import ConfigError, TrainingError
from lib_lora.plateau import LossEma, LossRecorder, MovingAverage, PlateauController, PlateauEvent


def _run(ctrl: PlateauController, losses, start: int = 1, every: int = 1) -> dict[int, list[PlateauEvent]]:
    """Feeds losses at steps start, start+every, ...; returns {step: events} for steps with events."""
    fired = {}
    for i, loss in enumerate(losses):
        step = start + i * every
        events = ctrl.update(step, loss)
        if events:
            fired[step] = events
    return fired


# --- LossEma ---------------------------------------------------------------------------------------------------------


def test_ema_bias_correction_closed_form():
    beta = 0.9
    xs = [1.0, 0.5, 0.25, 2.0, 0.0, 1.5]
    ema = LossEma(beta)
    assert ema.value is None
    for t in range(1, len(xs) + 1):
        got = ema.update(xs[t - 1])
        weights = [(1 - beta) * beta ** (t - 1 - i) for i in range(t)]
        expected = sum(w * x for w, x in zip(weights, xs[:t])) / (1 - beta**t)
        assert got == pytest.approx(expected, rel=1e-12)
    assert LossEma(0.99).update(0.123) == pytest.approx(0.123)  # first value is the first loss
    assert LossEma(0.0).update(3.0) == 3.0


def test_ema_constant_input_and_state():
    ema = LossEma(0.99)
    for _ in range(500):
        v = ema.update(0.1)
    assert v == pytest.approx(0.1, rel=1e-12)
    other = LossEma(0.99)
    other.load_state_dict(json.loads(json.dumps(ema.state_dict())))
    assert other.update(0.2) == ema.update(0.2)
    with pytest.raises(TrainingError, match="non-finite"):
        ema.update(float("nan"))
    with pytest.raises(ConfigError):
        LossEma(1.0)


# --- PlateauController -------------------------------------------------------------------------------------------


def test_decreasing_loss_never_fires():
    ctrl = PlateauController(50, base_lr=1e-4, early_stop_patience=100)
    fired = _run(ctrl, [1.0 - 0.0004 * s for s in range(2000)])
    assert fired == {}
    assert ctrl.lr_factor == 1.0 and not ctrl.stopped


def test_decreasing_exponential_loss_never_fires():
    ctrl = PlateauController(200, base_lr=1e-4, min_delta=1e-4)
    assert _run(ctrl, [0.1 + 0.9 * math.exp(-s / 300) for s in range(1500)]) == {}


def test_flat_loss_drops_at_the_documented_steps():
    ctrl = PlateauController(100, base_lr=1e-4)
    fired = _run(ctrl, [0.1] * 350)  # steps 1..350; best set at step 1
    assert sorted(fired) == [101, 201, 301]
    first = fired[101][0]
    assert first.kind == "lr_drop" and first.step == 101
    assert first.lr_factor == 0.5 and first.lr == pytest.approx(5e-5)
    assert first.smoothed_loss == pytest.approx(0.1)
    assert "5e-05" in first.message and "0.0001" in first.message and "101" in first.message
    assert fired[201][0].lr == pytest.approx(2.5e-5)
    assert ctrl.num_drops == 3 and ctrl.lr == pytest.approx(1.25e-5)
    json.dumps(first.to_dict())


def test_flat_loss_with_step_gaps_counts_steps_not_calls():
    ctrl = PlateauController(100, base_lr=1e-4)
    fired = _run(ctrl, [0.2] * 30, start=10, every=10)  # steps 10, 20, ..., 300
    assert sorted(fired) == [110, 210]


def test_warmup_steps_are_not_counted():
    ctrl = PlateauController(100, base_lr=1e-4, warmup_steps=50)
    fired = _run(ctrl, [0.1] * 200)
    assert sorted(fired) == [150]


def test_min_lr_floor():
    ctrl = PlateauController(10, base_lr=1e-4, min_lr=3e-5)
    fired = _run(ctrl, [0.5] * 100)
    lrs = [ev[0].lr for _, ev in sorted(fired.items())]
    assert lrs == pytest.approx([5e-5, 3e-5])
    assert ctrl.lr == pytest.approx(3e-5)


def test_early_stop_fires_once_and_drops_do_not_reset_it():
    ctrl = PlateauController(100, base_lr=1e-4, early_stop_patience=250)
    fired = _run(ctrl, [0.1] * 400)
    assert sorted(fired) == [101, 201, 251]
    stop = fired[251]
    assert len(stop) == 1 and stop[0].kind == "early_stop" and stop[0].step == 251
    assert stop[0].lr_factor == 0.25 and "stopping early" in stop[0].message
    assert ctrl.stopped


def test_early_stop_wins_when_both_fire():
    ctrl = PlateauController(100, base_lr=1e-4, early_stop_patience=100)
    fired = _run(ctrl, [0.1] * 150)
    assert list(fired) == [101] and [e.kind for e in fired[101]] == ["early_stop"]
    assert ctrl.lr_factor == 1.0


def test_improvement_after_a_drop_resets_patience():
    ctrl = PlateauController(100, base_lr=1e-4, ema_beta=0.9)
    losses = [0.3] * 150 + [0.3 - 0.001 * i for i in range(1, 201)]  # flat to step 150, then steadily down
    fired = _run(ctrl, losses)
    assert sorted(fired) == [101]
    assert ctrl.best_step == 350


def test_noisy_flat_loss_eventually_drops():
    import random

    rng = random.Random(0)
    ctrl = PlateauController(200, base_lr=1e-4, ema_beta=0.99)
    fired = _run(ctrl, [0.1 + rng.gauss(0, 0.05) for _ in range(3000)])
    assert fired and all(e.kind == "lr_drop" for ev in fired.values() for e in ev)


def test_state_round_trip_matches_an_uninterrupted_run():
    losses = [0.2 + 0.05 * math.sin(s / 7.0) * math.exp(-s / 400) for s in range(1, 900)]

    def make():
        return PlateauController(60, base_lr=2e-4, min_delta=1e-3, early_stop_patience=400, ema_beta=0.95)

    full = make()
    fired_full = _run(full, losses)

    first = make()
    fired_a = _run(first, losses[:300])
    state = json.loads(json.dumps(first.state_dict()))  # must be JSON-compatible
    resumed = make()
    resumed.load_state_dict(state)
    fired_b = _run(resumed, losses[300:], start=301)
    assert {**fired_a, **fired_b} == fired_full
    assert resumed.state_dict() == full.state_dict()
    assert fired_full  # the sequence does exercise the rule


def test_initial_state_is_json_safe():
    state = PlateauController(10, base_lr=1e-4).state_dict()
    assert json.loads(json.dumps(state, allow_nan=False)) == state
    assert state["best_loss"] is None and state["lr_factor"] == 1.0


def test_load_state_dict_rejects_incomplete_or_unknown():
    ctrl = PlateauController(10, base_lr=1e-4)
    state = ctrl.state_dict()
    broken = dict(state)
    del broken["lr_factor"]
    with pytest.raises(TrainingError, match="missing lr_factor"):
        ctrl.load_state_dict(broken)
    with pytest.raises(TrainingError, match="version"):
        ctrl.load_state_dict({**state, "version": 99})


def test_update_errors():
    ctrl = PlateauController(10, base_lr=1e-4)
    ctrl.update(5, 0.1)
    with pytest.raises(ConfigError, match="increase"):
        ctrl.update(5, 0.1)
    with pytest.raises(TrainingError, match="non-finite loss inf at step 6"):
        ctrl.update(6, float("inf"))


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((0,), {"base_lr": 1e-4}),
        ((10,), {"base_lr": 1e-4, "factor": 1.0}),
        ((10,), {"base_lr": 1e-4, "factor": 0.0}),
        ((10,), {"base_lr": 1e-4, "min_delta": -1.0}),
        ((10,), {"base_lr": 1e-4, "min_lr": 1e-4}),
        ((10,), {"base_lr": 0.0}),
        ((10,), {"base_lr": 1e-4, "early_stop_patience": 0}),
        ((10,), {"base_lr": 1e-4, "warmup_steps": -1}),
        ((10,), {"base_lr": 1e-4, "ema_beta": 1.0}),
        ((10.5,), {"base_lr": 1e-4}),
    ],
)
def test_config_validation(args, kwargs):
    with pytest.raises(ConfigError):
        PlateauController(*args, **kwargs)


def test_base_lr_is_required():
    with pytest.raises(TypeError):
        PlateauController(10)  # type: ignore[call-arg]


# --- LossRecorder / MovingAverage --------------------------------------------------------------------------------


def test_loss_recorder_is_a_moving_mean_over_one_epoch():
    steps_per_epoch = 4
    losses = [float(i) for i in range(1, 13)]  # three epochs
    rec = LossRecorder()
    window = MovingAverage(steps_per_epoch)
    assert rec.moving_average == 0.0 and window.value is None
    for i, loss in enumerate(losses):
        epoch, step = divmod(i, steps_per_epoch)
        rec.add(epoch=epoch, step=step, loss=loss)
        window.add(loss)
        assert rec.moving_average == pytest.approx(window.value)
    assert rec.moving_average == pytest.approx((9 + 10 + 11 + 12) / 4)


def test_loss_recorder_epoch_zero_grows():
    rec = LossRecorder()
    for s, loss in enumerate([2.0, 4.0, 6.0]):
        rec.add(epoch=0, step=s, loss=loss)
    assert rec.moving_average == pytest.approx(4.0)
    rec.add(epoch=1, step=0, loss=8.0)  # replaces the 2.0
    assert rec.moving_average == pytest.approx(6.0)


def test_recorders_state_round_trip():
    rec = LossRecorder()
    for s in range(5):
        rec.add(epoch=0, step=s, loss=0.1 * s)
    rec2 = LossRecorder()
    rec2.load_state_dict(json.loads(json.dumps(rec.state_dict())))
    assert rec2.moving_average == pytest.approx(rec.moving_average)
    ma = MovingAverage(3)
    for x in [1.0, 2.0, 3.0, 4.0]:
        ma.add(x)
    assert ma.value == pytest.approx(3.0) and len(ma) == 3
    ma2 = MovingAverage(2)
    ma2.load_state_dict(ma.state_dict())
    assert ma2.value == pytest.approx(3.5)
    with pytest.raises(TrainingError):
        ma2.load_state_dict({})
    with pytest.raises(ConfigError):
        MovingAverage(0)
