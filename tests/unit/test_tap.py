"""The tap against a small aiohttp upstream that answers like SGLang: bytes pass through, events come out.

The real router + emulated workers version of these checks is tests/e2e/test_tap_router.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct

import aiohttp
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from router_plugin.tap import Limits, Publisher, StreamMeter, Tap, start_server
from router_plugin.wire import (
    ARRIVAL,
    ENDPOINTS,
    FLAG_STREAMED,
    HEADER,
    KIND_ARRIVAL,
    RECORD_V2,
    decode_header,
    frame_kind,
)

SEEN = web.AppKey("seen", list)
HEADERS = web.AppKey("headers", list)
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 2}}


def _sse(objs: list[object]) -> list[bytes]:
    return [b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs] + [b"data: [DONE]\n\n"]


async def upstream_handler(request: web.Request) -> web.StreamResponse:
    """SGLang-shaped answers. Records what it received so tests can check the injected stream_options."""
    body = await request.json() if request.can_read_body else {}
    request.app[SEEN].append((request.path, body))
    stream = bool(body.get("stream"))
    if request.path == "/generate":
        metas = [{"prompt_tokens": 5, "completion_tokens": i, "cached_tokens": 1} for i in (1, 2, 3)]
        if not stream:
            return web.json_response({"text": "abc", "meta_info": metas[-1]})
        events = _sse([{"text": "abc"[: i + 1], "meta_info": m} for i, m in enumerate(metas)])
    else:
        chat = request.path == "/v1/chat/completions"
        if not stream:
            return web.json_response({"id": "x", "choices": [{"text": "abc"}], "usage": USAGE})
        chunks: list[object] = [
            {"id": "x", "choices": [{"delta": {"content": c}} if chat else {"text": c}], "usage": None} for c in "abc"
        ]
        so = body.get("stream_options") or {}
        if so.get("include_usage"):
            chunks.append({"id": "x", "choices": [], "usage": USAGE})
        events = _sse(chunks)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    # split events across writes at odd places: the tap must re-frame correctly
    raw = b"".join(events)
    for i in range(0, len(raw), 13):
        await resp.write(raw[i : i + 13])
        await asyncio.sleep(0.02 if body.get("slow") else 0)
    await resp.write_eof()
    return resp


async def echo_headers(request: web.Request) -> web.Response:
    request.app[HEADERS].append(dict(request.headers))
    return web.Response(text="ok", headers={"Set-Cookie": "session=abc"})


async def other_handler(request: web.Request) -> web.Response:
    request.app[SEEN].append((request.path, request.method))
    return web.Response(body=b"\x00raw-bytes" + request.query_string.encode(), status=203, headers={"X-Up": "1"})


@pytest.fixture
async def upstream():
    app = web.Application()
    app[SEEN] = []
    app[HEADERS] = []
    app.router.add_get("/echo-headers", echo_headers)
    for p in ENDPOINTS:
        app.router.add_post(p, upstream_handler)
    app.router.add_route("*", "/{tail:.*}", other_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", app
    await runner.cleanup()


@pytest.fixture
async def tap_server(upstream):
    url, upapp = upstream
    ctx = zmq.asyncio.Context()
    pub = Publisher("tcp://127.0.0.1:0", "tap-test", ctx=ctx, flush_interval_s=0.01)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    # /echo-headers is not serving API: it is forwarded only because it is allow-listed here
    tap = Tap(url, pub, limits=Limits(allow_paths=("/echo-headers",)))
    server = await start_server(tap, "127.0.0.1", 0)
    await asyncio.sleep(0.2)  # ZeroMQ slow joiner: let SUB connect before events flow
    yield f"http://127.0.0.1:{server.port}", url, tap, sub, upapp
    await server.close()
    sub.close(linger=0)
    ctx.term()




async def _events(sub, n: int) -> tuple[list[tuple], list[tuple]]:
    """(arrivals, completions) until n completions have come; completion tuples end with the request id."""
    arrivals: list[tuple] = []
    out: list[tuple] = []
    while len(out) < n:
        frame = await asyncio.wait_for(sub.recv(), 5)
        version, rsize, count, source, _seq = decode_header(frame)
        assert (version, source) == (2, "tap-test")
        if frame_kind(frame) == KIND_ARRIVAL:
            assert rsize == ARRIVAL.size
            arrivals += [ARRIVAL.unpack_from(frame, HEADER.size + i * rsize) for i in range(count)]
        else:
            assert rsize == RECORD_V2.size
            out += [RECORD_V2.unpack_from(frame, HEADER.size + i * rsize) for i in range(count)]
    return arrivals, out


async def _records(sub, n: int) -> list[tuple]:
    """Completion records as the 10 fields both wire versions share."""
    return [r[:10] for r in (await _events(sub, n))[1]]


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize("stream", [False, True])
async def test_bodies_identical_and_event_published(tap_server, path, stream):
    tap_url, up_url, _tap, sub, upapp = tap_server
    if path == "/generate":
        body = {"stream": stream, "text": "hi"}
    else:
        body = {"model": "m", "stream": stream, "prompt" if path == "/v1/completions" else "messages": "hi"}
    async with aiohttp.ClientSession() as s:
        async with s.post(up_url + path, json=body) as r:
            direct = await r.read()
        async with s.post(tap_url + path, json=body) as r:
            via = await r.read()
            assert r.status == 200
    assert via == direct
    (rec,) = await _records(sub, 1)
    arrival, inp, cached, out, ttft, tpot, e2e, status, ep, flags = rec
    assert status == 200 and ep == ENDPOINTS[path]
    assert (inp, cached, out) == ((5, 1, 3) if path == "/generate" else (7, 2, 3))
    assert bool(flags & FLAG_STREAMED) == stream
    assert e2e > 0 and arrival > 1e9
    if stream:
        assert 0 <= ttft <= e2e and tpot >= 0
    else:
        assert math.isnan(ttft) and math.isnan(tpot)
    # the tap asked the upstream for usage on OpenAI streams, and only there
    sent = upapp[SEEN][-1][1]
    want_usage = stream and path != "/generate"
    assert bool((sent.get("stream_options") or {}).get("include_usage")) == want_usage


async def test_client_that_asked_for_usage_keeps_it(tap_server):
    tap_url, up_url, _tap, sub, _ = tap_server
    body = {"stream": True, "prompt": "hi", "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as s:
        async with s.post(up_url + "/v1/completions", json=body) as r:
            direct = await r.read()
        async with s.post(tap_url + "/v1/completions", json=body) as r:
            via = await r.read()
    assert via == direct and b'"choices": [], "usage"' in via
    (rec,) = await _records(sub, 1)
    assert rec[1:4] == (7, 2, 3)


async def test_read_only_serving_paths_pass_through(tap_server):
    tap_url, _up_url, tap, _sub, upapp = tap_server
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/models?x=1", "/v1/models/m?x=1", "/health?x=1", "/health_generate?x=1"):
            async with s.get(tap_url + path) as r:
                assert r.status == 203 and r.headers["X-Up"] == "1"
                assert await r.read() == b"\x00raw-bytesx=1"
        async with s.get(tap_url + "/tap/metrics") as r:
            text = await r.text()
    assert 'pdtap_events_dropped_total{reason="hwm"} 0' in text
    assert tap.publisher.published == 0 and len(upapp[SEEN]) == 4


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PUT", "PATCH"])
@pytest.mark.parametrize("path", ["/workers", "/workers/abc", "/flush_cache", "/add_worker?url=http://x",
                                  "/remove_worker?url=http://x", "/list_workers", "/v1/rl/workers/1/engine/x",
                                  "/get_server_info", "/metrics", "/v1/models"])
async def test_admin_api_is_never_forwarded(tap_server, method, path):
    """Issue 13: `DELETE /workers` through the tap removed every worker. Now the router never sees it."""
    tap_url, _up_url, tap, _sub, upapp = tap_server
    if path == "/v1/models" and method == "GET":
        return  # serving API
    async with aiohttp.ClientSession() as s, s.request(method, tap_url + path, json={"url": "http://evil:1"}) as r:
        assert r.status == 404
        assert "not forwarded" in await r.text()
    assert upapp[SEEN] == []
    assert tap.refused["not_forwarded"] == 1


async def test_allow_path_forwards_exactly_what_it_names(upstream):
    url, upapp = upstream
    tap = Tap(url, Publisher(None, "x"), limits=Limits(allow_paths=("/get_server_info", "/v1/files/*")))
    server = await start_server(tap, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as s:
            for path, want in (("/get_server_info", 203), ("/v1/files/a/b", 203), ("/get_server_info/x", 404),
                               ("/workers", 404)):
                async with s.post(base + path) as r:
                    assert r.status == want, path
        assert [p for p, _m in upapp[SEEN]] == ["/get_server_info", "/v1/files/a/b"]
    finally:
        await server.close()


async def test_router_down_gives_502_after_bounded_retries_and_event(registry):
    ctx = zmq.Context()
    pub = Publisher(None, "x", ctx=ctx)
    tap = Tap("http://127.0.0.1:9", pub, limits=Limits(connect_retry_s=1.0))
    # discard port: nothing listens; 1 s of retries (50, 100, 200, 400 ms) leaves room for a loaded machine
    server = await start_server(tap, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{server.port}/generate", json={}) as r:
            assert r.status == 502
        pub.flush()
        assert pub.dropped["no_socket"] == 2  # the arrival and the completion
        assert 2 <= tap.connect_retries <= 4 and tap.unreachable == 1  # bounded: 50+100+200+400 ms fit in 1 s
        assert "pdtap_router_unreachable_total 1" in tap.metrics_text()
    finally:
        await server.close()
        ctx.term()


def test_publisher_never_blocks_and_counts_hwm_drops():
    """A PUB with no subscriber and a tiny HWM: sends never block; what cannot go is counted."""
    ctx = zmq.Context()
    pub = Publisher("tcp://127.0.0.1:0", "s", ctx=ctx, sndhwm=1, max_batch=2, max_pending=10)
    rec = struct.pack("<dIIIfffHBBQ", 1.0, 1, 0, 1, 0.1, 0.01, 0.2, 200, 1, 0, 7)
    for _ in range(15):
        pub.add(rec)
    assert pub.dropped["buffer_full"] == 5 and len(pub.pending) == 10
    pub.flush()  # PUB with no peer drops silently: every frame "sent", sequence numbers advance
    assert pub.seq == 5 and not pub.pending
    pub.close()
    ctx.term()


def test_publisher_bad_batch():
    with pytest.raises(ValueError, match="max_batch=0"):
        Publisher(None, "s", max_batch=0)


def test_stream_meter_strips_only_the_usage_chunk():
    t = iter(range(100))
    m = StreamMeter(0.0, lambda: float(next(t)), strip_usage=True)
    events = _sse([{"choices": [{"text": "a"}], "usage": None}, {"choices": [], "usage": USAGE}])
    raw = b"".join(events)
    out = b"".join(m.feed(raw[i : i + 5]) for i in range(0, len(raw), 5)) + m.finish()
    assert out == events[0] + events[2]
    assert m.final_tokens() == (7, 2, 3) and m.content_events == 1


async def test_tap_metrics_parse_and_pass_promtool(tap_server):
    import shutil
    import subprocess

    from prometheus_client.parser import text_string_to_metric_families

    tap_url, _up, tap, _sub, _ = tap_server
    tap.publisher.dropped["hwm"] += 3
    async with aiohttp.ClientSession() as s:
        async with s.post(tap_url + "/generate", json={"text": "x"}) as r:
            await r.read()
        async with s.get(tap_url + "/tap/metrics") as r:
            text = await r.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    drops = {x.labels["reason"]: x.value for x in fams["pdtap_events_dropped"].samples}
    assert drops["hwm"] == 3 and drops["buffer_full"] == 0
    assert fams["pdtap_requests"].samples[0].labels == {"endpoint": "/generate", "status": "200"}
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


async def test_tap_adds_no_headers_and_keeps_no_cookies(tap_server):
    """The router must see the client's headers only, and one client's cookie never reaches another's request."""
    tap_url, _up, _tap, _sub, upapp = tap_server
    seen = upapp[HEADERS]
    skip = ("User-Agent", "Accept-Encoding")
    async with aiohttp.ClientSession(skip_auto_headers=skip) as s, s.get(
        tap_url + "/echo-headers", headers={"X-Client": "1"}
    ) as r:
        assert r.headers["Set-Cookie"] == "session=abc"
    async with aiohttp.ClientSession(skip_auto_headers=skip) as s, s.get(tap_url + "/echo-headers") as r:
        await r.read()
    assert seen[0].get("X-Client") == "1"
    for h in seen:
        assert "Cookie" not in h and "Accept-Encoding" not in h and "User-Agent" not in h


async def test_client_leaving_mid_stream_is_recorded_and_the_tap_goes_on(tap_server):
    tap_url, _up, tap, sub, _ = tap_server
    async with aiohttp.ClientSession() as s:
        r = await s.post(tap_url + "/v1/completions", json={"stream": True, "prompt": "x", "slow": True})
        await r.content.readany()
        r.close()  # hang up after the first bytes
        recs = await _records(sub, 1)
        async with s.post(tap_url + "/generate", json={"text": "x"}) as r2:
            assert r2.status == 200
    assert recs[0][7] == 499  # recorded as "client closed"
    assert (await _records(sub, 1))[0][7] == 200
    assert tap.publisher.dropped["internal_error"] == 0


_chunk_objs = st.one_of(
    st.builds(lambda t: {"choices": [{"text": t}], "usage": None}, st.text(max_size=8)),
    st.builds(lambda t: {"text": t, "meta_info": {"prompt_tokens": 3, "completion_tokens": 1, "cached_tokens": 0}},
              st.text(max_size=8)),
)


@given(
    objs=st.lists(_chunk_objs, max_size=12),
    with_usage=st.booleans(),
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    crlf=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_stream_meter_is_a_transparent_reframer(objs, with_usage, cuts, crlf):
    """Any SSE stream cut at any byte positions: without stripping the output is the input; with
    stripping it is the input minus exactly the usage-only chunk."""
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    events = [b"data: " + json.dumps(o).encode() + sep for o in objs]
    usage_ev = b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + sep
    done = b"data: [DONE]" + sep
    stream = b"".join(events) + (usage_ev if with_usage else b"") + done
    for strip in (False, True):
        m = StreamMeter(0.0, lambda: 1.0, strip_usage=strip)
        out, i, k = [], 0, 0
        while i < len(stream):
            step = cuts[k % len(cuts)]
            out.append(m.feed(stream[i : i + step]))
            i += step
            k += 1
        out.append(m.finish())
        got = b"".join(out)
        want = stream.replace(usage_ev, b"") if (strip and with_usage) else stream
        assert got == want
        assert m.content_events == len(objs)
        if with_usage:
            assert m.final_tokens() == (7, 2, 3)
