"""`pd-router-tap`: a streaming pass-through in front of the sglang-router that measures every request.

    clients -> tap (--listen) -> router (--router) ; per-request events -> ZeroMQ PUB (--publish)

For `/generate`, `/v1/completions` and `/v1/chat/completions` the tap records the
arrival time, input/cached/output tokens (from `usage` or `meta_info`), TTFT,
mean TPOT, end-to-end latency and status, and publishes them in batched frames
(router_plugin.wire). Every other path is passed through untouched.

Two promises:
- The client sees exactly the bytes it would see without the tap. For a
  streaming OpenAI request that did not ask for usage, the tap adds
  `stream_options.include_usage` (the only way to learn token counts from a
  stream) and removes the extra usage-only chunk that this produces.
- The controller can never slow or fail a request: events go into a bounded
  buffer and out through a PUB socket with a send high-water mark and NOBLOCK
  sends; whatever cannot be sent is dropped and counted (`/tap/metrics`).

Depends on aiohttp and pyzmq only (no controller, no numpy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import zmq
from aiohttp import web

from router_plugin.wire import (
    ENDPOINT_NAMES,
    ENDPOINTS,
    FLAG_STREAMED,
    MAX_RECORDS_PER_FRAME,
    RequestEvent,
    encode_frame,
)

log = logging.getLogger("pd-router-tap")

# hop-by-hop headers (RFC 9110 §7.6.1) and the ones aiohttp recomputes for us
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)
# a non-streaming body larger than this is passed through without being parsed for token counts
MAX_PARSE_BYTES = 16 * 1024 * 1024
# status recorded when the client goes away before the answer is complete (nginx's convention)
STATUS_CLIENT_CLOSED = 499
STATUS_UPSTREAM_FAILED = 502
# a usage-only OpenAI chunk has an empty choices list; content chunks never do
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class Publisher:
    """Batches packed records and sends them as frames on a ZeroMQ PUB socket, never blocking.

    `add` is O(1) and cannot raise. `flush` sends whole frames with NOBLOCK: a
    full send queue (high-water mark) or any socket error drops the frame and
    counts its events. PUB also drops silently per subscriber at that
    subscriber's high-water mark; the controller sees those as gaps in the
    frame sequence numbers.
    """

    def __init__(
        self,
        endpoint: str | None,
        source_id: str,
        *,
        sndhwm: int = 1000,
        max_batch: int = 512,
        max_pending: int = 65536,
        flush_interval_s: float = 0.05,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        if not 1 <= max_batch <= MAX_RECORDS_PER_FRAME:
            raise ValueError(f"max_batch={max_batch}: must be in [1, {MAX_RECORDS_PER_FRAME}]")
        self.source_id = source_id
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.flush_interval_s = flush_interval_s
        self.seq = 0
        self.pending: list[bytes] = []
        self.published = 0
        self.frames_sent = 0
        self.dropped: Counter[str] = Counter()
        self._ctx = ctx
        self._own_ctx = False
        self.sock: zmq.Socket[Any] | None = None
        self.endpoint = endpoint
        if endpoint:
            if self._ctx is None:
                self._ctx = zmq.Context()
                self._own_ctx = True
            self.sock = self._ctx.socket(zmq.PUB)
            self.sock.setsockopt(zmq.SNDHWM, sndhwm)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.bind(endpoint)
            # tcp://host:0 binds an ephemeral port: report the real one
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def add(self, record: bytes) -> None:
        if len(self.pending) >= self.max_pending:
            self.dropped["buffer_full"] += 1
            return
        self.pending.append(record)

    def flush(self) -> None:
        while self.pending:
            batch = self.pending[: self.max_batch]
            del self.pending[: self.max_batch]
            if self.sock is None:
                self.dropped["no_socket"] += len(batch)
                continue
            frame = encode_frame(self.source_id, self.seq, batch)
            self.seq += 1
            try:
                self.sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                self.dropped["hwm"] += len(batch)
            except zmq.ZMQError:
                self.dropped["send_error"] += len(batch)
            else:
                self.frames_sent += 1
                self.published += len(batch)

    async def run(self) -> None:
        """Flush every `flush_interval_s` (and whenever a batch is full, see `maybe_flush`)."""
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self.flush()

    def maybe_flush(self) -> None:
        if len(self.pending) >= self.max_batch:
            self.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None


def _int(x: Any) -> int:
    """A token count from JSON, clamped into the wire's uint32 (junk -> 0)."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
        return 0
    return min(int(x), 0xFFFFFFFF)


def _tokens_from(obj: Any) -> tuple[int, int, int] | None:
    """(input, cached, output) from an OpenAI `usage` or an SGLang `meta_info`; None if absent."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return _int(usage.get("prompt_tokens")), _int(cached), _int(usage.get("completion_tokens"))
    meta = obj.get("meta_info")
    if isinstance(meta, dict):
        return _int(meta.get("prompt_tokens")), _int(meta.get("cached_tokens")), _int(meta.get("completion_tokens"))
    return None


def _sum_tokens(parsed: Any) -> tuple[int, int, int] | None:
    """Token counts of a non-streaming answer (a batch /generate answers a list)."""
    if isinstance(parsed, list):
        parts = [t for t in (_tokens_from(x) for x in parsed) if t is not None]
        if not parts:
            return None
        return tuple(min(sum(p[i] for p in parts), 0xFFFFFFFF) for i in range(3))  # type: ignore[return-value]
    return _tokens_from(parsed)


class StreamMeter:
    """Follows a Server-Sent-Events answer: first-token time, last-token time, token counts.

    `feed(chunk)` returns the bytes to forward to the client. Unless `strip_usage`
    is set they are the chunk itself (forwarded at once, parsed on the side); with
    `strip_usage` the stream is cut at event boundaries and the usage-only chunk
    that the tap itself asked for is removed.
    """

    def __init__(self, t0: float, clock: Callable[[], float], strip_usage: bool) -> None:
        self.t0 = t0
        self.clock = clock
        self.strip_usage = strip_usage
        self.buf = b""
        self.first_s: float | None = None
        self.last_s: float | None = None
        self.content_events = 0
        self.tokens: tuple[int, int, int] | None = None
        self.last_data = b""

    def feed(self, chunk: bytes) -> bytes:
        self.buf += chunk
        out: list[bytes] = []
        while True:
            # SSE events end with a blank line; SGLang writes "\n\n" (accept "\r\n\r\n" too)
            i = self.buf.find(b"\n\n")
            j = self.buf.find(b"\r\n\r\n")
            if i < 0 and j < 0:
                break
            end = i + 2 if j < 0 or (0 <= i < j) else j + 4
            event, self.buf = self.buf[:end], self.buf[end:]
            if self._on_event(event) or not self.strip_usage:
                out.append(event)
        if not self.strip_usage:
            return chunk
        return b"".join(out)

    def finish(self) -> bytes:
        """Bytes still buffered at end of stream (an unterminated last event), to forward as-is."""
        rest, self.buf = self.buf, b""
        if rest.strip():
            self._on_event(rest)
        return rest if self.strip_usage else b""

    def _on_event(self, event: bytes) -> bool:
        """Account for one event; False if it is the usage-only chunk the tap added (drop it).

        Only what must be parsed is parsed: a usage-only chunk (`"choices": []`)
        at once, otherwise just the last data event, at the end (SGLang's
        /generate repeats cumulative meta_info in every event; OpenAI chunks
        carry usage only in the last). Content events cost a substring search.
        """
        data = b"".join(
            line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
        )
        if not data or data == b"[DONE]":
            return True
        if _EMPTY_CHOICES.search(data) is not None:
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
                self.tokens = _tokens_from(obj)
                return not self.strip_usage
        now = self.clock()
        if self.first_s is None:
            self.first_s = now - self.t0
        self.last_s = now - self.t0
        self.content_events += 1
        self.last_data = data
        return True

    def final_tokens(self) -> tuple[int, int, int] | None:
        """Token counts: the usage chunk's, else the last event's meta_info/usage."""
        if self.tokens is None and self.last_data:
            with contextlib.suppress(ValueError):
                self.tokens = _tokens_from(json.loads(self.last_data))
        return self.tokens


class Tap:
    """The aiohttp application: proxy + measurement + publishing."""

    def __init__(
        self,
        router_url: str,
        publisher: Publisher,
        *,
        wall_clock: Callable[[], float] = time.time,
        perf_clock: Callable[[], float] = time.perf_counter,
        timeout_s: float | None = None,
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self.publisher = publisher
        self.wall_clock = wall_clock
        self.perf_clock = perf_clock
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.requests: Counter[tuple[str, int]] = Counter()
        self.internal_errors = 0
        self._flusher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/tap/metrics", self.handle_metrics)
        app.router.add_get("/tap/healthz", self.handle_health)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        # A transparent proxy's client: pass compressed bodies through byte for byte
        # (auto_decompress off), never add headers the client did not send (an added
        # Accept-Encoding could get the client a compressed body it cannot read), and keep
        # no cookies (one client's Set-Cookie must never ride along on another's request).
        self.session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=self.timeout,
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        self._flusher = asyncio.create_task(self.publisher.run(), name="tap-flush")

    async def _stop(self, _app: web.Application) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self.session is not None:
            await self.session.close()
        self.publisher.close()

    # -- own endpoints -----------------------------------------------------------------------

    async def handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "publish": self.publisher.endpoint})

    async def handle_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics_text().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def metrics_text(self) -> str:
        """Prometheus text exposition, written by hand (the tap must not depend on prometheus_client)."""
        p = self.publisher
        lines = [
            "# HELP pdtap_requests_total Requests passed through the tap, by endpoint and HTTP status.",
            "# TYPE pdtap_requests_total counter",
        ]
        lines += [
            f'pdtap_requests_total{{endpoint="{ep}",status="{st}"}} {n}' for (ep, st), n in sorted(self.requests.items())
        ]
        lines += [
            "# HELP pdtap_events_published_total Request events sent to the PUB socket.",
            "# TYPE pdtap_events_published_total counter",
            f"pdtap_events_published_total {p.published}",
            "# HELP pdtap_frames_published_total Frames sent to the PUB socket.",
            "# TYPE pdtap_frames_published_total counter",
            f"pdtap_frames_published_total {p.frames_sent}",
            "# HELP pdtap_events_dropped_total Request events dropped instead of delaying a client, by reason.",
            "# TYPE pdtap_events_dropped_total counter",
        ]
        reasons = {"buffer_full", "hwm", "send_error", "no_socket", "internal_error"} | set(p.dropped)
        lines += [f'pdtap_events_dropped_total{{reason="{r}"}} {p.dropped[r]}' for r in sorted(reasons)]
        lines += [
            "# HELP pdtap_events_pending Events buffered, waiting for the next frame.",
            "# TYPE pdtap_events_pending gauge",
            f"pdtap_events_pending {len(p.pending)}",
        ]
        return "\n".join(lines) + "\n"

    # -- proxy -------------------------------------------------------------------------------

    def _upstream_headers(self, request: web.Request, body_changed: bool) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        if body_changed:
            headers.pop("Content-MD5", None)
        return headers

    @staticmethod
    def _response_headers(up: aiohttp.ClientResponse) -> list[tuple[str, str]]:
        return [(k, v) for k, v in up.headers.items() if k.lower() not in _HOP]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        endpoint = ENDPOINTS.get(request.path, 0) if request.method == "POST" else 0
        if endpoint == 0:
            return await self._passthrough(request, body)
        return await self._measured(request, body, endpoint)

    async def _passthrough(self, request: web.Request, body: bytes) -> web.StreamResponse:
        assert self.session is not None
        try:
            up_cm = self.session.request(
                request.method, self.router_url + str(request.rel_url),
                headers=self._upstream_headers(request, False), data=body or None, allow_redirects=False,
            )
            async with up_cm as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=self._response_headers(up))
                if up.content_length is not None and "Content-Encoding" not in up.headers:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except ConnectionResetError:  # the client left; nothing to answer
            return web.Response(status=STATUS_CLIENT_CLOSED)
        except (TimeoutError, aiohttp.ClientError) as e:
            return web.Response(status=STATUS_UPSTREAM_FAILED, text=f"pd-router-tap: router unreachable: {e}\n")

    async def _measured(self, request: web.Request, body: bytes, endpoint: int) -> web.StreamResponse:
        assert self.session is not None
        arrival_s = self.wall_clock()
        t0 = self.perf_clock()
        stream, strip_usage, send_body = False, False, body
        try:
            req_json = json.loads(body) if body else None
        except ValueError:
            req_json = None
        if isinstance(req_json, dict):
            stream = bool(req_json.get("stream"))
            if stream and endpoint != ENDPOINTS["/generate"]:
                so = req_json.get("stream_options")
                if not (isinstance(so, dict) and so.get("include_usage")):
                    # ask for usage, remember to remove the chunk it adds
                    req_json["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
                    send_body = json.dumps(req_json, ensure_ascii=False).encode()
                    strip_usage = True
        status = STATUS_UPSTREAM_FAILED
        meter = StreamMeter(t0, self.perf_clock, strip_usage)
        tokens: tuple[int, int, int] | None = None
        streamed = False
        resp: web.StreamResponse | None = None
        try:
            up_cm = self.session.request(
                "POST", self.router_url + str(request.rel_url),
                headers=self._upstream_headers(request, send_body is not body), data=send_body,
                allow_redirects=False,
            )
            async with up_cm as up:
                status = up.status
                ctype = up.headers.get("Content-Type", "")
                streamed = ctype.startswith("text/event-stream")
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=self._response_headers(up))
                if not streamed and up.content_length is not None and "Content-Encoding" not in up.headers:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                if streamed:
                    async for chunk in up.content.iter_any():
                        out = meter.feed(chunk)
                        if out:
                            await resp.write(out)
                    rest = meter.finish()
                    if rest:
                        await resp.write(rest)
                    tokens = meter.final_tokens()
                else:
                    parts: list[bytes] = []
                    size = 0
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                        if size <= MAX_PARSE_BYTES:
                            parts.append(chunk)
                            size += len(chunk)
                    if status == 200 and size <= MAX_PARSE_BYTES and "Content-Encoding" not in up.headers:
                        with contextlib.suppress(ValueError):
                            tokens = _sum_tokens(json.loads(b"".join(parts)))
                await resp.write_eof()
        except asyncio.CancelledError:
            self._record(endpoint, arrival_s, t0, STATUS_CLIENT_CLOSED, streamed, meter, tokens)
            raise
        except ConnectionResetError:
            # the client went away mid-answer: nothing left to send; the upstream answer is dropped
            self._record(endpoint, arrival_s, t0, STATUS_CLIENT_CLOSED, streamed, meter, tokens)
            return resp if resp is not None else web.Response(status=STATUS_CLIENT_CLOSED)
        except (TimeoutError, aiohttp.ClientError) as e:
            if resp is None:  # nothing sent yet: answer like a gateway would
                self._record(endpoint, arrival_s, t0, STATUS_UPSTREAM_FAILED, streamed, meter, tokens)
                return web.Response(status=STATUS_UPSTREAM_FAILED, text=f"pd-router-tap: router unreachable: {e}\n")
            status = STATUS_UPSTREAM_FAILED  # the router broke the stream midway
        self._record(endpoint, arrival_s, t0, status, streamed, meter, tokens)
        assert resp is not None
        return resp

    def _record(
        self,
        endpoint: int,
        arrival_s: float,
        t0: float,
        status: int,
        streamed: bool,
        meter: StreamMeter,
        tokens: tuple[int, int, int] | None,
    ) -> None:
        """Pack one event; never raises (the client's answer is already on its way)."""
        try:
            e2e_s = self.perf_clock() - t0
            inp, cached, out = tokens if tokens is not None else (0, 0, meter.content_events)
            ttft = meter.first_s if (streamed and meter.first_s is not None) else math.nan
            tpot = math.nan
            # mean TPOT over the decode phase: (last token - first token) / (tokens after the first)
            if streamed and meter.first_s is not None and meter.last_s is not None and out > 1:
                tpot = (meter.last_s - meter.first_s) / (out - 1)
            ev = RequestEvent(arrival_s, inp, min(cached, inp) if inp else cached, out, ttft, tpot, e2e_s,
                              min(max(status, 0), 0xFFFF), endpoint, FLAG_STREAMED if streamed else 0)
            self.requests[(ENDPOINT_NAMES[endpoint], status)] += 1
            self.publisher.add(ev.pack())
            self.publisher.maybe_flush()
        except Exception:
            self.publisher.dropped["internal_error"] += 1
            log.exception("pd-router-tap: could not record an event")


def parse_listen(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen={s!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pd-router-tap",
        description="Streaming pass-through in front of the sglang-router that publishes per-request events.",
    )
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 30001), help="HOST:PORT to serve clients on")
    p.add_argument("--router", required=True, help="the router's base URL, e.g. http://127.0.0.1:30000")
    p.add_argument("--publish", default=None, help="ZeroMQ endpoint to bind the PUB socket on, e.g. tcp://127.0.0.1:5557")
    p.add_argument("--source-id", default=None, help="source id in frame headers (<= 16 bytes; default: the listen address)")
    p.add_argument("--sndhwm", type=int, default=1000, help="PUB send high-water mark, in frames")
    p.add_argument("--max-batch", type=int, default=512, help="events per frame at most")
    p.add_argument("--flush-interval-ms", type=float, default=50.0, help="publish pending events at least this often")
    p.add_argument("--max-pending", type=int, default=65536, help="events buffered at most; beyond that new ones drop")
    p.add_argument("--timeout-s", type=float, default=None, help="total upstream timeout per request (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, port = args.listen
    try:
        pub = Publisher(
            args.publish, (args.source_id or f"{host}:{port}")[:16], sndhwm=args.sndhwm, max_batch=args.max_batch,
            max_pending=args.max_pending, flush_interval_s=args.flush_interval_ms / 1000.0,
        )
    except (ValueError, zmq.ZMQError) as e:
        print(f"pd-router-tap: error: --publish={args.publish!r}: {e}", file=sys.stderr)
        return 2
    tap = Tap(args.router, pub, timeout_s=args.timeout_s)
    log.info("pd-router-tap listening on %s:%d -> %s, publishing on %s", host, port, args.router, pub.endpoint)
    # web.run_app handles SIGINT/SIGTERM: stop accepting, finish in-flight requests, run cleanup
    web.run_app(tap.app(), host=host, port=port, print=None, handle_signals=True, access_log=None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
