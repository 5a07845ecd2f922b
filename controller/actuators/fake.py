"""An in-memory actuator for tests of the runtime and policy: same Protocol, same safety rules, no I/O.

It keeps a fleet, applies the `FlipGuard` (the hard safety rules only: rate
limits are the core's), records every call, and can be told to fail the next
flips (to test how the caller handles a rollback). Results carry the same
honest `outcome` as the real actuators (done, refused, rolled_back).
"""

from __future__ import annotations

import dataclasses

from controller.actuators.base import ActionResult, FleetView, Outcome, Role, WorkerView, refused
from controller.actuators.flip import FlipGuard


class FakeActuator:
    name = "fake"

    def __init__(
        self, prefill: int, decode: int, *, spares: int = 0, guard: FlipGuard | None = None,
        clock: object = None,
    ) -> None:
        ws = [WorkerView(f"http://fake-p{i}", Role.PREFILL) for i in range(prefill)]
        ws += [WorkerView(f"http://fake-d{i}", Role.DECODE) for i in range(decode)]
        self.workers = {w.url: w for w in ws}
        self.spares = [f"http://fake-s{i}" for i in range(spares)]
        self.guard = guard or FlipGuard(min_pool_size=1)
        self.calls: list[tuple[str, str, object, str]] = []
        self.fail_next: list[str] = []  # failure reasons to return for the next flips (rolled back)
        self.now = 0.0

    async def fleet(self) -> FleetView:
        return FleetView(tuple(self.workers.values()))

    async def flip(self, worker: str, to_role: Role, reason: str) -> ActionResult:
        self.calls.append(("flip", worker, to_role, reason))
        why = self.guard.refusal(await self.fleet(), worker, to_role, {})
        if why is not None:
            return refused("flip", worker, reason, why)
        if self.fail_next:
            return ActionResult("flip", worker, ok=False, reason=reason, outcome=Outcome.ROLLED_BACK,
                                detail=f"failed at switch: {self.fail_next.pop(0)}; rolled back")
        self.workers[worker] = dataclasses.replace(self.workers[worker], role=to_role)
        return ActionResult("flip", worker, ok=True, reason=reason, detail="done")

    async def scale(self, pool: Role, delta: int, reason: str) -> ActionResult:
        self.calls.append(("scale", pool, delta, reason))
        if delta > 0:
            if not self.spares:
                return refused("scale", pool, reason, "no_spare_workers", "refused: no spare workers")
            added = self.spares[:delta]
            del self.spares[:delta]
            for u in added:
                self.workers[u] = WorkerView(u, pool)
            return ActionResult("scale", pool, ok=True, reason=reason, detail=f"added {', '.join(added)}")
        members = [w for w in self.workers.values() if w.role == pool]
        room = len(members) - self.guard.min_pool_size
        if room <= 0:
            return refused("scale", pool, reason, "last_instance_of_pool")
        gone = members[: min(-delta, room)]
        for w in gone:
            del self.workers[w.url]
            self.spares.append(w.url)
        return ActionResult("scale", pool, ok=True, reason=reason, detail=f"removed {len(gone)}")

    async def close(self) -> None:
        return None
