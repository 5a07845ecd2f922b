"""Online calibration of the models against what the fleet shows, with bounded drift.

Prefill: the profile's service time is scaled by k (TPmax_fit = TPmax / k).
Each fit solves for the k whose predicted mean prefill sojourn (Pollaczek-
Khinchine, per instance at lambda / n_prefill) equals the observed mean
TTFT less the fixed overhead. Decode: TPOT observed at the observed mean
batch over the profile's TPOT at that batch. A fit moves the running scale
by an EMA in log space, at most `calibration_max_step` per tick, and within
`calibration_bounds`: one noisy window cannot swing the model.
Predicted-vs-observed relative error is kept as an EMA for operators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from controller.core.control.params import ControlParams
from controller.core.control.types import CalibrationView
from controller.core.prefill import ServiceTime


@dataclass(frozen=True)
class CalibrationState:
    prefill_scale: float = 1.0
    tpot_scale: float = 1.0
    ttft_error_rel: float | None = None
    tpot_error_rel: float | None = None
    prefill_fits: int = 0
    decode_fits: int = 0

    def view(self, tpmax_profile_tps: float | None) -> CalibrationView:
        return CalibrationView(
            prefill_service_scale=self.prefill_scale,
            tpot_scale=self.tpot_scale,
            prefill_tpmax_tps=None if tpmax_profile_tps is None else tpmax_profile_tps / self.prefill_scale,
            ttft_error_rel=self.ttft_error_rel,
            tpot_error_rel=self.tpot_error_rel,
            prefill_fits=self.prefill_fits,
            decode_fits=self.decode_fits,
        )


def bounded_step(old: float, fit: float, p: ControlParams) -> float:
    """EMA in log space, step-limited and clamped to the bounds."""
    if not (fit > 0 and math.isfinite(fit)):
        return old
    step = p.calibration_alpha * math.log(fit / old)
    step = max(-p.calibration_max_step, min(p.calibration_max_step, step))
    lo, hi = p.calibration_bounds
    return min(hi, max(lo, old * math.exp(step)))


def pk_mean_sojourn_s(rate_rps: float, svc: ServiceTime, k: float) -> float:
    """M/G/1 mean time in system with service scaled by k; inf when unstable."""
    s, s2 = svc.mean_s * k, svc.second_moment_s2 * k * k
    rho = rate_rps * s
    if rho >= 1.0:
        return math.inf
    return s + rate_rps * s2 / (2.0 * (1.0 - rho))


def fit_prefill_scale(per_instance_rate_rps: float, svc: ServiceTime, observed_sojourn_s: float, p: ControlParams) -> float | None:
    """The k with predicted mean sojourn = observed (bisection within the bounds), or None."""
    if not (observed_sojourn_s > 0 and math.isfinite(observed_sojourn_s)):
        return None
    lo, hi = p.calibration_bounds
    f_lo = pk_mean_sojourn_s(per_instance_rate_rps, svc, lo)
    f_hi = pk_mean_sojourn_s(per_instance_rate_rps, svc, hi)
    if observed_sojourn_s <= f_lo:
        return lo
    if observed_sojourn_s >= f_hi:
        return hi
    a, b = lo, hi
    for _ in range(40):  # sojourn is increasing in k
        m = 0.5 * (a + b)
        if pk_mean_sojourn_s(per_instance_rate_rps, svc, m) < observed_sojourn_s:
            a = m
        else:
            b = m
    return 0.5 * (a + b)


def _ema_err(old: float | None, new: float, a: float = 0.1) -> float:
    return new if old is None else a * new + (1 - a) * old


def update_prefill(
    st: CalibrationState,
    per_instance_rate_rps: float,
    svc: ServiceTime,
    observed_sojourn_s: float,
    p: ControlParams,
) -> CalibrationState:
    predicted = pk_mean_sojourn_s(per_instance_rate_rps, svc, st.prefill_scale)
    err = st.ttft_error_rel
    if math.isfinite(predicted) and observed_sojourn_s > 0:
        err = _ema_err(err, (predicted - observed_sojourn_s) / observed_sojourn_s)
    if not p.calibrate:
        return replace(st, ttft_error_rel=err)
    fit = fit_prefill_scale(per_instance_rate_rps, svc, observed_sojourn_s, p)
    if fit is None:
        return replace(st, ttft_error_rel=err)
    return replace(st, prefill_scale=bounded_step(st.prefill_scale, fit, p), ttft_error_rel=err,
                   prefill_fits=st.prefill_fits + 1)


def update_prefill_busy(
    st: CalibrationState, rate_rps: float, serving: int, busy_fraction: float, svc: ServiceTime, p: ControlParams,
) -> CalibrationState:
    """Fit the service scale from the measured busy time: E[S]_observed = busy x N / lambda.

    Busy time is a direct measurement of service, unconfounded by how the
    router spreads requests across instances (pooled least-load routing
    queues far less than N separate M/G/1 queues, so a fit of the mean
    sojourn would pull the service time below the profile and turn the tail
    model optimistic when N falls). Only between 5 % and 90 % busy: near idle
    the ratio is noise, near saturation the busy share stops growing with load.
    """
    if not p.calibrate or not (0.05 <= busy_fraction <= 0.9) or rate_rps <= 0 or serving <= 0 or svc.mean_s <= 0:
        return st
    fit = busy_fraction * serving / (rate_rps * svc.mean_s)
    return replace(st, prefill_scale=bounded_step(st.prefill_scale, fit, p), prefill_fits=st.prefill_fits + 1)


def update_decode(st: CalibrationState, profile_tpot_ms: float, observed_tpot_ms: float, p: ControlParams) -> CalibrationState:
    if not (profile_tpot_ms > 0 and observed_tpot_ms > 0):
        return st
    predicted = profile_tpot_ms * st.tpot_scale
    err = _ema_err(st.tpot_error_rel, (predicted - observed_tpot_ms) / observed_tpot_ms)
    if not p.calibrate:
        return replace(st, tpot_error_rel=err)
    return replace(st, tpot_scale=bounded_step(st.tpot_scale, observed_tpot_ms / profile_tpot_ms, p),
                   tpot_error_rel=err, decode_fits=st.decode_fits + 1)
