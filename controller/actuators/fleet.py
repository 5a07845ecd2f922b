"""The `router` actuator: the router's worker registry plus a role switcher (endpoint or node agent).

Fleet view = the router's `/workers`, plus the workers it does not list
because a flip or a scale-down is moving them (state `flipping`), plus the
configured spares. Scale-up registers spares (switching them to the pool's
role first); scale-down drains a worker exactly like a flip's first half and
keeps it as a spare (asking its agent to stop it when there is one).
"""

from __future__ import annotations

import asyncio
import dataclasses

import structlog

from controller.actuators.agent import AgentSwitcher
from controller.actuators.base import ActionResult, FleetView, Role, WorkerView, refused
from controller.actuators.errors import ActuationError
from controller.actuators.flip import DrainedFlipper, FlipGuard
from controller.actuators.metrics import ActuatorMetrics
from controller.actuators.router import RouterClient
from controller.actuators.switch import Switcher

log = structlog.get_logger("pd.actuation")


class RouterActuator:
    name = "router"

    def __init__(
        self,
        router: RouterClient,
        flipper: DrainedFlipper,
        switcher: Switcher,
        metrics: ActuatorMetrics,
        *,
        spares: list[str],
        agents: AgentSwitcher | None = None,
        closers: tuple[object, ...] = (),
    ) -> None:
        self.router = router
        self.flipper = flipper
        self.switcher = switcher
        self.metrics = metrics
        self.spares = [s.rstrip("/") for s in spares]
        self.agents = agents
        self._closers = closers
        self._lock = asyncio.Lock()  # scale actions one at a time; flips bounded by the guard
        self._recovered = False
        self.recovered: list[ActionResult] = []  # what start-up recovery finished or rolled back

    @property
    def guard(self) -> FlipGuard:
        return self.flipper.guard

    async def _recover_once(self) -> None:
        # idempotent across restarts: the first look at the fleet finishes or rolls back journaled flips
        if not self._recovered:
            self._recovered = True
            if self.flipper.in_flight:
                self.recovered = await self.flipper.recover()

    async def fleet(self) -> FleetView:
        await self._recover_once()
        listed = await self.router.workers()
        seen = {w.url for w in listed}
        workers = list(listed)
        for url, rec in self.flipper.in_flight.items():
            if url not in seen:
                workers.append(WorkerView(url, rec.from_role, healthy=False, state="flipping"))
                seen.add(url)
            else:
                workers = [dataclasses.replace(w, state="flipping") if w.url == url else w for w in workers]
        for url in self.spares:
            if url not in seen:
                workers.append(WorkerView(url, "decode", healthy=False, state="spare"))
        return FleetView(tuple(workers), tuple(self.flipper.in_flight))

    async def flip(self, worker: str, to_role: Role, reason: str) -> ActionResult:
        await self._recover_once()
        return await self.flipper.flip(worker, to_role, reason)

    async def recover(self) -> list[ActionResult]:
        self._recovered = True
        res = await self.flipper.recover()
        self.recovered += res
        return res

    async def scale(self, pool: Role, delta: int, reason: str) -> ActionResult:
        async with self._lock:
            try:
                res = await (self._scale_up(pool, delta, reason) if delta > 0 else self._scale_down(pool, -delta, reason))
            except ActuationError as e:
                res = ActionResult("scale", pool, ok=False, reason=reason, detail=str(e))
            self.metrics.scales.labels("ok" if res.ok else "failed", pool).inc()
            return res

    async def _scale_up(self, pool: Role, n: int, reason: str) -> ActionResult:
        listed = {w.url for w in await self.router.workers()}
        free = [s for s in self.spares if s not in listed and s not in self.flipper.in_flight]
        if not free:
            return refused("scale", pool, reason, "no_spare_workers", "refused: no spare workers")
        done = []
        for url in free[:n]:
            if self.agents is not None:
                await self.agents.client.send(self.agents.endpoint(url), "start", pool)
            if await self.switcher.current_role(url) != pool:
                await self.switcher.switch(url, pool, self.flipper.t.switch_s)
            await self.router.add(url, pool, self.flipper.bootstrap_ports.get(url), self.flipper.t.register_s)
            self.spares.remove(url)
            done.append(url)
        detail = f"added {', '.join(done)}" + (f" ({n - len(done)} short: no more spares)" if len(done) < n else "")
        return ActionResult("scale", pool, ok=True, reason=reason, detail=detail)

    async def _scale_down(self, pool: Role, n: int, reason: str) -> ActionResult:
        fleet = await self.fleet()
        serving = sorted(fleet.pool(pool), key=lambda w: w.load)  # drain the least loaded first
        room = len(serving) - self.guard.min_pool_size
        if room <= 0:
            return refused("scale", pool, reason, "last_instance_of_pool")
        done = []
        for w in serving[: min(n, room)]:
            try:
                await self.flipper.drain_out(w.url)
            except ActuationError:
                # last good state: back in its pool
                await self.router.add(w.url, pool, w.bootstrap_port, self.flipper.t.register_s)
                raise
            if self.agents is not None:
                await self.agents.client.send(self.agents.endpoint(w.url), "stop")
            self.spares.append(w.url)
            done.append(w.url)
        return ActionResult("scale", pool, ok=True, reason=reason, detail=f"drained and removed {', '.join(done)}")

    async def close(self) -> None:
        for c in self._closers:
            close = getattr(c, "close", None)
            if close is not None:
                await close()
