"""The tick loop: observe, decide (the pure core), report, and act only when allowed.

Every `period_s` (or at once when woken): drain new observations, call the
injected decision function `decide(state, obs, now) -> TickResult`, export
the diagnostics as metrics and one canonical log line, keep the last decisions
for the API, and hand the actions to the actuator unless the loop is in
advisory mode (no actuator, `--advisory`, or paused through the API).

A tick that raises is logged and counted (`pdctl_ticks_total{result="error"}`)
and the state is kept: one bad tick must not take the sidecar down.

Actuation runs in its own supervised task (`run_actuation`): a drained flip
can take minutes (the drain waits for the longest stream), and the loop must
keep observing and reporting meanwhile. A tick hands its actions over only
when the actuation task is idle (`applied="submitted"`); otherwise the
actions are recorded as `blocked:actuation_busy` and re-derived next tick
from the fleet as it then is. Without a running actuation task (unit tests)
the actions are applied inline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from controller.core.control.types import Action, Diagnostics, Observations
from controller.metrics import ControllerMetrics
from controller.runtime.clock import Clock, Waker

Decide = Callable[[Any, Observations, float], Any]  # (state, obs, now) -> TickResult(actions, state, diagnostics)
Observe = Callable[[float], Observations]


class ActionSink(Protocol):
    """What the loop hands actions to (see controller.runtime.actuation for the adapter over an Actuator)."""

    async def apply(self, actions: Sequence[Action]) -> list[tuple[Action, bool, str]]:
        """Apply actions; one (action, ok, detail) per action."""
        ...


@dataclass(frozen=True)
class DecisionRecord:
    now: float
    tick: int
    pool: str
    reason: str
    detail: str
    actions: tuple[str, ...]
    applied: str  # advisory | submitted | ok | failed | none | blocked:<why>

    def as_dict(self) -> dict[str, Any]:
        return {
            "time_s": self.now, "tick": self.tick, "pool": self.pool, "reason": self.reason,
            "detail": self.detail, "actions": list(self.actions), "applied": self.applied,
        }


def _kind_key(a: Action) -> str:
    return f"{a.kind.value}:{'+' if a.count > 0 else '-'}"


def _fleet_signature(obs: Observations) -> tuple[Any, ...]:
    f = obs.fleet
    return (f.serving_prefill, f.serving_decode, len(f.transitions))


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def observed_latencies(events: np.ndarray) -> tuple[float | None, float | None]:
    """Mean TTFT and TPOT (s) of this tick's successful events; None when there are none."""
    if events.size == 0:
        return None, None
    ok = events[events["status"] < 400]
    if ok.size == 0:
        return None, None
    ttft = ok["ttft_s"][np.isfinite(ok["ttft_s"])]
    tpot = ok["tpot_s"][np.isfinite(ok["tpot_s"])]
    return (float(ttft.mean()) if ttft.size else None), (float(tpot.mean()) if tpot.size else None)


@dataclass
class TickLoop:
    decide: Decide
    observe: Observe
    state: Any
    clock: Clock
    period_s: float
    metrics: ControllerMetrics | None = None
    sink: ActionSink | None = None
    advisory: bool = True
    paused: bool = False
    history: deque[DecisionRecord] = field(default_factory=lambda: deque(maxlen=100))
    log: Any = field(default_factory=lambda: structlog.get_logger("pd-controller.tick"))
    extra_log: Callable[[], dict[str, Any]] = dict
    # a reason not to act this tick (e.g. the fleet is unknown), or None
    guard: Callable[[], str | None] = lambda: None
    # re-read the fleet after an actuation, before the next tick decides on it
    after_apply: Callable[[], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ValueError(f"period_s={self.period_s!r}: must be a positive number of seconds")
        self.waker = Waker()
        self.ticks = 0
        self.errors = 0
        self.last_diagnostics: Diagnostics | None = None
        self.last_obs: Observations | None = None
        self.last_actions: tuple[Action, ...] = ()
        self.last_tick_s: float | None = None
        self.observed_ttft_s: float | None = None
        self.observed_tpot_s: float | None = None
        self._submitted: asyncio.Queue[tuple[float, tuple[Action, ...]]] = asyncio.Queue(maxsize=1)
        self._actuation_running = False
        self.actuation_busy = False
        self.last_outcomes: deque[dict[str, Any]] = deque(maxlen=50)
        # proposals the actuator refused or only advised, by action kind: (fleet signature, retry at, why).
        # The same proposal on the same fleet is not submitted again before the retry time (doubling).
        self.refused: dict[str, tuple[tuple[Any, ...], float, float, str]] = {}
        self.fleet_signature: Callable[[Observations], tuple[Any, ...]] = _fleet_signature
        if self.metrics is not None:
            self.metrics.paused.set(1 if self.acting is False else 0)

    @property
    def acting(self) -> bool:
        return self.sink is not None and not self.advisory and not self.paused

    @property
    def mode(self) -> str:
        return "acting" if self.acting else "advisory"

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        if self.metrics is not None:
            self.metrics.paused.set(0 if self.acting else 1)
        self.waker.wake()  # re-solve now under the new mode

    async def run(self) -> None:
        while True:
            started = self.clock.now()
            await self.tick_once()
            # keep the period from tick start to tick start; a slow tick shortens the wait. A wake-up
            # (pause/resume) ends the sleep early, but ticks never come faster than one per period:
            # the rest of the period is slept after it (issue 13: a loop that woke itself after every
            # actuation spun at 100 % CPU when the actuation changed nothing).
            await self.clock.sleep(max(self.period_s - (self.clock.now() - started), 0.0), self.waker)
            rest = self.period_s - (self.clock.now() - started)
            if rest > 0:
                await self.clock.sleep(rest)

    async def tick_once(self) -> Any:
        now = self.clock.now()
        t0 = time.perf_counter()
        try:
            obs = self.observe(now)
            result = self.decide(self.state, obs, now)
        except Exception as e:
            self.errors += 1
            if self.metrics is not None:
                self.metrics.ticks.labels(result="error").inc()
            self.log.error("tick_failed", tick=self.ticks + 1, error=repr(e))
            return None
        duration = time.perf_counter() - t0
        self.ticks += 1
        self.state = result.state
        self.last_diagnostics = result.diagnostics
        self.last_obs = obs
        self.last_actions = tuple(result.actions)
        self.last_tick_s = now
        self.observed_ttft_s, self.observed_tpot_s = observed_latencies(obs.events)
        applied = "advisory"
        outcomes: list[tuple[Action, bool, str]] = []
        blocked = self.guard() if result.actions and self.acting else None
        suppressed = self._suppressed(now, tuple(result.actions), obs) if result.actions and self.acting else None
        if blocked is not None:
            applied = f"blocked:{blocked}"
        elif suppressed is not None:
            applied = f"suppressed:{suppressed}"
        elif result.actions and self.acting and self._actuation_running:
            if self.actuation_busy or self._submitted.full():
                applied = "blocked:actuation_busy"
            else:
                self._submitted.put_nowait((now, tuple(result.actions)))
                applied = "submitted"
        elif result.actions and self.acting:
            outcomes = await self._apply(now, tuple(result.actions))
            applied = "ok" if all(ok for _, ok, _ in outcomes) else "failed"
        elif not result.actions:
            applied = "none"
        try:
            self._record(now, result, applied)
            self._export(duration, result, obs, applied, outcomes)
            self._log_line(now, duration, result, obs, applied)
        except Exception as e:  # reporting must not stop the loop either
            self.log.error("tick_report_failed", tick=self.ticks, error=repr(e))
        return result

    def _suppressed(self, now: float, actions: tuple[Action, ...], obs: Observations) -> str | None:
        """Why these actions are not submitted again (refused before on this same fleet), or None."""
        sig = self.fleet_signature(obs)
        for a in actions:
            rec = self.refused.get(_kind_key(a))
            if rec is None or rec[0] != sig or now >= rec[1]:
                return None
        return self.refused[_kind_key(actions[0])][3]

    def _remember_refusals(self, now: float, actions: tuple[Action, ...]) -> None:
        last = getattr(self.sink, "last", ())
        sig = self.fleet_signature(self.last_obs) if self.last_obs is not None else ()
        for x in last:
            key = _kind_key(x.action)
            if getattr(x, "refused", False):
                prev = self.refused.get(key)
                backoff = min(2 * prev[2], 600.0) if prev is not None and prev[0] == sig else max(60.0, self.period_s)
                if prev is None or prev[0] != sig:
                    self.log.info("proposal_refused", action=f"{x.action.kind.value}:{x.action.count}",
                                  why=getattr(x, "why", "") or x.detail, retry_in_s=backoff)
                self.refused[key] = (sig, now + backoff, backoff, getattr(x, "why", "") or "refused")
            else:
                self.refused.pop(key, None)

    async def _apply(self, now: float, actions: tuple[Action, ...]) -> list[tuple[Action, bool, str]]:
        assert self.sink is not None
        try:
            outcomes = await self.sink.apply(actions)
        except Exception as e:  # an actuator bug must not stop the loop
            outcomes = [(a, False, repr(e)) for a in actions]
        self._remember_refusals(now, actions)
        for a, ok, detail in outcomes:
            self.last_outcomes.append({"time_s": now, "action": f"{a.kind.value}:{a.count}:{a.reason.value}",
                                       "ok": ok, "detail": detail})
        return outcomes

    async def run_actuation(self) -> None:
        """The actuation task: apply submitted actions one batch at a time, then re-solve at once."""
        self._actuation_running = True
        try:
            while True:
                now, actions = await self._submitted.get()
                self.actuation_busy = True
                try:
                    outcomes = await self._apply(now, actions)
                finally:
                    self.actuation_busy = False
                if self.metrics is not None:
                    for _, ok, _ in outcomes:
                        self.metrics.actuations.labels(result="ok" if ok else "failed").inc()
                self.log.info("actuation", submitted_at=now,
                              results=[{"action": f"{a.kind.value}:{a.count}", "ok": ok, "detail": d}
                                       for a, ok, d in outcomes])
                if getattr(self.sink, "last_changed", True) and self.after_apply is not None:
                    await self.after_apply()  # the fleet may have changed: re-read it before the next tick
        finally:
            self._actuation_running = False

    def _record(self, now: float, result: Any, applied: str) -> None:
        acts = tuple(f"{a.kind.value}:{a.count}:{a.reason.value}" for a in result.actions)
        for d in result.diagnostics.decisions:
            self.history.append(DecisionRecord(now, self.ticks, d.pool, d.reason.value, d.detail, acts, applied))

    def _export(self, duration: float, result: Any, obs: Observations, applied: str,
                outcomes: list[tuple[Action, bool, str]]) -> None:
        m = self.metrics
        if m is None:
            return
        d: Diagnostics = result.diagnostics
        m.ticks.labels(result="ok").inc()
        m.tick_duration.observe(duration)
        est = d.estimates
        if est is not None:
            for g, v in ((m.arrival_rate, est.arrival_rate_rps), (m.input_len, est.input_len_mean),
                         (m.output_len, est.output_len_mean), (m.cache_hit, est.cache_hit_rate)):
                if math.isfinite(v):
                    g.set(v)
            m.window_samples.set(est.samples)
        if d.forecast is not None:
            m.forecast_level.set(d.forecast.level_rps)
            m.forecast_max.set(d.forecast.max_rps)
        t = d.target
        if t is not None:
            if t.predicted_ttft_s is not None:
                m.predicted_ttft.set(t.predicted_ttft_s)
            if t.predicted_tpot_ms is not None:
                m.predicted_tpot.set(t.predicted_tpot_ms / 1000.0)
            m.needed_instances.labels(role="prefill", source="plan").set(t.n_prefill_exact)
            m.needed_instances.labels(role="decode", source="plan").set(t.n_decode_exact)
            if t.prefill_backlog_need is not None:
                m.needed_instances.labels(role="prefill", source="arrival_burst").set(t.prefill_backlog_need)
            if t.decode_backlog_need is not None:
                m.needed_instances.labels(role="decode", source="arrival_burst").set(t.decode_backlog_need)
            if t.decode_observed_need is not None:
                m.needed_instances.labels(role="decode", source="running_batch").set(t.decode_observed_need)
            if est is not None and math.isfinite(est.input_len_mean):
                m.prefill_tps.set(t.prefill_rate_per_instance_rps * est.input_len_mean)
                m.decode_tps.set(t.decode_rate_per_instance_rps * est.output_len_mean)
        if self.observed_ttft_s is not None:
            m.observed_ttft.set(self.observed_ttft_s)
        if self.observed_tpot_s is not None:
            m.observed_tpot.set(self.observed_tpot_s)
        if d.feedback is not None:
            m.feedback_headroom.labels(role="prefill").set(d.feedback.prefill_headroom)
            m.feedback_headroom.labels(role="decode").set(d.feedback.decode_headroom)
        c = d.calibration
        m.calibration_scale.labels(quantity="prefill_service").set(c.prefill_service_scale)
        m.calibration_scale.labels(quantity="tpot").set(c.tpot_scale)
        errors: tuple[tuple[str, float | None], ...] = (("ttft", c.ttft_error_rel), ("tpot", c.tpot_error_rel))
        for q, err in errors:
            if err is not None and math.isfinite(err):
                m.model_error.labels(quantity=q).set(err)
        if d.desired_prefill is not None:
            m.target_instances.labels(role="prefill").set(d.desired_prefill)
        if d.desired_decode is not None:
            m.target_instances.labels(role="decode").set(d.desired_decode)
        m.current_instances.labels(role="prefill").set(obs.fleet.serving_prefill)
        m.current_instances.labels(role="decode").set(obs.fleet.serving_decode)
        for dec in d.decisions:
            m.decisions.labels(pool=dec.pool, reason=dec.reason.value).inc()
        for a in result.actions:
            m.actions.labels(kind=a.kind.value, reason=a.reason.value).inc()
        if result.actions and applied == "advisory":
            m.actuations.labels(result="skipped_advisory").inc(len(result.actions))
        elif result.actions and applied.startswith("blocked:"):
            m.actuations.labels(result="blocked").inc(len(result.actions))
        for _, ok, _ in outcomes:
            m.actuations.labels(result="ok" if ok else "failed").inc()

    def _log_line(self, now: float, duration: float, result: Any, obs: Observations, applied: str) -> None:
        """The canonical line: everything about this tick in one structured event."""
        d: Diagnostics = result.diagnostics
        est, fc, t = d.estimates, d.forecast, d.target
        self.log.info(
            "tick",
            tick=self.ticks,
            duration_ms=round(duration * 1000, 3),
            mode=self.mode,
            events=int(obs.events.size),
            rate_rps=_finite(est.arrival_rate_rps) if est else None,
            input_len=_finite(est.input_len_mean) if est else None,
            output_len=_finite(est.output_len_mean) if est else None,
            cache_hit=_finite(est.cache_hit_rate) if est else None,
            samples=est.samples if est else 0,
            forecast_rps=_finite(fc.max_rps) if fc else None,
            fleet=f"{obs.fleet.serving_prefill}P{obs.fleet.serving_decode}D",
            target=(f"{d.desired_prefill}P{d.desired_decode}D" if d.desired_prefill is not None else None),
            model=(f"{t.n_prefill_exact:.2f}P{t.n_decode_exact:.2f}D" if t else None),
            predicted_ttft_s=_finite(t.predicted_ttft_s) if t and t.predicted_ttft_s is not None else None,
            observed_ttft_s=self.observed_ttft_s,
            reasons=list(d.reasons),
            actions=[f"{a.kind.value}:{a.count}" for a in result.actions],
            applied=applied,
            **self.extra_log(),
        )
