"""Load forecast: Holt level + trend on the rate estimates, a seasonal (history) term, a margin.

Holt's linear method with time-based smoothing (alpha = 1 - exp(-dt/tau)) so
the behaviour does not change with the tick period. The seasonal term is the
change seen one period ago over the same horizon (additive seasonal naive,
the history-aware part of DOPD-style proactive reconfiguration): if traffic
rose between t-P and t-P+h yesterday, expect the same rise now. The plan
sizes for the forecast *maximum* over the lead time an action needs, plus z
standard deviations of the one-step forecast residuals, and at least the
level plus the q-quantile of how far the load has risen within one lead
time in the recent past (learned online: each sample's level is compared
with the maximum rate seen during the lead time that followed it; samples
still inside their lead time count with their rise so far, a lower bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from controller.core.control.params import ControlParams
from controller.core.control.types import FloatArray, Forecast


@dataclass(frozen=True)
class ForecastState:
    level: float | None = None
    trend: float = 0.0
    resid_var: float = 0.0
    last_s: float | None = None
    # seasonal ring: mean rate per bucket, and the time each bucket was last written
    season_rate: FloatArray | None = None
    season_time: FloatArray | None = None
    # learned rise over the lead time: open samples (issued_s, level, running max of the rate)
    # and the rises (max over the lead time - level, req/s) of the samples that have matured
    pending: tuple[tuple[float, float, float], ...] = ()
    rise_ratios: tuple[float, ...] = ()  # req/s
    last_issue_s: float = -math.inf
    # the rate observations of the last trend span, thinned (time, req/s): the sustained-trend fit
    recent: tuple[tuple[float, float], ...] = ()


def _ring(p: ControlParams) -> int:
    return max(1, math.ceil(p.season_period_s / p.season_bucket_s))


def _rise(st: ForecastState, rate: float, now: float, level: float, p: ControlParams) -> tuple[
        tuple[tuple[float, float, float], ...], tuple[float, ...], float]:
    """Track how far the load rose within one lead time after each sample (history-aware margin)."""
    lead = p.lead_s
    pending = []
    ratios = list(st.rise_ratios)
    for t0, lvl, top in st.pending:
        top = max(top, rate)
        if now >= t0 + lead:
            ratios.append(top - lvl)
        else:
            pending.append((t0, lvl, top))
    issued = st.last_issue_s
    if now - issued >= max(lead / 10.0, p.tick_period_s):
        pending.append((now, level, rate))
        issued = now
    return tuple(pending), tuple(ratios[-p.rise_history:]), issued


def update(st: ForecastState, rate: float, now: float, p: ControlParams) -> ForecastState:
    """Fold one rate observation in."""
    if st.level is None or st.last_s is None:
        n = _ring(p)
        sr = np.full(n, np.nan)
        stt = np.full(n, -np.inf)
        b = int(now // p.season_bucket_s) % n
        sr[b], stt[b] = rate, now
        return ForecastState(rate, 0.0, 0.0, now, sr, stt)
    dt = max(now - st.last_s, 1e-9)
    pred = st.level + st.trend * dt
    a = 1.0 - math.exp(-dt / p.level_tau_s)
    g = 1.0 - math.exp(-dt / p.trend_tau_s)
    level = a * rate + (1.0 - a) * pred
    trend = g * (level - st.level) / dt + (1.0 - g) * st.trend
    resid = rate - pred
    resid_var = a * resid * resid + (1.0 - a) * st.resid_var
    assert st.season_rate is not None and st.season_time is not None
    sr, stt = st.season_rate.copy(), st.season_time.copy()
    n = sr.size
    b = int(now // p.season_bucket_s) % n
    if now - stt[b] > p.season_bucket_s:  # a new pass over this bucket: restart its mean
        sr[b] = rate
    else:
        sr[b] = 0.8 * sr[b] + 0.2 * rate
    stt[b] = now
    pending, ratios, issued = _rise(st, rate, now, max(level, 0.0), p)
    recent = st.recent
    if not recent or now - recent[-1][0] >= p.window_s / 6.0:
        keep = _trend_span_s(p)
        recent = (*tuple(x for x in recent if x[0] >= now - keep), (now, rate))
    return replace(st, level=max(level, 0.0), trend=trend, resid_var=resid_var, last_s=now, season_rate=sr,
                   season_time=stt, pending=pending, rise_ratios=ratios, last_issue_s=issued, recent=recent)


def _trend_span_s(p: ControlParams) -> float:
    """The sustained-trend fit reads one lead time of rates, at least four estimator windows."""
    return max(p.lead_s, 4.0 * p.window_s)


def sustained_rise(recent: tuple[tuple[float, float], ...], now: float, horizon_s: float,
                   p: ControlParams) -> float | None:
    """The rate a trend sustained over the last lead time reaches at now + horizon_s, or None.

    Least squares over the span's rate observations; the slope is taken at its lower confidence bound,
    slope - z * SE, and at most the later half's own slope, and only when positive: noise and a flat load
    have none, a step none once it is half a span old, a ramp keeps most of its slope. The observations
    are windowed means, so neighbours share most of their requests: the standard error counts
    span / window_s independent points, not one per tick. Extrapolated undamped over the horizon from the
    later half's line at now (the Holt level lags a ramp by its smoothing time).
    """
    z = p.trend_lcb_z
    if z <= 0 or len(recent) < 4:
        return None
    t = np.fromiter((x[0] for x in recent), float, len(recent))
    r = np.fromiter((x[1] for x in recent), float, len(recent))
    span = float(t[-1] - t[0])
    n_eff = span / p.window_s
    if n_eff < 4.0:
        return None
    tm, rm = float(t.mean()), float(r.mean())
    sxx = float(np.sum((t - tm) ** 2))
    b = float(np.sum((t - tm) * (r - rm))) / sxx
    resid = r - rm - b * (t - tm)
    s2 = float(np.sum(resid ** 2)) / max(len(t) - 2, 1)
    se = math.sqrt(s2 / sxx * len(t) / max(n_eff - 2.0, 1.0))
    # a step is not a trend: the line through a step slopes for a whole span after it, but the load
    # since is flat. The later half must keep rising at that slope too (its own least-squares slope), and
    # the extrapolation starts from the later half's line at now (the whole span's overshoots a step)
    late = t >= t[0] + span / 2.0
    tl, rl = t[late], r[late]
    tlm, rlm = float(tl.mean()), float(rl.mean())
    b_late = float(np.sum((tl - tlm) * (rl - rlm))) / max(float(np.sum((tl - tlm) ** 2)), 1e-9)
    slope = min(b - z * se, b_late)
    if slope <= 0:
        return None
    return rlm + b_late * (now - tlm) + slope * horizon_s


def _seasonal_delta(st: ForecastState, now: float, horizon_s: float, p: ControlParams) -> float | None:
    """Max rise over [now-P, now-P+h] one period ago, if that history exists."""
    if st.season_rate is None or st.season_time is None:
        return None
    n = st.season_rate.size
    period = p.season_period_s
    base_b = int((now - period) // p.season_bucket_s) % n
    base_t = st.season_time[base_b]
    # valid only if written during the previous period, not this one
    if not (now - period - 2 * p.season_bucket_s <= base_t <= now - period + p.season_bucket_s):
        return None
    base = st.season_rate[base_b]
    best = 0.0
    steps = max(1, math.ceil(horizon_s / p.season_bucket_s))
    for k in range(1, steps + 1):
        b = int((now - period + k * p.season_bucket_s) // p.season_bucket_s) % n
        t = st.season_time[b]
        if now - period - p.season_bucket_s <= t <= now - period + (k + 1) * p.season_bucket_s:
            best = max(best, float(st.season_rate[b] - base))
    return best


def forecast(st: ForecastState, now: float, horizon_s: float, p: ControlParams) -> Forecast:
    """Forecast maximum over [now, now + horizon_s]."""
    if st.level is None or st.last_s is None:
        return Forecast(0.0, 0.0, None, horizon_s, 0.0)
    level = st.level + st.trend * max(now - st.last_s, 0.0)
    # damped trend (Gardner): a trend persists for ~trend_damping_s, so over horizon h it adds
    # trend * tau_d * (1 - exp(-h / tau_d)) - a noisy trend cannot be extrapolated over a long cold start
    tau_d = p.trend_damping_s
    rise = st.trend * tau_d * (1.0 - math.exp(-horizon_s / tau_d)) if tau_d > 0 else 0.0
    # the damped path is monotone: its maximum over the horizon is at one end
    holt_max = max(level, level + rise)
    sdelta = _seasonal_delta(st, now, horizon_s, p)
    seasonal = None if sdelta is None else level + sdelta
    top = holt_max if seasonal is None else max(holt_max, seasonal)
    top += p.forecast_z * math.sqrt(max(st.resid_var, 0.0))
    # a trend sustained over the last lead time, at its lower confidence bound: the damped Holt trend
    # keeps ~3/4 of a steady ramp a 10-minute cold start ahead, and orders capacity a cold start late
    sustained = sustained_rise(st.recent, now, horizon_s, p)
    if sustained is not None:
        top = max(top, sustained)
    # history-aware margin: the q-quantile of how far load has risen within one lead time
    # (additive, in req/s: a ratio to a near-idle level would explode after idle gaps)
    # Samples still inside their lead time count too: each one's rise so far is a lower bound of its
    # rise, and a ramp under way shows there a lead time before any sample matures (ten matured samples
    # take two lead times). Taken as a max with the matured samples' own quantile, so the young ones
    # (risen ~0 so far) never dilute it.
    if p.rise_quantile > 0:
        with_pending = st.rise_ratios + tuple(peak - lvl for _, lvl, peak in st.pending)
        for learned in (st.rise_ratios, with_pending):
            if len(learned) >= p.rise_min_samples:
                rise = float(np.quantile(np.asarray(learned), p.rise_quantile))
                top = max(top, level + max(rise, 0.0))
    if len(st.rise_ratios) < p.rise_min_samples and p.rise_prior_frac > 0:
        # fewer matured than rise_min_samples: the prior rise as well, pro rata to the horizon
        # (a cold start of 10 min: the full share)
        top = max(top, level * (1.0 + p.rise_prior_frac * min(1.0, horizon_s / 600.0)))
    return Forecast(level, st.trend, seasonal, horizon_s, max(top, 0.0))
