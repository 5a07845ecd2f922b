"""Control parameters as a plain core dataclass (the pydantic `ControlConfig` converts to it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from controller.core.errors import ModelInputError
from controller.core.sizing import Hardware, Objectives


class Mode(StrEnum):
    FIXED = "fixed"  # a GPU budget: only flips move capacity
    ELASTIC = "elastic"  # pools scale between bounds


@dataclass(frozen=True)
class ControlParams:
    mode: Mode = Mode.ELASTIC
    tick_period_s: float = 5.0
    window_s: float = 60.0  # estimator sliding window
    min_samples: int = 20  # fewer completed requests in the window -> insufficient_data
    max_age_s: float = 120.0  # newest sample older than this -> stale
    tolerance: float = 0.1  # HPA-style: ignore a need down to current x (1 - tolerance)
    tolerance_up: float = 0.03  # ... and up to current x (1 + tolerance_up): above it a breach is predicted
    stabilization_up_s: float = 0.0  # up: at least this window (up_window_s below adds a tenth of the lead)
    # up to this quantile of the up window's recommendations (0 = HPA's minimum): the median rises once
    # half the window asks for more, so one tick back inside the tolerance band does not restart the wait
    stabilization_up_quantile: float = 0.5
    stabilization_down_s: float = 300.0  # down: max over this window
    min_prefill: int = 1
    max_prefill: int = 64
    min_decode: int = 1
    max_decode: int = 64
    gpus: int | None = None  # fixed-budget mode: total GPUs; elastic: optional cap
    max_flips_in_flight: int = 2
    max_flips_per_hour: int = 30
    max_scale_step: int = 4  # instances added per pool per tick
    flip_time_s: float = 30.0  # role switch once drained
    drain_s: float = 10.0  # expected drain before a flip can start
    cold_start_s: float = 300.0
    # forecaster
    level_tau_s: float = 30.0  # Holt level smoothing time constant
    trend_tau_s: float = 300.0  # Holt trend smoothing time constant
    trend_damping_s: float = 600.0  # how long a trend is extrapolated (damped trend; ~ a long cold start); 0 = no trend
    # a trend sustained over one lead time is extrapolated undamped at its lower confidence bound, slope -
    # z SE (forecast.sustained_rise): a ramp keeps most of its slope, noise none; 0 = off
    trend_lcb_z: float = 2.0
    season_period_s: float = 86400.0  # seasonal (same time yesterday) component
    season_bucket_s: float = 60.0
    forecast_z: float = 1.5  # margin: z standard deviations of one-step residuals
    rise_quantile: float = 0.9  # history-aware margin: quantile of (max over lead time - level); 0 = off
    rise_history: int = 120  # matured rise samples kept
    rise_min_samples: int = 10
    # until rises over one lead time have been learned (they take a lead time each to mature), assume the
    # load may rise by this share within a lead time of 10 minutes (pro rata, up to 1x): a prior, not a fit
    rise_prior_frac: float = 0.15
    # model
    # least-load routing pools the prefill instances into one M/G/c queue (core/pooled.py);
    # False: N separate M/G/1 queues (round-robin routing, the source method's per-instance view)
    prefill_pooled: bool = True
    # no prefill instance planned above this busy share, whatever the queueing model allows: arrivals
    # burstier than Poisson (inter-arrival CV > 1 in production traces) queue far more near saturation
    max_prefill_utilization: float = 0.85
    # GI/G/c: the prefill wait scales with (c_a^2 + c_s^2) / 2 (Allen-Cunneen), c_a^2 read from the window's
    # arrivals (index of dispersion at the TTFT budget's time scale), within [1, max_arrival_scv]: never
    # below Poisson (a calm window says little of the next), and bounded (one burst in a short window)
    max_arrival_scv: float = 16.0  # 1 = Poisson arrivals assumed (the model before the sixth session)
    # the decode need read from the observed running batch must hold this long (a drained prefill
    # backlog floods decode for a moment; a cold start to serve that moment arrives after it)
    observed_need_hold_s: float = 30.0
    decode_margin_z: float = 1.0  # size decode so B + z*sqrt(B) <= B* (Poisson batch fluctuation)
    burst_bin_s: float = 10.0  # decode covers the burst_quantile of the arrival rate over such bins
    burst_quantile: float = 0.9  # 0 = size decode for the mean rate only
    # calibration
    calibrate: bool = True
    calibration_alpha: float = 0.1  # EMA weight of a new fit
    calibration_max_step: float = 0.05  # max relative change of a scale per tick (bounded drift)
    calibration_bounds: tuple[float, float] = (0.5, 2.0)
    # feedback on the objective (see feedback.py): headroom on a pool's need while its tail burns
    miss_allowance: float = 0.01  # share of requests a TPOT (or mean-TTFT) objective may miss
    feedback_gain: float = 0.2  # log-headroom added per window of burn rate 2 (0 = off)
    feedback_decay_s: float = 600.0  # headroom relaxes toward 1 with this time constant once the tail is met
    feedback_max: float = 1.5
    # an unspent error budget (elastic): decode's headroom falls below 1 while TPOT stays far inside
    # (feedback.py); its observed needs stay whole, so this only takes back the model's margins
    decode_slack_min: float = 0.8  # lowest headroom: the model's need x 0.8 (1 = off)
    slack_burn: float = 0.25  # ... while decode's burn averaged over slack_avg_s stays below this
    slack_avg_s: float = 900.0
    slack_rate: float = 0.02  # log-headroom given up per window of such calm
    # safe scale-down (see safety.py): hold the peak load seen within this many regrow times
    regrow_hold_factor: float = 1.0

    def __post_init__(self) -> None:
        pos = ("tick_period_s", "window_s", "max_age_s", "level_tau_s", "trend_tau_s", "season_period_s", "season_bucket_s")
        for name in pos:
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ModelInputError(name, v, "must be a positive number of seconds")
        for name in ("stabilization_up_s", "stabilization_down_s", "flip_time_s", "drain_s", "cold_start_s"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ModelInputError(name, v, "must be a non-negative number of seconds")
        if not (0 <= self.tolerance < 1):
            raise ModelInputError("tolerance", self.tolerance, "must be in [0, 1)")
        if not (0 <= self.stabilization_up_quantile <= 1):
            raise ModelInputError("stabilization_up_quantile", self.stabilization_up_quantile, "must be in [0, 1]")
        if not (0 <= self.tolerance_up < 1):
            raise ModelInputError("tolerance_up", self.tolerance_up, "must be in [0, 1)")
        for lo, hi in (("min_prefill", "max_prefill"), ("min_decode", "max_decode")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a < 1:
                raise ModelInputError(lo, a, "every pool keeps at least one instance")
            if b < a:
                raise ModelInputError(hi, b, f"must be >= {lo}={a}")
        if self.max_flips_in_flight < 0 or self.max_flips_per_hour < 0 or self.max_scale_step < 1:
            raise ModelInputError("max_flips_in_flight", self.max_flips_in_flight, "limits must be non-negative (scale step >= 1)")
        if self.mode is Mode.FIXED and self.gpus is None:
            raise ModelInputError("gpus", None, "fixed-budget mode needs a GPU budget")
        if not (0 < self.miss_allowance < 1):
            raise ModelInputError("miss_allowance", self.miss_allowance, "must be in (0, 1), e.g. 0.01")
        if not (self.feedback_gain >= 0 and self.feedback_decay_s > 0 and self.feedback_max >= 1):
            raise ModelInputError("feedback_gain", self.feedback_gain,
                                  f"need gain >= 0, feedback_decay_s > 0 (got {self.feedback_decay_s}), "
                                  f"feedback_max >= 1 (got {self.feedback_max})")
        for name, ok, rule in (
            ("decode_slack_min", 0 < self.decode_slack_min <= 1, "must be in (0, 1] (1 = off)"),
            ("slack_burn", 0 <= self.slack_burn < 0.5, "must be in [0, 0.5): a window at half its allowance resets"),
            ("slack_rate", self.slack_rate >= 0 and math.isfinite(self.slack_rate), "must be a finite number >= 0"),
            ("slack_avg_s", self.slack_avg_s > 0 and math.isfinite(self.slack_avg_s), "must be a positive number of seconds"),
        ):
            if not ok:
                raise ModelInputError(name, getattr(self, name), rule)
        if not (self.trend_lcb_z >= 0 and math.isfinite(self.trend_lcb_z)):
            raise ModelInputError("trend_lcb_z", self.trend_lcb_z, "must be a finite number >= 0 (0 = off)")
        if not (self.max_arrival_scv >= 1 and math.isfinite(self.max_arrival_scv)):
            raise ModelInputError("max_arrival_scv", self.max_arrival_scv, "must be a finite number >= 1 (1 = Poisson)")
        if not (0 < self.max_prefill_utilization <= 1):
            raise ModelInputError("max_prefill_utilization", self.max_prefill_utilization, "must be in (0, 1]")
        if not (self.observed_need_hold_s >= 0 and math.isfinite(self.observed_need_hold_s)):
            raise ModelInputError("observed_need_hold_s", self.observed_need_hold_s, "must be >= 0 seconds")
        if not (self.regrow_hold_factor >= 0 and math.isfinite(self.regrow_hold_factor)):
            raise ModelInputError("regrow_hold_factor", self.regrow_hold_factor, "must be a non-negative number")
        c_lo, c_hi = self.calibration_bounds
        if not (0 < c_lo <= 1 <= c_hi):
            raise ModelInputError("calibration_bounds", self.calibration_bounds, "need 0 < low <= 1 <= high")

    @property
    def lead_s(self) -> float:
        """Time an action needs to take effect: a flip (fixed budget) or a cold start (elastic)."""
        return self.flip_lead_s if self.mode is Mode.FIXED else self.cold_start_s

    @property
    def flip_lead_s(self) -> float:
        return self.drain_s + self.flip_time_s

    @property
    def startup_s(self) -> float:
        """Until one estimator window has been seen and one lead time has passed, nothing the controller
        asks for serves: the fleet it starts on carries the load alone."""
        return self.window_s + self.lead_s

    @property
    def history_s(self) -> float:
        return max(self.window_s, self.up_window_s, self.stabilization_down_s)

    @property
    def up_window_s(self) -> float:
        """Up-stabilization: at least a tenth of the action's lead time. A need must persist that long
        before capacity is added; waiting a tenth of what the action takes costs little, and it keeps a
        need hovering at a pool boundary from adding and removing an instance (2 -> 3 -> 2) on noise."""
        return max(self.stabilization_up_s, 0.1 * self.lead_s)

    @property
    def regrow_hold_s(self) -> float:
        """How far back the peak load is held before a pool may shrink: the cost of being wrong is a regrow."""
        return max(self.stabilization_down_s, self.regrow_hold_factor * self.lead_s)


@dataclass(frozen=True)
class ControlSpec:
    """Everything a tick needs besides state and observations: objectives, hardware, parameters."""

    objectives: Objectives
    hardware: Hardware
    params: ControlParams = ControlParams()

    def budget_instances(self) -> int | None:
        """Fixed mode: instances the GPU budget holds (equal GPUs per instance assumed per pool)."""
        if self.params.gpus is None:
            return None
        prof = self.hardware.profile
        per = max(prof.prefill_gpus_per_instance, prof.decode_gpus_per_instance)
        return self.params.gpus // per
