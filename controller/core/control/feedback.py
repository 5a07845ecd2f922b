"""Feedback on the objective itself: the observed tail against the target corrects the model.

The queueing and batch models size each pool from a profile. When the model
is wrong — pooled routing across instances, queueing at the router's decode
gate, KV transfer, a heavier length tail than the fitted one — mean-fitted
calibration cannot see it, because the error lives in the tail. This stage
watches what the objective is about: the share of requests in the window that
missed the TTFT (resp. TPOT) target, against the share the objective allows
(1 - q for a q-quantile objective; `miss_allowance` otherwise). Their ratio is
the SLO *burn rate* (as in SRE error budgets).

Each pool keeps a headroom multiplier h >= 1 on its model need:

- burn > 1 for a pool that is not mid-change: h grows, in log space, by
  `feedback_gain * min(burn - 1, 4)` per window of sustained burn (an integral
  controller on the burn rate, bounded by `feedback_max`);
- burn < 1/2: h relaxes toward 1 with time constant `feedback_decay_s`;
- otherwise h holds.

Decode's h may fall below 1 (elastic mode only; `decode_slack_min` < 1): an
error budget left unspent is GPU-hours bought for nothing. The model's margins
(forecast maximum, Poisson batch margin, burst quantile) compound, and on
steady traffic decode meets TPOT with almost no misses. While decode's burn,
averaged over `slack_avg_s`, stays below `slack_burn`, the window's burn below
1/2, the pool is not growing and the load is not rising, h falls by
`slack_rate` (log) per window, down to `decode_slack_min`. Only the model's
need is scaled: decode's two observed needs (the running batch at the target
batch, the arrivals' concurrency at the objective's batch) stay whole, and they
are the floor. A window burning half its allowance or more puts h back to 1 at
once. Prefill keeps h >= 1: its only observed floor is the fluid bound of the
arrivals, which has no queue in it, and a queue near saturation turns a burst
10 % above a relaxed plan into a minute of TTFT misses (tried: the elastic
conversation -> code scenario fell 99.25 -> 97.9 %).

Anti-windup: while the pool is growing (a scale-up or a flip toward it is in
progress) the misses are already being answered, so h does not integrate
them. Misses are attributed to the pool whose objective they miss: TTFT to
prefill, TPOT to decode (TTFT misses while requests wait at the router's
decode gate are decode's; see `attribute_ttft_to_decode`).

Also exported: the TTFT at the objective's quantile as observed in the window,
to set beside the model's prediction at the current fleet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from controller.core.control.params import ControlParams
from controller.core.control.types import FloatArray
from controller.core.sizing import Objectives


@dataclass(frozen=True)
class FeedbackState:
    prefill_headroom: float = 1.0
    decode_headroom: float = 1.0
    last_s: float | None = None
    decode_burn_avg: float | None = None  # decode's burn averaged over slack_avg_s (None before a window)


@dataclass(frozen=True)
class Burn:
    """What the window says about the objectives."""

    samples: int
    ttft_miss: float  # share of requests with TTFT over the target
    tpot_miss: float
    allowed_ttft: float  # share the objective allows
    allowed_tpot: float
    ttft_observed_q_s: float | None  # TTFT at the objective's quantile (or the mean for a mean objective)
    tpot_observed_q_ms: float | None  # TPOT at 1 - allowed_tpot

    @property
    def ttft_burn(self) -> float:
        return self.ttft_miss / self.allowed_ttft if self.allowed_ttft > 0 else 0.0

    @property
    def tpot_burn(self) -> float:
        return self.tpot_miss / self.allowed_tpot if self.allowed_tpot > 0 else 0.0


def measure_burn(ttft_s: FloatArray, tpot_s: FloatArray, obj: Objectives, p: ControlParams) -> Burn | None:
    """Burn rates of the window's completed requests; None on fewer than `min_samples`."""
    n = int(ttft_s.size)
    if n < p.min_samples:
        return None
    q = obj.ttft_quantile
    allowed_ttft = (1.0 - q) if q is not None else p.miss_allowance
    allowed_tpot = p.miss_allowance
    ttft_ok = np.isfinite(ttft_s)
    tpot_ok = np.isfinite(tpot_s) & (tpot_s > 0)
    ttft_miss = float(np.mean(ttft_s[ttft_ok] > obj.ttft_s)) if ttft_ok.any() else 0.0
    tpot_miss = float(np.mean(tpot_s[tpot_ok] * 1000.0 > obj.tpot_ms)) if tpot_ok.any() else 0.0
    if q is None:
        # a mean objective: its burn is the observed mean over the target (1 = exactly at it)
        mean = float(np.mean(ttft_s[ttft_ok])) if ttft_ok.any() else 0.0
        ttft_miss = allowed_ttft * mean / obj.ttft_s
        t_q: float | None = mean if ttft_ok.any() else None
    else:
        t_q = float(np.quantile(ttft_s[ttft_ok], q)) if ttft_ok.any() else None
    tpot_q = float(np.quantile(tpot_s[tpot_ok], 1.0 - allowed_tpot)) * 1000.0 if tpot_ok.any() else None
    return Burn(n, ttft_miss, tpot_miss, allowed_ttft, allowed_tpot, t_q, tpot_q)


def _average(avg: float | None, burn: float, dt: float, p: ControlParams) -> float:
    if avg is None:
        return burn
    a = 1.0 - math.exp(-dt / p.slack_avg_s)
    return avg + a * (burn - avg)


def _step(h: float, burn: float, growing: bool, dt: float, p: ControlParams,
          relax: bool = False, avg: float = math.inf) -> float:
    """One pool's headroom; `relax` (decode, elastic) lets a calm `avg` burn take it below 1."""
    if burn >= 0.5:
        h = max(h, 1.0)  # half the allowance spent in the window: the model's full plan, at once
    if burn > 1.0 and not growing:
        h *= math.exp(p.feedback_gain * min(burn - 1.0, 4.0) * dt / p.window_s)
    elif burn < 0.5 and h > 1.0:
        h = 1.0 + (h - 1.0) * math.exp(-dt / p.feedback_decay_s)
    elif burn < 0.5 and relax and not growing and avg < p.slack_burn:
        h *= math.exp(-p.slack_rate * dt / p.window_s)
    # below 1 only by relaxing; once there, h holds while relaxing is not allowed
    return min(max(h, p.decode_slack_min if relax or h < 1.0 else 1.0), p.feedback_max)


def update_feedback(
    st: FeedbackState, burn: Burn | None, now: float, p: ControlParams,
    prefill_growing: bool, decode_growing: bool, ttft_is_decode: bool = False, relax_decode: bool = False,
) -> FeedbackState:
    """One feedback step; `ttft_is_decode` attributes TTFT misses to decode (router-side decode wait).

    `relax_decode`: the tick allows decode to spend an unspent budget (elastic mode, past the
    start-up, load not rising); without it a headroom below 1 holds where it is.
    """
    if p.feedback_gain <= 0:
        return FeedbackState(1.0, 1.0, now)
    dt = 0.0 if st.last_s is None else min(max(now - st.last_s, 0.0), p.window_s)
    if burn is None or dt == 0.0:
        return replace(st, last_s=now)
    ttft_burn = burn.ttft_burn
    p_burn = 0.0 if ttft_is_decode else ttft_burn
    d_burn = max(burn.tpot_burn, ttft_burn if ttft_is_decode else 0.0)
    d_avg = _average(st.decode_burn_avg, d_burn, dt, p)
    return FeedbackState(
        _step(st.prefill_headroom, p_burn, prefill_growing, dt, p),
        _step(st.decode_headroom, d_burn, decode_growing, dt, p, relax_decode, d_avg),
        now, d_avg,
    )


def breaching(burn: Burn | None, role_is_prefill: bool) -> bool:
    """Does the pool's objective burn faster than allowed in this window?"""
    if burn is None:
        return False
    return (burn.ttft_burn if role_is_prefill else burn.tpot_burn) > 1.0
