"""The actuator interface: one small async Protocol and the fleet view it returns.

Every implementation (router registry + role switch, node agent, Kubernetes,
dry-run, the in-memory fake) is built once at start-up from config and passed
to the runtime. The runtime never knows which one it talks to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, Role] = ("prefill", "decode")


def other_role(role: Role) -> Role:
    return "decode" if role == "prefill" else "prefill"


def check_role(value: object) -> Role:
    if value not in ROLES:
        raise ValueError(f"role={value!r}: expected 'prefill' or 'decode'")
    return value


@dataclass(frozen=True)
class WorkerView:
    """One worker as the actuator last saw it."""

    url: str
    role: Role
    healthy: bool = True
    router_id: str | None = None  # the router's id for DELETE /workers/{id}; None when not registered
    bootstrap_port: int | None = None
    load: int = 0
    state: str = "serving"  # serving | flipping | draining | spare


@dataclass(frozen=True)
class FleetView:
    workers: tuple[WorkerView, ...] = ()
    flips_in_flight: tuple[str, ...] = ()

    def pool(self, role: Role, *, healthy_only: bool = True) -> list[WorkerView]:
        return [
            w
            for w in self.workers
            if w.role == role and w.state == "serving" and (w.healthy or not healthy_only)
        ]

    def count(self, role: Role) -> int:
        return len(self.pool(role))

    def by_url(self) -> Mapping[str, WorkerView]:
        return {w.url: w for w in self.workers}


@dataclass(frozen=True)
class ActionResult:
    """What an actuator did. `ok=False` results carry the reason; raised errors are for the caller's bugs."""

    op: str  # flip | scale
    target: str
    ok: bool
    reason: str  # the controller's reason for asking
    detail: str = ""  # what happened (or why it was refused / rolled back)
    steps: tuple[str, ...] = field(default=())
    duration_s: float = 0.0


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
