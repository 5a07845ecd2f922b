"""aiohttp application of the live sidecar.

    GET  /metrics     Prometheus exposition of the injected registry
    GET  /healthz     200 while the process serves (liveness)
    GET  /readyz      200 once telemetry is fresh, else 503 with the reason
    GET  /v1/state    estimates, forecast, fleet, target, last decisions, telemetry counters
    POST /v1/plan     what-if: the same inputs as `pd-controller plan` (JSON, snake_case)
    POST /v1/pause    advisory mode on  (Authorization: Bearer <token>)
    POST /v1/resume   advisory mode off (Authorization: Bearer <token>)
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.config import ConfigError
from controller.core.errors import PdControllerError
from controller.planning import execute, request_from

if TYPE_CHECKING:
    from controller.runtime.sidecar import Sidecar

SIDECAR = web.AppKey("sidecar", object)


def _sidecar(request: web.Request) -> Sidecar:
    return request.app[SIDECAR]  # type: ignore[return-value]


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _authorized(request: web.Request, token: str | None) -> bool:
    if not token:
        return False  # no token configured: mutating endpoints stay closed
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _unauthorized(sc: Sidecar) -> web.Response:
    why = "missing or wrong bearer token" if sc.token else (
        f"no API token configured (api.token or ${sc.cfg.api.token_env}): mutating endpoints are disabled"
    )
    resp = _error(401, why)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="pd-controller"'
    return resp


async def metrics(request: web.Request) -> web.Response:
    body = _sidecar(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ok, why = _sidecar(request).ready()
    return web.json_response({"ready": ok, "reason": why}, status=200 if ok else 503)


async def state(request: web.Request) -> web.Response:
    return web.json_response(_sidecar(request).state())


async def plan(request: web.Request) -> web.Response:
    sc = _sidecar(request)
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "body: expected a JSON object")
    if not isinstance(body, dict):
        return _error(400, f"body: expected a JSON object, got {type(body).__name__}")
    try:
        result = execute(request_from(sc.cfg, body))
    except (ConfigError, PdControllerError) as e:
        return _error(400, str(e))
    return web.json_response(json.loads(json.dumps(result, default=str)))


async def pause(request: web.Request) -> web.Response:
    return _set_paused(request, True)


async def resume(request: web.Request) -> web.Response:
    return _set_paused(request, False)


def _set_paused(request: web.Request, paused: bool) -> web.Response:
    sc = _sidecar(request)
    if not _authorized(request, sc.token):
        return _unauthorized(sc)
    sc.loop.set_paused(paused)
    body: dict[str, Any] = {"paused": sc.loop.paused, "mode": sc.loop.mode}
    if not paused and sc.loop.mode == "advisory":
        body["note"] = "still advisory: " + ("no actuator configured" if sc.loop.sink is None else "started with --advisory")
    return web.json_response(body)


def build_app(sidecar: Sidecar) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app[SIDECAR] = sidecar
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/state", state)
    app.router.add_post("/v1/plan", plan)
    app.router.add_post("/v1/pause", pause)
    app.router.add_post("/v1/resume", resume)
    return app
