"""The estimator window stays sorted and bounded whatever order events arrive in."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.control.estimators import EventWindow, thinned
from controller.core.events import empty_events


def _events(arrivals: list[float], e2e: float = 0.5) -> np.ndarray:
    ev = empty_events(len(arrivals))
    ev["arrival_s"] = arrivals
    ev["e2e_s"] = e2e
    ev["input_tokens"] = 100
    ev["output_tokens"] = 10
    ev["status"] = 200
    return ev


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.floats(0, 100), max_size=30), min_size=1, max_size=8))
def test_window_sorted_and_expired(batches: list[list[float]]) -> None:
    w = EventWindow.empty()
    seen: list[float] = []
    now = 0.0
    for b in batches:
        now += 15.0
        w = w.extended(_events(b), now, horizon_s=40.0)
        seen += [a + 0.5 for a in b]
        assert np.all(np.diff(w.done_s) >= 0)
        expected = sorted(d for d in seen if d > now - 40.0)
        assert w.done_s.tolist() == expected


def test_failed_requests_are_not_served_samples() -> None:
    ev = _events([1.0, 2.0])
    ev["status"][1] = 503
    w = EventWindow.empty().extended(ev, 10.0, 60.0)
    assert len(w) == 1


def test_thinned_keeps_small_arrays_and_bounds_large_ones() -> None:
    small = np.arange(100.0)
    assert thinned(small) is small
    big = np.arange(100_000.0)
    t = thinned(big)
    assert 8192 <= t.size < 2 * 8192
    assert abs(np.quantile(t, 0.9) - np.quantile(big, 0.9)) / np.quantile(big, 0.9) < 0.01


def test_windows_are_values_even_when_a_state_is_extended_twice() -> None:
    # the simulator and tests may branch from one state: the shared buffer must not leak between branches
    base = EventWindow.empty().extended(_events([1.0, 2.0]), 10.0, 60.0)
    a = base.extended(_events([5.0]), 20.0, 60.0)
    b = base.extended(_events([6.0, 7.0]), 20.0, 60.0)
    assert base.arrival_s.tolist() == [1.0, 2.0]
    assert a.arrival_s.tolist() == [1.0, 2.0, 5.0]
    assert b.arrival_s.tolist() == [1.0, 2.0, 6.0, 7.0]


def test_memory_stays_bounded_by_the_window() -> None:
    w = EventWindow.empty()
    for tick in range(2000):
        now = 5.0 * (tick + 1)
        w = w.extended(_events(list(np.linspace(now - 5, now - 0.6, 50))), now, horizon_s=60.0)
    assert len(w) <= 12 * 50 + 50
    assert w.cols.data.shape[1] <= 4 * (12 * 50 + 50)
