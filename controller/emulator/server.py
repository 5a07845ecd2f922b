"""An emulated SGLang worker: the HTTP surface the real sglang-router needs, timing from a profile.

Endpoints (as SGLang serves them): GET /health, /health_generate,
/server_info (/get_server_info), /model_info (/get_model_info), /v1/models,
/get_load, /loads and /v1/loads (SGLang's load snapshot, which smg polls), /metrics; POST /generate, /v1/completions, /v1/chat/completions
(streaming and not), /flush_cache, /pd_role_switch.

PD handshake. SGLang's decode worker pulls the KV cache of a request from the
prefill worker named by `bootstrap_host:bootstrap_port`, matched on
`bootstrap_room`. Here every worker started with a bootstrap port also runs a
tiny bootstrap server on it: GET /room/{room} long-polls until the prefill
of that room has finished and answers its token counts. The decode side then
waits the profile's KV-transfer time (base + per_token * input tokens)
before the request joins the decode batch. The router sends the same body to
both workers at once, so the decode side may ask before the prefill side has
even received the request; the room is created by whichever comes first.

The prefill side answers its own copy of the request (one generated token)
when its prefill is done; the router returns the decode side's answer to the
client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from controller.core.profile import Profile
from controller.emulator.engine import DecodeEngine, DecodeSeq, PrefillEngine, PrefixCache, decode_curve_of
from controller.emulator.metrics import WorkerMetrics
from controller.emulator.text import BadRequest, GenRequest, output_words, parse_request

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
ROLES = ("prefill", "decode")
log = logging.getLogger("controller.emulator")

# SGLang's /v1/loads `include` names -> the LoadSnapshot section each adds (core fields are always there)
LOAD_SECTIONS = {"memory": "memory", "spec": "speculative", "lora": "lora", "disagg": "disaggregation",
                 "queues": "queues"}
# a room whose prefill finished but that no decode worker fetched is forgotten after this long (wall seconds)
_ROOM_TTL_S = 300.0
# how long a decode worker waits for the prefill of its room (wall seconds)
_ROOM_WAIT_S = 600.0


@dataclass(frozen=True)
class WorkerOptions:
    """Everything an emulated worker is configured with (the CLI flags, one to one)."""

    role: str
    host: str = "127.0.0.1"
    port: int = 0
    bootstrap_port: int | None = None
    model_path: str = str(TOKENIZER_DIR)
    served_model_name: str | None = None
    time_scale: float = 1.0
    enable_pd_role_switch: bool = False
    role_switch_s: float = 0.0
    chunk_tokens: int | None = None
    max_running_requests: int | None = None
    kv_capacity_tokens: float | None = None
    prefix_cache_tokens: float | None = None
    natural_output_len: int | None = 256
    context_length: int = 131072
    collect_tokens_histogram: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r}: must be one of {', '.join(ROLES)}")
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale={self.time_scale!r}: must be a positive number (0.1 = ten times faster)")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={self.chunk_tokens!r}: must be >= 1")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError(f"max_running_requests={self.max_running_requests!r}: must be >= 1")
        if self.natural_output_len is not None and self.natural_output_len < 1:
            raise ValueError(f"natural_output_len={self.natural_output_len!r}: must be >= 1")
        if self.context_length < 2:
            raise ValueError(f"context_length={self.context_length!r}: must be >= 2")


def _err(status: int, message: str) -> web.Response:
    # SGLang's error body shape: {"error": {"message", "type", "code"}} (OpenAI-compatible)
    kind = "BadRequestError" if status == 400 else "ServerError"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}, "object": "error",
                              "message": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as e:
        return _err(400, str(e))
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # an emulator bug must answer 500, never kill the worker
        log.exception("emulated worker: unhandled error on %s", request.path)
        return _err(500, f"internal error: {type(e).__name__}: {e}")


class EmulatedWorker:
    """One emulated SGLang server. `await start()` binds; `await stop()` releases everything."""

    def __init__(self, profile: Profile, opts: WorkerOptions) -> None:
        self.profile = profile
        self.opts = opts
        self.role = opts.role
        self.model_name = opts.served_model_name or opts.model_path
        self.metrics = WorkerMetrics(self.model_name, opts.collect_tokens_histogram)
        curve = decode_curve_of(profile)
        kv = opts.kv_capacity_tokens
        if kv is None:
            kv = curve.kv_capacity_tokens if curve.kv_capacity_tokens is not None else math.inf
        self.kv_capacity_tokens = kv
        self.max_running = opts.max_running_requests or max(1, math.floor(curve.max_batch))
        cache_tokens = opts.prefix_cache_tokens
        if cache_tokens is None:
            cache_tokens = kv if math.isfinite(kv) else 1_000_000
        self.cache = PrefixCache(cache_tokens)
        self.inflight = 0
        self.decode_pending = 0  # waiting for their room's prefill or for the KV transfer
        self.switching = False
        self._rooms: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._room_done_at: dict[int, float] = {}
        self._gen_window: deque[float] = deque()  # times of recent generated tokens
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None
        self.prefill: PrefillEngine | None = None
        self.decode: DecodeEngine | None = None
        self.port = opts.port
        self.bootstrap_port = opts.bootstrap_port

    # ---- lifecycle ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health)
        for p in ("/server_info", "/get_server_info"):
            r.add_get(p, self.server_info)
        for p in ("/model_info", "/get_model_info"):
            r.add_get(p, self.model_info)
        r.add_get("/v1/models", self.models)
        r.add_get("/get_load", self.get_load)
        r.add_get("/loads", self.loads)
        r.add_get("/v1/loads", self.loads)
        r.add_get("/metrics", self.metrics_handler)
        r.add_post("/generate", self._gen("generate"))
        r.add_post("/v1/completions", self._gen("completions"))
        r.add_post("/v1/chat/completions", self._gen("chat"))
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_post("/pd_role_switch", self.pd_role_switch)
        return app

    def bootstrap_app(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        app.router.add_get("/room/{room}", self.bootstrap_room)
        app.router.add_get("/health", self.health)
        return app

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()  # e.g. the port is taken: release what was already set up
            raise

    async def _start(self) -> None:
        self.prefill = PrefillEngine(self.profile, self.opts.time_scale, self.opts.chunk_tokens)
        self.decode = DecodeEngine(
            self.profile, self.opts.time_scale, self.max_running, self.kv_capacity_tokens
        )
        self.prefill.start()
        self.decode.start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5))
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self.opts.host, self.opts.port)
        await site.start()
        self._runners.append(runner)
        self.port = _bound_port(runner)
        if self.opts.bootstrap_port is not None:
            brunner = web.AppRunner(self.bootstrap_app(), access_log=None, handler_cancellation=True)
            await brunner.setup()
            await web.TCPSite(brunner, self.opts.host, self.opts.bootstrap_port).start()
            self._runners.append(brunner)
            self.bootstrap_port = _bound_port(brunner)

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for eng in (self.prefill, self.decode):
            if eng is not None:
                await eng.stop()
        for fut in self._rooms.values():
            if not fut.done():
                fut.cancel()
        self._rooms.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def url(self) -> str:
        return f"http://{self.opts.host}:{self.port}"

    @property
    def idle(self) -> bool:
        pending_rooms = sum(1 for f in self._rooms.values() if f.done() and not f.cancelled())
        return self.inflight == 0 and pending_rooms == 0

    def _trim_window(self, now: float) -> None:
        while self._gen_window and now - self._gen_window[0] > 10.0:
            self._gen_window.popleft()

    # ---- info endpoints -----------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.switching:
            return web.Response(status=503, text="switching role")
        return web.Response(status=200)

    def _info(self) -> dict[str, Any]:
        return {
            "model_path": self.opts.model_path,
            "tokenizer_path": self.opts.model_path,
            "served_model_name": self.model_name,
            "disaggregation_mode": self.role,
            "disaggregation_bootstrap_port": self.bootstrap_port,
            "enable_pd_role_switch": self.opts.enable_pd_role_switch,
            "tp_size": self.profile.tensor_parallel,
            "dp_size": 1,
            "context_length": self.opts.context_length,
            "max_running_requests": self.max_running,
            "max_total_num_tokens": None if math.isinf(self.kv_capacity_tokens) else int(self.kv_capacity_tokens),
            "chunked_prefill_size": self.opts.chunk_tokens,
            "is_generation": True,
            "version": "emulated",
            "emulator": {"profile": self.profile.name, "time_scale": self.opts.time_scale},
        }

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response(self._info())

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.opts.model_path,
            "tokenizer_path": self.opts.model_path,
            "served_model_name": self.model_name,
            "is_generation": True,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
        })

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "sglang",
             "root": self.model_name, "max_model_len": self.opts.context_length}]})

    def _counts(self) -> tuple[int, int, float]:
        """(running, queued, KV tokens in use) for the current role."""
        if self.role == "prefill":
            assert self.prefill is not None
            # SGLang counts the KV in use less the evictable prefix cache: on a prefill worker, the batch
            # being computed (the radix cache it keeps afterwards is evictable and not load)
            return self.prefill.running, self.prefill.queued, float(self.prefill.running_tokens)
        assert self.decode is not None
        return len(self.decode.running), len(self.decode.waiting) + self.decode_pending, float(self.decode.kv_used)

    async def get_load(self, request: web.Request) -> web.Response:
        running, queued, used = self._counts()
        # SGLang's get_load: tokens in use plus the input tokens of every waiting request
        return web.json_response([{
            "dp_rank": 0, "num_reqs": max(self.inflight, running + queued), "num_waiting_reqs": queued,
            "num_tokens": int(used) + self._waiting_tokens(),
        }])

    def _waiting_tokens(self) -> int:
        if self.role == "prefill" and self.prefill is not None:
            return self.prefill.queued_tokens
        if self.role == "decode" and self.decode is not None:
            return sum(s.input_tokens for s in self.decode.waiting)
        return 0

    def load_snapshot(self, include: set[str] | None) -> dict[str, Any]:
        """One DP rank's load, with SGLang's /v1/loads field names (core fields always; sections on request)."""
        running, queued, used = self._counts()
        now = time.monotonic()
        self._trim_window(now)
        cap = int(self.kv_capacity_tokens) if math.isfinite(self.kv_capacity_tokens) else 0
        pending = self.decode_pending if self.role == "decode" else 0
        waiting_uncached = self.prefill.queued_tokens if self.role == "prefill" and self.prefill else 0
        pending_tokens = self._waiting_tokens()
        snap: dict[str, Any] = {
            "timestamp": time.time(),
            "dp_rank": 0,
            "num_running_reqs": running,
            # SGLang counts the PD queues (decode prealloc/transfer) as waiting too
            "num_waiting_reqs": queued,
            "num_waiting_uncached_tokens": waiting_uncached,
            "num_used_tokens": int(used),
            "num_total_tokens": int(used) + pending_tokens,
            "num_active_tokens": int(used) + pending_tokens,
            "max_total_num_tokens": cap,
            "max_running_requests": self.max_running,
            "token_usage": round(used / cap, 4) if cap else 0.0,
            "gen_throughput": round(len(self._gen_window) / 10.0, 2),
            "cache_hit_rate": round(self.metrics.hit_rate(), 4),
            "utilization": 0.0,
        }
        sections: dict[str, Any] = {
            "disaggregation": {
                "mode": self.role,
                "prefill_bootstrap_queue_reqs": 0,
                "prefill_inflight_queue_reqs": self.prefill.running if self.role == "prefill" and self.prefill else 0,
                "decode_prealloc_queue_reqs": 0,
                "decode_transfer_queue_reqs": pending,
                "decode_retracted_queue_reqs": 0,
                "kv_transfer_speed_gb_s": 0.0,
                "kv_transfer_latency_ms": round(self.profile.kv_transfer.time_s(1) * 1000.0, 3),
            },
            "queues": {"waiting": queued - pending, "grammar": 0, "paused": 0, "retracted": 0,
                       "prealloc_ready": 0},
            "memory": {"weight_gb": 0.0, "kv_cache_gb": 0.0, "graph_gb": 0.0, "token_capacity": cap},
        }
        for inc, key in LOAD_SECTIONS.items():
            if key in sections and (include is None or "all" in include or inc in include):
                snap[key] = sections[key]
        return snap

    async def loads(self, request: web.Request) -> web.Response:
        """GET /v1/loads (and /loads): {"timestamp", "version", "accelerator", "num_accelerators", "loads": [...]}."""
        q = request.query
        raw = q.get("include")
        include = {x.strip() for x in raw.split(",") if x.strip()} if raw else None
        valid = {"core", "all", *LOAD_SECTIONS}
        if include is not None and not include <= valid:
            raise BadRequest(f"include={raw!r}: invalid sections {sorted(include - valid)}; valid: {sorted(valid)}")
        model = q.get("model")
        if model is not None and model not in (self.model_name, self.opts.model_path):
            return _err(404, f"model={model!r}: not served here (serving {self.model_name!r})")
        dp = q.get("dp_rank")
        if dp is not None and dp != "0":
            raise BadRequest(f"dp_rank={dp!r}: this worker has one DP rank (0)")
        snap = self.load_snapshot(include if include != {"core"} else set())
        return web.json_response({"timestamp": datetime.now(UTC).isoformat(), "version": "emulated",
                                  "accelerator": None, "num_accelerators": self.profile.tensor_parallel,
                                  "loads": [snap]})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        running, queued, used = self._counts()
        now = time.monotonic()
        self._trim_window(now)
        gen_tps = len(self._gen_window) / 10.0
        cap = self.kv_capacity_tokens if math.isfinite(self.kv_capacity_tokens) else 0.0
        transfer = 0
        if self.role == "decode":
            # SGLang's decode worker keeps requests still waiting for their prefill/KV in its
            # prealloc/transfer queues, not in the waiting queue that num_queue_reqs reports
            transfer = self.decode_pending
            queued -= transfer
        self.metrics.set_gauges(running, queued, used, cap, gen_tps)
        self.metrics.transfer_queue.labels(**self.metrics.labels).set(transfer)
        return web.Response(body=self.metrics.exposition(), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def flush_cache(self, request: web.Request) -> web.Response:
        if not self.idle:
            return web.Response(status=400, text="Cache not flushed, please check there are no running requests.")
        self.cache.clear()
        return web.Response(status=200, text="Cache flushed.\nPlease check backend logs for more details.")

    async def pd_role_switch(self, request: web.Request) -> web.Response:
        body = await _json(request)
        new = body.get("new_role") if isinstance(body, dict) else None
        if new not in ROLES:
            raise BadRequest(f"new_role={new!r}: must be 'prefill' or 'decode'")
        old = self.role

        def answer(ok: bool, msg: str, status: int = 200) -> web.Response:
            return web.json_response({"success": ok, "message": msg, "old_role": old, "new_role": new if ok else old},
                                     status=status)

        if not self.opts.enable_pd_role_switch:
            return answer(False, "PD role switch is disabled: start the server with --enable-pd-role-switch", 400)
        if new == old:
            return answer(True, f"already {old}: nothing to do")
        if self.switching:
            return answer(False, "not idle: a role switch is already in progress", 400)
        if not self.idle:
            return answer(False, f"not idle: {self.inflight} request(s) in flight; drain the worker first", 400)
        self.switching = True
        try:
            if self.opts.role_switch_s > 0:
                await asyncio.sleep(self.opts.role_switch_s * self.opts.time_scale)
            # the KV pool is rebuilt for the new role: cached prefixes are gone
            self.cache.clear()
            self.role = new
        finally:
            self.switching = False
        log.info("emulated worker %s: role %s -> %s", self.url, old, new)
        return answer(True, f"switched from {old} to {new}")

    # ---- the PD rendezvous --------------------------------------------------------------------

    def _room(self, room: int) -> asyncio.Future[dict[str, Any]]:
        fut = self._rooms.get(room)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._rooms[room] = fut
            self._purge_rooms()
        return fut

    def _purge_rooms(self) -> None:
        if len(self._room_done_at) < 256:
            return
        now = time.monotonic()
        for room, t in list(self._room_done_at.items()):
            if now - t > _ROOM_TTL_S:
                self._room_done_at.pop(room, None)
                fut = self._rooms.pop(room, None)
                if fut is not None and not fut.done():
                    fut.cancel()

    async def bootstrap_room(self, request: web.Request) -> web.Response:
        try:
            room = int(request.match_info["room"])
        except ValueError:
            raise BadRequest(f"room={request.match_info['room']!r}: must be an integer") from None
        fut = self._room(room)
        try:
            info = await asyncio.wait_for(asyncio.shield(fut), timeout=_ROOM_WAIT_S)
        except TimeoutError:
            return _err(504, f"room {room}: no prefill finished within {_ROOM_WAIT_S:g} s")
        except asyncio.CancelledError:
            if fut.cancelled():
                return _err(410, f"room {room}: the prefill was aborted")
            raise
        self._rooms.pop(room, None)
        self._room_done_at.pop(room, None)
        return web.json_response(info)

    async def _fetch_room(self, req: GenRequest) -> dict[str, Any]:
        assert self._session is not None
        url = f"http://{req.bootstrap_host}:{req.bootstrap_port}/room/{req.bootstrap_room}"
        try:
            async with self._session.get(url) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise web.HTTPBadGateway(text=json.dumps({"error": {"message": f"KV transfer from {url}: {body}"}}),
                                             content_type="application/json")
                return dict(body)
        except aiohttp.ClientError as e:
            raise web.HTTPBadGateway(
                text=json.dumps({"error": {"message": f"KV transfer from {url} failed: {e}"}}),
                content_type="application/json",
            ) from None

    # ---- generation ---------------------------------------------------------------------------

    def _gen(self, kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            body = await _json(request)
            req = parse_request(kind, body, self.opts.context_length)
            if self.switching:
                return _err(503, "worker is switching role")
            self.inflight += 1
            try:
                if self.role == "prefill":
                    return await self._serve_prefill(request, req)
                return await self._serve_decode(request, req)
            finally:
                self.inflight -= 1

        return handler

    async def _serve_prefill(self, request: web.Request, req: GenRequest) -> web.StreamResponse:
        assert self.prefill is not None
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        room_fut = self._room(req.bootstrap_room) if req.bootstrap_room is not None else None
        cached = self.cache.match_and_insert(req.input_ids)
        self.metrics.c_req.inc()
        self.metrics.count_prompt(req.input_tokens, cached)
        # the profile's fixed per-request overhead (tokenising, scheduling) before the GPU queue: the
        # simulator and the model add it to every TTFT, so the emulated server spends it too
        overhead_s = self.profile.overhead_s * self.opts.time_scale
        job: asyncio.Future[float] | None = None
        try:
            if overhead_s > 0:
                await asyncio.sleep(overhead_s)
            job = self.prefill.submit(req.input_tokens - cached)
            done_at = await job
        except asyncio.CancelledError:
            if job is not None:
                job.cancel()
            if room_fut is not None and not room_fut.done():
                room_fut.cancel()
            raise
        if room_fut is not None and not room_fut.done():
            room_fut.set_result({"input_tokens": req.input_tokens, "cached_tokens": cached,
                                 "prefill_s": done_at - arrival})
            self._room_done_at[req.bootstrap_room] = time.monotonic()  # type: ignore[index]
        self.metrics.finished(req.input_tokens, cached, 1)
        rid = req.rid or uuid.uuid4().hex
        words = output_words(1, req.input_tokens)
        meta = {"prompt_tokens": req.input_tokens, "completion_tokens": 1, "cached_tokens": cached}
        return await self._respond(request, req, rid, words, "length", meta, stream_tokens=None)

    async def _serve_decode(self, request: web.Request, req: GenRequest) -> web.StreamResponse:
        assert self.decode is not None
        if req.bootstrap_room is None or req.bootstrap_host is None or req.bootstrap_port is None:
            raise BadRequest(
                "bootstrap_host, bootstrap_port, bootstrap_room: required on a decode worker "
                "(requests reach it through the PD router, which adds them)"
            )
        n_out, finish = req.output_tokens(self.opts.natural_output_len)
        if n_out < 1:
            n_out, finish = 1, "length"  # SGLang's decode side always returns the prefill's first token
        seq_probe = DecodeSeq(req.input_tokens, n_out, emit=lambda i, t: None)
        if not self.decode.fits(seq_probe):
            raise BadRequest(
                f"input {req.input_tokens} + output {n_out} tokens = {req.input_tokens + n_out} exceeds this "
                f"decode worker's KV capacity of {self.kv_capacity_tokens:g} tokens"
            )
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        self.metrics.c_req.inc()
        self.decode_pending += 1
        try:
            info = await self._fetch_room(req)
            n_in = int(info.get("input_tokens", req.input_tokens))
            cached = int(info.get("cached_tokens", 0))
            delay = self.profile.kv_transfer.time_s(n_in) * self.opts.time_scale
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            self.decode_pending -= 1
        self.metrics.c_prompt.inc(req.input_tokens)
        queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
        seq = DecodeSeq(req.input_tokens, n_out, emit=lambda i, t: queue.put_nowait((i, t)))
        self.decode.submit(seq)
        rid = req.rid or uuid.uuid4().hex
        meta = {"prompt_tokens": req.input_tokens, "completion_tokens": n_out, "cached_tokens": cached}

        async def tokens() -> Any:
            prev = arrival
            for _ in range(n_out):
                i, t = await queue.get()
                if i == 0:
                    self.metrics.h_ttft.observe(max(0.0, t - arrival))
                else:
                    self.metrics.h_itl.observe(max(0.0, t - prev))
                prev = t
                self.metrics.c_gen.inc()
                now = time.monotonic()
                self._gen_window.append(now)
                self._trim_window(now)
                yield i
            self.metrics.h_e2e.observe(max(0.0, prev - arrival))
            self.metrics.finished(req.input_tokens, cached, n_out)

        try:
            return await self._respond(request, req, rid, output_words(n_out, req.input_tokens), finish, meta,
                                       stream_tokens=tokens())
        finally:
            seq.cancelled = True  # no-op if it finished; frees its batch slot and KV if the client left

    # ---- response shapes ------------------------------------------------------------------------

    async def _respond(
        self, request: web.Request, req: GenRequest, rid: str, words: list[str], finish: str,
        meta: dict[str, int], stream_tokens: Any,
    ) -> web.StreamResponse:
        """Answer in the endpoint's format. `stream_tokens` (async iterator of indices) paces decode output."""
        created = int(time.time())
        model = req.model or self.model_name
        n = len(words)
        if not req.stream:
            if stream_tokens is not None:
                async for _ in stream_tokens:
                    pass
            return web.json_response(_final_body(req.kind, rid, created, model, " ".join(words), finish, meta, n))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        async def indices() -> Any:
            if stream_tokens is None:
                for i in range(n):
                    yield i
            else:
                async for i in stream_tokens:
                    yield i

        if req.kind == "chat":
            await send(_chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None))
        async for i in indices():
            last = i == n - 1
            fr = finish if last else None
            piece = words[i] if i == 0 else " " + words[i]
            if req.kind == "generate":
                m = dict(meta, completion_tokens=i + 1)
                m["id"] = rid  # type: ignore[assignment]
                m["finish_reason"] = _sglang_finish(finish, n) if last else None  # type: ignore[assignment]
                await send({"text": " ".join(words[: i + 1]), "output_ids": [], "meta_info": m, "index": 0})
            elif req.kind == "completions":
                await send({"id": rid, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": fr}]})
            else:
                await send(_chat_chunk(rid, created, model, {"content": piece}, fr))
        if req.kind != "generate" and req.include_usage:
            await send({"id": rid, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
                        "created": created, "model": model, "choices": [], "usage": _usage(meta, n)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _sglang_finish(finish: str, n: int) -> dict[str, Any]:
    return {"type": "length", "length": n} if finish == "length" else {"type": "stop", "matched": 2}


def _usage(meta: dict[str, int], n: int) -> dict[str, Any]:
    return {
        "prompt_tokens": meta["prompt_tokens"],
        "completion_tokens": n,
        "total_tokens": meta["prompt_tokens"] + n,
        "prompt_tokens_details": {"cached_tokens": meta["cached_tokens"]},
    }


def _chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _final_body(kind: str, rid: str, created: int, model: str, text: str, finish: str, meta: dict[str, int],
                n: int) -> dict[str, Any]:
    if kind == "generate":
        m: dict[str, Any] = dict(meta, completion_tokens=n, id=rid, finish_reason=_sglang_finish(finish, n))
        return {"text": text, "output_ids": [], "meta_info": m}
    if kind == "completions":
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": _usage(meta, n)}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": _usage(meta, n)}


async def _json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise BadRequest("request body is empty: expected a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None


def _bound_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise RuntimeError("emulated worker: could not read the bound port")


async def serve_forever(
    worker: EmulatedWorker, ready: Callable[[EmulatedWorker], None] | None = None, exit_with_parent: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT (or, with exit_with_parent, until the parent process is gone)."""
    await worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        # a harness killed without cleanup must not leave workers behind: re-parenting means it died
        while os.getppid() == parent:
            await asyncio.sleep(0.5)
        stop.set()

    watcher = asyncio.create_task(watch_parent(), name="emulator-parent-watch") if exit_with_parent else None
    if ready is not None:
        ready(worker)
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        with contextlib.suppress(Exception):
            await worker.stop()
