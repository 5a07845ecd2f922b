"""Client of the sglang-router worker registry (the real router's HTTP API).

Contract, as measured against sglang-router 0.3 from PyPI:
- `GET /workers` -> {"workers": [{"id", "url", "worker_type", "is_healthy",
  "bootstrap_port"?, "load", ...}], "stats": {...}}
- `POST /workers {"url", "worker_type", "bootstrap_port"?}` -> 202
  {"worker_id", "location", ...}; registration runs in the background (it
  checks /health, /server_info, /model_info), so we poll `GET /workers`
  until the URL is listed, with the right type, healthy.
- `DELETE /workers/{id}` (the id, not the URL) -> 202; poll until gone.
- A URL already listed is refused by the background job (logged there, not
  in the answer), so callers remove before re-adding under another type.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from controller.actuators.base import FleetView, Role, WorkerView
from controller.actuators.errors import RouterError, TransientError
from controller.actuators.http import Http
from controller.actuators.retry import Retrier

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def parse_workers(body: Any) -> list[WorkerView]:
    """Router /workers answer -> WorkerViews. Entries that are not prefill/decode (regular) are skipped."""
    if not isinstance(body, dict) or not isinstance(body.get("workers"), list):
        raise RouterError("list_workers", "router", f"unexpected /workers body: {str(body)[:120]}")
    out = []
    for w in body["workers"]:
        if not isinstance(w, dict):
            continue
        wt = w.get("worker_type")
        url = w.get("url")
        if wt not in ("prefill", "decode") or not isinstance(url, str):
            continue
        load = w.get("load", 0)
        out.append(
            WorkerView(
                url=url.rstrip("/"),
                role=wt,
                healthy=bool(w.get("is_healthy", True)),
                router_id=str(w["id"]) if w.get("id") is not None else None,
                bootstrap_port=w.get("bootstrap_port") if isinstance(w.get("bootstrap_port"), int) else None,
                load=int(load) if isinstance(load, int | float) else 0,
            )
        )
    return out


class RouterClient:
    def __init__(
        self,
        base_url: str,
        http: Http,
        retrier: Retrier,
        *,
        poll_interval_s: float = 0.5,
        clock: Clock,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.http = http
        self.retrier = retrier
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.sleep = sleep

    async def workers(self) -> list[WorkerView]:
        async def call() -> list[WorkerView]:
            _, body = await self.http.request(
                "GET", f"{self.base}/workers", op="list_workers", target=self.base, refusal=RouterError
            )
            return parse_workers(body)

        return await self.retrier.call("list_workers", self.base, call)

    async def fleet(self) -> FleetView:
        return FleetView(workers=tuple(await self.workers()))

    async def find(self, url: str) -> WorkerView | None:
        url = url.rstrip("/")
        for w in await self.workers():
            if w.url == url:
                return w
        return None

    async def add(self, url: str, role: Role, bootstrap_port: int | None, timeout_s: float) -> WorkerView:
        """Register and wait until the router lists it healthy under `role`."""
        url = url.rstrip("/")
        body: dict[str, Any] = {"url": url, "worker_type": role}
        if role == "prefill" and bootstrap_port is not None:
            body["bootstrap_port"] = bootstrap_port

        async def call() -> Any:
            return await self.http.request(
                "POST", f"{self.base}/workers", op="add_worker", target=url, refusal=RouterError, json_body=body
            )

        await self.retrier.call("add_worker", url, call)
        deadline = self.clock() + timeout_s
        while True:
            w = await self.find(url)
            if w is not None and w.role == role and w.healthy:
                return w
            if w is not None and w.role != role:
                raise RouterError("add_worker", url, f"router lists it as {w.role}, wanted {role}")
            if self.clock() >= deadline:
                state = "not listed" if w is None else "listed but unhealthy"
                raise TransientError("add_worker", url, f"{state} after {timeout_s:g}s")
            await self.sleep(self.poll_interval_s)

    async def remove(self, url: str, timeout_s: float) -> None:
        """Deregister by id and wait until it is gone. Absent already = done (idempotent)."""
        url = url.rstrip("/")
        w = await self.find(url)
        if w is None:
            return
        wid = w.router_id

        async def call() -> Any:
            return await self.http.request(
                "DELETE", f"{self.base}/workers/{wid}", op="remove_worker", target=url, refusal=RouterError,
                ok=(200, 202, 204, 404),
            )

        await self.retrier.call("remove_worker", url, call)
        deadline = self.clock() + timeout_s
        while await self.find(url) is not None:
            if self.clock() >= deadline:
                raise TransientError("remove_worker", url, f"still listed after {timeout_s:g}s")
            await self.sleep(self.poll_interval_s)

    async def reconcile(
        self, desired: dict[str, Role], bootstrap_ports: dict[str, int], timeout_s: float
    ) -> list[str]:
        """Make the router's pools equal `desired` (url -> role): remove strays, (re)add missing. Returns changes.

        Used at start-up and after recovery; workers the router lists but
        `desired` does not name are left alone only if `desired` is empty.
        """
        changes: list[str] = []
        if not desired:
            return changes
        current = {w.url: w for w in await self.workers()}
        for url, w in current.items():
            want = desired.get(url)
            if want is None or want != w.role:
                await self.remove(url, timeout_s)
                changes.append(f"removed {url} ({w.role})")
        current = {w.url: w for w in await self.workers()}
        for url, role in desired.items():
            if url not in current:
                await self.add(url, role, bootstrap_ports.get(url), timeout_s)
                changes.append(f"added {url} as {role}")
        return changes
