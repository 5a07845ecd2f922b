"""Policies the simulator runs: ours (`slo`, the control core's tick) and the baselines.

Every policy sees only what a live controller could see (the completed-request
events and pool gauges of `Observations`), except `oracle`, which reads the
future on purpose, and the static ones, which are sized once from the whole
trace. All act through the same `Action`s on the same simulated fleet.

Baselines, from their public descriptions:
- static: the source method once (M/M/1 TTFT model, eq. 5-13, mean lengths) from
  whole-trace means; fixed budget: the source's best split of the GPUs.
- static-peak: the same method sized for the busiest minute of the trace.
- threshold: Kubernetes-HPA style. Per pool a utilisation metric (prefill
  busy fraction; decode batch / B*) against a target; desired =
  ceil(current * util / target), 10% tolerance, scale-up at once, scale-down
  to the maximum recommendation of the last 5 minutes, sync every 15 s.
- throughput: an imitation, written here, of NVIDIA Dynamo's throughput-based planner
  (`dynamo`, an optional extra, runs the real one: controller/sim/dynamo_policy.py): every
  adjustment interval, predict next interval's request rate and mean ISL/OSL
  (constant predictor), replicas = ceil(token demand / per-instance throughput
  at full utilisation) - prefill at TPmax(ISL), decode at the TPOT objective's
  batch B* - with no queueing term; one decision per interval.
- oracle: hindsight. For each minute it knows the true load and sets the
  fleet the model needs for it, with zero reconfiguration cost (instant flips
  and cold starts). A reference for GPU-hours, not a policy one could run.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from controller.core.backlog import decode_arrivals_need, prefill_backlog_need, priced_requests
from controller.core.control import (
    Action,
    ActionKind,
    ControlSpec,
    Mode,
    Observations,
    Reason,
    Role,
    initial_state,
    tick,
)
from controller.core.control.model import model_target
from controller.core.control.stages import best_split, record, stabilize
from controller.core.control.types import ModelTarget
from controller.core.prefill import QueueModel
from controller.core.sizing import Hardware, Workload, instance_capacity
from controller.sim.fleet import lru_prefix_hit, prefix_cache_blocks
from controller.sim.traces import Trace

POLICIES = ("slo", "static", "static-peak", "threshold", "throughput", "oracle")
# needs an optional extra (NVIDIA Dynamo's planner, controller/sim/dynamo_policy.py); not part of "all"
OPTIONAL_POLICIES = ("dynamo",)


@dataclass(frozen=True)
class SimContext:
    trace: Trace
    spec: ControlSpec
    mode: Mode
    instances_budget: int | None  # fixed mode: total instances

    @property
    def profile(self):  # type: ignore[no-untyped-def]
        return self.spec.hardware.profile


def _trace_shape(trace: Trace, lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float, float, float, tuple[float, ...]]:
    m = (trace.arrival_s >= lo) & (trace.arrival_s < hi)
    inp = trace.input_tokens[m].astype(np.float64)
    if inp.size == 0:
        return 0.0, 0.0, 0.0, 0.0, ()
    cached = trace.cached_tokens[m]
    hit = float(np.clip(cached, 0, None).sum() / inp.sum()) if np.all(cached >= 0) else _hash_hit_estimate(trace, m)
    # at least one second: a one-request (zero-duration) trace once sized a fleet for 1e9 req/s
    span = (min(hi, trace.duration_s) - max(lo, 0.0)) if math.isfinite(hi) else trace.duration_s
    span = max(span, 1.0)
    qs = np.quantile(inp, (np.arange(32) + 0.5) / 32)
    samples = tuple(float(2.0 ** (round(math.log2(max(x, 1.0)) * 16) / 16)) for x in qs)
    return float(inp.size / max(span, 1e-9)), float(inp.mean()), float(trace.output_tokens[m].mean()), min(hit, 0.99), samples


def _hash_hit_estimate(trace: Trace, mask: np.ndarray, instances: int = 1, blocks: int = 1 << 62) -> float:
    """Share of prefix blocks seen before by the instance a request is sent to.

    One instance, no eviction (the default capacity): an upper bound of what one shared cache could hit. Several: each has its
    own LRU cache of `blocks` blocks (as in the simulated fleet, and in SGLang) and requests are dealt
    out in turn, so a prefix hits only where an earlier request with it went to the same instance and
    has not been evicted since.
    """
    if trace.hash_ids is None:
        return 0.0
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(max(1, instances))]
    hit = tot = 0
    for j, i in enumerate(np.flatnonzero(mask)):
        hs = trace.hash_ids[i].tolist()
        hit += lru_prefix_hit(caches[j % len(caches)], hs, blocks)
        tot += len(hs)
    return hit / tot if tot else 0.0


def _fixed_split(ctx: SimContext, p_exact: float, d_exact: float, current_p: int) -> tuple[int, int]:
    n = ctx.instances_budget
    assert n is not None
    prm = ctx.spec.params
    p = best_split(p_exact, d_exact, n, prm.min_prefill, prm.max_prefill, prm.min_decode, prm.max_decode, current_p)
    return p, n - p


class Policy:
    name = "policy"
    dynamic = True  # False: never decides (the runner skips its ticks)
    knob: float | None = None  # a baseline's swept setting, reported with its result
    flip_time_s: float | None = None  # override of the fleet's (oracle: zero)
    cold_start_s: float | None = None

    def __init__(self, ctx: SimContext) -> None:
        self.ctx = ctx

    @property
    def warm_start_s(self) -> float:
        """The stretch the starting fleet must carry alone (the controller's start-up), at least 5 min."""
        return max(300.0, self.ctx.spec.params.startup_s)

    def initial(self) -> tuple[int, int]:
        """Warm start shared by the dynamic policies: the model's fleet for the busiest minute of the start-up."""
        horizon = self.warm_start_s
        rate, lin, lout, hit, samples = _trace_shape(self.ctx.trace, 0.0, horizon)
        if rate <= 0:
            return 1, 1
        # sized for the busiest minute of those, as an operator sizes the fleet it starts from (the mean
        # of a bursty stretch starts the fleet short, and the first scale-up then waits out a cold start)
        first = self.ctx.trace.arrival_s[self.ctx.trace.arrival_s < horizon]
        rate = max(rate, float(np.bincount((first // 60.0).astype(np.int64)).max()) / 60.0)
        t = model_target(self.ctx.spec, rate, lin, lout, hit, samples)
        tr = self.ctx.trace
        if tr.hash_ids is not None and np.any(tr.cached_tokens[tr.arrival_s < horizon] < 0):
            # prefix hits decided by per-instance caches: the hit rate of one shared cache (the trace's
            # upper bound) started a cache-heavy fleet short by an instance for the whole start-up. The
            # fleet's size and its hit rate depend on each other: a few rounds settle them
            m = (tr.arrival_s >= 0.0) & (tr.arrival_s < horizon)
            blocks = prefix_cache_blocks(self.ctx.spec.hardware.profile)
            for _ in range(4):
                hit_n = min(_hash_hit_estimate(tr, m, t.n_prefill, blocks), 0.99)
                if hit_n == hit:
                    break
                hit = hit_n
                t = model_target(self.ctx.spec, rate, lin, lout, hit, samples)
        # and for the work those minutes' arrivals bring at every time scale (core/backlog.py): a burst of
        # the first minutes is in the fleet the operator starts from, as in the one the controller plans
        t = t.at_least(*self._first_backlog_needs(hit, t))
        if self.ctx.mode is Mode.FIXED:
            return _fixed_split(self.ctx, t.n_prefill_exact, t.n_decode_exact, 1)
        prm = self.ctx.spec.params
        return (min(max(t.n_prefill, prm.min_prefill), prm.max_prefill),
                min(max(t.n_decode, prm.min_decode), prm.max_decode))

    def _first_backlog_needs(self, hit: float, t: ModelTarget) -> tuple[float, float]:
        """Prefill, then decode instances the busiest minute of the start-up needs by its arrivals (the
        fluid bounds of core/backlog.py; decode fed by the prefill those bounds and the model plan)."""
        spec, tr = self.ctx.spec, self.ctx.trace
        obj, curve = spec.objectives, spec.hardware.profile.prefill
        a = tr.arrival_s
        minutes = []
        for k in range(math.ceil(self.warm_start_s / 60.0)):
            w = (a >= 60.0 * k) & (a < min(60.0 * (k + 1), self.warm_start_s))
            if w.any():
                minutes.append(priced_requests(curve, a[w], tr.input_tokens[w] * (1.0 - hit), tr.output_tokens[w]))
        pe = max((prefill_backlog_need(m, obj.ttft_budget_s, obj.ttft_quantile) for m in minutes), default=0.0)
        b = t.decode_batch_max
        if b is None or b <= 0:
            return pe, 0.0
        c = float(max(1, math.ceil(max(pe, t.n_prefill_exact) - 1e-9)))  # the prefill instances it starts with
        de = max((decode_arrivals_need(m, obj.tpot_ms / 1000.0, c, b, 1.0 - spec.params.miss_allowance)
                  for m in minutes), default=0.0)
        return pe, de

    def decide(self, now: float, obs: Observations) -> list[Action]:
        return []


def _to_actions(cur_p: int, cur_d: int, want_p: int, want_d: int, mode: Mode, reason_up: Reason) -> list[Action]:
    """Flips in fixed mode, scale actions in elastic mode."""
    if mode is Mode.FIXED:
        d = want_p - cur_p
        if d > 0:
            return [Action(ActionKind.FLIP_TO_PREFILL, d, reason_up)]
        if d < 0:
            return [Action(ActionKind.FLIP_TO_DECODE, -d, reason_up)]
        return []
    out = []
    if want_p != cur_p:
        out.append(Action(ActionKind.SCALE_PREFILL, want_p - cur_p, reason_up))
    if want_d != cur_d:
        out.append(Action(ActionKind.SCALE_DECODE, want_d - cur_d, reason_up))
    return out


class SloPolicy(Policy):
    """Ours: the control core's tick, unchanged."""

    name = "slo"

    def __init__(self, ctx: SimContext) -> None:
        super().__init__(ctx)
        self.state = initial_state(ctx.spec, 0.0)
        self.last = None

    def decide(self, now: float, obs: Observations) -> list[Action]:
        r = tick(self.state, obs, self.ctx.spec, now)
        self.state = r.state
        self.last = r.diagnostics  # type: ignore[assignment]
        return list(r.actions)


class StaticPolicy(Policy):
    name = "static"
    peak = False
    dynamic = False

    def _size(self) -> tuple[int, int]:
        tr = self.ctx.trace
        rate, lin, lout, hit, _ = _trace_shape(tr)
        if self.peak:
            counts = np.bincount((tr.arrival_s // 60).astype(np.int64))
            rate = float(counts.max()) / 60.0
        # the source method: M/M/1 prefill on mean lengths, decode at B*
        hw = Hardware(self.ctx.spec.hardware.profile, QueueModel.MM1, self.ctx.spec.hardware.decode_tps_override)
        cap = instance_capacity(Workload(1.0, lin, lout, hit), self.ctx.spec.objectives, hw)
        pe, de = rate / cap.prefill_rate_rps, rate / cap.decode_rate_rps
        if self.ctx.mode is Mode.FIXED:
            return _fixed_split(self.ctx, pe, de, 1)
        prm = self.ctx.spec.params
        return (min(max(1, math.ceil(pe - 1e-9)), prm.max_prefill),
                min(max(1, math.ceil(de - 1e-9)), prm.max_decode))

    def initial(self) -> tuple[int, int]:
        return self._size()


class StaticPeakPolicy(StaticPolicy):
    name = "static-peak"
    peak = True


class FixedSplitPolicy(Policy):
    """A given static split (used to sweep every split of a fixed budget)."""

    dynamic = False

    def __init__(self, ctx: SimContext, p: int, d: int) -> None:
        super().__init__(ctx)
        self.p, self.d = p, d
        self.name = f"static-{p}P{d}D"

    def initial(self) -> tuple[int, int]:
        return self.p, self.d


class ThresholdPolicy(Policy):
    """HPA-style utilisation targets per pool."""

    name = "threshold"
    target_util = 0.7
    tolerance = 0.1
    sync_s = 15.0
    down_window_s = 300.0

    def __init__(self, ctx: SimContext, target_util: float | None = None) -> None:
        super().__init__(ctx)
        if target_util is not None:
            self.target_util = target_util
        self.knob = self.target_util
        self.next_sync = 0.0
        self.busy_acc: list[float] = []
        self.batch_acc: list[float] = []
        self.recs_p: tuple[tuple[float, int], ...] = ()
        self.recs_d: tuple[tuple[float, int], ...] = ()
        self.recent_lengths: tuple[float, float] = (0.0, 0.0)
        self.bstar_cache: dict[tuple[int, int], float] = {}

    def _bstar(self, lin: float, lout: float) -> float:
        key = (round(lin, -1), round(lout, -1))
        if key not in self.bstar_cache:
            curve = self.ctx.profile.decode_curve
            if curve is None:
                self.bstar_cache[key] = 64.0
            else:
                self.bstar_cache[key] = float(curve.best_batch(self.ctx.spec.objectives.tpot_ms, lin + lout / 2.0, lin + lout))
        return self.bstar_cache[key]

    def decide(self, now: float, obs: Observations) -> list[Action]:
        s = obs.stats
        if s.prefill_busy_fraction is not None:
            self.busy_acc.append(s.prefill_busy_fraction)
        if s.decode_running_mean is not None:
            self.batch_acc.append(s.decode_running_mean)
        if obs.events.size:
            self.recent_lengths = (float(obs.events["input_tokens"].mean()), float(obs.events["output_tokens"].mean()))
        if now < self.next_sync:
            return []
        self.next_sync = now + self.sync_s
        fleet = obs.fleet
        cur_p, cur_d = fleet.committed(Role.PREFILL), fleet.committed(Role.DECODE)
        if not self.busy_acc or not self.batch_acc or self.recent_lengths[0] <= 0:
            return []
        util_p = float(np.mean(self.busy_acc))
        util_d = float(np.mean(self.batch_acc)) / self._bstar(*self.recent_lengths)
        self.busy_acc, self.batch_acc = [], []
        wants = []
        for cur, util, attr in ((cur_p, util_p, "recs_p"), (cur_d, util_d, "recs_d")):
            serving = fleet.serving_prefill if attr == "recs_p" else fleet.serving_decode
            ratio = util / self.target_util
            # HPA: usage is measured over serving pods; desired = ceil(serving * ratio)
            want = cur if abs(ratio - 1.0) <= self.tolerance else max(1, math.ceil(serving * ratio - 1e-9))
            recs = record(getattr(self, attr), now, want, self.down_window_s)
            setattr(self, attr, recs)
            n, _ = stabilize(recs, now, cur, 0.0, self.down_window_s)
            wants.append(n)
        want_p, want_d = wants
        if self.ctx.mode is Mode.FIXED:
            want_p, want_d = _fixed_split(self.ctx, float(want_p), float(want_d), cur_p)
            # one flip per sync, none while one is in flight
            if fleet.flips_in_flight:
                return []
            want_p = cur_p + max(-1, min(1, want_p - cur_p))
            want_d = cur_p + cur_d - want_p
        else:
            prm = self.ctx.spec.params
            want_p = min(max(want_p, prm.min_prefill), prm.max_prefill)
            want_d = min(max(want_d, prm.min_decode), prm.max_decode)
        return _to_actions(cur_p, cur_d, want_p, want_d, self.ctx.mode, Reason.REBALANCE)


class ThroughputPolicy(Policy):
    """An imitation of Dynamo's throughput planner: token demand at full utilisation, one decision per interval."""

    name = "throughput"
    interval_s = 60.0
    utilisation = 1.0  # Dynamo sizes at full utilisation; the matrix sweeps this knob

    def __init__(self, ctx: SimContext, utilisation: float | None = None) -> None:
        super().__init__(ctx)
        if utilisation is not None:
            self.utilisation = utilisation
        self.knob = self.utilisation
        self.next_at = self.interval_s
        self.arrivals: list[np.ndarray] = []

    def decide(self, now: float, obs: Observations) -> list[Action]:
        if obs.events.size:
            self.arrivals.append(obs.events[["arrival_s", "input_tokens", "output_tokens"]])
        if now < self.next_at:
            return []
        self.next_at = now + self.interval_s
        if not self.arrivals:
            return []
        ev = np.concatenate(self.arrivals)
        self.arrivals = []
        # constant predictor: next interval = this interval's completed requests
        rate = ev.size / self.interval_s
        isl, osl = float(ev["input_tokens"].mean()), float(ev["output_tokens"].mean())
        prof = self.ctx.profile
        tpmax = prof.prefill.max_tps_at(isl)
        cap = instance_capacity(Workload(1.0, isl, osl), self.ctx.spec.objectives, self.ctx.spec.hardware)
        pe = rate * isl / (tpmax * self.utilisation)
        de = rate * osl / (cap.decode.tps * self.utilisation)
        fleet = obs.fleet
        cur_p, cur_d = fleet.committed(Role.PREFILL), fleet.committed(Role.DECODE)
        if self.ctx.mode is Mode.FIXED:
            want_p, want_d = _fixed_split(self.ctx, pe, de, cur_p)
        else:
            prm = self.ctx.spec.params
            want_p = min(max(math.ceil(pe - 1e-9), prm.min_prefill, 1), prm.max_prefill)
            want_d = min(max(math.ceil(de - 1e-9), prm.min_decode, 1), prm.max_decode)
        return _to_actions(cur_p, cur_d, want_p, want_d, self.ctx.mode, Reason.REBALANCE)


class OraclePolicy(Policy):
    """Hindsight per-minute optimum of the same model, with zero reconfiguration cost."""

    name = "oracle"
    flip_time_s = 0.0
    cold_start_s = 0.0
    window_s = 60.0

    def __init__(self, ctx: SimContext) -> None:
        super().__init__(ctx)
        self.plan: dict[int, tuple[float, float]] = {}
        tr = ctx.trace
        nwin = int(tr.duration_s // self.window_s) + 1
        for w in range(nwin):
            rate, lin, lout, hit, samples = _trace_shape(tr, w * self.window_s, (w + 1) * self.window_s)
            if rate <= 0:
                self.plan[w] = (0.0, 0.0)
                continue
            t = model_target(ctx.spec, rate, lin, lout, hit, samples)
            self.plan[w] = (t.n_prefill_exact, t.n_decode_exact)

    def _want(self, w: int) -> tuple[float, float]:
        return self.plan.get(w, (0.0, 0.0))

    def initial(self) -> tuple[int, int]:
        pe, de = self._want(0)
        return self._ints(pe, de, 1)

    def _ints(self, pe: float, de: float, cur_p: int) -> tuple[int, int]:
        if self.ctx.mode is Mode.FIXED:
            return _fixed_split(self.ctx, max(pe, 1e-6), max(de, 1e-6), cur_p)
        prm = self.ctx.spec.params
        return (min(max(math.ceil(pe - 1e-9), prm.min_prefill, 1), prm.max_prefill),
                min(max(math.ceil(de - 1e-9), prm.min_decode, 1), prm.max_decode))

    def decide(self, now: float, obs: Observations) -> list[Action]:
        w = int(now // self.window_s)
        pe, de = self._want(w)
        fleet = obs.fleet
        cur_p, cur_d = fleet.committed(Role.PREFILL), fleet.committed(Role.DECODE)
        if pe <= 0 and de <= 0:
            return []  # an idle minute: keep what is there (no load to size for)
        want_p, want_d = self._ints(pe, de, cur_p)
        return _to_actions(cur_p, cur_d, want_p, want_d, self.ctx.mode, Reason.REBALANCE)


def make_policy(name: str, ctx: SimContext) -> Policy:
    classes: dict[str, type[Policy]] = {
        "slo": SloPolicy, "static": StaticPolicy, "static-peak": StaticPeakPolicy,
        "threshold": ThresholdPolicy, "throughput": ThroughputPolicy, "oracle": OraclePolicy,
    }
    if name == "dynamo":  # lazy: the simulator runs without the extra; absent, this raises a clear error
        from controller.sim.dynamo_policy import DynamoPolicy

        return DynamoPolicy(ctx)
    if name not in classes:
        raise ValueError(f"policy={name!r}: expected one of {', '.join(POLICIES)}")
    return classes[name](ctx)


def with_params(ctx: SimContext, **kw: object) -> SimContext:
    return replace(ctx, spec=replace(ctx.spec, params=replace(ctx.spec.params, **kw)))
