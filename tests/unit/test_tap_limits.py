"""The tap's bounds (issue 13): body size, timeouts, connection cap, connect retries, bytes unchanged.

Each test drives the real tap server (start_server: the connection cap and the
header timeout live there) in front of a small aiohttp upstream that records the
raw bytes it received. Raw sockets where a well-behaved client library would hide
the case (partial headers, a declared but unsent body).
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp
import pytest
from aiohttp import web

from router_plugin.tap import Limits, Publisher, Tap, splice_include_usage, start_server, strict_object
from router_plugin.wire import ARRIVAL, FLAG_ESTIMATED, HEADER

RAW = web.AppKey("raw", list)
HITS = web.AppKey("hits", list)


async def _record_raw(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[RAW].append((request.path, dict(request.headers), body))
    return web.json_response({"text": "ok", "meta_info": {"prompt_tokens": 3, "completion_tokens": 1}})


async def _hash_body(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        n += len(chunk)
    request.app[RAW].append((request.path, dict(request.headers), h.hexdigest(), n))
    return web.json_response({"n": n})


async def _drop_connection(request: web.Request) -> web.Response:
    request.app[HITS].append(request.path)
    await request.read()
    assert request.transport is not None
    request.transport.abort()  # reached the router, which then failed: must not be retried
    return web.Response(text="never sent")


async def _start_upstream(port: int = 0) -> tuple[web.AppRunner, int, web.Application]:
    app = web.Application(client_max_size=1024**3)
    app[RAW] = []
    app[HITS] = []
    app.router.add_post("/generate", _record_raw)
    app.router.add_post("/v1/completions", _record_raw)
    app.router.add_post("/v1/chat/completions", _drop_connection)
    app.router.add_post("/v1/big", _hash_body)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1], app  # type: ignore[union-attr]


@pytest.fixture
async def upstream():
    runner, port, app = await _start_upstream()
    yield f"http://127.0.0.1:{port}", app
    await runner.cleanup()


async def _tap(url: str, **limits) -> tuple[Tap, object, str]:
    tap = Tap(url, Publisher(None, "t"), limits=Limits(**limits))
    server = await start_server(tap, "127.0.0.1", 0)
    return tap, server, f"http://127.0.0.1:{server.port}"


async def _raw(port: int, data: bytes, read_timeout: float = 10.0) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    try:
        return await asyncio.wait_for(r.read(65536), read_timeout)
    finally:
        w.close()


async def test_declared_body_over_the_limit_is_413_before_any_byte_is_read(upstream):
    url, app = upstream
    tap, server, _base = await _tap(url, max_body_bytes=1000)
    try:
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        got = await _raw(server.port, head % (10 * 1024**3))  # 10 GB declared, not one byte sent
        assert got.startswith(b"HTTP/1.1 413"), got
        # with Expect: 100-continue the client is refused before it sends anything
        got = await _raw(server.port, (head % 5000)[:-2] + b"Expect: 100-continue\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 413") and b"100 Continue" not in got
        assert app[RAW] == [] and tap.refused["too_large"] == 2
    finally:
        await server.close()


async def test_chunked_body_over_the_limit_is_refused_and_never_completes_upstream(upstream):
    url, app = upstream
    tap, server, base = await _tap(url, max_body_bytes=2_000_000, parse_limit_bytes=10_000)

    async def chunks():
        yield b'{"text": "'
        for _ in range(100):
            yield b"x" * 50_000  # 5 MB in all, no Content-Length: chunked
        yield b'"}'

    try:
        status = None
        try:
            async with aiohttp.ClientSession() as s, s.post(base + "/generate", data=chunks()) as r:
                status = r.status
        except aiohttp.ClientError:  # refused mid-upload: the client may see the reset before the 413
            pass
        assert status in (None, 413)
        await asyncio.sleep(0.2)
        assert app[RAW] == []  # the router never got a whole body to act on
        assert tap.refused["too_large"] == 1
    finally:
        await server.close()


async def test_large_body_streams_through_with_bounded_holding(upstream):
    """An 8 MB body passes intact with its Content-Length, while the tap holds at most the parse limit."""
    url, app = upstream
    tap, server, base = await _tap(url, parse_limit_bytes=64 * 1024, allow_paths=("/v1/big",))
    body = (b'{"text": "' + b"y" * (8 * 1024 * 1024) + b'"}')
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, tap.buffered)
            await asyncio.sleep(0)

    w = asyncio.create_task(watch())
    try:
        async with aiohttp.ClientSession() as s, s.post(base + "/v1/big", data=body) as r:
            assert r.status == 200 and (await r.json())["n"] == len(body)
    finally:
        w.cancel()
        await server.close()
    (_p, headers, digest, n) = app[RAW][0]
    assert digest == hashlib.sha256(body).hexdigest() and n == len(body)
    assert headers["Content-Length"] == str(len(body)) and "Transfer-Encoding" not in headers
    assert peak == 0  # unmeasured path: nothing held at all


async def test_measured_large_body_is_streamed_and_its_arrival_estimated(upstream):
    url, app = upstream
    pub = Publisher(None, "t", flush_interval_s=3600)  # keep the records to look at them
    tap = Tap(url, pub, limits=Limits(parse_limit_bytes=64 * 1024))
    server = await start_server(tap, "127.0.0.1", 0)
    body = b'{"text": "' + b"z" * 400_000 + b'", "sampling_params": {"max_new_tokens": 3}}'
    try:
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{server.port}/generate", data=body) as r:
            assert r.status == 200
        (arr,) = [ARRIVAL.unpack(r) for r in pub.pending_arrivals]  # before close() flushes them away
    finally:
        await server.close()
    assert app[RAW][0][2] == body
    assert arr[2] == -(-len(body) // 4) and arr[5] & FLAG_ESTIMATED  # bytes/4 of the whole body
    assert tap.buffered == 0


async def test_slow_body_is_408_within_the_body_timeout(upstream):
    url, app = upstream
    tap, server, _b = await _tap(url, body_timeout_s=0.5)
    try:
        got = await _raw(server.port, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"te")
        assert got.startswith(b"HTTP/1.1 408"), got
        assert app[RAW] == [] and tap.refused["body_timeout"] == 1
    finally:
        await server.close()


async def test_slow_headers_are_cut_off(upstream):
    url, _app = upstream
    tap, server, _b = await _tap(url, header_timeout_s=0.5)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        await w.drain()
        assert await asyncio.wait_for(r.read(), 10) == b""  # the tap closed the connection
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", server.port)  # nothing sent at all
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        assert tap.gate.header_timeouts == 2
        assert 'pdtap_refused_total{reason="header_timeout"} 2' in tap.metrics_text()
    finally:
        await server.close()


async def test_idle_keepalive_and_long_answers_outlive_the_header_timeout(upstream):
    """The header timer runs only while a request's headers are incomplete, not between requests."""
    url, _app = upstream
    _t, server, _b = await _tap(url, header_timeout_s=0.3)
    req = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{\"text\": \"a\"}"
    try:
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(2):
            w.write(req)
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            n = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")).split(b":")[1])
            await r.readexactly(n)
            await asyncio.sleep(0.8)  # idle for longer than the header timeout: still open
        w.close()
    finally:
        await server.close()


async def test_connections_over_the_cap_get_503_at_once(upstream):
    url, _app = upstream
    tap, server, base = await _tap(url, max_connections=3)
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    try:
        await asyncio.sleep(0.05)
        got = await _raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 503") and b"too many connections" in got
        assert tap.gate.refused == 1 and tap.gate.open == 3
        for _r, w in held:
            w.close()
        await asyncio.sleep(0.1)
        assert tap.gate.open == 0
        async with aiohttp.ClientSession() as s, s.post(base + "/generate", json={"text": "a"}) as r:
            assert r.status == 200  # room again
        assert 'pdtap_refused_total{reason="too_many_connections"} 1' in tap.metrics_text()
    finally:
        await server.close()


async def test_router_refusing_connections_is_retried_until_it_comes_up():
    """Issue 13: requests that never reached a restarting router failed. Now they wait for it."""
    from harness.fleet import free_port

    port = free_port()
    tap, server, base = await _tap(f"http://127.0.0.1:{port}", connect_retry_s=10.0)
    runner = None
    try:
        async with aiohttp.ClientSession() as s:
            req = asyncio.create_task(s.post(base + "/generate", json={"text": "a"}))
            await asyncio.sleep(0.5)  # the router is down: connects refused, retried
            assert not req.done()
            runner, _p, app = await _start_upstream(port)
            r = await asyncio.wait_for(req, 10)
            assert r.status == 200
            r.release()
        assert tap.connect_retries >= 1 and tap.unreachable == 0
        assert len(app[RAW]) == 1
    finally:
        await server.close()
        if runner is not None:
            await runner.cleanup()


async def test_request_that_reached_the_router_is_never_retried(upstream):
    url, app = upstream
    tap, server, base = await _tap(url, connect_retry_s=5.0)
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        async with aiohttp.ClientSession() as s, s.post(base + "/v1/chat/completions", json=body) as r:
            assert r.status == 502
        assert app[HITS] == ["/v1/chat/completions"] and tap.connect_retries == 0
    finally:
        await server.close()


ODD = [
    b'{"text": "a", "text": "b"}',
    b'{"model": "m", "prompt": "\\ud800", "stream": true}',
    b'{"model": "m", "prompt": "a", "prompt": "b", "stream": true}',
    b'{"model": "m", "prompt": "x", "stream": true, "n": NaN}',
    b'{"model": "m", "prompt": "x", "stream": true, "t": 1e999}',
    b'{"model": "m", "prompt": "x", "stream": true, "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"prompt": "x", "stream": true}',  # no model: the router's "missing field" error names the end
    b"\xef\xbb\xbf{\"model\": \"m\", \"prompt\": \"x\", \"stream\": true}",
    b'{"model": "m", "prompt": "x", "stream": true, "stream_options": null}',
    b"not json at all \xff",
]


@pytest.mark.parametrize("raw", ODD, ids=range(len(ODD)))
async def test_odd_bodies_reach_the_router_byte_for_byte(upstream, raw):
    """Issue 13: the tap parsed and re-serialised bodies, so the router judged something else."""
    url, app = upstream
    _t, server, base = await _tap(url)
    path = "/generate" if raw.startswith(b'{"text"') else "/v1/completions"
    try:
        async with aiohttp.ClientSession() as s, s.post(base + path, data=raw,
                                                        headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
    finally:
        await server.close()
    assert app[RAW][0][2] == raw


async def test_only_a_strict_streaming_body_is_spliced_and_only_at_its_end(upstream):
    url, app = upstream
    _t, server, base = await _tap(url)
    raw = b' {"model": "m", "prompt": "caf\xc3\xa9", "stream": true}\n'
    try:
        async with aiohttp.ClientSession() as s, s.post(base + "/v1/completions", data=raw) as r:
            assert r.status == 200
    finally:
        await server.close()
    sent = app[RAW][0][2]
    assert sent == b' {"model": "m", "prompt": "caf\xc3\xa9", "stream": true,"stream_options":{"include_usage":true}}\n'
    assert json.loads(sent)["stream_options"] == {"include_usage": True}


def test_stream_usage_off_never_splices():
    assert strict_object(b'{"a": [1, {"b": "c"}]}') == {"a": [1, {"b": "c"}]}
    for bad in (b'{"a": 1, "a": 2}', b'{"a": "\\udc00"}', b'{"a": Infinity}', b"[1]", b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}"):
        assert strict_object(bad) is None, bad
    with pytest.raises(ValueError, match="not a JSON object"):
        splice_include_usage(b"[1, 2]")


async def test_stream_usage_off_forwards_every_byte(upstream):
    url, app = upstream
    _t, server, base = await _tap(url, stream_usage=False)
    raw = b'{"model": "m", "prompt": "x", "stream": true}'
    try:
        async with aiohttp.ClientSession() as s, s.post(base + "/v1/completions", data=raw) as r:
            assert r.status == 200
    finally:
        await server.close()
    assert app[RAW][0][2] == raw


def test_limits_refuse_nonsense():
    for kw, msg in (({"max_body_bytes": 0}, "max_body_bytes=0"), ({"body_timeout_s": float("nan")}, "body_timeout_s"),
                    ({"allow_paths": ("workers",)}, "allow_paths item 'workers'"),
                    ({"connect_retry_s": -1.0}, "connect_retry_s=-1.0")):
        with pytest.raises(ValueError, match=msg):
            Limits(**kw)
    assert HEADER.size == 32


def test_measure_request_counts_ids_exactly_and_estimates_text():
    from router_plugin.tap import measure_request
    from router_plugin.wire import ENDPOINTS

    gen, comp, chat = ENDPOINTS["/generate"], ENDPOINTS["/v1/completions"], ENDPOINTS["/v1/chat/completions"]
    m = measure_request(gen, {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 9}}, 4.0, True)
    assert (m.input_tokens, m.estimated, m.max_tokens, m.splice_usage) == (5, False, 9, False)
    m = measure_request(comp, {"model": "x", "prompt": [7] * 11, "max_tokens": 3, "stream": True}, 4.0, True)
    assert (m.input_tokens, m.estimated, m.model, m.stream, m.splice_usage) == (11, False, "x", True, True)
    m = measure_request(comp, {"prompt": "abcdefgh" * 10, "stream": True, "stream_options": {}}, 4.0, True)
    assert (m.input_tokens, m.estimated, m.splice_usage) == (20, True, False)
    msgs = [{"role": "system", "content": "x" * 40}, {"role": "user", "content": [{"type": "text", "text": "y" * 8},
                                                                                  {"type": "image_url"}]}]
    m = measure_request(chat, {"messages": msgs, "max_completion_tokens": 5, "max_tokens": 99}, 4.0, False)
    assert (m.input_tokens, m.max_tokens, m.estimated) == (12 + 2 * 4, 5, True)  # 48 bytes / 4 + 4 per message
    for junk in (None, [], "x", {"input_ids": [True, 2]}, {"messages": "x"}, {"max_tokens": -3}, {"max_tokens": 1e99}):
        m = measure_request(gen, junk, 4.0, True)
        assert m.max_tokens in (0, 0xFFFFFFFF) and m.input_tokens >= 0
