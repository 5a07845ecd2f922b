"""The actuator interface: one small async Protocol and the fleet view it returns.

Every implementation (router registry + role switch, node agent, Kubernetes,
dry-run, the in-memory fake) is built once at start-up from config and passed
to the runtime. The runtime never knows which one it talks to.

`Role` is the core's (controller.core.control.types.Role, a StrEnum): one
type for a role everywhere. Being a `str`, `Role.PREFILL == "prefill"`, so
JSON from the router, the agents and the journal compares and serialises as is.

Every call returns an `ActionResult` whose `outcome` says honestly what
happened to the fleet: done, refused (nothing touched), advised (dry-run:
nothing touched), rolled back (touched, then restored) or failed (touched and
not restored: the worker is out of the router until the reconciler repairs it).
The runtime uses `changed` to know whether to re-read the fleet and decide
again at once, and `refused`/`why` to stop re-proposing what cannot be done.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from controller.core.control.types import Role

ROLES: tuple[Role, Role] = (Role.PREFILL, Role.DECODE)

__all__ = ["ROLES", "ActionResult", "Actuator", "FleetView", "Outcome", "Role", "WorkerView", "check_role",
           "other_role", "refused"]


def other_role(role: Role | str) -> Role:
    return Role.DECODE if role == Role.PREFILL else Role.PREFILL


def check_role(value: object) -> Role:
    if not isinstance(value, str) or value not in ROLES:
        raise ValueError(f"role={value!r}: expected 'prefill' or 'decode'")
    return Role(value)


@dataclass(frozen=True)
class WorkerView:
    """One worker as the actuator last saw it."""

    url: str
    role: Role
    healthy: bool = True
    router_id: str | None = None  # the router's id for DELETE /workers/{id}; None when not registered
    bootstrap_port: int | None = None
    load: int = 0
    state: str = "serving"  # serving | flipping | draining | spare | failed (out of capacity, being repaired)


@dataclass(frozen=True)
class FleetView:
    workers: tuple[WorkerView, ...] = ()
    flips_in_flight: tuple[str, ...] = ()

    def pool(self, role: Role | str, *, healthy_only: bool = True) -> list[WorkerView]:
        return [
            w
            for w in self.workers
            if w.role == role and w.state == "serving" and (w.healthy or not healthy_only)
        ]

    def count(self, role: Role | str) -> int:
        return len(self.pool(role))

    def by_url(self) -> Mapping[str, WorkerView]:
        return {w.url: w for w in self.workers}


class Outcome(StrEnum):
    """What an action did to the fleet (a metric label value)."""

    DONE = "done"  # carried out: the fleet changed as asked
    REFUSED = "refused"  # a safety rule or precondition said no (or nothing to do): nothing touched
    ADVISED = "advised"  # dry-run: logged what it would do; nothing touched
    ROLLED_BACK = "rolled_back"  # started, failed, the previous state was restored (and checked)
    FAILED = "failed"  # started, failed, not restored: a worker is out of the router (the reconciler retries)


@dataclass(frozen=True)
class ActionResult:
    """What an actuator did. `ok=False` results carry the reason; raised errors are for the caller's bugs.

    `outcome` defaults from `ok` and `detail` (ok -> done; "refused..." -> refused; else failed) so older
    call sites keep their meaning; actuators in this package always set it. `why` is a short label
    (e.g. `last_instance_of_pool`, `dry_run`, `no_spare_workers`), `detail` the human sentence.
    """

    op: str  # flip | scale
    target: str
    ok: bool
    reason: str  # the controller's reason for asking
    detail: str = ""  # what happened (or why it was refused / rolled back)
    steps: tuple[str, ...] = field(default=())
    duration_s: float = 0.0
    outcome: Outcome | None = None
    why: str = ""

    def __post_init__(self) -> None:
        if self.outcome is None:
            if self.ok:
                o = Outcome.DONE
            elif self.detail.startswith("refused"):
                o = Outcome.REFUSED
            else:
                o = Outcome.FAILED
            object.__setattr__(self, "outcome", o)
        if not self.why and self.outcome is Outcome.REFUSED and self.detail.startswith("refused: "):
            object.__setattr__(self, "why", self.detail.removeprefix("refused: ").split(" ", 1)[0])

    @property
    def refused(self) -> bool:
        """Nothing was touched and trying again unchanged will not help (refused or advisory)."""
        return self.outcome in (Outcome.REFUSED, Outcome.ADVISED)

    @property
    def started(self) -> bool:
        """The action touched the fleet (a flip observed to start): done, rolled back or failed."""
        return self.outcome in (Outcome.DONE, Outcome.ROLLED_BACK, Outcome.FAILED)

    @property
    def changed(self) -> bool:
        """The fleet may differ from before: re-read it and decide again. A rollback restored it, but it
        was out of its pool meanwhile, so it counts as changed too; refusals and advice change nothing."""
        return self.started


def refused(op: str, target: str, reason: str, why: str, detail: str = "") -> ActionResult:
    """A refusal: nothing was touched. `why` is the short label; detail defaults to `refused: {why}`."""
    return ActionResult(op, target, ok=False, reason=reason, detail=detail or f"refused: {why}",
                        outcome=Outcome.REFUSED, why=why)


@runtime_checkable
class Actuator(Protocol):
    name: str

    async def fleet(self) -> FleetView:
        """The current fleet as the actuator sees it (router /workers, agents, API server)."""
        ...

    async def flip(self, worker: str, to_role: Role, reason: str) -> ActionResult:
        """Move one worker to the other pool, drained and safe; roll back on failure."""
        ...

    async def scale(self, pool: Role, delta: int, reason: str) -> ActionResult:
        """Add (delta > 0) or remove (delta < 0, drained) workers of one pool."""
        ...

    async def close(self) -> None: ...
