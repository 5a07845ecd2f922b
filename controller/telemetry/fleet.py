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

from controller.core.control.types import FleetView
from controller.telemetry.hub import TelemetryHub

PD_ROLES = ("prefill", "decode")


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
    """A change observed in progress: `kind` is draining | unhealthy | role_changed; `since_s` first seen."""

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
        """The core's fleet: workers serving each pool (healthy, not draining)."""
        n_p = sum(1 for w in self.workers if w.role == "prefill" and w.serving)
        n_d = sum(1 for w in self.workers if w.role == "decode" and w.serving)
        return FleetView(n_p, n_d)

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
    """First-seen times of draining / unhealthy / role-changed workers across successive snapshots."""

    since: dict[tuple[str, str], float] = field(default_factory=dict)
    last_role: dict[str, str] = field(default_factory=dict)
    role_from: dict[str, str] = field(default_factory=dict)

    def observe(self, workers: list[RouterWorker], now: float) -> tuple[FleetChange, ...]:
        seen: set[tuple[str, str]] = set()
        out = []
        for w in workers:
            prev = self.last_role.get(w.url, self.role_from.get(w.url))
            if prev is not None and prev != w.role:
                # re-registered under another role (smg PUT, or remove + add between two polls)
                self.role_from[w.url] = prev
                self.since[(w.url, "role_changed")] = now
            self.last_role[w.url] = w.role
            kinds = []
            if w.draining:
                kinds.append("draining")
            elif not w.healthy:
                kinds.append("unhealthy")
            if (w.url, "role_changed") in self.since and not w.serving:
                kinds.append("role_changed")  # a flip in progress: new role listed, not serving yet
            for kind in kinds:
                key = (w.url, kind)
                seen.add(key)
                t = self.since.setdefault(key, now)
                out.append(FleetChange(w.url, kind, t, w.role, self.role_from.get(w.url) if kind == "role_changed"
                                       else None))
        listed = {w.url for w in workers}
        for key in list(self.since):
            if key not in seen:
                del self.since[key]
        for url in list(self.last_role):
            if url not in listed:
                # gone from the router: remember its role for a little (a remove + add flip) via role_from
                self.role_from[url] = self.last_role.pop(url)
        for url in list(self.role_from):
            if url in listed and (url, "role_changed") not in self.since:
                del self.role_from[url]
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
