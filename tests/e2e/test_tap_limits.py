"""The tap as its own process under a burst of large bodies (issue 13: 4 x 200 MB took it from 31 MB to 2.4 GB).

The upstream here is a small aiohttp server that reads and discards what it gets
(the real router would spend its own memory on such bodies, which is the router's
business; what is measured is the tap's). Memory is read from /proc: the peak
(VmHWM) during the burst and the resident set after it.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.e2e._tap_procs import TapProc

pytestmark = pytest.mark.e2e

MB = 1024 * 1024


async def _discard(request: web.Request) -> web.Response:
    n = 0
    async for chunk in request.content.iter_any():
        n += len(chunk)
    return web.json_response({"n": n, "meta_info": {"prompt_tokens": 1, "completion_tokens": 1}})


async def test_burst_of_large_bodies_keeps_tap_memory_flat(tmp_path):
    app = web.Application()
    app.router.add_post("/generate", _discard)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    tap = await asyncio.to_thread(TapProc, f"http://127.0.0.1:{port}", tmp_path,
                                  extra_args=("--max-body-mb", "128"))
    size = 96 * MB
    block = b"a" * MB

    async def body():
        yield b'{"text": "'
        for _ in range(size // MB):
            yield block
        yield b'"}'

    try:
        before = tap.memory_kb()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:

            async def one() -> int:
                async with s.post(tap.url + "/generate", data=body(),
                                  headers={"Content-Length": str(size + 12)}) as r:
                    assert (await r.json())["n"] == size + 12
                    return r.status

            assert await asyncio.gather(*(one() for _ in range(4))) == [200] * 4
            # and a declared body over the limit is refused before it is sent
            async with s.post(tap.url + "/generate", data=b"x",
                              headers={"Content-Length": str(200 * MB), "Expect": "100-continue"}) as r:
                assert r.status == 413
        after = tap.memory_kb()
        # 4 x 96 MB went through: the tap's peak grew by far less than one body
        assert after["VmHWM"] - before["VmRSS"] < 48 * 1024, (before, after)
        assert after["VmRSS"] - before["VmRSS"] < 32 * 1024, (before, after)
    finally:
        await asyncio.to_thread(tap.stop)
        await runner.cleanup()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_connection_cap_and_header_timeout_in_the_tap_process(tmp_path, loop):
    """The same bounds as the unit tests, in the real process, on each event loop it can run."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    tap = await asyncio.to_thread(TapProc, "http://127.0.0.1:9", tmp_path,
                                  extra_args=("--header-timeout-s", "0.5", "--max-connections", "2", "--loop", loop))
    try:
        r, w = await asyncio.open_connection("127.0.0.1", tap.port)
        w.write(b"GET /health HTTP/1.1\r\nX-Slow: ")
        await w.drain()
        assert await asyncio.wait_for(r.read(), 10) == b""  # cut off: headers never completed
        w.close()
        held = [await asyncio.open_connection("127.0.0.1", tap.port) for _ in range(2)]
        r, w = await asyncio.open_connection("127.0.0.1", tap.port)
        got = await asyncio.wait_for(r.read(200), 10)
        assert got.startswith(b"HTTP/1.1 503") and b"too many connections" in got, got
        for _r, hw in (*held, (r, w)):
            hw.close()
    finally:
        await asyncio.to_thread(tap.stop)
