"""Client of the PD router's worker registry: smg 1.x (the default) and sglang-router 0.3.x.

Both routers list workers at `GET /workers` (parsed by the one reader,
controller.telemetry.fleet.parse_workers) and register them with
`POST /workers {"url", "worker_type", "bootstrap_port"?}` (202: a background
job checks /health, /server_info, /model_info; we poll until listed, healthy,
under the right type) and remove them with `DELETE /workers/{id}` (the UUID,
never the URL: a URL is a 400 "expected UUID").

What smg adds (measured on smg 1.13.0), and how this client uses it:
- `DELETE` leaves the worker listed `status: "draining"` (not healthy, routed
  nothing new; requests in flight finish) for `health.drain_settle_secs`
  (5 s unless set), then it is gone. The controller drains the worker itself
  (it waits until the worker is idle), so the router only has to hold the
  worker long enough for requests it already dispatched to reach it: we send
  `{"health": {"drain_settle_secs": N}}` (`drain_settle_s`, 1 s by default)
  with every registration, and `remove` waits until the worker is gone.
- A duplicate `POST` is a synchronous 409 `WORKER_ALREADY_EXISTS` naming the
  id: if it is listed under the wanted role we just wait for it; under another
  role it is re-registered by `PUT`.
- `PUT /workers/{id}` re-registers a worker under another role in one call,
  keeping its id, with no drain (`reregister`).
- `PATCH /workers/{id}` tunes `health` (drain settle) but ignores worker_type.

0.3.x has none of these: a duplicate POST is refused by the background job
(logged there, answered 202), so callers remove before re-adding; `PUT` there
answers 202 but does not change the role, and `PATCH` is 405. The dialect is
told from the router's own answers (smg lists a `status` per worker; with an
empty fleet, `GET /get_loads` names `smg-<version>`), once, and can be forced.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

from controller.actuators.base import FleetView, Role, WorkerView
from controller.actuators.errors import RouterError, TransientError
from controller.actuators.http import Http
from controller.actuators.retry import Retrier
from controller.telemetry.fleet import PD_ROLES, RouterWorker, dialect_of, parse_workers

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
DIALECTS = ("auto", "smg", "legacy")
_UUID_IN_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def to_view(w: RouterWorker) -> WorkerView:
    """The reader's worker as the actuator's view (draining = on its way out, not part of a pool)."""
    return WorkerView(url=w.url, role=Role(w.role), healthy=w.healthy, router_id=w.id,
                      bootstrap_port=w.bootstrap_port, load=w.load or 0,
                      state="draining" if w.draining else "serving")


def worker_views(body: Any) -> list[WorkerView]:
    """Router /workers answer -> WorkerViews of the PD pools (regular workers are skipped)."""
    try:
        workers = parse_workers(body)
    except ValueError as e:
        raise RouterError("list_workers", "router", str(e)) from None
    return [to_view(w) for w in workers if w.role in PD_ROLES]


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
        drain_settle_s: float = 1.0,
        dialect: str = "auto",
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"dialect={dialect!r}: must be one of {', '.join(DIALECTS)}")
        if not (drain_settle_s >= 0 and math.isfinite(drain_settle_s)):
            raise ValueError(f"drain_settle_s={drain_settle_s!r}: must be a finite number >= 0")
        self.base = base_url.rstrip("/")
        self.http = http
        self.retrier = retrier
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.sleep = sleep
        # smg takes whole seconds; round up so the settle is never shorter than asked
        self.drain_settle_secs = math.ceil(drain_settle_s)
        self.dialect: str | None = None if dialect == "auto" else dialect

    # ---- reading ---------------------------------------------------------------------------------

    async def _list(self) -> Any:
        async def call() -> Any:
            _, body = await self.http.request(
                "GET", f"{self.base}/workers", op="list_workers", target=self.base, refusal=RouterError
            )
            return body

        body = await self.retrier.call("list_workers", self.base, call)
        if self.dialect is None:
            d = dialect_of(body)
            if d != "unknown":
                self.dialect = d
        return body

    async def workers(self) -> list[WorkerView]:
        return worker_views(await self._list())

    async def fleet(self) -> FleetView:
        return FleetView(workers=tuple(await self.workers()))

    async def find(self, url: str) -> WorkerView | None:
        url = url.rstrip("/")
        for w in await self.workers():
            if w.url == url:
                return w
        return None

    async def kind(self) -> str:
        """'smg' or 'legacy': from the worker list, else from `/get_loads` (smg names itself there)."""
        if self.dialect is None:
            await self._list()
        if self.dialect is None:
            try:
                _, body = await self.http.request("GET", f"{self.base}/get_loads", op="detect_router",
                                                  target=self.base, refusal=RouterError)
            except (RouterError, TransientError):
                body = None
            version = body.get("version") if isinstance(body, dict) else None
            self.dialect = "smg" if isinstance(version, str) and version.startswith("smg") else "legacy"
        return self.dialect

    # ---- registering -----------------------------------------------------------------------------

    def _body(self, url: str, role: Role, bootstrap_port: int | None, smg: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"url": url, "worker_type": role}
        if role == "prefill" and bootstrap_port is not None:
            body["bootstrap_port"] = bootstrap_port
        if smg:
            body["health"] = {"drain_settle_secs": self.drain_settle_secs}
        return body

    async def add(self, url: str, role: Role, bootstrap_port: int | None, timeout_s: float) -> WorkerView:
        """Register and wait until the router lists it healthy under `role`.

        smg: a worker already listed (409) under the wanted role is waited for;
        under another role it is re-registered in place (PUT).
        """
        url = url.rstrip("/")
        smg = await self.kind() == "smg"
        listed = await self.find(url)
        if listed is not None:
            # never POST a listed URL: 0.3.x queues the duplicate and may re-add it after a later removal
            if listed.role == role and listed.state == "serving":
                return await self._wait_listed(url, role, timeout_s, "add_worker")
            if smg:
                return await self._put(url, listed.router_id, role, bootstrap_port, timeout_s)
            raise RouterError("add_worker", url, f"already listed as {listed.role} ({listed.state}): remove it first")
        body = self._body(url, role, bootstrap_port, smg)

        async def call() -> tuple[int, Any]:
            return await self.http.request(
                "POST", f"{self.base}/workers", op="add_worker", target=url, refusal=RouterError, json_body=body,
                ok=(200, 201, 202, 409),
            )

        status, answer = await self.retrier.call("add_worker", url, call)
        if status == 409:
            code = answer.get("code") if isinstance(answer, dict) else None
            if code not in (None, "WORKER_ALREADY_EXISTS"):
                raise RouterError("add_worker", url, f"router refused: {answer}", status=409)
            listed = await self.find(url)
            if listed is None:
                # it was being removed (draining out) and is gone now: register it afresh
                await self.retrier.call("add_worker", url, call)
            elif listed.role != role or listed.state == "draining":
                return await self._put(url, listed.router_id or _id_in(answer), role, bootstrap_port, timeout_s)
        return await self._wait_listed(url, role, timeout_s, "add_worker")

    async def reregister(self, url: str, role: Role, bootstrap_port: int | None, timeout_s: float) -> WorkerView:
        """Put a listed worker under `role`: smg in one call (PUT, same id, no drain); 0.3.x remove + add."""
        url = url.rstrip("/")
        listed = await self.find(url)
        if listed is None:
            return await self.add(url, role, bootstrap_port, timeout_s)
        if listed.role == role and listed.state == "serving":
            return await self._wait_listed(url, role, timeout_s, "reregister_worker")
        if await self.kind() == "smg":
            return await self._put(url, listed.router_id, role, bootstrap_port, timeout_s)
        await self.remove(url, timeout_s)
        return await self.add(url, role, bootstrap_port, timeout_s)

    async def _put(self, url: str, wid: str | None, role: Role, bootstrap_port: int | None,
                   timeout_s: float) -> WorkerView:
        if wid is None:
            raise RouterError("reregister_worker", url, "the router lists it without an id: cannot PUT /workers/{id}")
        body = self._body(url, role, bootstrap_port, smg=True)

        async def call() -> Any:
            return await self.http.request(
                "PUT", f"{self.base}/workers/{wid}", op="reregister_worker", target=url, refusal=RouterError,
                json_body=body,
            )

        await self.retrier.call("reregister_worker", url, call)
        return await self._wait_listed(url, role, timeout_s, "reregister_worker", role_may_lag=True)

    async def set_drain_settle(self, url: str, seconds: float) -> None:
        """smg only: the drain settle the router holds this worker for after a DELETE (PATCH /workers/{id})."""
        url = url.rstrip("/")
        if await self.kind() != "smg":
            raise RouterError("set_drain_settle", url, "this router (sglang-router 0.3.x) has no per-worker drain "
                              "settle: PATCH /workers/{id} is smg's")
        w = await self.find(url)
        if w is None or w.router_id is None:
            raise RouterError("set_drain_settle", url, "not registered with the router")
        wid = w.router_id

        async def call() -> Any:
            return await self.http.request(
                "PATCH", f"{self.base}/workers/{wid}", op="set_drain_settle", target=url, refusal=RouterError,
                json_body={"health": {"drain_settle_secs": math.ceil(seconds)}},
            )

        await self.retrier.call("set_drain_settle", url, call)

    async def _settle_before_delete(self, url: str, w: WorkerView) -> None:
        """Workers registered from smg's command line drain 5 s: bring that down to ours before the DELETE.

        PATCH is a background job, and smg does not list a PATCHed settle: wait (briefly) until the
        worker's `job_status` says the update is no longer pending.
        """
        listed = {x.url: x for x in parse_workers(await self._list())}.get(url)
        if listed is None or (listed.drain_settle_s is not None and listed.drain_settle_s <= self.drain_settle_secs):
            return
        await self.set_drain_settle(url, self.drain_settle_secs)
        deadline = self.clock() + 3.0
        while self.clock() < deadline:
            try:
                _, one = await self.http.request("GET", f"{self.base}/workers/{w.router_id}", op="worker_job",
                                                 target=url, refusal=RouterError)
            except (RouterError, TransientError):
                return
            job = one.get("job_status") if isinstance(one, dict) else None
            if not isinstance(job, dict) or job.get("status") not in ("pending", "processing", "queued"):
                return
            await self.sleep(0.05)

    async def _wait_listed(self, url: str, role: Role, timeout_s: float, op: str, *,
                           role_may_lag: bool = False) -> WorkerView:
        deadline = self.clock() + timeout_s
        while True:
            w = await self.find(url)
            if w is not None and w.role == role and w.healthy and w.state == "serving":
                return w
            if w is not None and w.role != role and w.state == "serving" and not role_may_lag:
                raise RouterError(op, url, f"router lists it as {w.role}, wanted {role}")
            if self.clock() >= deadline:
                state = "not listed" if w is None else f"listed {w.state}, {'healthy' if w.healthy else 'unhealthy'}"
                raise TransientError(op, url, f"{state} after {timeout_s:g}s")
            await self.sleep(self.poll_interval_s)

    # ---- removing --------------------------------------------------------------------------------

    async def remove(self, url: str, timeout_s: float) -> None:
        """Deregister by id and wait until it is gone (smg: through its drain settle). Absent already = done."""
        url = url.rstrip("/")
        w = await self.find(url)
        if w is None:
            return
        wid = w.router_id
        if wid is None:
            raise RouterError("remove_worker", url, "the router lists it without an id: cannot DELETE /workers/{id}")
        if w.state != "draining" and await self.kind() == "smg":
            await self._settle_before_delete(url, w)
        if w.state != "draining":  # smg: already on its way out, a second DELETE would only 404 later

            async def call() -> tuple[int, Any]:
                return await self.http.request(
                    "DELETE", f"{self.base}/workers/{wid}", op="remove_worker", target=url, refusal=RouterError,
                    ok=(200, 202, 204, 404),
                )

            await self.retrier.call("remove_worker", url, call)
        deadline = self.clock() + timeout_s + self.drain_settle_secs
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
        A worker listed under the wrong role is re-registered (smg: PUT in place).
        """
        changes: list[str] = []
        if not desired:
            return changes
        current = {w.url: w for w in await self.workers()}
        for url, w in current.items():
            want = desired.get(url)
            if want is None:
                await self.remove(url, timeout_s)
                changes.append(f"removed {url} ({w.role})")
            elif want != w.role:
                await self.reregister(url, want, bootstrap_ports.get(url, w.bootstrap_port), timeout_s)
                changes.append(f"re-registered {url} as {want} (was {w.role})")
        current = {w.url: w for w in await self.workers()}
        for url, role in desired.items():
            if url not in current:
                await self.add(url, role, bootstrap_ports.get(url), timeout_s)
                changes.append(f"added {url} as {role}")
        return changes


def _id_in(answer: Any) -> str | None:
    """smg's 409 names the existing worker's id in its message."""
    m = _UUID_IN_TEXT.search(str(answer))
    return m.group(0) if m else None
