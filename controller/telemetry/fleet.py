"""The current fleet as the router sees it: `GET /workers` polled every few seconds.

Gives the core its `FleetView` (healthy workers serving each pool) in advisory
mode, when no actuator owns the fleet, and the scraper its URL -> role map.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from controller.core.control.types import FleetView
from controller.telemetry.hub import TelemetryHub


@dataclass(frozen=True)
class RouterWorker:
    url: str
    role: str  # prefill | decode | regular
    healthy: bool
    load: int | None


def parse_workers(body: Any) -> list[RouterWorker]:
    """The router's /workers answer -> workers; raises ValueError on an unexpected shape."""
    if not isinstance(body, dict) or not isinstance(body.get("workers"), list):
        raise ValueError(f"unexpected /workers body: {str(body)[:120]}")
    out = []
    for w in body["workers"]:
        if not isinstance(w, dict) or not isinstance(w.get("url"), str):
            continue
        load = w.get("load")
        out.append(RouterWorker(
            url=w["url"].rstrip("/"),
            role=str(w.get("worker_type", "regular")),
            healthy=bool(w.get("is_healthy", True)),
            load=int(load) if isinstance(load, int | float) and not isinstance(load, bool) else None,
        ))
    return out


class RouterFleet:
    def __init__(
        self, router_url: str, hub: TelemetryHub, clock: Callable[[], float], *,
        interval_s: float = 5.0, timeout_s: float = 2.0,
    ) -> None:
        self.url = router_url.rstrip("/") + "/workers"
        self.hub = hub
        self.clock = clock
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.workers: list[RouterWorker] | None = None
        self.last_ok_s: float | None = None

    def view(self) -> FleetView | None:
        if self.workers is None:
            return None
        n_p = sum(1 for w in self.workers if w.role == "prefill" and w.healthy)
        n_d = sum(1 for w in self.workers if w.role == "decode" and w.healthy)
        return FleetView(n_p, n_d)

    def roles(self) -> dict[str, str]:
        return {w.url: w.role for w in self.workers or ()}

    def snapshot(self) -> list[dict[str, Any]]:
        return [asdict(w) for w in self.workers or ()]

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(self.url) as r:
                if r.status != 200:
                    raise ValueError(f"HTTP {r.status}")
                body = await r.json(content_type=None)
            self.workers = parse_workers(body)
        except TimeoutError:
            self.hub.drop("workers_timeout")
            return False
        except (aiohttp.ClientError, ValueError):
            self.hub.drop("workers_error")
            return False
        self.last_ok_s = self.clock()
        return True

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                try:
                    await self.refresh(session)
                except Exception:  # never fatal: the last known fleet stays
                    self.hub.drop("workers_internal_error")
                await asyncio.sleep(self.interval_s)
