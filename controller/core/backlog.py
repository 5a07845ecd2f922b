"""Prefill capacity read from the arrivals themselves: the work that arrived, at every time scale.

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
"""

from __future__ import annotations

import math

import numpy as np

from controller.core.errors import ModelInputError
from controller.core.prefill import FloatArray, PrefillCurve


def fluid_sojourns_s(arrival_s: FloatArray, service_s: FloatArray, capacity: float) -> FloatArray:
    """Sojourn of each request on one FIFO server working `capacity` seconds of work per second."""
    cum = np.cumsum(service_s)
    start = np.minimum.accumulate(cum - service_s - capacity * arrival_s)  # min over j <= i of C_{j-1} - c a_j
    return np.asarray((cum - capacity * arrival_s - start) / capacity, dtype=np.float64)


def backlog_need(arrival_s: FloatArray, service_s: FloatArray, budget_s: float, quantile: float,
                 rel_tol: float = 1e-3) -> float:
    """Instances at which a share `quantile` of these requests meet the TTFT budget (fluid pooled bound).

    `arrival_s` sorted ascending; `service_s` the prefill time of each on one instance.
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

    def enough(c: float) -> bool:
        return int(np.count_nonzero(fluid_sojourns_s(a, w, c) <= budget_s)) >= need_met

    hi = float(w.sum()) / budget_s  # all the work within one budget: every request meets it
    lo = hi * 1e-6
    if enough(lo):
        return lo
    while hi - lo > rel_tol * hi:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def prefill_backlog_need(curve: PrefillCurve, arrival_s: FloatArray, uncached_tokens: FloatArray, budget_s: float,
                         quantile: float | None, service_scale: float = 1.0) -> float:
    """`backlog_need` for requests given by arrival time and uncached input tokens (any order): each
    one's service is the profile's prefill time at its tokens, times the calibrated scale; a mean-TTFT
    objective (no quantile) asks for the median request."""
    order = np.argsort(np.asarray(arrival_s, dtype=np.float64), kind="stable")
    a = np.asarray(arrival_s, dtype=np.float64)[order]
    svc = curve.time_s(np.maximum(np.asarray(uncached_tokens, dtype=np.float64)[order], 1.0)) * service_scale
    return backlog_need(a, svc, budget_s, quantile or 0.5)
