"""aiohttp application of the live sidecar.

    GET  /metrics     Prometheus exposition of the injected registry
    GET  /healthz     200 while the process serves (liveness)
    GET  /readyz      200 once telemetry is fresh, else 503 with the reason
    GET  /v1/state    estimates, forecast, fleet, target, last decisions, telemetry counters
    POST /v1/plan     what-if: the same inputs as `pd-controller plan` (JSON, snake_case);
                      `profile` is a NAME from the configured profile directories, never a path;
                      runs in a worker process with a time limit (api.plan_timeout_s);
                      needs the token when api.plan_requires_token
    POST /v1/pause    advisory mode on  (Authorization: Bearer <token>)
    POST /v1/resume   advisory mode off (Authorization: Bearer <token>)

The API depends only on `ControllerView` (controller.api.view), never on the
runtime. Every error is a JSON object `{"error": "<one line>"}`: bodies above
api.max_body_bytes are 413 before they are read, malformed input is 4xx, and
an unexpected failure is a 500 logged as one line (no traceback).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.api.planpool import PlanBusy, PlanPool, PlanTimeout
from controller.api.view import ControllerView
from controller.boundedjson import JsonInputError, loads_bounded
from controller.config import Config, ConfigError
from controller.core.errors import PdControllerError
from controller.planning import request_from
from controller.profiles import PROFILES_DIR, resolve_profile_name

VIEW = web.AppKey("view", ControllerView)
POOL = web.AppKey("plan_pool", PlanPool)
# a plan request is a flat object: anything nested deeper is not one
MAX_JSON_DEPTH = 8
BODY_TIMEOUT_S = 10.0

log = structlog.get_logger("pd-controller")


def _view(request: web.Request) -> ControllerView:
    return request.app[VIEW]


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _authorized(request: web.Request, token: str | None) -> bool:
    if not token:
        return False  # no token configured: mutating endpoints stay closed
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    try:
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: encode them back the same way,
        # so any byte (0xff included) compares, timing-safe, instead of raising
        given_b = given.strip().encode("utf-8", "surrogateescape")
    except UnicodeError:
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(given_b, token.encode())


def _unauthorized(view: ControllerView) -> web.Response:
    why = "missing or wrong bearer token" if view.token else (
        f"no API token configured (api.token or ${view.cfg.api.token_env}): this endpoint is disabled"
    )
    resp = _error(401, why)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="pd-controller"'
    return resp


def profile_dirs(cfg: Config) -> list[Path]:
    """Where POST /v1/plan looks profile names up: api.profile_dirs, else shipped + the config's own."""
    if cfg.api.profile_dirs is not None:
        return list(cfg.api.profile_dirs)
    dirs = [PROFILES_DIR]
    if cfg.hardware is not None and cfg.hardware.profile is not None:
        dirs.append(Path(cfg.hardware.profile).parent)
    return dirs


@web.middleware
async def errors_as_json(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # 404, 405, 413 ... as one-line JSON, keeping headers such as Allow
        resp = _error(e.status, f"{request.method} {request.path}: {e.reason}")
        for k in ("Allow", "WWW-Authenticate", "Retry-After"):
            if k in e.headers:
                resp.headers[k] = e.headers[k]
        return resp
    except Exception as e:
        log.warning("api_error", path=request.path, error=f"{type(e).__name__}: {str(e)[:200]}")
        return _error(500, f"internal error ({type(e).__name__})")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=_view(request).metrics_exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ok, why = _view(request).ready()
    return web.json_response({"ready": ok, "reason": why}, status=200 if ok else 503)


async def state(request: web.Request) -> web.Response:
    return web.json_response(_view(request).state())


async def plan(request: web.Request) -> web.Response:
    view = _view(request)
    cfg = view.cfg
    if cfg.api.plan_requires_token and not _authorized(request, view.token):
        return _unauthorized(view)
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):  # a client trickling its body does not hold a handler
            raw = await request.read()  # over api.max_body_bytes: 413 (client_max_size)
    except TimeoutError:
        # answer, then drop the connection: no lingering read of the rest of a trickled body
        resp = _error(408, f"body: not received within {BODY_TIMEOUT_S:g}s")
        resp.force_close()
        await resp.prepare(request)
        await resp.write_eof()
        if request.transport is not None:
            request.transport.close()
        return resp
    try:
        body = loads_bounded(raw, max_bytes=cfg.api.max_body_bytes, max_depth=MAX_JSON_DEPTH)
    except JsonInputError as e:
        return _error(400, f"body: expected a JSON object: {e}", reason=e.reason)
    if not isinstance(body, dict):
        return _error(400, f"body: expected a JSON object, got {type(body).__name__}")
    if body.get("profile") is not None:
        # a name, looked up in the configured directories only; never a path from the network
        try:
            body = {**body, "profile": str(resolve_profile_name(body["profile"], profile_dirs(cfg)))}
        except PdControllerError as e:
            return _error(400, str(e))
    try:
        req = request_from(cfg, body)
    except (ConfigError, PdControllerError) as e:
        return _error(400, str(e))
    try:
        kind, value = await request.app[POOL].run(req)
    except PlanBusy as e:
        resp = _error(429, f"plan: busy ({e}); retry later")
        resp.headers["Retry-After"] = "1"
        return resp
    except PlanTimeout as e:
        return _error(503, f"plan: {e}")
    if kind == "ok":
        return web.json_response(value)
    if kind == "invalid":
        return _error(400, value)
    log.warning("api_plan_error", error=value)
    return _error(500, f"plan: internal error ({value.split(':', 1)[0]})")


async def pause(request: web.Request) -> web.Response:
    return _set_paused(request, True)


async def resume(request: web.Request) -> web.Response:
    return _set_paused(request, False)


def _set_paused(request: web.Request, paused: bool) -> web.Response:
    view = _view(request)
    if not _authorized(request, view.token):
        return _unauthorized(view)
    return web.json_response(view.set_paused(paused))


def build_app(view: ControllerView) -> web.Application:
    api = view.cfg.api
    app = web.Application(client_max_size=api.max_body_bytes, middlewares=[errors_as_json])
    app[VIEW] = view
    app[POOL] = PlanPool(timeout_s=api.plan_timeout_s, memory_mb=api.plan_memory_mb)

    async def close_pool(app: web.Application) -> None:
        await app[POOL].close()

    app.on_cleanup.append(close_pool)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/state", state)
    app.router.add_post("/v1/plan", plan)
    app.router.add_post("/v1/pause", pause)
    app.router.add_post("/v1/resume", resume)
    return app
