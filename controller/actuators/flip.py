"""The drained flip: an explicit state machine, journaled so a restarted controller can finish it.

    PLANNED -> DEREGISTER -> DRAIN -> SWITCH -> REGISTER -> VERIFY -> DONE
        any failure -> ROLLBACK -> ROLLED_BACK   (or FAILED when even the rollback fails)

DEREGISTER removes the worker from the router first, so no new request is
routed to it; DRAIN waits until `/get_load` reports zero running and waiting
requests (SGLang refuses a role switch unless fully idle); SWITCH changes the
role and returns once the worker is healthy in it; REGISTER adds it to the
other pool; VERIFY waits for its request counters to move.

Rollback restores the last good state: the worker serving its old role in
the old pool. If that is impossible (the worker is down), it is left out of
the router — never registered while broken — and the result says why.

Safety rules (`FlipGuard`), checked before anything is touched: one flip per
worker at a time, never take a pool below `min_pool_size` healthy serving
workers (counting flips already in flight out of it). Rate limits are the
control parameters' (one owner), not the actuator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import structlog

from controller.actuators.base import ActionResult, FleetView, Role, check_role, other_role, refused
from controller.actuators.errors import ActuationError
from controller.actuators.metrics import ActuatorMetrics
from controller.actuators.router import RouterClient
from controller.actuators.switch import Switcher
from controller.actuators.worker import WorkerClient

log = structlog.get_logger("pd.actuation")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Step(StrEnum):
    PLANNED = "planned"
    DEREGISTER = "deregister"
    DRAIN = "drain"
    SWITCH = "switch"
    REGISTER = "register"
    VERIFY = "verify"
    DONE = "done"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


# steps after which the worker may already serve the new role
SWITCHED = (Step.SWITCH, Step.REGISTER, Step.VERIFY)


@dataclass
class FlipRecord:
    worker: str
    from_role: Role
    to_role: Role
    reason: str
    started_at: float
    step: Step = Step.PLANNED
    bootstrap_port: int | None = None
    history: list[str] = field(default_factory=list)
    served_before: float = 0.0  # the worker's request counters just before REGISTER
    peers_before: dict[str, float] = field(default_factory=dict)  # same, for the other workers of the pool


class Journal:
    """In-flight flips, persisted as one JSON file (atomic rename) so a restart can resume them."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: dict[str, FlipRecord] = {}
        if path is not None and path.exists():
            raw = json.loads(path.read_text() or "{}")
            for url, r in raw.items():
                self.records[url] = FlipRecord(
                    worker=r["worker"], from_role=check_role(r["from_role"]), to_role=check_role(r["to_role"]),
                    reason=r["reason"], started_at=float(r["started_at"]), step=Step(r["step"]),
                    bootstrap_port=r.get("bootstrap_port"), history=list(r.get("history", [])),
                )

    def save(self, rec: FlipRecord) -> None:
        self.records[rec.worker] = rec
        self._flush()

    def drop(self, worker: str) -> None:
        self.records.pop(worker, None)
        self._flush()

    def _flush(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({u: asdict(r) for u, r in self.records.items()}, indent=1))
        os.replace(tmp, self.path)


class FlipGuard:
    """The hard safety rules, as a pure check of the fleet view and the flips in flight.

    Only rules that protect the fleet whatever the controller decides: one flip per worker at a time,
    never a worker the fleet does not list healthy, never take a pool below `min_pool_size` healthy
    serving workers (counting flips already leaving it). How many flips may run at once and per hour
    is a control decision with one owner: the control parameters (`control.max_flips_in_flight`,
    `control.max_flips_per_hour`, controller.core.control.params), applied by the core to the flips
    observed to start. The actuator keeps no budget of its own.
    """

    def __init__(self, *, min_pool_size: int = 1) -> None:
        if min_pool_size < 1:
            raise ValueError(f"min_pool_size={min_pool_size!r}: every pool keeps at least one worker")
        self.min_pool_size = min_pool_size

    def refusal(self, fleet: FleetView, worker: str, to_role: Role, in_flight: Mapping[str, FlipRecord],
                busy: Collection[str] = ()) -> str | None:
        """None when the flip may start, else a short reason (a metric label)."""
        if worker in in_flight:
            return "already_flipping"
        if worker in busy:
            return "worker_repairing"
        w = fleet.by_url().get(worker)
        if w is None:
            return "unknown_worker"
        if w.role == to_role:
            return "already_in_role"
        if not w.healthy or w.state != "serving":
            return "worker_unhealthy"
        leaving = sum(1 for r in in_flight.values() if r.from_role == w.role)
        if fleet.count(w.role) - leaving - 1 < self.min_pool_size:
            return "last_instance_of_pool"
        return None


@dataclass
class FlipTimeouts:
    drain_s: float = 60.0
    switch_s: float = 120.0
    register_s: float = 30.0
    verify_s: float = 30.0
    poll_s: float = 0.5


class DrainedFlipper:
    def __init__(
        self,
        router: RouterClient,
        workers: WorkerClient,
        switcher: Switcher,
        guard: FlipGuard,
        journal: Journal,
        metrics: ActuatorMetrics,
        *,
        timeouts: FlipTimeouts,
        bootstrap_ports: dict[str, int],
        clock: Clock,
        sleep: Sleep = asyncio.sleep,
        on_step: Callable[[FlipRecord], Awaitable[None]] | None = None,
    ) -> None:
        self.router = router
        self.workers = workers
        self.switcher = switcher
        self.guard = guard
        self.journal = journal
        self.metrics = metrics
        self.t = timeouts
        self.bootstrap_ports = {k.rstrip("/"): v for k, v in bootstrap_ports.items()}
        self.clock = clock
        self.sleep = sleep
        self.on_step = on_step  # test hook: called after each journaled step

    @property
    def in_flight(self) -> dict[str, FlipRecord]:
        return self.journal.records

    async def _enter(self, rec: FlipRecord, step: Step, note: str = "") -> None:
        rec.step = step
        rec.history.append(f"{step.value}{': ' + note if note else ''}")
        self.journal.save(rec)
        log.info("flip_step", worker=rec.worker, to_role=rec.to_role, step=step.value, note=note)
        if self.on_step is not None:
            await self.on_step(rec)

    def _port_for(self, url: str, known: int | None) -> int | None:
        return self.bootstrap_ports.get(url, known)

    async def flip(self, worker: str, to_role: Role, reason: str) -> ActionResult:
        worker = worker.rstrip("/")
        t0 = self.clock()
        fleet = await self.router.fleet()
        why = self.guard.refusal(fleet, worker, to_role, self.in_flight)
        if why is not None:
            self.metrics.flips.labels("refused", to_role).inc()
            log.info("flip_refused", worker=worker, to_role=to_role, why=why, reason=reason)
            return refused("flip", worker, reason, why)
        w = fleet.by_url()[worker]
        rec = FlipRecord(worker, w.role, to_role, reason, t0, bootstrap_port=w.bootstrap_port)
        self.metrics.in_flight.set(len(self.in_flight) + 1)
        try:
            await self._enter(rec, Step.PLANNED, reason)
            return await self._run(rec, t0)
        finally:
            self.journal.drop(worker)
            self.metrics.in_flight.set(len(self.in_flight))

    async def _run(self, rec: FlipRecord, t0: float) -> ActionResult:
        try:
            await self._forward(rec)
        except (TimeoutError, ActuationError) as e:
            return await self._fail(rec, t0, str(e))
        self.metrics.flips.labels("ok", rec.to_role).inc()
        dt = self.clock() - t0
        self.metrics.flip_seconds.observe(dt)
        return ActionResult("flip", rec.worker, ok=True, reason=rec.reason, detail=rec.history[-1],
                            steps=tuple(rec.history), duration_s=dt)

    async def _forward(self, rec: FlipRecord, start: Step = Step.DEREGISTER) -> None:
        url = rec.worker
        order = [Step.DEREGISTER, Step.DRAIN, Step.SWITCH, Step.REGISTER, Step.VERIFY]
        for step in order[order.index(start):]:
            await self._enter(rec, step)
            if step is Step.DEREGISTER:
                await self.router.remove(url, self.t.register_s)
            elif step is Step.DRAIN:
                await self._wait_idle(url)
            elif step is Step.SWITCH:
                await self.switcher.switch(url, rec.to_role, self.t.switch_s)
            elif step is Step.REGISTER:
                rec.peers_before = await self._served_by_pool(rec.to_role, exclude=url)
                rec.served_before = await self.workers.served(url)
                await self.router.add(url, rec.to_role, self._port_for(url, rec.bootstrap_port), self.t.register_s)
            elif step is Step.VERIFY:
                note = await self._verify(rec)
                await self._enter(rec, Step.DONE, note)

    async def _wait_idle(self, url: str) -> None:
        deadline = self.clock() + self.t.drain_s
        while True:
            n = await self.workers.load(url)
            if n == 0:
                return
            if self.clock() >= deadline:
                raise ActuationError("drain", url, f"still {n} requests after {self.t.drain_s:g}s")
            await self.sleep(self.t.poll_s)

    async def _served_by_pool(self, role: Role, exclude: str) -> dict[str, float]:
        out = {}
        for w in (await self.router.fleet()).pool(role):
            if w.url != exclude:
                with contextlib.suppress(ActuationError):
                    out[w.url] = await self.workers.served(w.url)
        return out

    async def _verify(self, rec: FlipRecord) -> str:
        """Traffic reaches it: its counters move. If its peers got traffic and it did not, that is a failure;
        if nobody got any (an idle fleet), the flip stands, marked unverified."""
        if self.t.verify_s <= 0:
            return "verify skipped"
        deadline = self.clock() + self.t.verify_s
        while True:
            # a request counts as reaching it when it is running there (load) or done (counters): long
            # decodes finish well after the window, so counters alone would miss them
            now_served = await self.workers.served(rec.worker)
            if now_served > rec.served_before:
                return f"verified: served {now_served - rec.served_before:g} in new role"
            load = await self.workers.load(rec.worker)
            if load > 0:
                return f"verified: {load} request(s) running in new role"
            if self.clock() >= deadline:
                break
            await self.sleep(self.t.poll_s)
        after = await self._served_by_pool(rec.to_role, exclude=rec.worker)
        peers_moved = any(after.get(u, 0.0) > v for u, v in rec.peers_before.items())
        if peers_moved:
            raise ActuationError("verify", rec.worker, f"router sent traffic to {rec.to_role} peers but not to it")
        return "unverified: no traffic reached the pool during the window"

    async def _fail(self, rec: FlipRecord, t0: float, why: str) -> ActionResult:
        failed_at = rec.step.value
        log.warning("flip_failed", worker=rec.worker, step=failed_at, why=why)
        await self._enter(rec, Step.ROLLBACK, f"{failed_at}: {why}")
        try:
            await self._rollback(rec)
        except (TimeoutError, ActuationError) as e:
            await self._enter(rec, Step.FAILED, str(e))
            self.metrics.flips.labels("failed", rec.to_role).inc()
            detail = f"failed at {failed_at}: {why}; rollback failed: {e}; worker left out of the router"
            return ActionResult("flip", rec.worker, ok=False, reason=rec.reason, detail=detail,
                                steps=tuple(rec.history), duration_s=self.clock() - t0)
        await self._enter(rec, Step.ROLLED_BACK)
        self.metrics.flips.labels("rolled_back", rec.to_role).inc()
        return ActionResult("flip", rec.worker, ok=False, reason=rec.reason,
                            detail=f"failed at {failed_at}: {why}; rolled back to {rec.from_role}",
                            steps=tuple(rec.history), duration_s=self.clock() - t0)

    async def _rollback(self, rec: FlipRecord) -> None:
        """Back to the last good state: serving `from_role` in the from-pool."""
        url = rec.worker
        listed = await self.router.find(url)
        if listed is not None and listed.role == rec.from_role and listed.healthy:
            return  # never left (failed while deregistering)
        if listed is not None:
            await self.router.remove(url, self.t.register_s)
        role = await self.switcher.current_role(url)
        if role != rec.from_role:
            await self._wait_idle(url)
            await self.switcher.switch(url, rec.from_role, self.t.switch_s)
        await self.router.add(url, rec.from_role, self._port_for(url, rec.bootstrap_port), self.t.register_s)

    async def recover(self) -> list[ActionResult]:
        """After a restart: finish flips whose worker already serves the new role, roll back the rest."""
        results = []
        for rec in list(self.journal.records.values()):
            t0 = self.clock()
            log.info("flip_recover", worker=rec.worker, step=rec.step.value, to_role=rec.to_role)
            try:
                role = await self.switcher.current_role(rec.worker)
                if rec.step in SWITCHED and role == rec.to_role:
                    await self._enter(rec, Step.REGISTER, "resumed after restart")
                    await self._forward(rec, Step.REGISTER)
                    self.metrics.flips.labels("ok", rec.to_role).inc()
                    results.append(ActionResult("flip", rec.worker, ok=True, reason=rec.reason,
                                                detail="finished after restart", steps=tuple(rec.history)))
                else:
                    raise ActuationError("recover", rec.worker, f"interrupted at {rec.step.value} (serves {role})")
            except (TimeoutError, ActuationError) as e:
                results.append(await self._fail(rec, t0, str(e)))
            finally:
                self.journal.drop(rec.worker)
        return results

    async def drain_out(self, url: str) -> None:
        """Scale-down: deregister, then wait idle (the same drain as a flip)."""
        await self.router.remove(url, self.t.register_s)
        await self._wait_idle(url)


__all__ = ["DrainedFlipper", "FlipGuard", "FlipRecord", "FlipTimeouts", "Journal", "Step", "other_role"]
