"""The one reader of the router's `GET /workers`: a `FleetSnapshot` for the core, the scraper and the actuator.

Everything in the controller that wants to know the fleet as the router sees
it asks this module (one owner per fact):

- `parse_workers(body)` turns one `/workers` answer into `RouterWorker`s; the
  router actuator (controller/actuators/router.py) uses it too;
- `RouterFleet` polls `/workers` every few seconds and keeps the latest
  `FleetSnapshot`: the workers (url, router id, role, healthy, draining), which
  registry dialect the router speaks, and the changes in progress it observed
  (a worker draining out, a worker unhealthy, a worker whose role changed) with
  the time each was first seen. `snapshot.view()` is the core's `FleetView`,
  `snapshot.roles()` the scraper's URL -> role map.

Two dialects, told apart by what the router answers (measured on both):
- smg 1.x ("smg"): entries carry `status` (`ready`, `draining`, `pending`, ...);
  `DELETE /workers/{id}` lists the worker `draining` (not healthy) for its
  `health.drain_settle_secs` before it is gone; `PUT /workers/{id}` re-registers.
- sglang-router 0.3.x ("legacy"): no `status`; a removed worker simply disappears.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from controller.core.control.types import FleetView, Role, Transition
from controller.telemetry.hub import TelemetryHub

PD_ROLES = ("prefill", "decode")
# a worker that left the router (deregistered: mid-flip, or removed) is reported as `gone` this long
GONE_TTL_S = 120.0


@dataclass(frozen=True)
class RouterWorker:
    url: str
    role: str  # prefill | decode | regular (whatever the router lists as worker_type)
    healthy: bool
    load: int | None
    id: str | None = None  # the router's id (a UUID): DELETE/PUT/PATCH /workers/{id} take it, never the URL
    status: str | None = None  # smg's lifecycle status; None where the router has none (0.3.x)
    draining: bool = False  # smg: deregistered, finishing its settle time; routes nothing new
    bootstrap_port: int | None = None
    drain_settle_s: float | None = None  # smg: the per-worker drain settle the router holds for it

    @property
    def serving(self) -> bool:
        """Routable now: healthy and not on its way out."""
        return self.healthy and not self.draining


@dataclass(frozen=True)
class FleetChange:
    """A change observed in progress; `since_s` is when it was first seen.

    kind: draining (smg: deregistered, finishing its settle), unhealthy, gone (was listed, is not: deregistered
    mid-flip or removed; reported for GONE_TTL_S), role_changed (listed again under another role, not serving
    yet: a flip whose `since_s` is when the worker first left its old pool).
    """

    url: str
    kind: str
    since_s: float
    role: str  # the role listed now
    from_role: str | None = None  # role_changed: the role it was listed under before


@dataclass(frozen=True)
class FleetSnapshot:
    workers: tuple[RouterWorker, ...]
    taken_s: float
    dialect: str  # "smg" | "legacy" | "unknown" (no worker listed, nothing to tell them apart)
    changes: tuple[FleetChange, ...] = ()

    def view(self) -> FleetView:
        """The core's fleet: workers serving each pool (healthy, not draining), and the observed transitions.

        A worker listed under a new role and not serving yet is a flip to that role; one draining or gone
        from the router is on its way out (target None: the router cannot tell a flip from a removal
        before the worker comes back). `started_s` is when that was first seen.
        """
        n_p = sum(1 for w in self.workers if w.role == "prefill" and w.serving)
        n_d = sum(1 for w in self.workers if w.role == "decode" and w.serving)
        ts = []
        for c in self.changes:
            if c.kind == "role_changed" and c.role in PD_ROLES:
                ts.append(Transition(Role(c.role), kind="flip", started_s=c.since_s, worker=c.url))
            elif c.kind in ("draining", "gone"):
                ts.append(Transition(None, kind="stop", started_s=c.since_s, worker=c.url))
        return FleetView(n_p, n_d, tuple(ts))

    def roles(self) -> dict[str, str]:
        """URL -> role of every listed worker (draining ones too: their metrics still belong to that pool)."""
        return {w.url: w.role for w in self.workers}

    def by_url(self) -> dict[str, RouterWorker]:
        return {w.url: w for w in self.workers}

    def as_json(self) -> dict[str, Any]:
        return {"taken_s": self.taken_s, "dialect": self.dialect,
                "workers": [asdict(w) for w in self.workers], "changes": [asdict(c) for c in self.changes]}


def _int_or_none(v: object) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def parse_workers(body: Any) -> list[RouterWorker]:
    """The router's /workers answer -> workers; raises ValueError (naming what is wrong) on an unexpected shape."""
    if not isinstance(body, dict) or not isinstance(body.get("workers"), list):
        raise ValueError(f"unexpected /workers body (want {{'workers': [...]}}): {str(body)[:120]}")
    out = []
    for w in body["workers"]:
        if not isinstance(w, dict) or not isinstance(w.get("url"), str):
            continue
        status = w.get("status") if isinstance(w.get("status"), str) else None
        health = w.get("health") if isinstance(w.get("health"), dict) else {}
        settle = health.get("drain_settle_secs")
        out.append(RouterWorker(
            url=w["url"].rstrip("/"),
            role=str(w.get("worker_type", "regular")),
            healthy=bool(w.get("is_healthy", True)),
            load=_int_or_none(w.get("load")),
            id=str(w["id"]) if w.get("id") is not None else None,
            status=status,
            draining=status == "draining",
            bootstrap_port=_int_or_none(w.get("bootstrap_port")),
            drain_settle_s=float(settle) if isinstance(settle, int | float) and not isinstance(settle, bool) else None,
        ))
    return out


def dialect_of(body: Any) -> str:
    """smg lists a `status` per worker; 0.3.x does not. No worker listed: unknown."""
    workers = body.get("workers") if isinstance(body, dict) else None
    if not isinstance(workers, list) or not workers:
        return "unknown"
    return "smg" if any(isinstance(w, dict) and "status" in w for w in workers) else "legacy"


@dataclass
class ChangeTracker:
    """First-seen times of draining / unhealthy / gone / role-changed workers across successive snapshots."""

    since: dict[tuple[str, str], float] = field(default_factory=dict)
    last_role: dict[str, str] = field(default_factory=dict)
    out_since: dict[str, float] = field(default_factory=dict)  # when it first stopped serving its last role
    gone: dict[str, tuple[str, float]] = field(default_factory=dict)  # url -> (its last role, when it left)
    changed: dict[str, tuple[str, float]] = field(default_factory=dict)  # url -> (role it left, flip start)

    def observe(self, workers: list[RouterWorker], now: float) -> tuple[FleetChange, ...]:
        out: list[FleetChange] = []
        listed = {w.url for w in workers}
        seen: set[tuple[str, str]] = set()
        for w in workers:
            prev = self.last_role.get(w.url) or (self.gone[w.url][0] if w.url in self.gone else None)
            if prev is not None and prev != w.role:
                # re-registered under another role (smg PUT, or remove + add): a flip that began when it left
                self.changed[w.url] = (prev, self.out_since.get(w.url, now))
            self.gone.pop(w.url, None)
            self.last_role[w.url] = w.role
            if w.serving:
                self.out_since.pop(w.url, None)
                self.changed.pop(w.url, None)
                continue
            self.out_since.setdefault(w.url, now)
            kinds = ["draining" if w.draining else "unhealthy"]
            if w.url in self.changed:
                kinds.append("role_changed")
            for kind in kinds:
                seen.add((w.url, kind))
                if kind == "role_changed":
                    frm, t = self.changed[w.url]
                    out.append(FleetChange(w.url, kind, t, w.role, frm))
                else:
                    out.append(FleetChange(w.url, kind, self.since.setdefault((w.url, kind), now), w.role))
        for url in [u for u in self.last_role if u not in listed]:
            self.gone[url] = (self.last_role.pop(url), self.out_since.setdefault(url, now))
        for url, (role, t) in list(self.gone.items()):
            if now - t > GONE_TTL_S:
                del self.gone[url]
                self.out_since.pop(url, None)
            else:
                out.append(FleetChange(url, "gone", t, role))
        for key in [k for k in self.since if k not in seen]:
            del self.since[key]
        return tuple(out)


class RouterFleet:
    """Polls `GET /workers`; `current()` is the latest `FleetSnapshot` (None until the first answer)."""

    def __init__(
        self, router_url: str, hub: TelemetryHub, clock: Callable[[], float], *,
        interval_s: float = 5.0, timeout_s: float = 2.0,
    ) -> None:
        self.url = router_url.rstrip("/") + "/workers"
        self.hub = hub
        self.clock = clock
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.latest: FleetSnapshot | None = None
        self.last_ok_s: float | None = None
        self._changes = ChangeTracker()
        self._dialect = "unknown"

    # ---- what the rest of the controller reads ---------------------------------------------------

    def current(self) -> FleetSnapshot | None:
        return self.latest

    @property
    def workers(self) -> list[RouterWorker] | None:
        return list(self.latest.workers) if self.latest is not None else None

    def view(self) -> FleetView | None:
        return self.latest.view() if self.latest is not None else None

    def roles(self) -> Mapping[str, str]:
        return self.latest.roles() if self.latest is not None else {}

    def snapshot(self) -> list[dict[str, Any]]:
        """The workers as JSON-able dicts (the API's /v1/state `fleet.workers`)."""
        return [asdict(w) for w in self.latest.workers] if self.latest is not None else []

    # ---- polling ---------------------------------------------------------------------------------

    def ingest(self, body: Any, now: float) -> FleetSnapshot:
        """One /workers answer -> the new snapshot (raises ValueError on a bad shape). Pure but for the tracker."""
        workers = parse_workers(body)
        d = dialect_of(body)
        if d != "unknown":
            self._dialect = d  # an empty fleet does not forget what the router is
        snap = FleetSnapshot(tuple(workers), now, self._dialect, self._changes.observe(workers, now))
        self.latest = snap
        self.last_ok_s = now
        return snap

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(self.url) as r:
                if r.status != 200:
                    raise ValueError(f"HTTP {r.status}")
                body = await r.json(content_type=None)
            self.ingest(body, self.clock())
        except TimeoutError:
            self.hub.drop("workers_timeout")
            return False
        except (aiohttp.ClientError, ValueError):
            self.hub.drop("workers_error")
            return False
        return True

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                try:
                    await self.refresh(session)
                except Exception:  # never fatal: the last known fleet stays
                    self.hub.drop("workers_internal_error")
                await asyncio.sleep(self.interval_s)
