"""Prefill and decode capacity read from the arrivals themselves: the work that arrived, at every time scale.

The queueing models (M/G/1, M/G/c) assume Poisson arrivals. Production code
traffic is not: the Azure code trace delivers 60 requests in one second and
then nothing for half a minute, so a 60-second mean rate says 2 instances
where the burst needs 8. This bound needs no arrival model.

A pool of c prefill instances behind least-load routing is close to one FIFO
server working c instance-seconds per second (the fluid limit of the pooled
queue). Let W(s, t] be the prefill work (seconds on one instance: the
profile's time at each request's uncached input) arriving in (s, t]. By
Lindley's recursion the sojourn of the request arriving at t is

    D(t) = max over s <= t of  W(s, t] / c - (t - s),

so D(t) <= T exactly when c >= max_s W(s, t] / (t - s + T). Each request has
such a need; the q-quantile of the needs over a window is the capacity at
which a share q of that window's requests meet the TTFT budget T (each
request's condition is monotone in c). It is found by bisection on c, each
step one vectorised pass: the backlog found by request i is
V_i = (C_i - c a_i) - min over j <= i of (C_{j-1} - c a_j), C the cumulative
work, so D_i = V_i / c needs no loop.

It is a lower bound for discrete instances (a request runs on one instance;
c slow servers are never faster than one c-fast server), so it complements
the queueing model, which covers the Poisson-scale randomness of a few
servers: the plan takes the larger of the two.

Decode has no queue to absorb a burst: the burst reaches it as fast as the
prefill pool releases it. Run the same fluid prefill pool (capacity c, the
prefill the plan serves with) to get each request's release time
d_i = a_i + D_i, let each decode for its output length at the objective's
TPOT (the boundary a sized pool runs at), and count the concurrent
requests B(t). A request's TPOT is the mean of the step times over its
life, so what it sees is its mean concurrency m_i = (1/L_i) integral of
B over [d_i, d_i + L_i]; n instances keep it within the objective while
m_i / n <= b* (the batch per instance at the TPOT objective). The pool
size at which a share q of the requests see that is the q-quantile of
m_i / b*: no search, the condition is linear in n. Requests near the
window's ends miss neighbours outside it, so their m_i reads low: a floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controller.core.errors import ModelInputError
from controller.core.prefill import FloatArray, PrefillCurve

# windows up to this many requests are read request by request; beyond, binned (prefill) or sampled
# (decode), so a tick over 100 000 requests a minute stays within its time budget (bench/bench_tick.py)
EXACT_MAX = 4096


def fluid_sojourns_s(arrival_s: FloatArray, service_s: FloatArray, capacity: float) -> FloatArray:
    """Sojourn of each request on one FIFO server working `capacity` seconds of work per second."""
    cum = np.cumsum(service_s)
    start = np.minimum.accumulate(cum - service_s - capacity * arrival_s)  # min over j <= i of C_{j-1} - c a_j
    return np.asarray((cum - capacity * arrival_s - start) / capacity, dtype=np.float64)


def backlog_need(arrival_s: FloatArray, service_s: FloatArray, budget_s: float, quantile: float,
                 rel_tol: float = 1e-3, exact_max: int = EXACT_MAX) -> float:
    """Instances at which a share `quantile` of these requests meet the TTFT budget (fluid pooled bound).

    `arrival_s` sorted ascending; `service_s` the prefill time of each on one instance. Beyond
    `exact_max` requests, arrivals are pooled into bins of budget/64: all of a bin's work arrives at
    its start and its requests count as served when the bin's last work is, within the budget less
    one bin. Lindley's recursion moves a completion by at most the shift of the arrivals, so a bin
    that passes holds every request of it within the budget: the binned need is never below the
    exact one. It is above it by the bin's own work for a request early in a bin (its successors'
    work counts against it), so it approaches the exact need as bins hold little work.
    """
    if not (budget_s > 0 and math.isfinite(budget_s)):
        raise ModelInputError("ttft_budget_s", budget_s, "must be a positive number of seconds")
    if not (0.0 < quantile <= 1.0):
        raise ModelInputError("ttft_quantile", quantile, "must be in (0, 1]")
    a = np.asarray(arrival_s, dtype=np.float64)
    w = np.asarray(service_s, dtype=np.float64)
    if a.shape != w.shape:
        raise ModelInputError("service_s", w.shape, f"needs one service time per arrival ({a.shape})")
    if a.size == 0:
        return 0.0
    need_met = math.ceil(quantile * a.size - 1e-9)
    total_work = float(w.sum())
    count: np.ndarray | None = None
    limit = budget_s
    if a.size > exact_max:
        width = budget_s / 64.0
        k = np.floor((a - a[0]) / width).astype(np.int64)
        first = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
        a, w = a[0] + k[first] * width, np.add.reduceat(w, first)
        count = np.diff(np.append(first, k.size))
        limit = budget_s - width

    def enough(c: float) -> bool:
        met = fluid_sojourns_s(a, w, c) <= limit
        return int(count[met].sum() if count is not None else np.count_nonzero(met)) >= need_met

    hi = total_work / limit  # all the work within one budget: every request meets it
    lo = hi * 1e-6
    if enough(lo):
        return lo
    while hi - lo > rel_tol * hi:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class PricedRequests:
    """A window's requests in arrival order, each with its prefill time on one instance: sorted and
    priced once, read by both bounds."""

    arrival_s: FloatArray  # ascending
    service_s: FloatArray  # the profile's prefill time at the request's uncached input, times the scale
    output_tokens: FloatArray


def priced_requests(curve: PrefillCurve, arrival_s: FloatArray, uncached_tokens: FloatArray,
                    output_tokens: FloatArray, service_scale: float = 1.0) -> PricedRequests:
    """Requests given by arrival time, uncached input and output tokens, in any order."""
    t = np.asarray(arrival_s, dtype=np.float64)
    u = np.asarray(uncached_tokens, dtype=np.float64)
    o = np.asarray(output_tokens, dtype=np.float64)
    if not (t.shape == u.shape == o.shape):
        raise ModelInputError("uncached_tokens", (u.shape, o.shape), f"needs one input and output per arrival ({t.shape})")
    if t.size > 1 and not np.all(t[1:] >= t[:-1]):  # completions come in completion order
        order = np.argsort(t, kind="stable")
        t, u, o = t[order], u[order], o[order]
    svc = np.asarray(curve.time_s(np.maximum(u, 1.0)) * service_scale, dtype=np.float64)
    return PricedRequests(t, svc, o)


def prefill_backlog_need(reqs: PricedRequests, budget_s: float, quantile: float | None) -> float:
    """`backlog_need` of priced requests; a mean-TTFT objective (no quantile) asks for the median request."""
    return backlog_need(reqs.arrival_s, reqs.service_s, budget_s, quantile or 0.5)


def mean_concurrency(start_s: FloatArray, duration_s: FloatArray, at: np.ndarray | None = None) -> FloatArray:
    """Each interval's mean count of intervals open over it (itself included), exactly; of the intervals
    indexed by `at` only, if given (the count is still over all of them).

    With S(t) = integral over [0, t] of the open count = sum over starts s <= t of (t - s) minus
    sum over ends e <= t of (t - e), interval i's mean is (S(e_i) - S(s_i)) / (e_i - s_i): two sorted
    prefix sums and four searches, O(n log n).
    """
    s = np.asarray(start_s, dtype=np.float64)
    d = np.asarray(duration_s, dtype=np.float64)
    if s.shape != d.shape:
        raise ModelInputError("duration_s", d.shape, f"needs one duration per start ({s.shape})")
    if s.size and not np.all(d > 0):
        raise ModelInputError("duration_s", float(d.min()), "must be positive")
    e = s + d
    ss, es = _sorted(s), _sorted(e)
    ps = np.concatenate(([0.0], np.cumsum(ss)))
    pe = np.concatenate(([0.0], np.cumsum(es)))

    def integral(t: FloatArray) -> FloatArray:
        k = np.searchsorted(ss, t, side="right")
        j = np.searchsorted(es, t, side="right")
        return np.asarray((k * t - ps[k]) - (j * t - pe[j]), dtype=np.float64)

    if at is not None:
        s, e, d = s[at], e[at], d[at]
    return np.asarray((integral(e) - integral(s)) / d, dtype=np.float64)


def _sorted(x: FloatArray) -> FloatArray:
    # FIFO releases are already in order, and so are their ends when durations are equal
    return x if x.size < 2 or bool(np.all(x[1:] >= x[:-1])) else np.sort(x)


def decode_backlog_need(arrival_s: FloatArray, prefill_service_s: FloatArray, decode_s: FloatArray,
                        prefill_capacity: float, batch_target: float, quantile: float,
                        exact_max: int = EXACT_MAX) -> float:
    """Decode instances at which a share `quantile` of these requests decode at <= `batch_target`
    requests per instance, on average over their life, when a fluid prefill pool of `prefill_capacity`
    instances releases them (see the module docstring). `arrival_s` sorted ascending; `decode_s` each
    request's decode time at the TPOT objective."""
    if not (prefill_capacity > 0 and math.isfinite(prefill_capacity)):
        raise ModelInputError("prefill_capacity", prefill_capacity, "must be a positive number of instances")
    if not (batch_target > 0 and math.isfinite(batch_target)):
        raise ModelInputError("batch_target", batch_target, "must be a positive batch size")
    if not (0.0 < quantile <= 1.0):
        raise ModelInputError("quantile", quantile, "must be in (0, 1]")
    a = np.asarray(arrival_s, dtype=np.float64)
    if a.size == 0:
        return 0.0
    release = a + fluid_sojourns_s(a, np.asarray(prefill_service_s, dtype=np.float64), prefill_capacity)
    # beyond exact_max requests, the share is read from every k-th of them (the count is over all)
    at = np.linspace(0, a.size - 1, exact_max).astype(np.int64) if a.size > exact_max else None
    m = np.sort(mean_concurrency(release, np.asarray(decode_s, dtype=np.float64), at))
    # the share q of requests: the ceil(q n)-th smallest mean concurrency (as prefill's need_met)
    return float(m[max(0, math.ceil(quantile * m.size - 1e-9) - 1)]) / batch_target


def decode_arrivals_need(reqs: PricedRequests, tpot_s: float, prefill_capacity: float, batch_target: float,
                         quantile: float) -> float:
    """`decode_backlog_need` of priced requests, each decoding its output tokens at `tpot_s` a token."""
    if not (tpot_s > 0 and math.isfinite(tpot_s)):
        raise ModelInputError("tpot_s", tpot_s, "must be a positive number of seconds")
    dec = np.maximum(reqs.output_tokens, 1.0) * tpot_s
    return decode_backlog_need(reqs.arrival_s, reqs.service_s, dec, prefill_capacity, batch_target, quantile)
