"""The tap in front of the REAL sglang-router (PD mode) with emulated prefill/decode workers.

Byte identity: the same request goes once straight to the router and once
through the tap, and the response bodies are compared. Two requests can only
be compared if the worker answers both alike: each request carries the same
`rid` (SGLang uses it as the response id, and so does the emulated worker), and
the prompts are distinct per test so the prefix cache cannot make the second
answer report different `cached_tokens`. The one field that still differs
between two otherwise identical answers is `"created"`, the worker's clock in
whole seconds (SGLang's own behaviour, not the router's or the tap's); it is
normalised. On /v1/chat/completions sglang-router 0.3.2 does not forward
`rid` (it re-serialises chat requests from its typed model, which lacks the
field; /generate and /v1/completions keep it), so there the worker draws a
fresh random id per request: the 32-hex `"id"` is normalised for chat only.
Nothing else is. The router adds a random X-Request-ID *header*; headers are
not compared.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time

import aiohttp
import openai
import pytest
import zmq

from harness.fleet import EmulatedFleet
from router_plugin.wire import (
    ARRIVAL,
    ENDPOINTS,
    FLAG_ESTIMATED,
    FLAG_STREAMED,
    HEADER,
    KIND_ARRIVAL,
    RECORD_V2,
    decode_header,
    frame_kind,
)
from tests.e2e._tap_procs import TapProc

pytestmark = pytest.mark.e2e

CREATED = re.compile(rb'"created": ?\d+')
_n = itertools.count()


CHAT_ID = re.compile(rb'"id": ?"[0-9a-f]{32}"')


def norm(b: bytes, path: str = "") -> bytes:
    b = CREATED.sub(b'"created": 0', b)
    return CHAT_ID.sub(b'"id": "x"', b) if path == "/v1/chat/completions" else b


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tap-e2e")
    with EmulatedFleet("llama2-70b-h100-tp8", 1, 1, time_scale=0.01, log_dir=log_dir / "fleet", model="m") as fleet:
        tap = TapProc(fleet.router_url, log_dir)
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVTIMEO, 5000)
        sub.connect(tap.publish)
        time.sleep(0.3)  # slow joiner
        try:
            yield fleet, tap, sub
        finally:
            sub.close(linger=0)
            ctx.term()
            tap.stop()


ARRIVED: list[tuple] = []  # arrival records drained so far (drain() keeps them here)


def drain(sub) -> list[tuple]:
    """Completion records (the 10 fields of wire v1, then the request id); arrivals go to ARRIVED."""
    out = []
    while True:
        try:
            frame = sub.recv(zmq.NOBLOCK)
        except zmq.Again:
            return out
        _v, rsize, count, _src, _seq = decode_header(frame)
        rec = ARRIVAL if frame_kind(frame) == KIND_ARRIVAL else RECORD_V2
        got = [rec.unpack_from(frame, HEADER.size + i * rsize) for i in range(count)]
        if rec is ARRIVAL:
            ARRIVED.extend(got)
        else:
            out += got


def wait_records(sub, n: int) -> list[tuple]:
    recs: list[tuple] = []
    deadline = time.monotonic() + 10
    while len(recs) < n and time.monotonic() < deadline:
        recs += drain(sub)
        time.sleep(0.02)
    return recs


def body_for(path: str, stream: bool, usage: bool = False) -> dict:
    k = next(_n)
    rid = f"rid-{k}-{path.strip('/').replace('/', '-')}-{int(stream)}"
    if path == "/generate":
        return {"text": f"prompt {k} about tapping routers", "sampling_params": {"max_new_tokens": 6},
                "stream": stream, "rid": rid}
    b: dict = {"model": "m", "max_tokens": 6, "stream": stream, "rid": rid}
    if path == "/v1/completions":
        b["prompt"] = f"prompt {k} about tapping routers"
    else:
        b["messages"] = [{"role": "user", "content": f"prompt {k} about tapping routers"}]
    if usage:
        b["stream_options"] = {"include_usage": True}
    return b


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize("stream", [False, True])
async def test_bytes_identical_with_and_without_tap(stack, path, stream):
    fleet, tap, sub = stack
    drain(sub)
    body = body_for(path, stream)
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.router_url + path, json=body) as r:
            assert r.status == 200
            direct = await r.read()
        async with s.post(tap.url + path, json=body) as r:
            assert r.status == 200
            via = await r.read()
    assert norm(via, path) == norm(direct, path)
    if stream and path != "/generate":
        assert b'"usage"' not in via  # the chunk the tap asked for is gone
    ARRIVED.clear()
    (rec,) = wait_records(sub, 1)
    arr_s, inp, cached, out, ttft, _tpot, e2e, status, ep, flags, rid = rec
    assert (status, ep, bool(flags & FLAG_STREAMED)) == (200, ENDPOINTS[path], stream)
    assert inp > 0 and out == 6 and cached <= inp and e2e > 0
    if stream:
        assert 0 < ttft <= e2e
    # the arrival came first, with the same request id, the request's max_tokens and its model
    (a,) = [x for x in ARRIVED if x[1] == rid]
    a_s, _rid, a_inp, max_tokens, a_ep, a_flags, _res, model = a
    assert a_s == arr_s and a_ep == ep and max_tokens == 6 and bool(a_flags & FLAG_STREAMED) == stream
    assert a_flags & FLAG_ESTIMATED and a_inp > 0  # text prompts: estimated from bytes
    assert model.rstrip(b"\0") == (b"" if path == "/generate" else b"m")


async def test_client_usage_request_is_honoured(stack):
    fleet, tap, sub = stack
    drain(sub)
    body = body_for("/v1/chat/completions", True, usage=True)
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.router_url + "/v1/chat/completions", json=body) as r:
            direct = await r.read()
        async with s.post(tap.url + "/v1/chat/completions", json=body) as r:
            via = await r.read()
    assert norm(via, "/v1/chat/completions") == norm(direct, "/v1/chat/completions") and b'"usage"' in via
    (rec,) = wait_records(sub, 1)
    assert rec[3] == 6


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_client_sees_the_same_through_the_tap(stack, stream):
    fleet, tap, _sub = stack
    out = []
    for base in (fleet.router_url, tap.url):
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        try:
            for kind in ("chat", "completions"):
                b = body_for("/v1/chat/completions" if kind == "chat" else "/v1/completions", stream)
                extra = {"rid": b["rid"].replace(f"-{b['rid'].split('-')[1]}-", "-x-")}
                if kind == "chat":
                    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello tap"}],
                                                             max_tokens=5, stream=stream, extra_body=extra)
                else:
                    r = await client.completions.create(model="m", prompt="hello tap " + kind, max_tokens=5,
                                                        stream=stream, extra_body=extra)
                got = [c.model_dump() async for c in r] if stream else [r.model_dump()]
                for g in got:
                    g["created"] = 0
                    if kind == "chat":  # see the module docstring: the router drops rid on chat
                        g["id"] = "x"
                out.append(got)
        finally:
            await client.close()
    n = len(out) // 2
    assert out[:n] == out[n:]
    if stream:
        assert all(c.get("usage") is None for chunks in out for c in chunks)


async def test_exact_token_ids_are_counted_at_arrival(stack):
    _fleet, tap, sub = stack
    time.sleep(0.1)  # let the previous tests' events come in, and forget them
    drain(sub)
    ARRIVED.clear()
    body = {"input_ids": list(range(100, 137)), "sampling_params": {"max_new_tokens": 4}, "rid": f"ids-{next(_n)}"}
    async with aiohttp.ClientSession() as s, s.post(tap.url + "/generate", json=body) as r:
        assert r.status == 200
    (rec,) = wait_records(sub, 1)
    (a,) = [x for x in ARRIVED if x[1] == rec[10]]
    assert a[2] == 37 and not a[5] & FLAG_ESTIMATED and a[3] == 4


async def test_router_admin_api_is_not_reachable_through_the_tap(stack):
    """Issue 13: `DELETE /workers` sent to the tap removed every worker from the real router."""
    fleet, tap, _sub = stack
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.router_url + "/workers") as r:
            before = json.loads(await r.read())
        for w in before["workers"]:
            for method, path in (("DELETE", f"/workers/{w.get('id', 'x')}"), ("DELETE", "/workers"),
                                 ("POST", f"/remove_worker?url={w['url']}")):
                async with s.request(method, tap.url + path, json={"url": w["url"]}) as r:
                    assert r.status == 404, (method, path)
        async with s.post(tap.url + "/workers", json={"url": "http://127.0.0.1:9", "worker_type": "decode"}) as r:
            assert r.status == 404
        for path in ("/workers", "/flush_cache", "/get_server_info"):
            async with s.get(tap.url + path) as r:
                assert r.status == 404
        async with s.get(tap.url + "/health") as r:
            assert r.status == 200
        async with s.get(tap.url + "/v1/models") as r, s.get(fleet.router_url + "/v1/models") as r2:
            assert (r.status, await r.read()) == (r2.status, await r2.read())
        async with s.get(fleet.router_url + "/workers") as r:
            after = json.loads(await r.read())
    assert {w["url"] for w in after["workers"]} == {w["url"] for w in before["workers"]}


def _deep(n: int) -> bytes:
    return b'{"model": "m", "max_tokens": 2, "prompt": "x", "extra": ' + b"[" * n + b"]" * n + b"}"


# bodies the tap used to parse and re-serialise (500 where the router says 400, 200 where it says 422)
ODD_BODIES = [
    ("/v1/completions", _deep(100_000)),
    ("/v1/chat/completions", _deep(100_000)),
    ("/v1/chat/completions",
     b'{"model": "m", "max_tokens": 2, "stream": true, "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/completions", b'{"model": "m", "max_tokens": 2, "stream": true, "prompt": "a \\udfff b"}'),
    ("/v1/completions", b'{"model": "m", "max_tokens": 2, "prompt": "a", "prompt": "b", "stream": true}'),
    ("/v1/chat/completions", b'{"model": "m", "max_tokens": 2, "messages": [], "messages": '
                             b'[{"role": "user", "content": "hi"}], "stream": true}'),
    ("/generate", b'{"text": "a", "text": "b", "sampling_params": {"max_new_tokens": 2}}'),
    ("/generate", b'{"text": "\\ud800", "stream": true, "sampling_params": {"max_new_tokens": 2}}'),
    ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": 2, "stream": true, "stream": false}'),
    ("/v1/completions", b'\xff\xfe not json'),
]


@pytest.mark.parametrize(("path", "raw"), ODD_BODIES, ids=range(len(ODD_BODIES)))
async def test_odd_bodies_get_what_the_router_answers(stack, path, raw):
    """Issue 13: nested JSON, a lone surrogate with stream: true, duplicate keys: same status as the router."""
    fleet, tap, _sub = stack
    hdr = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.router_url + path, data=raw, headers=hdr) as r:
            direct = (r.status, await r.read())
        async with s.post(tap.url + path, data=raw, headers=hdr) as r:
            via = (r.status, await r.read())
    assert via[0] == direct[0], (via, direct)
    if direct[0] != 200:  # an error answer is the router's own, byte for byte
        assert via[1] == direct[1]


async def test_tap_serves_concurrent_mixed_load(stack):
    """Concurrent streaming and non-streaming requests through the tap: every one answered."""
    _fleet, tap, _sub = stack
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> int:
            async with s.post(tap.url + "/v1/completions", json=body_for("/v1/completions", bool(i % 2))) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(40)))
    assert statuses == [200] * 40
    assert 'pdtap_requests_total{endpoint="/v1/completions",status="200"}' in tap.metrics()
