"""Policy stages, each alone: tolerance, stabilization, bounds, rate limits, fixed-budget split."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.control.stages import (
    best_split,
    bounds,
    flips_allowed,
    record,
    stabilize,
    tolerance_band,
)
from controller.core.control.types import Reason


def test_tolerance_band_keeps_current_inside_and_ceils_outside():
    assert tolerance_band(4, 4.3, 0.1) == (4, Reason.WITHIN_TOLERANCE)
    assert tolerance_band(12, 10.9, 0.1) == (12, Reason.WITHIN_TOLERANCE)
    assert tolerance_band(4, 4.5, 0.1) == (5, None)
    assert tolerance_band(4, 3.5, 0.1) == (4, None)  # ceil(3.5) = 4: outside the band but same count
    assert tolerance_band(4, 2.2, 0.1) == (3, None)
    assert tolerance_band(1, 0.01, 0.1) == (1, None)  # never below one


def test_tolerance_band_above_current_can_be_narrower():
    # a need above the current count predicts a breach: the band above is tolerance_up
    assert tolerance_band(4, 4.3, 0.1, 0.0) == (5, None)
    assert tolerance_band(4, 4.0, 0.1, 0.0) == (4, None)
    assert tolerance_band(12, 10.9, 0.1, 0.0) == (12, Reason.WITHIN_TOLERANCE)  # the band below is unchanged
    assert tolerance_band(10, 10.3, 0.1, 0.05) == (10, Reason.WITHIN_TOLERANCE)
    assert tolerance_band(10, 10.6, 0.1, 0.05) == (11, None)


def test_stabilize_up_takes_window_min_down_takes_window_max():
    recs = ((0.0, 6), (10.0, 3), (20.0, 8))
    # up window 5 s: only the latest (8) counts -> rise at once
    assert stabilize(recs, 20.0, 4, 5.0, 300.0)[0] == 8
    # up window 15 s: min(3, 8) = 3, no rise above current 4; down window max = 8 keeps 4
    n, r = stabilize(recs, 20.0, 4, 15.0, 300.0)
    assert n == 4 and r is Reason.STABILIZING
    # fall: current 10, recommendations all lower; down to the max within the down window
    assert stabilize(((0.0, 7), (10.0, 5), (20.0, 4)), 20.0, 10, 0.0, 300.0)[0] == 7
    assert stabilize(((0.0, 7), (10.0, 5), (20.0, 4)), 20.0, 10, 0.0, 15.0)[0] == 5


def test_stabilize_is_time_based_not_tick_based():
    # the same history sampled at 1 s or at 10 s gives the same answer
    fine = tuple((float(t), 9 if t < 200 else 3) for t in range(0, 400))
    coarse = tuple((float(t), 9 if t < 200 else 3) for t in range(0, 400, 10))
    for recs in (fine, coarse):
        assert stabilize(recs, recs[-1][0], 9, 0.0, 300.0)[0] == 9  # 9 still inside the 300 s window
        assert stabilize(recs, recs[-1][0], 9, 0.0, 150.0)[0] == 3


def test_record_drops_old_entries():
    recs = record(((0.0, 1), (100.0, 2)), 500.0, 3, 300.0)
    assert recs == ((500.0, 3),)


def test_bounds_never_below_one():
    assert bounds(0, 0, 5) == (1, Reason.AT_BOUND)
    assert bounds(9, 1, 5) == (5, Reason.AT_BOUND)
    assert bounds(3, 1, 5) == (3, None)


def test_flips_allowed_in_flight_and_hourly():
    assert flips_allowed(0, (), 0.0, 2, 10) == 2
    assert flips_allowed(2, (), 0.0, 2, 10) == 0
    times = tuple(float(t) for t in range(0, 3000, 300))  # 10 flips in the last hour
    assert flips_allowed(0, times, 3100.0, 2, 10) == 0
    assert flips_allowed(0, times, 3700.0, 2, 10) == 1  # the flip at t=0 has aged out of the hour
    assert flips_allowed(0, times, 4000.0, 2, 10) == 2


def test_best_split_balances_coverage_and_prefers_current_on_ties():
    # need 2 P and 6 D of an 8-instance budget
    assert best_split(2.0, 6.0, 8, 1, 64, 1, 64, 4) == 2
    # oversupply: both splits cover, max-min coverage picks 3P5D for 2:5
    assert best_split(2.0, 5.0, 10, 1, 64, 1, 64, 1) == 3
    # respects bounds
    assert best_split(7.0, 1.0, 8, 1, 5, 1, 64, 1) == 5


@given(
    pe=st.floats(0.1, 20), de=st.floats(0.1, 20), total=st.integers(2, 30),
    cur=st.integers(1, 29),
)
@settings(max_examples=200, deadline=None)
def test_best_split_is_optimal_and_in_range(pe, de, total, cur):
    p = best_split(pe, de, total, 1, 64, 1, 64, min(cur, total - 1))
    assert 1 <= p <= total - 1
    cover = min(p / pe, (total - p) / de)
    for q in range(1, total):
        assert min(q / pe, (total - q) / de) <= cover + 1e-9


def test_first_recommendation_is_seeded_with_the_current_count():
    recs = record((), 30.0, 1, 300.0, current=4)
    assert recs == ((30.0, 4), (30.0, 1))
    # a fresh controller cannot scale down before a full down window agrees
    assert stabilize(recs, 30.0, 4, 0.0, 300.0)[0] == 4
    assert stabilize(record(recs, 331.0, 1, 300.0, current=4), 331.0, 4, 0.0, 300.0)[0] == 1


def test_a_shrink_lands_well_inside_the_band_of_the_count_it_shrinks_to():
    """Hysteresis: 8 -> 7 at a need of 7.0 would sit at 7's upward edge (7 x 1.03 = 7.21) and grow back on
    the next noisy estimate; the shrink goes only where need x (1 + tolerance) still fits."""
    assert tolerance_band(8, 7.0, 0.1, 0.03) == (8, Reason.WITHIN_TOLERANCE)
    assert tolerance_band(8, 6.5, 0.1, 0.03) == (8, Reason.WITHIN_TOLERANCE)  # 6.5 x 1.1 = 7.15 > 7
    assert tolerance_band(8, 6.3, 0.1, 0.03) == (7, None)
    assert tolerance_band(8, 3.0, 0.1, 0.03) == (4, Reason.WITHIN_TOLERANCE)  # ceil(3.3): held one above 3
    for cur in range(1, 30):
        for need in np.linspace(0.1, 30.0, 300):
            n, _ = tolerance_band(cur, float(need), 0.1, 0.03)
            if n < cur:  # what it shrank to wants neither to grow at this need nor at one 3 % higher
                assert tolerance_band(n, float(need) * 1.03, 0.1, 0.03)[0] == n


def test_stabilize_up_to_the_windows_median_not_its_minimum():
    # a need climbing slowly across the boundary 4 -> 5: one tick in four falls back inside the band
    hovering = tuple((float(t), 4 if t % 20 == 0 else 5) for t in range(-20, 65, 5))
    assert stabilize(hovering, 60.0, 4, 60.0, 300.0)[0] == 4  # HPA's minimum: the wait restarts each time
    assert stabilize(hovering, 60.0, 4, 60.0, 300.0, up_quantile=0.5)[0] == 5
    # an excursion shorter than half the window still adds nothing
    brief = tuple((float(t), 5 if t >= 40 else 4) for t in range(-20, 65, 5))
    n, r = stabilize(brief, 60.0, 4, 60.0, 300.0, up_quantile=0.5)
    assert n == 4 and r is Reason.STABILIZING
    # the way down is unchanged: the window's maximum
    falling = ((0.0, 7), (10.0, 5), (20.0, 4))
    assert stabilize(falling, 20.0, 10, 0.0, 300.0, up_quantile=0.5)[0] == 7


def test_the_up_median_waits_for_a_whole_window_of_history():
    # first recommendation at t=30 (seeded with the current 1), asking 6 from then on: until the window
    # holds a whole up window of history, HPA's minimum (the seed) holds it back
    def recs(now: float) -> tuple[tuple[float, int], ...]:
        return ((30.0, 1), *((float(t), 6) for t in range(30, int(now) + 1, 5)))

    assert stabilize(recs(35.0), 35.0, 1, 60.0, 300.0, up_quantile=0.5)[0] == 1
    assert stabilize(recs(90.0), 90.0, 1, 60.0, 300.0, up_quantile=0.5)[0] == 1
    assert stabilize(recs(95.0), 95.0, 1, 60.0, 300.0, up_quantile=0.5)[0] == 6
    # a window no longer than a tick (a 2-s flip's tenth of its lead) is the latest recommendation alone
    assert stabilize(((0.0, 4), (5.0, 4), (10.0, 6)), 10.0, 4, 4.0, 300.0, up_quantile=0.5)[0] == 6
