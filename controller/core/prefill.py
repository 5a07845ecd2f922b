"""Prefill as a queue: the source method's M/M/1 (eq. 8-13) and what goes beyond it.

One prefill queue serves requests one at a time (FIFO). A request's service
time S is the time to prefill its *uncached* input tokens. With arrival rate
lambda and mean service time E[S] (mu = 1/E[S]):

- M/M/1 (the source): sojourn time is exponential with rate (mu - lambda), so
  mean TTFT - T_overhead = 1/(mu - lambda)                          (eq. 12)
  and the q-quantile is ln(1/(1-q)) / (mu - lambda).
- M/G/1 (Pollaczek-Khinchine): E[Wq] = lambda E[S^2] / (2 (1 - rho)),
  sojourn = Wq + S. M/D/1 is the case E[S^2] = E[S]^2.
  Quantiles need the waiting-time tail P(Wq > t); P(Wq > 0) = rho always.
  M/D/1 uses the Cramer-Lundberg asymptote C exp(-theta t), theta the positive
  root of lambda (E[exp(theta S)] - 1) = theta and
  C = (1 - rho) / (lambda E[S exp(theta S)] - 1): asymptotically exact, and
  within ~2 % of simulation from P90 up at any load. M/G/1 with observed
  (often heavy-tailed) lengths uses an exponential tail matched to the P-K
  mean, rho exp(-t rho / E[Wq]): the Cramer-Lundberg root is dominated by the
  longest sample there and overshoots by up to 15 %. Both are exact for
  M/M/1. The sojourn quantile is the convolution with the service-time
  distribution (deterministic for M/D/1, the observed samples for M/G/1).

"Both directions": `sojourn_s` predicts the time at a given rate; `max_rate_rps`
inverts it for an objective. With DP attention each DP group is its own queue
(`dp_groups`): a group runs at 1/d of the instance's throughput and sees 1/d
of its traffic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from controller.core.errors import InfeasibleError, ModelInputError

FloatArray = npt.NDArray[np.float64]

# Bisection tolerance on rates, relative. Rates are solved to 1e-9 of mu.
_REL_TOL = 1e-9
# Service-time samples kept for M/G/1 quantiles; larger inputs are thinned
# deterministically (sorted, evenly spaced order statistics).
_MAX_SAMPLES = 2048


class QueueModel(StrEnum):
    MM1 = "mm1"
    MD1 = "md1"
    MG1 = "mg1"


@dataclass(frozen=True)
class ServiceTime:
    """Distribution of one queue's service time, in seconds.

    `samples_s` (sorted) is kept only when the distribution matters (M/G/1).
    """

    mean_s: float
    second_moment_s2: float
    samples_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (self.mean_s > 0 and math.isfinite(self.mean_s)):
            raise ModelInputError("service_time_mean_s", self.mean_s, "must be a positive finite number")
        if self.second_moment_s2 < self.mean_s**2 * (1 - 1e-9):
            raise ModelInputError(
                "service_time_second_moment_s2", self.second_moment_s2, f"must be >= mean^2 = {self.mean_s**2!r}"
            )

    @property
    def rate_rps(self) -> float:
        """mu = 1/E[S] (eq. 9 for the constant-throughput case: TPmax / L_in)."""
        return 1.0 / self.mean_s

    @property
    def scv(self) -> float:
        """Squared coefficient of variation: 0 deterministic, 1 exponential."""
        return self.second_moment_s2 / self.mean_s**2 - 1.0

    @classmethod
    def deterministic(cls, s: float) -> ServiceTime:
        return cls(mean_s=s, second_moment_s2=s * s, samples_s=(s,))

    @classmethod
    def from_samples(cls, samples_s: Sequence[float] | FloatArray) -> ServiceTime:
        arr = np.sort(np.asarray(samples_s, dtype=np.float64))
        if arr.size == 0:
            raise ModelInputError("service_time_samples", "[]", "need at least one sample")
        if not np.all(np.isfinite(arr)) or arr[0] <= 0:
            raise ModelInputError("service_time_samples", float(arr[0]), "samples must be positive and finite")
        mean = float(arr.mean())
        m2 = float(np.mean(arr * arr))
        if arr.size > _MAX_SAMPLES:
            idx = np.linspace(0, arr.size - 1, _MAX_SAMPLES).round().astype(np.int64)
            arr = arr[idx]
        return cls(mean_s=mean, second_moment_s2=max(m2, mean * mean), samples_s=tuple(float(x) for x in arr))

    def scaled(self, factor: float) -> ServiceTime:
        """Service time of a queue running `factor` times slower (DP group of an instance)."""
        return ServiceTime(
            mean_s=self.mean_s * factor,
            second_moment_s2=self.second_moment_s2 * factor * factor,
            samples_s=tuple(s * factor for s in self.samples_s),
        )

    def for_model(self, model: QueueModel) -> ServiceTime:
        """The distribution each model assumes, keeping the observed mean.

        M/M/1 assumes exponential service (E[S^2] = 2 E[S]^2), M/D/1 a constant,
        M/G/1 the observed distribution.
        """
        if model is QueueModel.MM1:
            return ServiceTime(self.mean_s, 2.0 * self.mean_s**2, ())
        if model is QueueModel.MD1:
            return ServiceTime.deterministic(self.mean_s)
        if not self.samples_s:
            return ServiceTime(self.mean_s, self.second_moment_s2, (self.mean_s,))
        return self


def _check_quantile(q: float | None) -> None:
    if q is not None and not (0.0 < q < 1.0):
        raise ModelInputError("ttft_quantile", q, "must be in (0, 1), e.g. 0.9 for P90, or unset for the mean")


def _check_rate(rate_rps: float, svc: ServiceTime) -> None:
    if not (rate_rps >= 0 and math.isfinite(rate_rps)):
        raise ModelInputError("rate_rps", rate_rps, "must be a non-negative finite number")
    if rate_rps >= svc.rate_rps:
        raise ModelInputError(
            "rate_rps",
            rate_rps,
            f"at or above the service rate mu={svc.rate_rps:.6g} req/s: the prefill queue is unstable",
        )


def mean_wait_s(rate_rps: float, svc: ServiceTime) -> float:
    """Pollaczek-Khinchine mean waiting time in queue: lambda E[S^2] / (2 (1 - rho))."""
    rho = rate_rps * svc.mean_s
    return rate_rps * svc.second_moment_s2 / (2.0 * (1.0 - rho))


def cramer_lundberg(rate_rps: float, samples_s: FloatArray) -> tuple[float, float]:
    """(theta, C) of the waiting-time tail P(Wq > t) ~ C exp(-theta t) for service samples.

    theta > 0 solves f(theta) = lambda (E[exp(theta S)] - 1) - theta = 0; f is convex
    with f(0) = 0 and f'(0) = rho - 1 < 0, so the positive root is unique and bisection finds it.
    """
    s = samples_s

    def f(th: float) -> float:
        return float(rate_rps * (np.mean(np.exp(th * s)) - 1.0) - th)

    lo, hi = 0.0, 1.0 / float(s.max())
    while f(hi) < 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    theta = hi
    rho = rate_rps * float(s.mean())
    slope = float(rate_rps * np.mean(s * np.exp(theta * s))) - 1.0
    return theta, (1.0 - rho) / slope


def _wait_tail_params(model: QueueModel, rate_rps: float, svc: ServiceTime) -> tuple[float, float]:
    rho = rate_rps * svc.mean_s
    if model is QueueModel.MD1:
        return cramer_lundberg(rate_rps, np.asarray(svc.samples_s, dtype=np.float64))
    return rho / mean_wait_s(rate_rps, svc), rho


def _sojourn_tail(t: float, rate_rps: float, svc: ServiceTime, theta: float, c: float) -> float:
    """P(Wq + S > t) = E_S[P(Wq > t - S)]: P(Wq > x) = 1 for x < 0, min(rho, c exp(-theta x)) after."""
    s = np.asarray(svc.samples_s, dtype=np.float64)
    rho = rate_rps * svc.mean_s
    slack = t - s
    tail = np.where(slack < 0, 1.0, np.minimum(rho, c * np.exp(-theta * np.maximum(slack, 0.0))))
    return float(tail.mean())


def sojourn_s(model: QueueModel, rate_rps: float, svc: ServiceTime, quantile: float | None = None) -> float:
    """Predicted time in the prefill queue (wait + service), mean or q-quantile."""
    _check_quantile(quantile)
    svc = svc.for_model(model)
    _check_rate(rate_rps, svc)
    if model is QueueModel.MM1:
        # eq. 12, and its exponential quantile
        decay = svc.rate_rps - rate_rps
        return 1.0 / decay if quantile is None else math.log(1.0 / (1.0 - quantile)) / decay
    if quantile is None:
        return svc.mean_s + mean_wait_s(rate_rps, svc)
    target = 1.0 - quantile
    if rate_rps == 0.0:
        return float(np.quantile(np.asarray(svc.samples_s), quantile))
    theta, c = _wait_tail_params(model, rate_rps, svc)
    # invert the tail by bisection: it is decreasing in t
    lo, hi = 0.0, max(svc.samples_s) + svc.mean_s
    while _sojourn_tail(hi, rate_rps, svc, theta, c) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _sojourn_tail(mid, rate_rps, svc, theta, c) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def max_rate_rps(model: QueueModel, svc: ServiceTime, budget_s: float, quantile: float | None = None) -> float:
    """Largest arrival rate whose predicted sojourn (mean or quantile) is <= budget_s.

    budget_s is the TTFT objective less the fixed overhead (eq. 12's TTFT - T_overhead).
    """
    _check_quantile(quantile)
    if not (budget_s > 0 and math.isfinite(budget_s)):
        raise ModelInputError("ttft_budget_s", budget_s, "TTFT objective must exceed the fixed overhead")
    svc = svc.for_model(model)
    mu = svc.rate_rps
    if model is QueueModel.MM1:
        # eq. 13 in rate form: lambda = mu - c/budget, c = 1 (mean) or ln(1/(1-q)).
        c = 1.0 if quantile is None else math.log(1.0 / (1.0 - quantile))
        lam = mu - c / budget_s
    elif quantile is None:
        # P-K mean: s + lambda s2 / (2 (1 - lambda s)) <= T
        #   => lambda <= 2 (T - s) / (s2 + 2 s (T - s))
        s, s2 = svc.mean_s, svc.second_moment_s2
        lam = 2.0 * (budget_s - s) / (s2 + 2.0 * s * (budget_s - s)) if budget_s > s else -1.0
    else:
        if sojourn_s(model, 0.0, svc, quantile) > budget_s:
            lam = -1.0
        else:
            lo, hi = 0.0, mu * (1.0 - 1e-12)
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if sojourn_s(model, mid, svc, quantile) <= budget_s:
                    lo = mid
                else:
                    hi = mid
                if hi - lo <= _REL_TOL * mu:
                    break
            lam = lo
    if lam <= 0:
        what = "mean" if quantile is None else f"P{quantile * 100:g}"
        raise InfeasibleError(
            f"ttft_budget_s={budget_s:.6g}: even an idle prefill instance misses the {what} TTFT objective "
            f"(mean service time {svc.mean_s:.6g} s, model {model.value})"
        )
    return lam


# --- service time from a measured prefill curve -----------------------------------------------


@dataclass(frozen=True)
class PrefillCurve:
    """Prefill time of one request as a function of its (uncached) input tokens.

    Either a constant saturated throughput `max_tps` (the source method's TPmax),
    or a measured curve `time_ms` at `input_len` points: piecewise linear
    between points, flat below the first (a forward pass has a floor), linear
    extrapolation beyond the last.
    """

    max_tps: float | None = None
    input_len: tuple[float, ...] = ()
    time_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tps is not None:
            if not (self.max_tps > 0 and math.isfinite(self.max_tps)):
                raise ModelInputError("prefill_max_tps", self.max_tps, "must be a positive finite number")
            return
        if len(self.input_len) < 1 or len(self.input_len) != len(self.time_ms):
            raise ModelInputError(
                "prefill.input_len", list(self.input_len), "need >= 1 point and as many time_ms values"
            )
        xs, ys = np.asarray(self.input_len), np.asarray(self.time_ms)
        if np.any(np.diff(xs) <= 0) or xs[0] <= 0:
            raise ModelInputError("prefill.input_len", list(self.input_len), "must be positive and strictly increasing")
        if np.any(ys <= 0) or np.any(np.diff(ys) < 0):
            raise ModelInputError("prefill.time_ms", list(self.time_ms), "must be positive and non-decreasing")

    def time_s(self, tokens: float | FloatArray) -> FloatArray:
        x = np.asarray(tokens, dtype=np.float64)
        if self.max_tps is not None:
            return np.asarray(x / self.max_tps, dtype=np.float64)
        xs, ys = np.asarray(self.input_len), np.asarray(self.time_ms)
        y = np.interp(x, xs, ys)
        if xs.size >= 2:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            y = np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), y)
        return np.asarray(y / 1000.0, dtype=np.float64)

    def max_tps_at(self, input_len: float) -> float:
        """Saturated throughput TPmax at this input length (tokens / prefill time)."""
        return float(input_len / float(self.time_s(input_len)))


def service_time(
    curve: PrefillCurve,
    input_len: float | Sequence[float] | FloatArray,
    cache_hit_rate: float = 0.0,
) -> ServiceTime:
    """Service-time distribution for requests of these input lengths.

    Prefix-cache hits remove work from prefill: only (1 - hit) of the input is
    computed. A single length gives a point mass (M/D/1 = M/G/1 then).
    """
    if not (0.0 <= cache_hit_rate < 1.0):
        raise ModelInputError("cache_hit_rate", cache_hit_rate, "must be in [0, 1)")
    lengths = np.atleast_1d(np.asarray(input_len, dtype=np.float64))
    if lengths.size == 0 or not np.all(np.isfinite(lengths)) or np.any(lengths <= 0):
        bad = lengths[~(np.isfinite(lengths) & (lengths > 0))]
        raise ModelInputError("input_len", float(bad[0]) if bad.size else "[]", "must be positive")
    times = curve.time_s(lengths * (1.0 - cache_hit_rate))
    if lengths.size == 1:
        return ServiceTime.deterministic(float(times[0]))
    return ServiceTime.from_samples(times)


@dataclass(frozen=True)
class PrefillQueueing:
    """One prefill instance: model choice, DP groups, and the objective solved."""

    model: QueueModel = QueueModel.MM1
    dp_groups: int = 1

    def __post_init__(self) -> None:
        if self.dp_groups < 1:
            raise ModelInputError("dp_groups", self.dp_groups, "must be >= 1")

    def group_service(self, svc: ServiceTime) -> ServiceTime:
        return svc.scaled(float(self.dp_groups)) if self.dp_groups > 1 else svc

    def max_rate_rps(self, svc: ServiceTime, budget_s: float, quantile: float | None) -> float:
        """Max arrival rate for the whole instance (sum over its DP groups)."""
        return self.dp_groups * max_rate_rps(self.model, self.group_service(svc), budget_s, quantile)

    def ttft_s(self, rate_rps: float, svc: ServiceTime, overhead_s: float, quantile: float | None) -> float:
        """Predicted TTFT (mean or quantile) at this instance's arrival rate, overhead included."""
        return overhead_s + sojourn_s(self.model, rate_rps / self.dp_groups, self.group_service(svc), quantile)

