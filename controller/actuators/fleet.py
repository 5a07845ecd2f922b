"""The `router` actuator: the router's worker registry plus a role switcher (endpoint or node agent).

Fleet view = the router's `/workers`, plus the workers it does not list
because a flip or a scale-down is moving them (state `flipping`), plus the
configured spares, with workers the reconciler found unable to serve marked
`failed` (out of capacity until repaired). The reconciler
(controller.actuators.reconcile) runs as this actuator's own background task,
started on the first look at the fleet (every user of the actuator heals:
`run`, the demo, benches) and stopped by `close()`. Scale-up registers spares (switching them to the pool's
role first); scale-down drains a worker exactly like a flip's first half and
keeps it as a spare (asking its agent to stop it when there is one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable

import structlog

from controller.actuators.agent import AgentSwitcher
from controller.actuators.base import ActionResult, FleetView, Role, WorkerView, refused
from controller.actuators.errors import ActuationError
from controller.actuators.flip import DrainedFlipper, FlipGuard
from controller.actuators.metrics import ActuatorMetrics
from controller.actuators.reconcile import Reconciler, ReconcileReport
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
        reconcile_interval_s: float = 0.0,
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
        self._recovering: asyncio.Lock = asyncio.Lock()
        self.recovered: list[ActionResult] = []  # what start-up recovery finished or rolled back
        self.reconcile_interval_s = reconcile_interval_s
        known = set(flipper.bootstrap_ports) | set(self.spares)
        if agents is not None:
            known |= set(agents.endpoints)
        self.reconciler = Reconciler(
            flipper, metrics, known=known, spares=lambda: self.spares, can_restart=agents is not None,
            interval_s=reconcile_interval_s or 3.0, clock=flipper.clock, sleep=flipper.sleep,
            enabled=lambda: self.heal_when(),
        )
        # whether the reconciler may repair (the runtime sets it to "the loop is acting": advisory and paused
        # controllers touch nothing, they report)
        self.heal_when: Callable[[], bool] = lambda: True
        self._reconcile_task: asyncio.Task[None] | None = None

    @property
    def guard(self) -> FlipGuard:
        return self.flipper.guard

    async def _recover_once(self) -> None:
        # idempotent across restarts: the first look at the fleet finishes or rolls back journaled flips
        async with self._recovering:
            if not self._recovered:
                self._recovered = True
                if self.flipper.in_flight:
                    self.recovered = await self.flipper.recover()

    def start_reconciler(self) -> None:
        """Start healing in the background (idempotent); `reconcile_interval_s` 0 leaves it to the caller."""
        if self.reconcile_interval_s > 0 and (self._reconcile_task is None or self._reconcile_task.done()):
            self._reconcile_task = asyncio.get_running_loop().create_task(
                self.reconciler.run(before=self._recover_once), name="actuator-reconcile")

    async def reconcile(self) -> ReconcileReport:
        """One reconciler pass now (after start-up recovery)."""
        await self._recover_once()
        return await self.reconciler.once()

    async def fleet(self) -> FleetView:
        self.start_reconciler()
        await self._recover_once()
        excluded = self.reconciler.excluded()
        listed = [dataclasses.replace(w, healthy=False, state="failed") if w.url in excluded else w
                  for w in await self.router.workers()]
        seen = {w.url for w in listed}
        workers = list(listed)
        for url, rec in self.flipper.in_flight.items():
            if url not in seen:
                workers.append(WorkerView(url, rec.from_role, healthy=False, state="flipping"))
                seen.add(url)
            else:
                workers = [dataclasses.replace(w, state="flipping") if w.url == url else w for w in workers]
        for url, rec in self.flipper.failed.items():
            if url not in seen:
                workers.append(WorkerView(url, rec.from_role, healthy=False, state="failed"))
                seen.add(url)
        for url, ws in excluded.items():
            if url not in seen and ws.last_role is not None and url not in self.spares:
                workers.append(WorkerView(url, ws.last_role, healthy=False, state="failed"))
                seen.add(url)
        for url in self.spares:
            if url not in seen:
                workers.append(WorkerView(url, Role.DECODE, healthy=False, state="spare"))
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
            self.flipper.busy.add(url)
            try:
                await self._add_spare(url, pool)
            finally:
                self.flipper.busy.discard(url)
            done.append(url)
        detail = f"added {', '.join(done)}" + (f" ({n - len(done)} short: no more spares)" if len(done) < n else "")
        return ActionResult("scale", pool, ok=True, reason=reason, detail=detail)

    async def _add_spare(self, url: str, pool: Role) -> None:
        if self.agents is not None:
            await self.agents.client.send(self.agents.endpoint(url), "start", pool)
        if await self.switcher.current_role(url) != pool:
            await self.switcher.switch(url, pool, self.flipper.t.switch_s)
        await self.flipper.register(url, pool, self.flipper.bootstrap_ports.get(url))
        self.spares.remove(url)

    async def _scale_down(self, pool: Role, n: int, reason: str) -> ActionResult:
        fleet = await self.fleet()
        serving = sorted(fleet.pool(pool), key=lambda w: w.load)  # drain the least loaded first
        room = len(serving) - self.guard.min_pool_size
        if room <= 0:
            return refused("scale", pool, reason, "last_instance_of_pool")
        done = []
        for w in serving[: min(n, room)]:
            self.flipper.busy.add(w.url)
            try:
                try:
                    await self.flipper.drain_out(w.url)
                except ActuationError:
                    # last good state: back in its pool
                    await self.flipper.register(w.url, pool, w.bootstrap_port)
                    raise
                self.spares.append(w.url)  # a spare before it stops: the reconciler must not re-add it
                if self.agents is not None:
                    await self.agents.client.send(self.agents.endpoint(w.url), "stop")
            finally:
                self.flipper.busy.discard(w.url)
            done.append(w.url)
        return ActionResult("scale", pool, ok=True, reason=reason, detail=f"drained and removed {', '.join(done)}")

    async def close(self) -> None:
        if self._reconcile_task is not None:
            self._reconcile_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconcile_task
            self._reconcile_task = None
        for c in self._closers:
            close = getattr(c, "close", None)
            if close is not None:
                await close()
