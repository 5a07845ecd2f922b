"""An in-process stand-in for the router registry and SGLang workers, following the contract measured on the
real sglang-router 0.3 (202 + background registration, DELETE by id, /workers listing) and SGLang's
/pd_role_switch (refuses unless idle, same role = no-op). Unit tests use it to drive every branch of the flip
state machine, including failures the real processes cannot be made to produce on demand; the end-to-end
tests in tests/e2e run the same code against the real router and emulated workers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class W:
    role: str
    load: int = 0
    served: float = 0.0
    healthy: bool = True
    switch_fails: bool = False  # rebuild fails: success=false and the worker goes unhealthy
    switch_refuses: bool = False  # success=false, stays healthy in its old role
    switch_calls: int = 0
    dead: bool = False  # the process is gone: every endpoint fails (answered 503 here; transient either way)


@dataclass
class ContractFleet:
    workers: dict[str, W] = field(default_factory=dict)  # path key "w0" -> state
    registry: dict[str, tuple[str, str, int | None]] = field(default_factory=dict)  # id -> (url, type, port)
    base: str = ""
    router_5xx: int = 0  # answer the next N router calls with 503
    add_ignored: bool = False  # accept POST /workers but never list the worker
    calls: list[str] = field(default_factory=list)
    frozen: set[str] = field(default_factory=set)  # workers whose request counters never move
    traffic_per_scrape: float = 1.0  # requests a listed worker serves between two scrapes of its counters
    initial: dict[str, tuple[str, str, int | None]] = field(default_factory=dict)  # registry at router start

    def restart_router(self, down_calls: int = 0) -> None:
        """The router restarts with its start-up arguments: it lists the start-up workers in their start-up
        roles (whatever they serve now), after answering `down_calls` calls with 503."""
        self.registry = {f"id-{uuid.uuid4().hex[:8]}": v for v in self.initial.values()}
        self.router_5xx = down_calls

    def url(self, key: str) -> str:
        return f"{self.base}/w/{key}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/router/workers", self.list_workers)
        app.router.add_post("/router/workers", self.add_worker)
        app.router.add_delete("/router/workers/{id}", self.del_worker)
        app.router.add_get("/w/{k}/health", self.health)
        app.router.add_get("/w/{k}/get_load", self.get_load)
        app.router.add_get("/w/{k}/server_info", self.server_info)
        app.router.add_get("/w/{k}/metrics", self.metrics)
        app.router.add_post("/w/{k}/pd_role_switch", self.switch)
        return app

    def _fault(self) -> web.Response | None:
        if self.router_5xx > 0:
            self.router_5xx -= 1
            return web.Response(status=503, text="upstream busy")
        return None

    async def list_workers(self, req: web.Request) -> web.Response:
        self.calls.append("GET /workers")
        if (f := self._fault()) is not None:
            return f
        out = []
        for wid, (url, wt, port) in self.registry.items():
            w = self.workers[url.rsplit("/", 1)[1]]
            d = {"id": wid, "url": url, "worker_type": wt, "is_healthy": w.healthy, "load": w.load}
            if port is not None:
                d["bootstrap_port"] = port
            out.append(d)
        return web.json_response({"workers": out, "total": len(out)})

    async def add_worker(self, req: web.Request) -> web.Response:
        self.calls.append("POST /workers")
        if (f := self._fault()) is not None:
            return f
        b = await req.json()
        wid = str(uuid.uuid4())
        if not self.add_ignored and all(u != b["url"] for u, _, _ in self.registry.values()):
            self.registry[wid] = (b["url"], b["worker_type"], b.get("bootstrap_port"))
        return web.json_response({"status": "accepted", "worker_id": wid}, status=202)

    async def del_worker(self, req: web.Request) -> web.Response:
        self.calls.append("DELETE /workers")
        if (f := self._fault()) is not None:
            return f
        if self.registry.pop(req.match_info["id"], None) is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response({"status": "accepted"}, status=202)

    def _w(self, req: web.Request) -> W:
        w = self.workers[req.match_info["k"]]
        if w.dead:
            raise web.HTTPServiceUnavailable(text="connection refused (emulated: the process is gone)")
        return w

    async def health(self, req: web.Request) -> web.Response:
        return web.Response(status=200 if self._w(req).healthy else 503)

    async def get_load(self, req: web.Request) -> web.Response:
        w = self._w(req)
        if req.match_info["k"] in self.frozen:  # gets no traffic: nothing ever runs there
            return web.json_response([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0}])
        load = w.load
        w.load = max(0, w.load - 1)  # in-flight requests finish one per poll
        return web.json_response([{"dp_rank": 0, "num_reqs": load, "num_waiting_reqs": 0}])

    async def server_info(self, req: web.Request) -> web.Response:
        return web.json_response({"disaggregation_mode": self._w(req).role})

    async def metrics(self, req: web.Request) -> web.Response:
        w = self._w(req)
        # every scrape after registration sees one more request if the worker is in the router
        listed = any(u.endswith("/" + req.match_info["k"]) for u, _, _ in self.registry.values())
        if listed and req.match_info["k"] not in self.frozen:
            w.served += self.traffic_per_scrape
        return web.Response(text=f"# TYPE sglang:num_requests counter\nsglang:num_requests_total {w.served}\n")

    async def switch(self, req: web.Request) -> web.Response:
        w = self._w(req)
        w.switch_calls += 1
        new = (await req.json())["new_role"]
        if w.switch_refuses and new != w.role:
            return web.json_response({"success": False, "message": "PD role switch is disabled"}, status=400)
        if w.load:
            return web.json_response({"success": False, "message": "not idle"}, status=400)
        if w.switch_fails and new != w.role:
            w.healthy = False
            return web.json_response({"success": False, "message": "rebuild failed"})
        old, w.role = w.role, new
        return web.json_response({"success": True, "message": "ok", "old_role": old, "new_role": new})
