"""The arrival-curve bounds (core/backlog.py): the math against a fluid FIFO server and brute-force
concurrency, bursts, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.backlog import (
    backlog_need,
    decode_arrivals_need,
    decode_backlog_need,
    fluid_sojourns_s,
    mean_concurrency,
    prefill_backlog_need,
    priced_requests,
)
from controller.core.errors import ModelInputError
from controller.core.pooled import pooled_need
from controller.core.prefill import PrefillCurve, ServiceTime


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


# --- decode: concurrency of the requests the prefill pool releases ------------------------------

def _brute_mean_concurrency(s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """B(t) counts the open intervals, so its integral over interval i is the sum of i's overlaps."""
    e = s + d
    overlap = np.clip(np.minimum(e[:, None], e[None, :]) - np.maximum(s[:, None], s[None, :]), 0.0, None)
    return overlap.sum(axis=1) / d


@given(data=_bursty(), durations=st.lists(st.floats(0.05, 30.0), min_size=80, max_size=80))
@settings(max_examples=60, deadline=None)
def test_mean_concurrency_is_the_integral_of_the_open_count(data, durations):
    s, _ = data
    d = np.asarray(durations[: s.size])
    assert np.allclose(mean_concurrency(s, d), _brute_mean_concurrency(s, d), rtol=1e-9, atol=1e-9)


@given(data=_bursty(), c=st.floats(0.2, 20.0), b=st.floats(1.0, 64.0), q=st.floats(0.5, 1.0))
@settings(max_examples=60, deadline=None)
def test_the_decode_need_is_the_least_pool_keeping_that_share_within_the_batch(data, c, b, q):
    """At n = need a share q of requests see a mean batch per instance <= b; at 1 % fewer they do not."""
    a, w = data
    dec = np.full(a.size, 2.0)
    need = decode_backlog_need(a, w, dec, c, b, q)
    m = _brute_mean_concurrency(a + _fluid_sojourns(a, w, c), dec)
    k = int(np.ceil(q * a.size - 1e-9))
    assert np.count_nonzero(m / need <= b * (1 + 1e-9)) >= k
    assert np.count_nonzero(m / (need * 0.99) <= b) < k


def test_a_burst_reaches_decode_as_fast_as_prefill_releases_it():
    """200 requests in one second: a large prefill pool floods decode, a small one meters it out."""
    a = np.linspace(0.0, 1.0, 200)
    w = np.full(200, 0.5)  # 100 instance-seconds of prefill
    dec = np.full(200, 3.0)  # each decodes for 3 s at the TPOT objective
    fast = decode_backlog_need(a, w, dec, 50.0, 16.0, 0.99)
    slow = decode_backlog_need(a, w, dec, 5.0, 16.0, 0.99)
    assert fast > 2 * slow
    # the mean over the minute reads ~0.6 instances (200 x 3 s / 60 s / 16); the flood needs several
    assert fast > 5 * (200 * 3.0 / 60.0 / 16.0)


def test_steady_poisson_decode_need_is_littles_law_plus_its_fluctuation():
    rng = np.random.default_rng(11)
    rate, dec_s, b = 20.0, 4.0, 16.0
    a = np.sort(rng.uniform(0.0, 600.0, rng.poisson(rate * 600)))
    w = np.full(a.size, 0.05)
    need = decode_backlog_need(a, w, np.full(a.size, dec_s), 4.0, b, 0.99)
    mean_batch = rate * dec_s  # Little: 80 concurrent
    assert mean_batch / b <= need <= (mean_batch + 3.0 * np.sqrt(mean_batch)) / b


def test_priced_requests_sort_once_and_price_each_request():
    curve = PrefillCurve(max_tps=10_000.0)
    t = np.array([3.0, 0.0, 1.0, 2.0] * 10)
    inp, out = np.arange(t.size) * 10.0 + 1000.0, np.full(t.size, 100.0)
    reqs = priced_requests(curve, t, inp, out, 2.0)
    o = np.argsort(t, kind="stable")
    assert np.array_equal(reqs.arrival_s, t[o]) and np.allclose(reqs.service_s, inp[o] / 10_000.0 * 2.0)
    got = decode_arrivals_need(reqs, 0.05, 2.0, 8.0, 0.9)
    want = decode_backlog_need(t[o], inp[o] / 5_000.0, np.full(t.size, 5.0), 2.0, 8.0, 0.9)
    assert got == pytest.approx(want)
    assert prefill_backlog_need(reqs, 2.0, 0.9) == pytest.approx(backlog_need(t[o], inp[o] / 5_000.0, 2.0, 0.9))


def test_large_windows_are_binned_never_below_the_exact_need():
    """Beyond EXACT_MAX requests the prefill bound bins arrivals (budget/64) and the decode bound reads
    a systematic sample: here within a few percent of the request-by-request answers, prefill never below."""
    rng = np.random.default_rng(5)
    a = np.sort(np.concatenate([rng.uniform(0, 60, 6000), rng.uniform(20, 21, 1500)]))  # a burst on Poisson
    w = rng.exponential(0.05, a.size)
    exact = backlog_need(a, w, 2.0, 0.99, exact_max=10**9)
    binned = backlog_need(a, w, 2.0, 0.99)
    assert exact * (1 - 2e-3) <= binned <= backlog_need(a, w, 2.0 * (1 - 2 / 64), 0.99, exact_max=10**9) * 1.002
    dec = rng.uniform(0.5, 10.0, a.size)
    full = decode_backlog_need(a, w, dec, binned, 16.0, 0.99, exact_max=10**9)
    assert decode_backlog_need(a, w, dec, binned, 16.0, 0.99) == pytest.approx(full, rel=0.03)


def test_decode_bad_inputs_name_the_field():
    a, w, d = np.array([0.0, 1.0]), np.array([0.1, 0.1]), np.array([1.0, 1.0])
    with pytest.raises(ModelInputError, match="prefill_capacity"):
        decode_backlog_need(a, w, d, 0.0, 8.0, 0.9)
    with pytest.raises(ModelInputError, match="batch_target"):
        decode_backlog_need(a, w, d, 1.0, float("nan"), 0.9)
    with pytest.raises(ModelInputError, match="quantile"):
        decode_backlog_need(a, w, d, 1.0, 8.0, 0.0)
    with pytest.raises(ModelInputError, match="duration_s"):
        decode_backlog_need(a, w, np.array([1.0, 0.0]), 1.0, 8.0, 0.9)
    with pytest.raises(ModelInputError, match="tpot_s"):
        decode_arrivals_need(priced_requests(PrefillCurve(max_tps=1e4), a, a, a), 0.0, 1.0, 8.0, 0.9)
    with pytest.raises(ModelInputError, match="uncached_tokens"):
        priced_requests(PrefillCurve(max_tps=1e4), a, a[:1], a)
    assert decode_backlog_need(np.empty(0), np.empty(0), np.empty(0), 1.0, 8.0, 0.9) == 0.0
