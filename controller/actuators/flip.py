"""The drained flip: an explicit state machine, journaled so a restarted controller can finish it.

    PLANNED -> DEREGISTER -> DRAIN -> SWITCH -> REGISTER -> VERIFY -> DONE
        any failure -> ROLLBACK -> ROLLED_BACK   (or FAILED when even the rollback fails)

DEREGISTER removes the worker from the router first, so no new request is
routed to it; DRAIN waits until `/get_load` reports zero running and waiting
requests (SGLang refuses a role switch unless fully idle); SWITCH changes the
role and returns once the worker is healthy in it; REGISTER adds it to the
other pool; VERIFY waits for its request counters to move.

VERIFY asks the worker, never assumes: its own request counters (or requests
running there) prove traffic reaches it; without traffic in the window (a
light load), the flip stands when the worker itself reports the new role,
answers healthy and the router lists it in the new pool. Only strong evidence
fails it: its peers served so many requests that even spreading would have
sent it one with probability > 99.9 %.

Rollback restores the last good state, the worker serving its old role in
the old pool, and checks it: what the worker serves (its /server_info) and
what the router lists. A worker that is down is not drained (it serves
nothing) but restarted through its agent; if that is impossible it is left
out of the router — never registered while broken — journaled as FAILED and
repaired by the reconciler (controller.actuators.reconcile) with backoff.
Router calls inside a flip ride out a router outage up to the step's budget.

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
from typing import TypeVar

import structlog

from controller.actuators.base import (
    ActionResult,
    FleetView,
    Outcome,
    Role,
    WorkerView,
    check_role,
    other_role,
    refused,
)
from controller.actuators.errors import ActuationError, TransientError
from controller.actuators.metrics import ActuatorMetrics
from controller.actuators.router import RouterClient
from controller.actuators.switch import Switcher
from controller.actuators.worker import WorkerClient

log = structlog.get_logger("pd.actuation")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


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
    """Flips in flight and flips that failed (step FAILED: the worker awaits repair), persisted as one JSON
    file (atomic rename) so a restarted controller can resume, roll back or repair them.

    A journal that does not parse (a disk filled mid-write by something else) is set aside as `.corrupt`
    and the controller starts empty: the reconciler rebuilds a consistent fleet from what the workers serve.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: dict[str, FlipRecord] = {}
        if path is not None and path.exists():
            try:
                raw = json.loads(path.read_text() or "{}")
                for url, r in raw.items():
                    self.records[url] = FlipRecord(
                        worker=r["worker"], from_role=check_role(r["from_role"]), to_role=check_role(r["to_role"]),
                        reason=r["reason"], started_at=float(r["started_at"]), step=Step(r["step"]),
                        bootstrap_port=r.get("bootstrap_port"), history=list(r.get("history", [])),
                    )
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                self.records = {}
                bad = path.with_suffix(path.suffix + ".corrupt")
                os.replace(path, bad)
                log.error("journal_unreadable", path=str(path), moved_to=str(bad), error=repr(e)[:200])

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
    settle_s: float = 30.0  # recovery: wait this long for a worker caught mid-switch to answer again


# verify: fail a flip for lack of traffic only when even spreading would have missed it with P < this
MISS_PROBABILITY = 1e-3


def miss_probability(peers: int, peer_requests: float) -> float:
    """P(a worker gets none of m requests spread evenly over it and `peers` others) = (n / (n + 1)) ** m."""
    if peers <= 0 or peer_requests <= 0:
        return 1.0
    return float((peers / (peers + 1)) ** peer_requests)


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
        self.active: set[str] = set()  # flips running in this process now
        self.busy: set[str] = set()  # workers another task (the reconciler, a scale action) is working on

    @property
    def in_flight(self) -> dict[str, FlipRecord]:
        """Journaled flips not finished (in this process or interrupted by a dead controller)."""
        return {u: r for u, r in self.journal.records.items() if r.step is not Step.FAILED}

    @property
    def failed(self) -> dict[str, FlipRecord]:
        """Flips that could not be rolled back: the worker is out of the router until the reconciler repairs it."""
        return {u: r for u, r in self.journal.records.items() if r.step is Step.FAILED}

    async def _enter(self, rec: FlipRecord, step: Step, note: str = "") -> None:
        rec.step = step
        rec.history.append(f"{step.value}{': ' + note if note else ''}")
        self.journal.save(rec)
        log.info("flip_step", worker=rec.worker, to_role=rec.to_role, step=step.value, note=note)
        if self.on_step is not None:
            await self.on_step(rec)

    def port_for(self, url: str, known: int | None = None) -> int | None:
        return self.bootstrap_ports.get(url, known)

    async def flip(self, worker: str, to_role: Role, reason: str) -> ActionResult:
        worker = worker.rstrip("/")
        to_role = check_role(to_role)
        t0 = self.clock()
        try:
            fleet = await self.router.fleet()
        except ActuationError as e:
            # nothing touched: the router cannot even be read
            log.info("flip_refused", worker=worker, to_role=to_role, why="router_unavailable", reason=reason)
            return refused("flip", worker, reason, "router_unavailable", f"refused: router_unavailable ({e})")
        why = self.guard.refusal(fleet, worker, to_role, self.in_flight, self.busy | set(self.failed))
        if why is not None:
            self.metrics.flips.labels("refused", to_role).inc()
            log.info("flip_refused", worker=worker, to_role=to_role, why=why, reason=reason)
            return refused("flip", worker, reason, why)
        w = fleet.by_url()[worker]
        rec = FlipRecord(worker, w.role, to_role, reason, t0, bootstrap_port=w.bootstrap_port)
        self.active.add(worker)
        self.metrics.in_flight.set(len(self.in_flight) + 1)
        try:
            await self._enter(rec, Step.PLANNED, reason)
            return await self._run(rec, t0)
        finally:
            self.active.discard(worker)
            if rec.step is not Step.FAILED:  # a failed one stays journaled: the reconciler repairs it
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
                            steps=tuple(rec.history), duration_s=dt, outcome=Outcome.DONE)

    async def _forward(self, rec: FlipRecord, start: Step = Step.DEREGISTER) -> None:
        url = rec.worker
        order = [Step.DEREGISTER, Step.DRAIN, Step.SWITCH, Step.REGISTER, Step.VERIFY]
        for step in order[order.index(start):]:
            await self._enter(rec, step)
            if step is Step.DEREGISTER:
                await self.deregister(url)
            elif step is Step.DRAIN:
                await self._wait_idle(url)
            elif step is Step.SWITCH:
                await self.switcher.switch(url, rec.to_role, self.t.switch_s)
                actual = await self.switcher.current_role(url)
                if actual != rec.to_role:
                    raise ActuationError("switch", url, f"serves {actual or 'nothing (unhealthy)'} after switching "
                                         f"to {rec.to_role}")
            elif step is Step.REGISTER:
                rec.peers_before = await self._requests_by_pool(rec.to_role, exclude=url)
                with contextlib.suppress(ActuationError):
                    rec.served_before = await self.workers.requests(url)
                await self.register(url, rec.to_role, self.port_for(url, rec.bootstrap_port))
            elif step is Step.VERIFY:
                note = await self._verify(rec)
                await self._enter(rec, Step.DONE, note)

    # ---- router calls that ride out an outage ------------------------------------------------------

    async def _patient(self, what: str, url: str, budget_s: float, fn: Callable[[], Awaitable[T]]) -> T:
        """Call fn until it succeeds or `budget_s` has passed: a router restarting for 10 s must not fail a flip."""
        deadline = self.clock() + budget_s
        delay = self.t.poll_s
        while True:
            try:
                return await fn()
            except TransientError as e:
                if self.clock() >= deadline:
                    raise
                log.warning("flip_router_wait", op=what, worker=url, why=e.why, retry_in_s=delay)
                await self.sleep(delay)
                delay = min(delay * 2, 2.0)  # a short cap: the router back means registered soon after

    async def find(self, url: str) -> WorkerView | None:
        return await self._patient("find", url, self.t.register_s, lambda: self.router.find(url))

    async def deregister(self, url: str) -> None:
        await self._patient("remove", url, self.t.register_s, lambda: self.router.remove(url, self.t.register_s))

    async def register(self, url: str, role: Role, port: int | None) -> None:
        """Listed healthy under `role`, riding out a router outage. A listing under the other role (a router
        restarted with its start-up arguments lists workers in their start-up roles) is moved: smg in one call
        (PUT), 0.3.x remove + add (RouterClient.reregister)."""
        deadline = self.clock() + self.t.register_s
        while True:
            try:
                listed = await self.router.find(url)
                if listed is not None and listed.role == role and listed.healthy and listed.state == "serving":
                    return
                await self.router.reregister(url, role, port, max(self.t.poll_s, deadline - self.clock()))
                return
            except ActuationError as e:
                if self.clock() >= deadline:
                    raise
                log.warning("flip_register_retry", worker=url, role=role, why=e.why)
                await self.sleep(self.t.poll_s)

    async def _wait_idle(self, url: str) -> None:
        deadline = self.clock() + self.t.drain_s
        while True:
            n = await self.workers.load(url)
            if n == 0:
                return
            if self.clock() >= deadline:
                raise ActuationError("drain", url, f"still {n} requests after {self.t.drain_s:g}s")
            await self.sleep(self.t.poll_s)

    async def _requests_by_pool(self, role: Role, exclude: str) -> dict[str, float]:
        out: dict[str, float] = {}
        with contextlib.suppress(ActuationError):
            for w in (await self.router.fleet()).pool(role):
                if w.url != exclude:
                    with contextlib.suppress(ActuationError):
                        out[w.url] = await self.workers.requests(w.url)
        return out

    async def _verify(self, rec: FlipRecord) -> str:
        """Traffic reaches it: its own request counter moves or requests run there. Without traffic (light load),
        the worker's own report decides; the absence of traffic fails it only on overwhelming evidence."""
        if self.t.verify_s <= 0:
            return "verify skipped"
        deadline = self.clock() + self.t.verify_s
        while True:
            # a request counts as reaching it when it is running there (load) or done (counter): long
            # decodes finish well after the window, so counters alone would miss them
            with contextlib.suppress(ActuationError):
                now_served = await self.workers.requests(rec.worker)
                if now_served > rec.served_before:
                    return f"verified: served {now_served - rec.served_before:g} request(s) in new role"
                load = await self.workers.load(rec.worker)
                if load > 0:
                    return f"verified: {load} request(s) running in new role"
            if self.clock() >= deadline:
                break
            await self.sleep(self.t.poll_s)
        actual = await self.switcher.current_role(rec.worker)
        if actual != rec.to_role:
            raise ActuationError("verify", rec.worker, f"serves {actual or 'nothing (unhealthy)'}, not {rec.to_role}")
        listed = await self.find(rec.worker)
        if listed is None or listed.role != rec.to_role:
            raise ActuationError("verify", rec.worker, f"router lists it as {listed.role if listed else 'absent'}")
        after = await self._requests_by_pool(rec.to_role, exclude=rec.worker)
        peer_reqs = sum(max(0.0, after.get(u, v) - v) for u, v in rec.peers_before.items())
        p = miss_probability(len(rec.peers_before), peer_reqs)
        if p < MISS_PROBABILITY:
            raise ActuationError("verify", rec.worker, f"router sent {peer_reqs:g} requests to its {len(rec.peers_before)} "
                                 f"{rec.to_role} peers and none to it (P = {p:.1e} under even spreading)")
        return (f"unverified traffic: none reached it in {self.t.verify_s:g}s (peers served {peer_reqs:g}); "
                f"it reports {rec.to_role}, healthy, listed")

    # ---- failure ------------------------------------------------------------------------------------

    async def _fail(self, rec: FlipRecord, t0: float, why: str) -> ActionResult:
        failed_at = rec.step.value
        log.warning("flip_failed", worker=rec.worker, step=failed_at, why=why)
        await self._enter(rec, Step.ROLLBACK, f"{failed_at}: {why}")
        try:
            await self.rollback(rec)
        except (TimeoutError, ActuationError) as e:
            await self._enter(rec, Step.FAILED, str(e))
            self.metrics.flips.labels("failed", rec.to_role).inc()
            detail = (f"failed at {failed_at}: {why}; rollback failed: {e}; worker left out of the router "
                      "(the reconciler keeps trying)")
            return ActionResult("flip", rec.worker, ok=False, reason=rec.reason, detail=detail,
                                steps=tuple(rec.history), duration_s=self.clock() - t0, outcome=Outcome.FAILED,
                                why=f"failed_at_{failed_at}")
        await self._enter(rec, Step.ROLLED_BACK)
        self.metrics.flips.labels("rolled_back", rec.to_role).inc()
        return ActionResult("flip", rec.worker, ok=False, reason=rec.reason,
                            detail=f"failed at {failed_at}: {why}; rolled back to {rec.from_role}",
                            steps=tuple(rec.history), duration_s=self.clock() - t0, outcome=Outcome.ROLLED_BACK,
                            why=f"failed_at_{failed_at}")

    async def rollback(self, rec: FlipRecord) -> None:
        """Back to the last good state, serving `from_role` in the from-pool, and check it: never assume."""
        url, want = rec.worker, rec.from_role
        port = self.port_for(url, rec.bootstrap_port)
        actual = await self.switcher.current_role(url)
        if actual != want:
            listed = await self.find(url)
            if listed is not None:
                await self.deregister(url)  # no new request for a worker about to change role again
            if actual is not None:
                await self._wait_idle(url)  # what it took in the new role finishes first
                await self.switcher.switch(url, want, self.t.switch_s)
            else:
                # down or unhealthy: nothing to drain; only a restart (its agent) can bring it back
                await self.switcher.restart(url, want, self.t.switch_s)
        await self.register(url, want, port)
        actual = await self.switcher.current_role(url)
        listed = await self.find(url)
        if actual != want or listed is None or listed.role != want:
            raise ActuationError("rollback", url, f"it serves {actual or 'nothing (unhealthy)'} and the router lists it "
                                 f"as {listed.role if listed else 'absent'}, wanted {want}")

    async def _settle(self, url: str) -> Role | None:
        """Recovery: a worker caught mid-switch answers again within `settle_s`, or it is down."""
        deadline = self.clock() + self.t.settle_s
        while (role := await self.switcher.current_role(url)) is None and self.clock() < deadline:
            await self.sleep(self.t.poll_s)
        return role

    async def recover(self) -> list[ActionResult]:
        """After a restart: finish flips whose worker already serves the new role, roll back the rest.

        Flips journaled FAILED are not in flight: the reconciler repairs those."""
        results = []
        for rec in list(self.in_flight.values()):
            t0 = self.clock()
            log.info("flip_recover", worker=rec.worker, step=rec.step.value, to_role=rec.to_role)
            self.active.add(rec.worker)
            try:
                role = await self._settle(rec.worker) if rec.step in SWITCHED else \
                    await self.switcher.current_role(rec.worker)
                if rec.step in SWITCHED and role == rec.to_role:
                    await self._enter(rec, Step.REGISTER, "resumed after restart")
                    await self._forward(rec, Step.REGISTER)
                    self.metrics.flips.labels("ok", rec.to_role).inc()
                    results.append(ActionResult("flip", rec.worker, ok=True, reason=rec.reason,
                                                detail="finished after restart", steps=tuple(rec.history),
                                                outcome=Outcome.DONE))
                else:
                    raise ActuationError("recover", rec.worker, f"interrupted at {rec.step.value} "
                                         f"(serves {role or 'nothing'})")
            except (TimeoutError, ActuationError) as e:
                results.append(await self._fail(rec, t0, str(e)))
            finally:
                self.active.discard(rec.worker)
                if rec.step is not Step.FAILED:
                    self.journal.drop(rec.worker)
        return results

    async def drain_out(self, url: str) -> None:
        """Scale-down: deregister, then wait idle (the same drain as a flip)."""
        await self.deregister(url)
        await self._wait_idle(url)


__all__ = ["DrainedFlipper", "FlipGuard", "FlipRecord", "FlipTimeouts", "Journal", "Step", "miss_probability",
           "other_role"]
