"""Unit tests for `distml.schedule.lr_at`: the learning rate as a pure function of the step."""
import math

import pytest

from distml.schedule import lr_at


def test_constant_is_the_base_rate_at_every_step():
    assert {lr_at(0.1, "constant", t, 50) for t in range(50)} == {0.1}


def test_cosine_starts_at_the_base_rate_halves_midway_and_ends_near_zero():
    total = 100

    rates = [lr_at(0.2, "cosine", t, total) for t in range(total)]

    assert rates[0] == pytest.approx(0.2)
    assert rates[50] == pytest.approx(0.1)
    assert rates[-1] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert 0 < rates[-1] < 1e-3
    assert all(a > b for a, b in zip(rates, rates[1:]))  # strictly decreasing


def test_step_divides_by_ten_at_half_and_three_quarters():
    rates = [lr_at(1.0, "step", t, 8) for t in range(8)]

    assert rates == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_warmup_ramps_linearly_to_the_base_rate_then_follows_the_schedule(schedule):
    total, warmup = 40, 4

    rates = [lr_at(0.4, schedule, t, total, warmup) for t in range(total)]

    assert rates[:warmup] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert rates[warmup] == pytest.approx(0.4)  # the schedule's own start, after the warm-up
    if schedule == "cosine":  # the decay spans the steps after warm-up
        assert rates[warmup + 18] == pytest.approx(0.2)


def test_a_step_outside_the_run_is_refused():
    with pytest.raises(ValueError, match="step"):
        lr_at(0.1, "cosine", 10, 10)
