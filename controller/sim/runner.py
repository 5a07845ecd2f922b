"""Run one policy over a trace on virtual time and score it."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from controller.core.control import Observations
from controller.core.events import empty_arrivals
from controller.sim.fleet import Fleet, SimConfig, SimError
from controller.sim.policies import Policy, SimContext


@dataclass
class Timeline:
    t: list[float] = field(default_factory=list)
    load_rps: list[float] = field(default_factory=list)  # arrivals over the last minute
    prefill: list[int] = field(default_factory=list)  # serving instances
    decode: list[int] = field(default_factory=list)
    allocated: list[int] = field(default_factory=list)


@dataclass
class Result:
    policy: str
    requests: int
    completed: int
    slo_attainment: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    gpu_hours: float
    flips: int
    scale_events: int
    goodput_rps: float
    duration_s: float
    wall_s: float = 0.0
    timeline: Timeline = field(default_factory=Timeline)
    met: np.ndarray | None = None  # per request: met both objectives
    arrival_s: np.ndarray | None = None
    ttft_each_s: np.ndarray | None = None  # per request (NaN where it never finished)
    tpot_each_ms: np.ndarray | None = None  # per request (NaN where it never finished)
    # flip reversals (an instance moved back to the role it just left within the window):
    # (time, instance, role returned to, seconds since it left, attainment of the minute before)
    reversals: list[tuple[float, int, str, float, float]] = field(default_factory=list)
    shed: int = 0  # requests the decode admission gate answered 503
    aborted: bool = False  # early stop: more misses than the budget; attainment is an upper bound
    knob: float | None = None  # the swept setting of a baseline (threshold / throughput utilisation)
    # why requests missed: TTFT over the objective, TPOT over it (TTFT met), never finished
    missed_ttft: int = 0
    missed_tpot: int = 0
    unfinished: int = 0

    @property
    def reversals_unjustified(self) -> int:
        """Reversals while the objectives held over the minute before (the target forbids these)."""
        return sum(1 for r in self.reversals if r[4] >= 0.99)

    def summary(self) -> dict[str, Any]:
        keys = ("requests", "slo_attainment", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p90_ms",
                "gpu_hours", "flips", "scale_events", "goodput_rps", "shed", "aborted", "knob", "missed_ttft",
                "missed_tpot", "unfinished")
        d = {k: getattr(self, k) for k in keys}
        d["flip_reversals"] = len(self.reversals)
        d["flip_reversals_unjustified"] = self.reversals_unjustified
        return d


MAX_TICKS = 2_000_000


def _q(x: np.ndarray, q: float) -> float:
    return float(np.quantile(x, q)) if x.size else math.nan


def simulate(
    policy: Policy,
    ctx: SimContext,
    sim: SimConfig,
    progress: Callable[[float], None] | None = None,
    miss_budget: float | None = None,
) -> Result:
    """Play the trace through the fleet with the policy deciding every tick_period_s.

    `miss_budget`: stop as soon as more requests than this have missed (a search
    only needs to know the candidate fails); the result is then `aborted`.
    A static policy (no decisions) skips the control ticks.
    """
    import time as _time  # the shell may read the clock (wall time of the run); the core never does

    wall0 = _time.perf_counter()
    trace = ctx.trace
    prof = ctx.spec.hardware.profile
    simc = replace(
        sim,
        flip_time_s=sim.flip_time_s if policy.flip_time_s is None else policy.flip_time_s,
        cold_start_s=sim.cold_start_s if policy.cold_start_s is None else policy.cold_start_s,
    )
    p0, d0 = policy.initial()
    fleet = Fleet(trace, prof, simc, p0, d0, ctx.spec.objectives.overhead_s)
    obj = ctx.spec.objectives
    fleet.set_objectives(obj.ttft_s, obj.tpot_ms / 1000.0, math.inf if miss_budget is None else miss_budget)
    period = ctx.spec.params.tick_period_s if policy.dynamic else 60.0
    # at least one tick: a one-request trace has zero duration
    end = max(trace.duration_s, ctx.spec.params.tick_period_s)
    if end / period > MAX_TICKS:
        # the timeline keeps one point per tick: a trace spanning years (a timestamp in ms read as s)
        # or a microsecond tick would grow memory without bound
        raise SimError(f"duration={end:.0f} s at tick_period_s={period:g}: {end / period:.3g} ticks, "
                       f"above the bound of {MAX_TICKS}")
    nxt = 0
    seen = 0
    last_busy: dict[int, float] = {}
    tl = Timeline()
    t = 0.0
    arr = trace.arrival_s
    while t < end:
        t = min(t + period, end)
        first = nxt
        nxt = fleet.run_until(t, nxt)
        events = fleet.drain_events(seen)
        seen = len(fleet.completed)
        if fleet.exhausted:
            break
        if policy.dynamic:
            # the tap's arrival events: every request that arrived this tick, input counted exactly
            arrivals = empty_arrivals(nxt - first)
            arrivals["arrival_s"] = arr[first:nxt]
            arrivals["input_tokens"] = trace.input_tokens[first:nxt]
            if simc.arrivals_max_tokens:
                arrivals["max_tokens"] = trace.output_tokens[first:nxt]
            obs = Observations(events=events, fleet=fleet.view(), stats=fleet.stats(t, last_busy, period),
                               arrivals=arrivals)
            actions = policy.decide(t, obs)
            if actions:
                fleet.apply(actions, t)
        v = fleet.view()
        lo = int(np.searchsorted(arr, t - 60.0))
        tl.t.append(t)
        tl.load_rps.append((nxt - lo) / min(60.0, max(t, 1e-9)))
        tl.prefill.append(v.serving_prefill)
        tl.decode.append(v.serving_decode)
        tl.allocated.append(v.allocated)
        if progress is not None:
            progress(t / end if end > 0 else 1.0)
    # let in-flight requests finish (no more control; GPU time is counted up to the trace's end)
    fleet.run_until(math.inf, nxt)
    r = score(policy.name, fleet, ctx, end, tl, _time.perf_counter() - wall0)
    r.knob = policy.knob
    return r


def score(name: str, fleet: Fleet, ctx: SimContext, end: float, tl: Timeline, wall_s: float) -> Result:
    obj = ctx.spec.objectives
    n = fleet.n
    done = ~np.isnan(fleet.done_s)
    ids = np.arange(n)
    ttft = fleet.join_s - fleet.arr + obj.overhead_s
    tpot_ms = np.full(n, np.inf)
    tpot_ms[done] = fleet.tpot_of(ids[done]) * 1000.0
    met = done & (ttft <= obj.ttft_s) & (tpot_ms <= obj.tpot_ms)
    dur = max(end, 1e-9)
    reversals = []
    for t, iid, role, dt in fleet.reversals:
        # did the objectives hold over the minute before? (the target allows a reversal on a breach)
        lo, hi = np.searchsorted(fleet.arr, (t - 60.0, t))
        att = float(met[lo:hi].mean()) if hi > lo else 1.0
        reversals.append((t, iid, role.value, dt, att))
    return Result(
        policy=name,
        requests=n,
        completed=int(done.sum()),
        slo_attainment=float(met.mean()) if n else math.nan,
        ttft_p50_s=_q(ttft[done], 0.5),
        ttft_p90_s=_q(ttft[done], 0.9),
        ttft_p99_s=_q(ttft[done], 0.99),
        tpot_p50_ms=_q(tpot_ms[done], 0.5),
        tpot_p90_ms=_q(tpot_ms[done], 0.9),
        gpu_hours=fleet.gpu_seconds(end) / 3600.0,
        flips=fleet.flips,
        scale_events=fleet.scale_events,
        goodput_rps=float(met.sum()) / dur,
        duration_s=end,
        wall_s=wall_s,
        timeline=tl,
        met=met,
        arrival_s=fleet.arr,
        ttft_each_s=np.where(done, ttft, np.nan),
        tpot_each_ms=np.where(done, tpot_ms, np.nan),
        reversals=reversals,
        shed=fleet.shed,
        aborted=fleet.exhausted,
        missed_ttft=int(np.sum(done & (ttft > obj.ttft_s))),
        missed_tpot=int(np.sum(done & (ttft <= obj.ttft_s) & (tpot_ms > obj.tpot_ms))),
        unfinished=int(np.sum(~done)),
    )


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.last = -1

    def __call__(self, frac: float) -> None:
        if not self.enabled:
            return
        pct = int(frac * 100)
        if pct != self.last:
            self.last = pct
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\r{self.label:<12} [{bar:<25}] {pct:3d}%")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()
