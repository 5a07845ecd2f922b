"""The live sidecar, assembled: telemetry sources -> hub -> tick loop (pure core) -> API, metrics, actuator.

Supervised tasks (each named, see Supervisor): `telemetry-zmq` (tap events),
`telemetry-scrape` (router /engine_metrics and /metrics), `fleet` (router
GET /workers, or the actuator's view), `tick` (the loop), `api` (aiohttp).
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import asdict, is_dataclass, replace
from typing import Any

import structlog
import zmq.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry

from controller.config import Config, ConfigError
from controller.core.control import ControlSpec, FleetView, Observations, WorkerStats, initial_state, tick
from controller.core.control.types import Role, Transition
from controller.metrics import ControllerMetrics
from controller.planning import objectives_and_hardware
from controller.runtime.actuation import ActuatorSink
from controller.runtime.clock import Clock, SystemClock
from controller.runtime.loop import Decide, TickLoop
from controller.runtime.supervisor import Outcome, Supervisor
from controller.telemetry.fleet import RouterFleet
from controller.telemetry.frames import Plausibility
from controller.telemetry.hub import TelemetryHub
from controller.telemetry.scrape import PrometheusScraper
from controller.telemetry.zmq_source import ZmqSource, load_client_curve
from router_plugin.keys import CurveKeyError


def build_spec(cfg: Config) -> ControlSpec:
    """Objectives and hardware exactly as `pd-controller plan` builds them, plus the control parameters."""
    objectives, hardware = objectives_and_hardware(cfg)
    return ControlSpec(objectives, hardware, cfg.control.to_params())


def jsonable(x: Any) -> Any:
    """Dataclasses, enums, tuples and numpy scalars -> JSON; NaN/inf -> null (JSON has neither)."""
    if is_dataclass(x) and not isinstance(x, type):
        return {k: jsonable(v) for k, v in asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, str | bytes):
        try:
            x = x.item()
        except (ValueError, TypeError):
            return None
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, str | int | bool) or x is None:
        return x
    return str(x)


class Sidecar:
    def __init__(
        self,
        cfg: Config,
        *,
        registry: CollectorRegistry,
        clock: Clock | None = None,
        advisory: bool = True,
        actuator: Any = None,
        decide: Decide | None = None,
        listen: tuple[str, int] | None = None,
        zmq_ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.metrics = ControllerMetrics(registry)
        t = cfg.telemetry
        self.hub = TelemetryHub(max_pending=t.max_pending_events, metrics=self.metrics, max_sources=t.max_sources,
                                plausibility=Plausibility(max_context_tokens=t.max_context_tokens))
        self.spec = build_spec(cfg) if decide is None else None
        self.actuator = actuator
        # one reader of the fleet: the actuator when there is one (it reads the router's /workers with
        # the shared parser and knows the flips it is carrying out), else the router's /workers poller.
        # The core's FleetView and the scraper's URL -> role map both come from that one reader.
        self.fleet = RouterFleet(t.router_url, self.hub, self.clock.now, interval_s=t.workers_interval_s,
                                 timeout_s=t.scrape_timeout_s) if t.router_url and actuator is None else None
        self._actuator_roles: dict[str, str] = {}
        self._actuator_workers: list[dict[str, Any]] = []
        self._flip_seen_s: dict[str, float] = {}  # url -> when a flip of it was first observed
        curve = None
        if t.curve_secret_key is not None and t.zmq_endpoints:
            try:
                curve = load_client_curve(t.curve_secret_key, t.curve_server_keys, len(t.zmq_endpoints))
            except CurveKeyError as e:
                raise ConfigError(f"telemetry: {e}") from None
        self.zmq = ZmqSource(t.zmq_endpoints, self.hub, self.clock.now, rcvhwm=t.rcvhwm, ctx=zmq_ctx, curve=curve,
                             allow_insecure=t.allow_insecure) if t.zmq_endpoints else None
        synth = t.synthesize_from_scrape if t.synthesize_from_scrape is not None else not t.zmq_endpoints
        self.scraper = PrometheusScraper(
            t.router_url, self.hub, self.clock.now, metrics_url=t.router_metrics_url,
            interval_s=t.scrape_interval_s, timeout_s=t.scrape_timeout_s, synthesize=synth,
            roles=self.fleet.roles if self.fleet else (lambda: self._actuator_roles), metrics=self.metrics,
        ) if t.router_url else None
        self._actuator_fleet: FleetView | None = None
        if decide is None:
            spec = self.spec
            assert spec is not None

            def decide(state: Any, obs: Observations, now: float) -> Any:
                return tick(state, obs, spec, now)

            state: Any = initial_state(spec, self.clock.now())
        else:
            state = None
        self.loop = TickLoop(
            decide=decide, observe=self.observe, state=state, clock=self.clock,
            period_s=cfg.control.tick_period_s, metrics=self.metrics,
            sink=ActuatorSink(actuator) if actuator is not None else None, advisory=advisory,
            extra_log=self._log_fields, guard=lambda: None if self.fleet_known else "fleet_unknown",
        )
        if hasattr(actuator, "heal_when"):  # the actuator's reconciler repairs only while the loop acts
            actuator.heal_when = lambda: self.loop.acting
        self.listen = listen or (cfg.api.host, cfg.api.port)
        self.token = cfg.api.token or os.environ.get(cfg.api.token_env) or None
        self.supervisor = Supervisor()
        self.runner: web.AppRunner | None = None
        self.api_port: int | None = None
        self.fleet_known = False

    # -- observations ------------------------------------------------------------------------

    def current_fleet(self) -> FleetView | None:
        if self.actuator is not None:
            return self._actuator_fleet
        return self.fleet.view() if self.fleet is not None else None

    def observe(self, now: float) -> Observations:
        events = self.hub.drain()
        arrivals = self.hub.drain_arrivals()
        fleet = self.current_fleet()
        self.fleet_known = fleet is not None
        if fleet is None:
            # unknown fleet: decide as if one instance per pool; actions are not applied (TickLoop.guard)
            fleet = FleetView(1, 1)
        stats = self.scraper.latest.stats if self.scraper is not None and self.scraper.latest else WorkerStats()
        age = self.telemetry_age(now)
        if age is not None:
            self.metrics.telemetry_age.set(age)
        in_flight = self.hub.in_flight(now) if self.zmq is not None else None
        if in_flight is not None and stats.in_flight is None:
            stats = replace(stats, in_flight=in_flight)
        return Observations(events=events, fleet=fleet, stats=stats, arrivals=arrivals)

    def telemetry_age(self, now: float) -> float | None:
        times = [t for t in (self.hub.last_event_s, self.scraper.last_ok_s if self.scraper else None) if t is not None]
        return now - max(times) if times else None

    def ready(self) -> tuple[bool, str]:
        age = self.telemetry_age(self.clock.now())
        if age is None:
            return False, "no telemetry yet"
        if age > self.cfg.telemetry.fresh_s:
            return False, f"telemetry is {age:.1f}s old > fresh_s={self.cfg.telemetry.fresh_s}"
        return True, "telemetry fresh"

    def _log_fields(self) -> dict[str, Any]:
        return {"dropped": sum(self.hub.dropped_total.values()), "fleet_known": self.fleet_known}

    # -- state for the API -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        d = self.loop.last_diagnostics
        fleet = self.current_fleet()
        telemetry = self.hub.snapshot()
        events_by_source = dict(self.hub.events_total)
        now = self.clock.now()
        out: dict[str, Any] = jsonable({
            "mode": self.loop.mode,
            "paused": self.loop.paused,
            "advisory_flag": self.loop.advisory,
            "actuator": getattr(self.actuator, "name", None),
            "tick": self.loop.ticks,
            "tick_errors": self.loop.errors,
            "last_tick_s": self.loop.last_tick_s,
            "estimates": d.estimates if d else None,
            "forecast": d.forecast if d else None,
            "fleet": {
                "known": fleet is not None,
                "prefill": fleet.serving_prefill if fleet else None,
                "decode": fleet.serving_decode if fleet else None,
                "workers": self.fleet.snapshot() if self.fleet else self._actuator_workers,
                "worker_metrics": self.scraper.latest.per_worker if self.scraper and self.scraper.latest else {},
            },
            "target": {
                "prefill": d.desired_prefill if d else None,
                "decode": d.desired_decode if d else None,
                "model": d.target if d else None,
            },
            "calibration": d.calibration if d else None,
            "observed": {"ttft_s": self.loop.observed_ttft_s, "tpot_s": self.loop.observed_tpot_s},
            "actions": [{"kind": a.kind.value, "count": a.count, "reason": a.reason.value} for a in self.loop.last_actions],
            "decisions": [r.as_dict() for r in list(self.loop.history)[-20:]],
            "telemetry": {
                "events_total": sum(events_by_source.values()),
                "events_by_source": events_by_source,
                "dropped_total": telemetry["dropped_total"],
                "frames_lost": telemetry["frames_lost"],
                "pending": telemetry["pending"],
                "age_s": self.telemetry_age(now),
                "sources": {
                    "zmq": list(self.zmq.endpoints) if self.zmq else [],
                    "scrape": self.scraper.engine_url if self.scraper else None,
                },
            },
        })
        return out

    # -- the API's view (controller.api.view.ControllerView) ----------------------------------

    def metrics_exposition(self) -> bytes:
        return self.metrics.exposition()

    def set_paused(self, paused: bool) -> dict[str, Any]:
        self.loop.set_paused(paused)
        body: dict[str, Any] = {"paused": self.loop.paused, "mode": self.loop.mode}
        if not paused and self.loop.mode == "advisory":
            body["note"] = "still advisory: " + ("no actuator configured" if self.loop.sink is None
                                                 else "started with --advisory")
        return body

    # -- lifecycle ---------------------------------------------------------------------------

    async def refresh_actuator_fleet(self) -> None:
        """Read the fleet from the actuator once (also right after an actuation, so the next tick sees it)."""
        try:
            f = await self.actuator.fleet()
        except Exception as e:
            # the router may be restarting: the fleet becomes unknown (the loop then does not
            # act, TickLoop.guard) and is read again later; this must not end the sidecar
            self._actuator_fleet = None
            self.metrics.fleet_errors.inc()
            structlog.get_logger("pd-controller").warning("fleet_unavailable", error=repr(e))
            return
        flipping = set(f.flips_in_flight)
        now = self.clock.now()
        # when each flip was first observed under way (the core counts flips from these, never proposals)
        self._flip_seen_s = {u: self._flip_seen_s.get(u, now) for u in flipping}
        # a worker moving between pools counts toward its new pool (the core's FleetView.committed);
        # one being drained for removal has no target role
        moving = tuple(
            Transition(Role.DECODE if w.role == "prefill" else Role.PREFILL, kind="flip",
                       started_s=self._flip_seen_s[w.url], worker=w.url)
            if w.url in flipping else Transition(None, kind="stop", worker=w.url)
            for w in f.workers if w.state in ("flipping", "draining")
        )
        self._actuator_fleet = FleetView(f.count("prefill"), f.count("decode"), moving)
        self._actuator_roles = {w.url.rstrip("/"): str(w.role) for w in f.workers}
        self._actuator_workers = [{"url": w.url, "role": str(w.role), "healthy": w.healthy, "state": w.state,
                                   "load": w.load} for w in f.workers]

    async def _actuator_fleet_task(self) -> None:
        while True:
            await self.refresh_actuator_fleet()
            await asyncio.sleep(self.cfg.telemetry.workers_interval_s)

    async def start_api(self) -> int:
        from controller.api.app import build_app

        self.runner = web.AppRunner(build_app(self), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.listen[0], self.listen[1])
        await site.start()
        server = site._server
        assert server is not None
        self.api_port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.api_port

    async def stop_api(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _serve_forever(self) -> None:
        await asyncio.Event().wait()

    async def run(self, *, signals: bool = True) -> Outcome:
        sup = self.supervisor
        if self.zmq is not None:
            sup.add("telemetry-zmq", self.zmq.run)
        if self.scraper is not None:
            sup.add("telemetry-scrape", self.scraper.run)
        if self.actuator is not None:
            sup.add("fleet", self._actuator_fleet_task)
        elif self.fleet is not None:
            sup.add("fleet", self.fleet.run)
        sup.add("tick", self.loop.run)
        if self.loop.sink is not None:
            self.loop.after_apply = self.refresh_actuator_fleet
            sup.add("actuation", self.loop.run_actuation)
        port = await self.start_api()
        structlog.get_logger("pd-controller").info("api_listening", host=self.listen[0], port=port)
        sup.add("api", self._serve_forever)
        if signals:
            sup.install_signal_handlers()
        try:
            return await sup.run()
        finally:
            if signals:
                sup.remove_signal_handlers()
            await self.stop_api()
            if self.actuator is not None and hasattr(self.actuator, "close"):
                await self.actuator.close()
