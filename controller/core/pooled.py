"""The prefill pool as one queue: M/G/c, for a router that sends each request to the least-loaded instance.

`prefill.py` models each instance as its own M/G/1 queue fed lambda/N (the
source method's per-instance view). A router that routes by least load
(SGLang's router and smg do, for PD prefill) pools the instances: a request
waits only when *every* instance is busy, which at the same per-instance
load is far less waiting than N separate queues — the gap grows with N, so a
per-instance model fitted at one N is wrong at another (issue 9: the mean fit
pulled the service time ~18 % low, and the tail turned optimistic when N fell).

Waiting time in M/G/c (Allen-Cunneen / Kingman scaling of M/M/c):

    P(Wq > 0)      = C(c, a)           Erlang C, offered load a = lambda E[S]
    Wq | Wq > 0    ~ Exp(theta),       theta = (c/E[S] - lambda) * 2 / (1 + SCV)

which for c = 1 is exactly the exponential tail matched to the P-K mean that
`prefill.py` uses for M/G/1 (same theta, C = rho), so N = 1 predictions agree.
The sojourn tail convolves with the service-time samples,
P(Wq + S > t) = E_S[P(Wq > t - S)], so a heavy-tailed length mix shows up in
the quantile through its own long prompts.

With DP attention each instance runs `dp` groups at 1/dp of its throughput:
the pool is c = N x dp servers of the group service time.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from controller.core.errors import InfeasibleError
from controller.core.prefill import ServiceTime

_MAX_SERVERS = 4096


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in M/M/c with offered load a (< c); stable Erlang-B recursion."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    rho = a / c
    return b / (1.0 - rho * (1.0 - b))


@lru_cache(maxsize=1024)
def _samples(svc: ServiceTime) -> np.ndarray:
    """Service-time samples to convolve with: the observed ones, else 32 exponential mid-quantiles
    (M/M/1's assumption) when the second moment says exponential, else the mean (a constant)."""
    if svc.samples_s:
        return np.asarray(svc.samples_s, dtype=np.float64)
    if abs(svc.scv - 1.0) < 1e-6:
        u = (np.arange(32) + 0.5) / 32
        return np.asarray(-svc.mean_s * np.log(1.0 - u), dtype=np.float64)
    return np.asarray([svc.mean_s], dtype=np.float64)


def _tail_at(t: float, c: int, rate: float, svc: ServiceTime) -> float:
    """P(Wq + S > t) for c pooled servers at total arrival rate `rate`."""
    s = _samples(svc)
    a = rate * svc.mean_s
    if a >= c:
        return 1.0
    pc = erlang_c(c, a)
    theta = (c / svc.mean_s - rate) * 2.0 / (1.0 + svc.scv)
    slack = t - s
    tail = np.where(slack < 0, 1.0, pc * np.exp(-theta * np.maximum(slack, 0.0)))
    return float(tail.mean())


def _mean_sojourn(c: int, rate: float, svc: ServiceTime) -> float:
    a = rate * svc.mean_s
    if a >= c:
        return math.inf
    wq = erlang_c(c, a) / (c / svc.mean_s - rate) * (1.0 + svc.scv) / 2.0
    return svc.mean_s + wq


@lru_cache(maxsize=1024)  # pure; the model asks at a 5 %-grid rate (model.py), so ticks repeat questions
def pooled_sojourn_s(c: int, rate: float, svc: ServiceTime, quantile: float | None) -> float:
    """Predicted prefill sojourn (wait + service) in the pooled queue: mean or q-quantile; inf if unstable."""
    if rate * svc.mean_s >= c:
        return math.inf
    if quantile is None:
        return _mean_sojourn(c, rate, svc)
    target = 1.0 - quantile
    lo, hi = 0.0, float(_samples(svc).max()) + svc.mean_s
    while _tail_at(hi, c, rate, svc) > target:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _tail_at(mid, c, rate, svc) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    return hi


def _meets(c: int, rate: float, svc: ServiceTime, budget_s: float, quantile: float | None) -> bool:
    if quantile is None:
        return _mean_sojourn(c, rate, svc) <= budget_s
    # the q-quantile is within the budget iff the tail at the budget is within 1 - q
    return _tail_at(budget_s, c, rate, svc) <= 1.0 - quantile


@lru_cache(maxsize=4096)
def pooled_max_rate_rps(c: int, svc: ServiceTime, budget_s: float, quantile: float | None) -> float:
    """Largest total arrival rate c pooled servers carry within the objective (0 if none)."""
    if not _meets(c, 0.0, svc, budget_s, quantile):
        return 0.0
    lo, hi = 0.0, c / svc.mean_s
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if _meets(c, mid, svc, budget_s, quantile):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-6 * hi:
            break
    return lo


def pooled_need(rate_rps: float, svc: ServiceTime, budget_s: float, quantile: float | None,
                dp_groups: int = 1, max_instances: int = 1024) -> float:
    """Fractional instance count for `rate_rps`: N - 1 + the share of the N-th instance's added capacity used.

    Capacity grows faster than linearly in N (pooling), so the integer need is
    the first N whose pooled capacity reaches the rate, and the fraction
    interpolates between N - 1 and N: ceil(need) is that N.
    """
    if rate_rps <= 0:
        return 0.0
    group = svc.scaled(float(dp_groups)) if dp_groups > 1 else svc

    def cap(n: int) -> float:
        return pooled_max_rate_rps(min(n * dp_groups, _MAX_SERVERS), group, budget_s, quantile) if n > 0 else 0.0

    if cap(1) <= 0.0:  # the service alone misses the budget: no pool size helps
        raise InfeasibleError(
            f"ttft_budget_s={budget_s:.6g}: even an idle prefill instance misses the TTFT objective "
            f"(mean service time {svc.mean_s:.6g} s)"
        )
    # capacity grows with n: the first n that carries the rate, by doubling then bisection (log n
    # evaluations; a fleet of hundreds of instances made the linear scan the tick's largest cost)
    hi = 1
    while cap(hi) < rate_rps:
        if hi >= max_instances:
            return float(max_instances) * rate_rps / max(cap(max_instances), 1e-12)
        hi = min(2 * hi, max_instances)
    lo = hi // 2  # cap(lo) < rate (or lo = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cap(mid) >= rate_rps:
            hi = mid
        else:
            lo = mid
    prev = cap(hi - 1)
    return (hi - 1) + (rate_rps - prev) / max(cap(hi) - prev, 1e-12)


def pooled_ttft_s(n: int, rate_rps: float, svc: ServiceTime, overhead_s: float, quantile: float | None,
                  dp_groups: int = 1) -> float:
    """Predicted TTFT (overhead included) of n pooled prefill instances at rate_rps."""
    group = svc.scaled(float(dp_groups)) if dp_groups > 1 else svc
    return overhead_s + pooled_sojourn_s(min(n * dp_groups, _MAX_SERVERS), rate_rps, group, quantile)
