"""The arrival-curve prefill bound (core/backlog.py): the math against a fluid FIFO server, bursts, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.backlog import backlog_need, fluid_sojourns_s
from controller.core.errors import ModelInputError
from controller.core.pooled import pooled_need
from controller.core.prefill import ServiceTime


def _exact_needs(a: np.ndarray, w: np.ndarray, budget: float) -> np.ndarray:
    """max over every earlier arrival j of W[a_j, a_i] / (a_i - a_j + T): the bound without a grid."""
    cum = np.concatenate(([0.0], np.cumsum(w)))
    out = np.empty(a.size)
    for i in range(a.size):
        j = np.arange(i + 1)
        out[i] = np.max((cum[i + 1] - cum[j]) / (a[i] - a[j] + budget))
    return out


def _fluid_sojourns(a: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """Lindley's recursion for one FIFO server working c seconds of work per second."""
    d = np.empty(a.size)
    backlog, last = 0.0, a[0] if a.size else 0.0
    for i in range(a.size):
        backlog = max(0.0, backlog - c * (a[i] - last)) + w[i]
        last = a[i]
        d[i] = backlog / c
    return d


@st.composite
def _bursty(draw):
    n = draw(st.integers(1, 80))
    gaps = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.2), st.floats(0.2, 20.0)), min_size=n, max_size=n))
    work = draw(st.lists(st.floats(0.01, 2.0), min_size=n, max_size=n))
    return np.cumsum(np.asarray(gaps)), np.asarray(work)


@given(data=_bursty(), budget=st.floats(0.2, 5.0), c=st.floats(0.2, 20.0))
@settings(max_examples=60, deadline=None)
def test_a_request_meets_the_budget_exactly_when_the_capacity_covers_its_need(data, budget, c):
    """The docstring's claim: D_i <= T  <=>  c >= max_s W(s, a_i] / (a_i - s + T)."""
    a, w = data
    need = _exact_needs(a, w, budget)
    meets = _fluid_sojourns(a, w, c) <= budget * (1 + 1e-9)
    covered = need <= c * (1 + 1e-9)
    assert np.array_equal(meets, covered)


@given(data=_bursty(), c=st.floats(0.2, 20.0))
@settings(max_examples=60, deadline=None)
def test_the_vectorised_sojourns_are_lindleys_recursion(data, c):
    a, w = data
    assert np.allclose(fluid_sojourns_s(a, w, c), _fluid_sojourns(a, w, c), rtol=1e-9, atol=1e-9)


@given(data=_bursty(), budget=st.floats(0.2, 5.0), q=st.floats(0.5, 1.0))
@settings(max_examples=60, deadline=None)
def test_the_need_is_the_quantile_of_the_per_request_needs(data, budget, q):
    a, w = data
    exact = np.sort(_exact_needs(a, w, budget))
    want = exact[max(0, int(np.ceil(q * a.size - 1e-9)) - 1)]
    assert backlog_need(a, w, budget, q) == pytest.approx(want, rel=2e-3)


def test_the_quantile_need_serves_that_share_of_requests_on_the_fluid_pool():
    rng = np.random.default_rng(4)
    # on/off traffic: 60 requests in a second, then half a minute of nothing, three times
    a = np.sort(np.concatenate([k * 30.0 + rng.uniform(0, 1, 60) for k in range(3)]))
    w = rng.uniform(0.1, 0.3, a.size)
    need = backlog_need(a, w, 2.0, 0.9)
    assert np.mean(_fluid_sojourns(a, w, need) <= 2.0) >= 0.9
    assert np.mean(_fluid_sojourns(a, w, need * 0.99) <= 2.0) < 0.9  # and it is the least that does


def test_a_one_second_burst_needs_far_more_than_its_minutes_mean():
    a = np.linspace(0.0, 1.0, 60)  # 60 requests in one second, then nothing for the rest of the minute
    w = np.full(60, 0.2)  # 12 s of prefill work
    need = backlog_need(a, w, 2.0, 0.99)
    mean_load = w.sum() / 60.0  # 0.2 instances: what a one-minute mean rate reads
    assert need >= 3.5  # ~12 s of work within 1 s + 2 s of budget
    assert need > 15 * mean_load


def test_steady_poisson_arrivals_need_no_more_than_the_pooled_queue():
    """On Poisson traffic the queueing model binds and the bound costs nothing."""
    rng = np.random.default_rng(7)
    rate, svc_s, budget = 40.0, 0.1, 2.0
    a = np.sort(rng.uniform(0.0, 60.0, rng.poisson(rate * 60)))
    w = rng.exponential(svc_s, a.size)
    need = backlog_need(a, w, budget, 0.99)
    model = pooled_need(rate, ServiceTime.from_samples(np.sort(w)), budget, 0.99)
    assert need <= max(model, rate * svc_s / 0.85)


def test_bad_inputs_name_the_field():
    a, w = np.array([0.0, 1.0]), np.array([0.1, 0.1])
    with pytest.raises(ModelInputError, match="ttft_budget_s"):
        backlog_need(a, w, 0.0, 0.9)
    with pytest.raises(ModelInputError, match="ttft_quantile"):
        backlog_need(a, w, 2.0, 1.5)
    with pytest.raises(ModelInputError, match="service_s"):
        backlog_need(a, w[:1], 2.0, 0.9)
    assert backlog_need(np.empty(0), np.empty(0), 2.0, 0.9) == 0.0
