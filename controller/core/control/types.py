"""What a control tick reads and writes: observations, the fleet, actions, diagnostics.

All plain frozen dataclasses (numpy arrays are treated as read-only). Times are
seconds on the caller's clock (`now`), which is virtual in the simulator and
in tests, and wall-clock in the live sidecar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from controller.core.events import ARRIVAL_DTYPE, EVENT_DTYPE, empty_arrivals, empty_events


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


class ActionKind(StrEnum):
    FLIP_TO_PREFILL = "flip_to_prefill"
    FLIP_TO_DECODE = "flip_to_decode"
    SCALE_PREFILL = "scale_prefill"
    SCALE_DECODE = "scale_decode"


class Reason(StrEnum):
    """Why a decision was taken (or not). Each value is a Prometheus label value."""

    SLO_PREFILL_SHORT = "slo_prefill_short"
    SLO_DECODE_SHORT = "slo_decode_short"
    PREFILL_SURPLUS = "prefill_surplus"
    DECODE_SURPLUS = "decode_surplus"
    REBALANCE = "rebalance"
    WITHIN_TOLERANCE = "within_tolerance"
    STABILIZING = "stabilizing"
    RATE_LIMITED = "rate_limited"
    AT_BOUND = "at_bound"
    INSUFFICIENT_DATA = "insufficient_data"
    INFEASIBLE = "infeasible"
    STEADY = "steady"
    IN_TRANSITION = "in_transition"
    SCALE_DOWN_RISK = "scale_down_risk"  # the smaller pool would not hold the load seen within a regrow time
    REVERSAL_BLOCKED = "reversal_blocked"  # undoing a recent flip while the pool it left keeps its objective
    SLO_BREACH = "slo_breach"  # the observed tail misses the objective: feedback raises the pool's need
    BUDGET_UNSPENT = "budget_unspent"  # decode's TPOT budget stays unspent: feedback lowers its model need


@dataclass(frozen=True)
class Transition:
    """One instance on its way to `target_role`: draining, switching or cold-starting.

    `target_role` None means it is being removed (scale-down drain).
    """

    target_role: Role | None
    ready_s: float | None = None  # expected time it serves; None while still draining
    kind: str = "flip"  # "flip" | "start" | "stop"
    # when the transition was observed to start (None: unknown; the core then counts new transitions)
    started_s: float | None = None
    worker: str = ""  # the instance's identity where the source knows it (router worker id or URL)


@dataclass(frozen=True)
class FleetView:
    """What the fleet is now, from the actuator's point of view."""

    serving_prefill: int
    serving_decode: int
    transitions: tuple[Transition, ...] = ()

    @property
    def flips_in_flight(self) -> int:
        return sum(1 for t in self.transitions if t.kind == "flip")

    def committed(self, role: Role) -> int:
        """Serving plus on the way in: the count the pool will have once transitions settle."""
        serving = self.serving_prefill if role is Role.PREFILL else self.serving_decode
        return serving + sum(1 for t in self.transitions if t.target_role is role)

    @property
    def allocated(self) -> int:
        """Instances holding GPUs (serving or in any transition)."""
        return self.serving_prefill + self.serving_decode + len(self.transitions)


@dataclass(frozen=True)
class WorkerStats:
    """Optional pool-level gauges (from worker metrics) used by estimation and calibration.

    Any field may be None when the source does not expose it.
    """

    in_flight: int | None = None  # requests accepted but not completed (router active requests)
    prefill_queued: int | None = None
    decode_queued: int | None = None
    decode_running_mean: float | None = None  # mean running batch per decode instance over the tick
    decode_tpot_ms_mean: float | None = None  # observed mean step time over the tick
    prefill_busy_fraction: float | None = None  # mean share of time a prefill instance was busy
    # requests held at the router's decode admission gate (smg): decode demand the workers' queues do not show
    decode_gate_waiting: int | None = None


FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Observations:
    """Everything new since the last tick.

    `events`: EVENT_DTYPE records of requests *completed* since the last tick;
    `arrivals`: ARRIVAL_DTYPE records of requests that *arrived* since the last tick (the tap's
    arrival events; empty where the source has none). Times are on the same clock as `now`.
    """

    events: np.ndarray = field(default_factory=empty_events)
    fleet: FleetView = field(default_factory=lambda: FleetView(1, 1))
    stats: WorkerStats = field(default_factory=WorkerStats)
    arrivals: np.ndarray = field(default_factory=empty_arrivals)

    def __post_init__(self) -> None:
        if self.events.dtype != EVENT_DTYPE:
            raise TypeError(f"Observations.events dtype={self.events.dtype}: expected EVENT_DTYPE")
        if self.arrivals.dtype != ARRIVAL_DTYPE:
            raise TypeError(f"Observations.arrivals dtype={self.arrivals.dtype}: expected ARRIVAL_DTYPE")


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    count: int  # > 0 for flips; signed delta for scale actions
    reason: Reason

    @property
    def delta(self) -> int:
        return self.count


@dataclass(frozen=True)
class Estimates:
    arrival_rate_rps: float
    input_len_mean: float
    input_len_m2: float
    input_len_p50: float
    input_len_p90: float
    output_len_mean: float
    output_len_p90: float
    cache_hit_rate: float
    samples: int
    window_covered_s: float
    newest_age_s: float
    lengths_from_history: bool = False  # lengths carried over from before the window (idle window)
    peak_rate_rps: float = 0.0  # a high quantile of the arrival rate over short bins (burstiness)
    arrival_scv: float = 1.0  # c_a^2 the prefill queueing model uses (index of dispersion; 1 = Poisson)


@dataclass(frozen=True)
class Forecast:
    level_rps: float
    trend_rps_per_s: float
    seasonal_rps: float | None
    horizon_s: float
    max_rps: float  # the forecast maximum over the horizon, with the margin


@dataclass(frozen=True)
class ModelTarget:
    n_prefill_exact: float
    n_decode_exact: float
    n_prefill: int
    n_decode: int
    predicted_ttft_s: float | None
    predicted_tpot_ms: float | None
    prefill_rate_per_instance_rps: float
    decode_rate_per_instance_rps: float
    decode_batch_target: float | None = None  # mean batch per decode instance the plan aims at
    # the batch per instance at which TPOT meets its objective (the target less the Poisson margin)
    decode_batch_max: float | None = None
    decode_observed_need: float | None = None  # decode instances the observed running batch calls for
    prefill_backlog_need: float | None = None  # prefill instances the window's arrivals call for (core/backlog.py)
    decode_backlog_need: float | None = None  # decode instances the same arrivals call for, released by prefill
    # the prefill need with the busy-share cap at the planned rate too (the stricter view; model.py): equal to
    # n_prefill_exact unless the cap was applied at a lower observed rate
    n_prefill_capped_exact: float | None = None

    def at_least(self, prefill: float = 0.0, decode: float = 0.0) -> ModelTarget:
        """This plan with each pool's exact need raised to at least the one given (its count follows)."""
        t = self
        if prefill > t.n_prefill_exact:
            t = replace(t, n_prefill_exact=prefill, n_prefill=max(1, math.ceil(prefill - 1e-9)))
        if decode > t.n_decode_exact:
            t = replace(t, n_decode_exact=decode, n_decode=max(1, math.ceil(decode - 1e-9)))
        return t


@dataclass(frozen=True)
class CalibrationView:
    prefill_service_scale: float  # fitted service time / profile (TPmax_fit = TPmax / scale)
    tpot_scale: float  # observed TPOT / profile TPOT
    prefill_tpmax_tps: float | None
    ttft_error_rel: float | None  # EMA of (predicted - observed) / observed
    tpot_error_rel: float | None
    prefill_fits: int
    decode_fits: int


@dataclass(frozen=True)
class Decision:
    pool: str  # "prefill" | "decode" | "fleet"
    reason: Reason
    detail: str = ""


@dataclass(frozen=True)
class FeedbackView:
    """The objective as observed in the window, beside the model's prediction, and the feedback headroom."""

    samples: int
    ttft_observed_q_s: float | None  # at the objective's quantile (the mean for a mean objective)
    ttft_predicted_q_s: float | None  # the model at the current fleet and the observed load
    tpot_observed_q_ms: float | None
    ttft_burn: float  # share missed / share allowed (1 = exactly at the objective)
    tpot_burn: float
    prefill_headroom: float
    decode_headroom: float


@dataclass(frozen=True)
class Diagnostics:
    now: float
    estimates: Estimates | None
    forecast: Forecast | None
    target: ModelTarget | None
    calibration: CalibrationView
    desired_prefill: int | None  # after all stages
    desired_decode: int | None
    decisions: tuple[Decision, ...]
    feedback: FeedbackView | None = None

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(d.reason.value for d in self.decisions)
