"""`pd-router-tap`: a streaming pass-through in front of the SGLang router that measures every request.

    clients -> tap (--listen) -> router (--router) ; per-request events -> ZeroMQ PUB (--publish)

What it forwards: the serving API only -- POST `/generate`, `/v1/completions`,
`/v1/chat/completions` (measured), GET/HEAD `/v1/models[/{id}]` and the health
endpoints (`/health`, `/health_generate`, `/liveness`, `/readiness`). Everything else,
the router's admin surface included (`/workers`, `/flush_cache`, ...), is answered
404 by the tap itself unless named with `--allow-path` (see docs/security.md).

For each measured request the tap publishes an *arrival* event when the request
has arrived (time, input tokens -- exact from `input_ids` / token-id prompts, else
estimated from the text's bytes and flagged, `max_tokens`, model) and a *completion*
event when it ends (input/cached/output tokens from `usage` or `meta_info`, TTFT,
mean TPOT, end-to-end latency, status), joined by a request id (router_plugin.wire).

Promises:
- The router receives the client's bytes. The tap measures from them and never
  re-serialises a body. One exception, on by default (`--stream-usage splice`): a
  streaming OpenAI request that did not mention `stream_options` gets the member
  `,"stream_options":{"include_usage":true}` inserted before its closing brace (the
  only way to learn token counts from a stream); every other byte is the client's,
  and the usage-only chunk this produces is removed from the answer. Only a strictly
  valid body is spliced (UTF-8, no duplicate keys, no lone surrogates, no NaN, depth
  <= 64, the required fields present), so a body the router refuses is refused with
  the router's own words; anything else -- malformed, too deep, too large to parse --
  is forwarded byte for byte. `--stream-usage off` never changes a byte.
- Bounded: bodies over `--max-body-mb` are answered 413 (from Content-Length, before
  reading; or as soon as a chunked body passes the limit); bodies are streamed to the
  router, and only the first `--parse-limit-kb` of a body (within a global budget) is
  held to be measured; headers must arrive within `--header-timeout-s` and the body
  within `--body-timeout-s`; at most `--max-connections` client connections, the next
  ones get 503 at once.
- A router that refuses connections is retried with backoff for `--connect-retry-s`
  (counted), then 502; a request that reached the router is never retried.
- The controller can never slow or fail a request: events go into a bounded
  buffer and out through a PUB socket with a send high-water mark and NOBLOCK
  sends; whatever cannot be sent is dropped and counted (`/tap/metrics`).
- The PUB socket binds on loopback only, unless CURVE keys are given
  (`--curve-secret-key`, `--curve-authorized-keys`) or `--publish-insecure` says so.

Depends on aiohttp and pyzmq only (no controller, no numpy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import re
import resource
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import zmq
from aiohttp import hdrs, web

from router_plugin.keys import CurveKeyError, ServerCurve, is_loopback_endpoint, load_server_curve
from router_plugin.wire import (
    ENDPOINT_NAMES,
    ENDPOINTS,
    FLAG_ESTIMATED,
    FLAG_STREAMED,
    KIND_ARRIVAL,
    KIND_COMPLETION,
    MAX_RECORDS_PER_FRAME,
    ArrivalEvent,
    RequestEvent,
    encode_frame,
    encode_frame_v2,
)

log = logging.getLogger("pd-router-tap")

# hop-by-hop headers (RFC 9110 §7.6.1), the ones aiohttp recomputes for us, and Expect (answered by the tap)
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Expect",
    )
)
# a non-streaming answer larger than this is passed through without being parsed for token counts
MAX_PARSE_BYTES = 4 * 1024 * 1024
# status recorded when the client goes away before the answer is complete (nginx's convention)
STATUS_CLIENT_CLOSED = 499
STATUS_UPSTREAM_FAILED = 502
# a usage-only OpenAI chunk has an empty choices list; content chunks never do
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')

MEASURED = {path: code for path, code in ENDPOINTS.items()}  # POST only
# read-only serving endpoints forwarded unmeasured (GET/HEAD)
READ_PATHS = frozenset({"/v1/models", "/health", "/health_generate", "/liveness", "/readiness"})
_MODEL_PATH = re.compile(r"^/v1/models/[^/]+$")
_USAGE_MEMBER = b',"stream_options":{"include_usage":true}'
_JSON_WS = b" \t\r\n"
KEEPALIVE_S = 75.0  # idle keep-alive connections are closed after this (nginx's default)


@dataclass(frozen=True, slots=True)
class Limits:
    """What bounds the tap's memory, time and connections (see `--help` for each flag)."""

    # The router's own default is 512 MB; LLM requests are far smaller (a 128 k-token prompt is
    # ~0.5 MB of text, ~1 MB as token ids), so the tap refuses much earlier than the router.
    max_body_bytes: int = 64 * 1024 * 1024
    # a body up to this size is held and parsed to measure it; a larger one is streamed unparsed
    parse_limit_bytes: int = 1024 * 1024
    # all bodies held for measurement together at most: beyond it, new bodies stream unparsed
    parse_budget_bytes: int = 64 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1024
    connect_retry_s: float = 5.0
    connect_timeout_s: float = 2.0
    bytes_per_token: float = 4.0
    stream_usage: bool = True
    allow_paths: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "parse_limit_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.parse_budget_bytes < 0:
            raise ValueError(f"parse_budget_bytes={self.parse_budget_bytes}: must be >= 0")
        for name in ("header_timeout_s", "body_timeout_s", "connect_timeout_s", "bytes_per_token"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v}: must be a positive number")
        if not (math.isfinite(self.connect_retry_s) and self.connect_retry_s >= 0):
            raise ValueError(f"connect_retry_s={self.connect_retry_s}: must be >= 0")
        for p in self.allow_paths:
            if not p.startswith("/"):
                raise ValueError(f"allow_paths item {p!r}: must start with '/' (a path, or a prefix ending in '*')")


class Publisher:
    """Batches packed records and sends them as frames on a ZeroMQ PUB socket, never blocking.

    `add_*` are O(1) and cannot raise. `flush` sends whole frames with NOBLOCK: a
    full send queue (high-water mark) or any socket error drops the frame and
    counts its events. PUB also drops silently per subscriber at that
    subscriber's high-water mark; the controller sees those as gaps in the
    frame sequence numbers (one sequence over frames of both kinds).

    `wire_version` 2 (default) sends arrival and completion frames; 1 sends only
    completion frames in the old format, for controllers that know nothing else.
    With `curve`, the socket is a CURVE server and only the authorised controller
    keys can subscribe; without it, `endpoint` must be loopback unless `insecure`.
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
        wire_version: int = 2,
        curve: ServerCurve | None = None,
        insecure: bool = False,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        if not 1 <= max_batch <= MAX_RECORDS_PER_FRAME:
            raise ValueError(f"max_batch={max_batch}: must be in [1, {MAX_RECORDS_PER_FRAME}]")
        if wire_version not in (1, 2):
            raise ValueError(f"wire_version={wire_version}: must be 1 or 2")
        if endpoint and curve is None and not insecure and not is_loopback_endpoint(endpoint):
            raise ValueError(
                f"{endpoint}: without CURVE keys the PUB socket binds loopback only "
                "(give --curve-secret-key and --curve-authorized-keys, or --publish-insecure)"
            )
        self.source_id = source_id
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.flush_interval_s = flush_interval_s
        self.wire_version = wire_version
        self.seq = 0
        self.pending: list[bytes] = []  # completion records
        self.pending_arrivals: list[bytes] = []
        self.published = 0
        self.arrivals_published = 0
        self.frames_sent = 0
        self.dropped: Counter[str] = Counter()
        self._ctx = ctx
        self._own_ctx = False
        self._auth: Any = None
        self.sock: zmq.Socket[Any] | None = None
        self.endpoint = endpoint
        self.curve = curve
        if endpoint:
            if self._ctx is None:
                self._ctx = zmq.Context()
                self._own_ctx = True
            self.sock = self._ctx.socket(zmq.PUB)
            self.sock.setsockopt(zmq.SNDHWM, sndhwm)
            self.sock.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                self._auth = curve.start_authenticator(self._ctx)
                self.sock.curve_server = True
                self.sock.curve_publickey = curve.public
                self.sock.curve_secretkey = curve.secret
            try:
                self.sock.bind(endpoint)
            except zmq.ZMQError:
                self.close()
                raise
            # tcp://host:0 binds an ephemeral port: report the real one
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def n_pending(self) -> int:
        return len(self.pending) + len(self.pending_arrivals)

    def add(self, record: bytes) -> None:
        """A packed completion record (RequestEvent.pack() for wire v1, .pack_v2() for v2)."""
        if self.n_pending >= self.max_pending:
            self.dropped["buffer_full"] += 1
            return
        self.pending.append(record)

    def add_arrival(self, record: bytes) -> None:
        """A packed ArrivalEvent; ignored on wire v1 (which has no arrivals)."""
        if self.wire_version == 1:
            return
        if self.n_pending >= self.max_pending:
            self.dropped["buffer_full"] += 1
            return
        self.pending_arrivals.append(record)

    def _send(self, kind: int, batch: list[bytes]) -> None:
        if self.sock is None:
            self.dropped["no_socket"] += len(batch)
            return
        if self.wire_version == 1:
            frame = encode_frame(self.source_id, self.seq, batch)
        else:
            frame = encode_frame_v2(self.source_id, self.seq, kind, batch)
        self.seq += 1
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped["hwm"] += len(batch)
        except zmq.ZMQError:
            self.dropped["send_error"] += len(batch)
        else:
            self.frames_sent += 1
            if kind == KIND_ARRIVAL:
                self.arrivals_published += len(batch)
            else:
                self.published += len(batch)

    def flush(self) -> None:
        # arrivals first: a consumer that joins them sees a request arrive before it ends
        for kind, pending in ((KIND_ARRIVAL, self.pending_arrivals), (KIND_COMPLETION, self.pending)):
            while pending:
                batch = pending[: self.max_batch]
                del pending[: self.max_batch]
                self._send(kind, batch)

    async def run(self) -> None:
        """Flush every `flush_interval_s` (and whenever a batch is full, see `maybe_flush`)."""
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self.flush()

    def maybe_flush(self) -> None:
        if len(self.pending) >= self.max_batch or len(self.pending_arrivals) >= self.max_batch:
            self.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if self._auth is not None:
            with contextlib.suppress(Exception):
                self._auth.stop()
            self._auth = None
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


class _BodyError(Exception):
    """The client's body could not be taken: `status` is what the client is answered."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class _Unreachable(Exception):
    """Every connection attempt to the router failed within the retry window (it never saw the request)."""


@dataclass(slots=True)
class Measured:
    """What the tap learns from a request body (parsed only when small enough)."""

    stream: bool = False
    max_tokens: int = 0
    model: str = ""
    input_tokens: int = 0
    estimated: bool = True
    splice_usage: bool = False


def _count_ids(x: Any) -> int | None:
    """Tokens in a token-id prompt: a list of ints, or a batch (list of lists of ints); None if not ids."""
    if isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        return len(x)
    if isinstance(x, list) and x and all(isinstance(i, list) for i in x):
        total = 0
        for i in x:
            k = _count_ids(i)
            if k is None:
                return None
            total += k
        return total
    return None


def _text_bytes(x: Any) -> int:
    """UTF-8 bytes of the text in a prompt / message content (str, list of str, list of parts)."""
    if isinstance(x, str):
        return len(x.encode("utf-8", errors="replace"))
    if isinstance(x, list):
        return sum(_text_bytes(i) for i in x[:100_000])
    if isinstance(x, dict):
        return _text_bytes(x.get("text"))
    return 0


def measure_request(endpoint: int, obj: Any, bytes_per_token: float, stream_usage: bool) -> Measured:
    """Fields of a parsed request body that the events carry. Never raises on odd shapes.

    Input tokens are exact for token ids (`input_ids`, or an OpenAI `prompt` of ids);
    otherwise ceil(text bytes / bytes_per_token) -- plus 4 per chat message for the
    template's role markers -- and flagged estimated; the completion's `usage` count
    corrects it when the request ends.
    """
    m = Measured()
    if not isinstance(obj, dict):
        return m
    m.stream = obj.get("stream") is True
    model = obj.get("model")
    m.model = model if isinstance(model, str) else ""
    if endpoint == ENDPOINTS["/generate"]:
        sp = obj.get("sampling_params")
        mt = sp.get("max_new_tokens") if isinstance(sp, dict) else None
        if isinstance(sp, list) and sp and isinstance(sp[0], dict):
            mt = sp[0].get("max_new_tokens")
        ids = _count_ids(obj.get("input_ids"))
        text = obj.get("text")
        overhead = 0
    elif endpoint == ENDPOINTS["/v1/completions"]:
        mt = obj.get("max_tokens")
        ids = _count_ids(obj.get("prompt"))
        text = obj.get("prompt")
        overhead = 0
    else:
        mt = obj.get("max_completion_tokens", obj.get("max_tokens"))
        ids = None
        msgs = obj.get("messages")
        msgs = msgs if isinstance(msgs, list) else []
        text = [x.get("content") for x in msgs if isinstance(x, dict)]
        overhead = 4 * len(msgs)
    m.max_tokens = _int(mt)
    if ids is not None:
        m.input_tokens, m.estimated = min(ids, 0xFFFFFFFF), False
    else:
        m.input_tokens = min(math.ceil(_text_bytes(text) / bytes_per_token) + overhead, 0xFFFFFFFF)
    # splice only where it cannot collide with anything the client wrote
    m.splice_usage = (stream_usage and m.stream and endpoint != ENDPOINTS["/generate"]
                      and "stream_options" not in obj)
    return m


def splice_include_usage(body: bytes) -> bytes:
    """Insert `,"stream_options":{"include_usage":true}` before the closing brace; nothing else changes.

    At the end, not the start: a router error about anything the client wrote then
    names the same line and column as without the tap.
    """
    j = len(body)
    while j > 0 and body[j - 1] in _JSON_WS:
        j -= 1
    if j == 0 or body[j - 1] != ord("}"):
        raise ValueError("not a JSON object")
    return body[: j - 1] + _USAGE_MEMBER + body[j - 1 :]


class _NotStrict(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _NotStrict("duplicate key")
    return d


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _NotStrict("number out of range")
    return v


def _reject_constant(s: str) -> Any:
    raise _NotStrict(f"{s} is not JSON")


def strict_object(body: bytes, max_depth: int = 64) -> dict[str, Any] | None:
    """The body as a JSON object if every JSON parser must read it the same way, else None.

    Strict: UTF-8 only, no duplicate keys, no NaN/Infinity or out-of-range numbers, no
    lone surrogates, nesting at most `max_depth` (serde_json, the router's parser, stops
    at 128). Only such a body may be spliced: for anything else the router's own
    verdict must reach the client unchanged.
    """
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_float=_finite_float,
                         parse_constant=_reject_constant)
    except Exception:  # RecursionError, UnicodeDecodeError, _NotStrict, JSONDecodeError: not strict
        return None
    if not isinstance(obj, dict):
        return None
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > max_depth:
            return None
        if isinstance(x, dict):
            for k, v in x.items():
                if not _utf8_clean(k):
                    return None
                stack.append((v, depth + 1))
        elif isinstance(x, list):
            stack.extend((v, depth + 1) for v in x)
        elif isinstance(x, str) and not _utf8_clean(x):
            return None
    return obj


def _utf8_clean(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a \ud800 escape
        return False
    return True


# fields without which the router's typed parser reports "missing field" at the end of the body
_REQUIRED = {ENDPOINTS["/v1/completions"]: ("model", "prompt"), ENDPOINTS["/v1/chat/completions"]: ("model", "messages")}


def _parse(body: bytes) -> Any:
    """The body as JSON, or None: never raises (deep nesting, bad UTF-8, lone surrogates, anything)."""
    try:
        return json.loads(body)
    except Exception:  # RecursionError included: an unparseable body is forwarded untouched
        return None


class _Streamed:
    """A request body for aiohttp's client: what was read already, then the rest from the client.

    Each `__aiter__` starts a fresh generator, so a retried connect (nothing sent
    yet) can hand aiohttp a new one. A body that passes the size limit or the time
    limit stops the upload (the router gets an incomplete body, which it discards)
    and leaves `error` for the handler to answer.
    """

    def __init__(self, tap: Tap, request: web.Request, head: bytes, deadline: float) -> None:
        self.tap = tap
        self.request = request
        self.head = head
        self.deadline = deadline
        self.error: _BodyError | None = None
        self.sent = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[bytes]:
        self.sent = len(self.head)
        yield self.head
        while True:
            try:
                chunk = await self.tap._read_chunk(self.request, self.deadline, self.sent)
            except _BodyError as e:
                self.error = e
                raise
            if not chunk:
                return
            self.sent += len(chunk)
            yield chunk


class _Gate:
    """Open client connections, counted at accept, released when they close."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refusing = 0
        self.refused = 0
        self.header_timeouts = 0


class _CountedProtocol(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol: the connection cap and the header timeout.

    The header timeout runs from a connection's first byte of a request (or from
    the connection itself) until the request's handler starts, i.e. until its
    headers are complete; an idle keep-alive connection between requests is aiohttp's
    keep-alive business, not this timer's. A connection over time is closed.
    """

    def __init__(self, inner: asyncio.Protocol, gate: _Gate, header_timeout_s: float,
                 registry: dict[asyncio.BaseTransport, _CountedProtocol]) -> None:
        self.inner = inner
        self.gate = gate
        self.header_timeout_s = header_timeout_s
        self.registry = registry
        self.transport: asyncio.BaseTransport | None = None
        self.busy = 0
        self.timer: asyncio.TimerHandle | None = None
        gate.open += 1

    def _arm(self) -> None:
        if self.timer is None and not self.busy:
            self.timer = asyncio.get_running_loop().call_later(self.header_timeout_s, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if not self.busy and self.transport is not None:
            self.gate.header_timeouts += 1
            self.transport.close()

    def request_started(self) -> None:
        self.busy += 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def request_done(self) -> None:
        self.busy -= 1  # the next request's timer starts with its first byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.registry[transport] = self
        self._arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.open -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.registry.pop(self.transport, None)
        self.inner.connection_lost(exc)


class _BusyProtocol(asyncio.Protocol):
    """Beyond the connection cap: a 503 at once, then close (reading and discarding for up to 1 s,
    so the client reads the answer rather than a reset)."""

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        gate.refusing += 1
        gate.refused += 1
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: a cast, not an isinstance check
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        if self.gate.refusing > self.gate.limit:  # a flood of refusals: do not even answer
            transport.abort()
            return
        text = f"pd-router-tap: too many connections (at most {self.gate.limit}); retry later\n".encode()
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(text)).encode() + b"\r\n\r\n" + text
        )
        self._timer = asyncio.get_running_loop().call_later(1.0, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        if self.transport is not None:
            self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.refusing -= 1
        if self._timer is not None:
            self._timer.cancel()


class Tap:
    """The aiohttp application: allow-list, bounded body intake, proxy, measurement, publishing."""

    def __init__(
        self,
        router_url: str,
        publisher: Publisher,
        *,
        wall_clock: Callable[[], float] = time.time,
        perf_clock: Callable[[], float] = time.perf_counter,
        timeout_s: float | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self.publisher = publisher
        self.wall_clock = wall_clock
        self.perf_clock = perf_clock
        self.limits = limits or Limits()
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.limits.connect_timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.requests: Counter[tuple[str, int]] = Counter()
        self.refused: Counter[str] = Counter()  # answered by the tap itself, by reason
        self.connect_retries = 0
        self.unreachable = 0
        self.buffered = 0  # bytes of bodies held for measurement right now
        self.gate = _Gate(self.limits.max_connections)
        self._conns: dict[asyncio.BaseTransport, _CountedProtocol] = {}
        self._ids = itertools.count(1)
        self._id_base = secrets.randbits(24) << 40  # request ids differ across tap restarts
        self._allow_exact = frozenset(p for p in self.limits.allow_paths if not p.endswith("*"))
        self._allow_prefix = tuple(p[:-1] for p in self.limits.allow_paths if p.endswith("*"))
        self._flusher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @web.middleware
    async def _in_request(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every handler (the tap's own endpoints too) stops its connection's header timer while it runs."""
        conn = self._conns.get(request.transport) if request.transport is not None else None
        if conn is None:  # served without start_server (tests with a plain AppRunner): no timer
            return await handler(request)  # type: ignore[no-any-return]
        conn.request_started()
        try:
            return await handler(request)  # type: ignore[no-any-return]
        finally:
            conn.request_done()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._in_request])
        app.router.add_get("/tap/metrics", self.handle_metrics)
        app.router.add_get("/tap/healthz", self.handle_health)
        app.router.add_route("*", "/{tail:.*}", self.handle, expect_handler=self._expect)
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

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The listening socket's protocol factory: aiohttp's handler under the connection cap."""

        def factory() -> asyncio.Protocol:
            if self.gate.open >= self.gate.limit:
                return _BusyProtocol(self.gate)
            return _CountedProtocol(server(), self.gate, self.limits.header_timeout_s, self._conns)

        return factory

    # -- own endpoints -----------------------------------------------------------------------

    async def handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "publish": self.publisher.endpoint})

    async def handle_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics_text().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def metrics_text(self) -> str:
        """Prometheus text exposition, written by hand (the tap must not depend on prometheus_client)."""
        p = self.publisher

        def family(name: str, kind: str, help_: str, samples: list[str]) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]

        lines = family("pdtap_requests_total", "counter", "Requests passed through the tap, by endpoint and HTTP status.",
                       [f'pdtap_requests_total{{endpoint="{ep}",status="{st}"}} {n}'
                        for (ep, st), n in sorted(self.requests.items())])
        reasons = {"not_forwarded", "too_large", "body_timeout", "header_timeout", "bad_body",
                   "too_many_connections"} | set(self.refused)
        refused = Counter(self.refused)
        refused["too_many_connections"] = self.gate.refused
        refused["header_timeout"] = self.gate.header_timeouts
        lines += family("pdtap_refused_total", "counter", "Requests the tap answered itself (never forwarded), by reason.",
                        [f'pdtap_refused_total{{reason="{r}"}} {refused[r]}' for r in sorted(reasons)])
        lines += family("pdtap_router_connect_retries_total", "counter",
                        "Connection attempts to the router that failed and were retried (the router never saw them).",
                        [f"pdtap_router_connect_retries_total {self.connect_retries}"])
        lines += family("pdtap_router_unreachable_total", "counter",
                        "Requests answered 502 because no connection to the router succeeded within --connect-retry-s.",
                        [f"pdtap_router_unreachable_total {self.unreachable}"])
        lines += family("pdtap_connections_open", "gauge", "Client connections open.",
                        [f"pdtap_connections_open {self.gate.open}"])
        lines += family("pdtap_body_bytes_held", "gauge", "Request body bytes held for measurement.",
                        [f"pdtap_body_bytes_held {self.buffered}"])
        lines += family("pdtap_events_published_total", "counter", "Completion events sent to the PUB socket.",
                        [f"pdtap_events_published_total {p.published}"])
        lines += family("pdtap_arrivals_published_total", "counter", "Arrival events sent to the PUB socket.",
                        [f"pdtap_arrivals_published_total {p.arrivals_published}"])
        lines += family("pdtap_frames_published_total", "counter", "Frames sent to the PUB socket.",
                        [f"pdtap_frames_published_total {p.frames_sent}"])
        reasons = {"buffer_full", "hwm", "send_error", "no_socket", "internal_error"} | set(p.dropped)
        lines += family("pdtap_events_dropped_total", "counter",
                        "Request events dropped instead of delaying a client, by reason.",
                        [f'pdtap_events_dropped_total{{reason="{r}"}} {p.dropped[r]}' for r in sorted(reasons)])
        lines += family("pdtap_events_pending", "gauge", "Events buffered, waiting for the next frame.",
                        [f"pdtap_events_pending {p.n_pending}"])
        return "\n".join(lines) + "\n"

    # -- routing and intake ------------------------------------------------------------------

    def _route(self, method: str, path: str) -> int | str | None:
        """Endpoint code to measure (POST serving endpoints), "plain" to forward unmeasured, or None."""
        if path in self._allow_exact or any(path.startswith(p) for p in self._allow_prefix):
            code = MEASURED.get(path)
            return code if (code is not None and method == "POST") else "plain"
        if path in MEASURED:
            return MEASURED[path] if method == "POST" else None
        if method in ("GET", "HEAD") and (path in READ_PATHS or _MODEL_PATH.match(path)):
            return "plain"
        return None

    def _refuse(self, reason: str, status: int, text: str, *, close: bool = False) -> web.Response:
        self.refused[reason] += 1
        resp = web.Response(status=status, text=f"pd-router-tap: {text}\n")
        if close:
            resp.force_close()
        return resp

    def _not_forwarded(self, request: web.Request) -> web.Response:
        return self._refuse(
            "not_forwarded", 404,
            f"{request.method} {request.path} is not forwarded: the tap serves only the serving API "
            "(/generate, /v1/completions, /v1/chat/completions, /v1/models, health); see --allow-path",
        )

    def _too_large(self, n: int | None) -> web.Response:
        what = f"{n} bytes" if n is not None else "the body"
        return self._refuse("too_large", 413, f"{what} over --max-body-mb ({self.limits.max_body_bytes} bytes)",
                            close=True)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse before the client sends its body, when we already know."""
        if self._route(request.method, request.path) is None:
            return self._not_forwarded(request)
        cl = request.content_length
        if cl is not None and cl > self.limits.max_body_bytes:
            return self._too_large(cl)
        if request.version == aiohttp.HttpVersion11:
            if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
                return web.Response(status=417, text="pd-router-tap: unknown Expect\n")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    async def _read_chunk(self, request: web.Request, deadline: float, so_far: int) -> bytes:
        """The next piece of the body (b"" at its end), within the body deadline and the size limit."""
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await request.content.readany()
        except TimeoutError:
            raise _BodyError(408, f"body not received within --body-timeout-s ({self.limits.body_timeout_s} s)") from None
        except (ConnectionError, aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError) as e:
            raise _BodyError(400, f"request body could not be read: {type(e).__name__}") from None
        if so_far + len(chunk) > self.limits.max_body_bytes:
            raise _BodyError(413, f"body over --max-body-mb ({self.limits.max_body_bytes} bytes)")
        return chunk

    async def _read_head(self, request: web.Request, limit: int, deadline: float) -> tuple[bytes, bool]:
        """Up to about `limit` bytes of the body; (bytes, complete)."""
        parts: list[bytes] = []
        n = 0
        while n <= limit:
            chunk = await self._read_chunk(request, deadline, n)
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            n += len(chunk)
        return b"".join(parts), False

    # -- proxy -------------------------------------------------------------------------------

    def _upstream_headers(self, request: web.Request, body_changed: bool, length: int | None) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        if body_changed:
            headers.pop("Content-MD5", None)
        if length is not None:  # a streamed body of known size goes up with its length, not chunked
            headers["Content-Length"] = str(length)
        return headers

    @staticmethod
    def _response_headers(up: aiohttp.ClientResponse) -> list[tuple[str, str]]:
        return [(k, v) for k, v in up.headers.items() if k.lower() not in _HOP]

    async def _open_upstream(self, request: web.Request, headers: dict[str, str],
                             data: Callable[[], Any]) -> aiohttp.ClientResponse:
        """Send the request; retry only connections that failed to open (the router never saw those)."""
        assert self.session is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.limits.connect_retry_s
        delay = 0.05
        url = self.router_url + str(request.rel_url)
        while True:
            try:
                return await self.session.request(request.method, url, headers=headers, data=data(),
                                                  allow_redirects=False)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                gone = request.transport is None or request.transport.is_closing()
                if gone or loop.time() + delay > give_up:
                    self.unreachable += 1
                    raise _Unreachable(str(e)) from None
                self.connect_retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)  # 50 ms, 100, 200, 400, then every 500 ms

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.method, request.path)
        if route is None:
            return self._not_forwarded(request)
        cl = request.content_length
        if cl is not None and cl > self.limits.max_body_bytes:
            return self._too_large(cl)  # before reading a byte of it
        arrival_s = self.wall_clock()
        t0 = self.perf_clock()
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout_s
        measured = isinstance(route, int)
        # hold a body for measurement only within the global budget; else stream it unparsed
        limit = self.limits.parse_limit_bytes if measured else 0
        if self.buffered + limit > self.limits.parse_budget_bytes:
            limit = 0
        reserved = limit
        self.buffered += reserved
        try:
            if request.body_exists:
                head, complete = await self._read_head(request, limit, deadline)
            else:
                head, complete = b"", True
        except _BodyError as e:
            self.refused["too_large" if e.status == 413 else "body_timeout" if e.status == 408 else "bad_body"] += 1
            resp = web.Response(status=e.status, text=f"pd-router-tap: {e.text}\n")
            resp.force_close()
            if e.status == 408 and request.transport is not None:
                # a client too slow to send its body gets no lingering time either: answer and hang up
                await resp.prepare(request)
                await resp.write_eof()
                request.transport.close()
            return resp
        finally:
            self.buffered -= reserved
        body: bytes | None = head if complete else None
        if not measured:
            return await self._forward(request, body, head, deadline)
        assert isinstance(route, int)
        return await self._measured(request, route, body, head, deadline, arrival_s, t0)

    def _payload(self, request: web.Request, body: bytes | None, head: bytes,
                 deadline: float) -> tuple[Callable[[], Any], list[_Streamed]]:
        if body is not None:
            return (lambda: body or None), []
        made: list[_Streamed] = []

        def make() -> _Streamed:
            made.append(_Streamed(self, request, head, deadline))
            return made[-1]

        return make, made

    async def _forward(self, request: web.Request, body: bytes | None, head: bytes,
                       deadline: float) -> web.StreamResponse:
        """Unmeasured pass-through of an allowed path, byte for byte."""
        data, made = self._payload(request, body, head, deadline)
        headers = self._upstream_headers(request, False, request.content_length if body is None else None)
        resp: web.StreamResponse | None = None
        try:
            up = await self._open_upstream(request, headers, data)
            try:
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=self._response_headers(up))
                if up.content_length is not None and "Content-Encoding" not in up.headers:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            finally:
                up.release()
        except ConnectionResetError:  # the client left; nothing to answer
            return resp if resp is not None else web.Response(status=STATUS_CLIENT_CLOSED)
        except _Unreachable as e:
            return web.Response(status=STATUS_UPSTREAM_FAILED, text=f"pd-router-tap: router unreachable: {e}\n")
        except (TimeoutError, aiohttp.ClientError, _BodyError) as e:
            err = next((s.error for s in made if s.error is not None), None)
            if resp is None and err is not None:
                return self._body_refusal(err)
            if resp is None:
                return web.Response(status=STATUS_UPSTREAM_FAILED, text=f"pd-router-tap: router failed: {e}\n")
            return resp

    def _body_refusal(self, err: _BodyError) -> web.Response:
        reason = {413: "too_large", 408: "body_timeout"}.get(err.status, "bad_body")
        return self._refuse(reason, err.status, err.text, close=True)

    async def _measured(self, request: web.Request, endpoint: int, body: bytes | None, head: bytes,
                        deadline: float, arrival_s: float, t0: float) -> web.StreamResponse:
        lim = self.limits
        if body is not None:
            strict = strict_object(body) if lim.stream_usage else None
            m = measure_request(endpoint, strict if strict is not None else _parse(body), lim.bytes_per_token,
                                lim.stream_usage)
            m.splice_usage = (m.splice_usage and strict is not None
                              and all(k in strict for k in _REQUIRED.get(endpoint, ("",))))
        else:  # too large to hold: estimate from the size, learn the rest from the answer
            size = request.content_length or len(head)
            m = Measured(input_tokens=min(math.ceil(size / lim.bytes_per_token), 0xFFFFFFFF))
        send_body = body
        strip_usage = False
        if body is not None and m.splice_usage:
            with contextlib.suppress(ValueError):
                send_body = splice_include_usage(body)
                strip_usage = True
        request_id = self._id_base | (next(self._ids) & 0xFFFFFFFFFF)
        in_flags = FLAG_ESTIMATED if m.estimated else 0
        self._publish_arrival(ArrivalEvent(arrival_s, request_id, m.input_tokens, m.max_tokens, endpoint,
                                           in_flags | (FLAG_STREAMED if m.stream else 0), m.model))
        data, made = self._payload(request, send_body, head, deadline)
        headers = self._upstream_headers(request, send_body is not body,
                                         request.content_length if send_body is None else None)
        status = STATUS_UPSTREAM_FAILED
        meter = StreamMeter(t0, self.perf_clock, strip_usage)
        tokens: tuple[int, int, int] | None = None
        streamed = False
        resp: web.StreamResponse | None = None

        def record(st: int) -> None:
            self._record(endpoint, arrival_s, t0, st, streamed, meter, tokens, request_id, m)

        try:
            up = await self._open_upstream(request, headers, data)
            try:
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
                        tokens = _sum_tokens(_parse(b"".join(parts)))
                await resp.write_eof()
            finally:
                up.release()
        except asyncio.CancelledError:
            record(STATUS_CLIENT_CLOSED)
            raise
        except ConnectionResetError:
            # the client went away mid-answer: nothing left to send; the upstream answer is dropped
            record(STATUS_CLIENT_CLOSED)
            return resp if resp is not None else web.Response(status=STATUS_CLIENT_CLOSED)
        except _Unreachable as e:
            record(STATUS_UPSTREAM_FAILED)
            return web.Response(status=STATUS_UPSTREAM_FAILED, text=f"pd-router-tap: router unreachable: {e}\n")
        except (TimeoutError, aiohttp.ClientError, _BodyError) as e:
            err = next((s.error for s in made if s.error is not None), None)
            if resp is None and err is not None:  # the client's body broke the upload, not the router
                record(err.status)
                return self._body_refusal(err)
            if resp is None:  # nothing sent yet: answer like a gateway would
                record(STATUS_UPSTREAM_FAILED)
                return web.Response(status=STATUS_UPSTREAM_FAILED, text=f"pd-router-tap: router failed: {e}\n")
            status = STATUS_UPSTREAM_FAILED  # the router broke the stream midway
        record(status)
        assert resp is not None
        return resp

    def _publish_arrival(self, ev: ArrivalEvent) -> None:
        try:
            self.publisher.add_arrival(ev.pack())
            self.publisher.maybe_flush()
        except Exception:  # telemetry never fails a request
            self.publisher.dropped["internal_error"] += 1
            log.exception("pd-router-tap: could not record an arrival")

    def _record(
        self,
        endpoint: int,
        arrival_s: float,
        t0: float,
        status: int,
        streamed: bool,
        meter: StreamMeter,
        tokens: tuple[int, int, int] | None,
        request_id: int = 0,
        measured: Measured | None = None,
    ) -> None:
        """Pack one completion event; never raises (the client's answer is already on its way)."""
        try:
            e2e_s = self.perf_clock() - t0
            flags = FLAG_STREAMED if streamed else 0
            if tokens is not None:
                inp, cached, out = tokens
            else:  # no usage in the answer: the arrival's input count, output = content events seen
                inp, cached, out = (measured.input_tokens if measured else 0), 0, meter.content_events
                if measured is not None and measured.estimated:
                    flags |= FLAG_ESTIMATED
            ttft = meter.first_s if (streamed and meter.first_s is not None) else math.nan
            tpot = math.nan
            # mean TPOT over the decode phase: (last token - first token) / (tokens after the first)
            if streamed and meter.first_s is not None and meter.last_s is not None and out > 1:
                tpot = (meter.last_s - meter.first_s) / (out - 1)
            ev = RequestEvent(arrival_s, inp, min(cached, inp) if inp else cached, out, ttft, tpot, e2e_s,
                              min(max(status, 0), 0xFFFF), endpoint, flags, request_id)
            self.requests[(ENDPOINT_NAMES[endpoint], status)] += 1
            self.publisher.add(ev.pack() if self.publisher.wire_version == 1 else ev.pack_v2())
            self.publisher.maybe_flush()
        except Exception:  # the client's answer is already on its way
            self.publisher.dropped["internal_error"] += 1
            log.exception("pd-router-tap: could not record an event")


# -- serving ---------------------------------------------------------------------------------------


def fit_fd_limit(max_connections: int) -> int:
    """Raise the soft fd limit toward the hard one; lower the connection cap if fds cannot cover it.

    Each client connection can hold a second fd toward the router, and refusals briefly
    hold one more: 3 per connection plus a reserve, so an fd shortage never turns into
    accept() errors on the listening socket.
    """
    need = 3 * max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        fitted = max(1, (soft - 64) // 3)
        log.warning("pd-router-tap: fd limit %d covers only %d connections: --max-connections %d -> %d",
                    soft, fitted, max_connections, fitted)
        return fitted
    return max_connections


@dataclass
class TapServer:
    """A listening tap: `runner` (aiohttp), the asyncio server, the bound port."""

    runner: web.AppRunner
    server: asyncio.Server
    port: int

    async def close(self) -> None:
        self.server.close()  # stop accepting; cleanup closes idle connections, waits for the rest
        await self.runner.cleanup()


async def start_server(tap: Tap, host: str, port: int, shutdown_grace_s: float = 10.0) -> TapServer:
    """Serve `tap` on host:port with the connection cap and the header timeout.

    The header timeout is the connection wrapper's (see _CountedProtocol); idle
    keep-alive connections are closed by aiohttp after 75 s, like nginx's default. On
    close, requests in flight get `shutdown_grace_s` to finish; then they are cut.
    """
    # lingering_time: after refusing a body (413) keep reading and discarding it for 2 s at most,
    # so the client can read the answer instead of a reset; then close
    runner = web.AppRunner(tap.app(), access_log=None, keepalive_timeout=KEEPALIVE_S,
                           handle_signals=False, lingering_time=2.0, shutdown_timeout=shutdown_grace_s)
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(tap.protocol_factory(runner.server), host, port, backlog=1024,
                                   reuse_address=True)
    return TapServer(runner, srv, srv.sockets[0].getsockname()[1])


async def _serve(tap: Tap, host: str, port: int, shutdown_grace_s: float) -> None:
    ts = await start_server(tap, host, port, shutdown_grace_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("pd-router-tap listening on %s:%d -> %s, publishing on %s", host, ts.port, tap.router_url,
             tap.publisher.endpoint)
    try:
        await stop.wait()
    finally:
        # stop accepting, let in-flight requests finish (aiohttp's shutdown), run cleanup
        await ts.close()


def parse_listen(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen={s!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def _positive(kind: type[float] | type[int], flag: str) -> Callable[[str], Any]:
    def conv(s: str) -> Any:
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}={s!r}: expected a number") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"{flag}={s!r}: must be > 0")
        return v

    return conv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pd-router-tap",
        description="Streaming pass-through in front of the SGLang router that publishes per-request events.",
        epilog="example: pd-router-tap --listen 0.0.0.0:30001 --router http://127.0.0.1:30000 "
               "--publish tcp://127.0.0.1:5557",
    )
    d = Limits()
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 30001), help="HOST:PORT to serve clients on")
    p.add_argument("--router", required=True, help="the router's base URL, e.g. http://127.0.0.1:30000")
    p.add_argument("--publish", default=None, help="ZeroMQ endpoint to bind the PUB socket on, e.g. tcp://127.0.0.1:5557")
    p.add_argument("--source-id", default=None, help="source id in frame headers (<= 16 bytes; default: the listen address)")
    p.add_argument("--sndhwm", type=int, default=1000, help="PUB send high-water mark, in frames")
    p.add_argument("--max-batch", type=int, default=512, help="events per frame at most")
    p.add_argument("--flush-interval-ms", type=float, default=50.0, help="publish pending events at least this often")
    p.add_argument("--max-pending", type=int, default=65536, help="events buffered at most; beyond that new ones drop")
    p.add_argument("--timeout-s", type=float, default=None, help="total upstream timeout per request (default: none)")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="event loop: uvloop when installed (auto, the default), or the standard one")
    p.add_argument("--shutdown-grace-s", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, requests in flight get this long to finish")
    p.add_argument("--wire-version", type=int, choices=(1, 2), default=2,
                   help="2: arrival + completion events (default); 1: completions only, for older controllers")
    g = p.add_argument_group("limits")
    g.add_argument("--allow-path", action="append", default=[], metavar="PATH",
                   help="also forward PATH (any method; a trailing * makes it a prefix), e.g. /get_server_info. "
                        "The router's admin API (/workers, /flush_cache, ...) is refused unless named here")
    g.add_argument("--max-body-mb", type=_positive(float, "--max-body-mb"), default=d.max_body_bytes / 2**20,
                   help="bodies over this are answered 413 (default %(default)s; the router's own is 512)")
    g.add_argument("--parse-limit-kb", type=_positive(float, "--parse-limit-kb"), default=d.parse_limit_bytes / 1024,
                   help="bodies up to this are parsed to measure them; larger ones stream unparsed (default %(default)s)")
    g.add_argument("--parse-budget-mb", type=_positive(float, "--parse-budget-mb"),
                   default=d.parse_budget_bytes / 2**20, help="all bodies held for parsing together at most")
    g.add_argument("--header-timeout-s", type=_positive(float, "--header-timeout-s"), default=d.header_timeout_s,
                   help="a request's headers must be complete within this of its first byte (or of the connection)")
    g.add_argument("--body-timeout-s", type=_positive(float, "--body-timeout-s"), default=d.body_timeout_s,
                   help="the whole body must arrive within this after the headers (408 otherwise)")
    g.add_argument("--max-connections", type=_positive(int, "--max-connections"), default=d.max_connections,
                   help="client connections at most; the next ones are answered 503")
    g.add_argument("--connect-retry-s", type=float, default=d.connect_retry_s,
                   help="retry connections the router refuses for this long, then 502 (0 = no retry)")
    g.add_argument("--bytes-per-token", type=_positive(float, "--bytes-per-token"), default=d.bytes_per_token,
                   help="estimate input tokens of text prompts as bytes / this")
    g.add_argument("--stream-usage", choices=("splice", "off"), default="splice",
                   help="splice: ask streaming OpenAI requests for usage (one inserted member, see docs); "
                        "off: forward every body byte for byte, output tokens = stream chunks")
    s = p.add_argument_group("security of the PUB socket (docs/security.md)")
    s.add_argument("--curve-secret-key", type=Path, default=None,
                   help="the tap's CURVE secret key file (NAME.key_secret, as written by `pd-controller agent --keygen`)")
    s.add_argument("--curve-authorized-keys", type=Path, default=None,
                   help="directory of the controllers' public keys (*.key) allowed to subscribe")
    s.add_argument("--publish-insecure", action="store_true",
                   help="allow a non-loopback --publish without CURVE (anyone who can connect reads the events)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, port = args.listen
    if (args.curve_secret_key is None) != (args.curve_authorized_keys is None):
        parser.error("--curve-secret-key and --curve-authorized-keys go together")
    try:
        limits = Limits(
            max_body_bytes=int(args.max_body_mb * 2**20), parse_limit_bytes=int(args.parse_limit_kb * 1024),
            parse_budget_bytes=int(args.parse_budget_mb * 2**20), header_timeout_s=args.header_timeout_s,
            body_timeout_s=args.body_timeout_s, max_connections=fit_fd_limit(args.max_connections),
            connect_retry_s=args.connect_retry_s, bytes_per_token=args.bytes_per_token,
            stream_usage=args.stream_usage == "splice", allow_paths=tuple(args.allow_path),
        )
    except ValueError as e:
        parser.error(str(e))
    curve: ServerCurve | None = None
    if args.curve_secret_key is not None:
        try:
            curve = load_server_curve(args.curve_secret_key, args.curve_authorized_keys)
        except CurveKeyError as e:
            print(f"pd-router-tap: error: {e}", file=sys.stderr)
            return 2
    try:
        pub = Publisher(
            args.publish, (args.source_id or f"{host}:{port}")[:16], sndhwm=args.sndhwm, max_batch=args.max_batch,
            max_pending=args.max_pending, flush_interval_s=args.flush_interval_ms / 1000.0,
            wire_version=args.wire_version, curve=curve, insecure=args.publish_insecure,
        )
    except (ValueError, zmq.ZMQError) as e:
        print(f"pd-router-tap: error: --publish={args.publish!r}: {e}", file=sys.stderr)
        return 2
    tap = Tap(args.router, pub, timeout_s=args.timeout_s, limits=limits)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.loop in ("auto", "uvloop"):
        try:
            import uvloop  # optional: the same proxy, a faster event loop (less added latency per chunk)

            loop_factory = uvloop.new_event_loop
        except ImportError:
            if args.loop == "uvloop":
                print("pd-router-tap: error: --loop uvloop: uvloop is not installed (pip install uvloop)",
                      file=sys.stderr)
                return 2
    log.info("pd-router-tap event loop: %s", "uvloop" if loop_factory else "asyncio")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(tap, host, port, args.shutdown_grace_s))
    except OSError as e:
        print(f"pd-router-tap: error: --listen={host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
