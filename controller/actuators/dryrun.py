"""Advisory mode: reads the real fleet when it can, changes nothing, logs and counts what it would do.

Every answer is `ok=False, outcome=advised, why="dry_run"`: nothing was carried out, so the runtime
neither counts it as a flip that started nor wakes itself to decide again (issue 13 item 4).
"""

from __future__ import annotations

import structlog

from controller.actuators.base import ActionResult, FleetView, Outcome, Role
from controller.actuators.metrics import ActuatorMetrics
from controller.actuators.router import RouterClient

log = structlog.get_logger("pd.actuation")


class DryRunActuator:
    name = "dry-run"

    def __init__(self, metrics: ActuatorMetrics, router: RouterClient | None = None,
                 initial: FleetView | None = None) -> None:
        self.metrics = metrics
        self.router = router
        self.initial = initial or FleetView()
        self.would: list[ActionResult] = []

    async def fleet(self) -> FleetView:
        if self.router is not None:
            return await self.router.fleet()
        return self.initial

    def _advise(self, op: str, target: str, what: str, reason: str) -> ActionResult:
        res = ActionResult(op, target, ok=False, reason=reason, detail=f"dry-run: would {what}",
                           outcome=Outcome.ADVISED, why="dry_run")
        self.would.append(res)
        self.metrics.call(self.name, op, "advised")
        log.info("actuation_advice", op=op, target=target, would=what, reason=reason)
        return res

    async def flip(self, worker: str, to_role: Role, reason: str) -> ActionResult:
        return self._advise("flip", worker, f"drain {worker} and flip it to {to_role}", reason)

    async def scale(self, pool: Role, delta: int, reason: str) -> ActionResult:
        verb = "add" if delta > 0 else "drain and remove"
        return self._advise("scale", pool, f"{verb} {abs(delta)} {pool} worker(s)", reason)

    async def close(self) -> None:
        if self.router is not None:
            await self.router.http.close()
