"""Prometheus scraping of a router-shaped HTTP server: deltas -> pool stats and synthesized events; garbage counted."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from controller.metrics import ControllerMetrics
from controller.telemetry.fleet import RouterFleet, parse_workers
from controller.telemetry.hub import TelemetryHub
from controller.telemetry.scrape import PrometheusScraper, ScrapeError, parse_exposition

P, D = "http://127.0.0.1:7001", "http://127.0.0.1:7002"
MODE = web.AppKey("mode", dict)


class Engine:
    """Worker metrics as the router's /engine_metrics shows them: sglang:* with a worker label."""

    def __init__(self) -> None:
        r = self.reg = CollectorRegistry()
        lab = ["worker"]
        self.req = Counter("sglang:num_requests", "", lab, registry=r)
        self.prompt = Counter("sglang:prompt_tokens", "", lab, registry=r)
        self.gen = Counter("sglang:generation_tokens", "", lab, registry=r)
        self.cached = Counter("sglang:cached_tokens", "", lab, registry=r)
        self.running = Gauge("sglang:num_running_reqs", "", lab, registry=r)
        self.queue = Gauge("sglang:num_queue_reqs", "", lab, registry=r)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "", lab, registry=r)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "", lab, registry=r)

    def serve(self, n: int, inp: int, out: int, cached: int) -> None:
        for w in (P, D):
            self.req.labels(w).inc(n)
        self.prompt.labels(P).inc(n * inp)
        self.cached.labels(P).inc(n * cached)
        self.gen.labels(D).inc(n * out)
        for _ in range(n):
            self.ttft.labels(D).observe(0.2)
            self.itl.labels(D).observe(0.02)
        self.running.labels(D).set(6)
        self.queue.labels(P).set(2)


@pytest.fixture
async def router():
    eng = Engine()
    app = web.Application()
    app[MODE] = {"engine": "ok"}

    async def engine_metrics(request: web.Request) -> web.Response:
        mode = request.app[MODE]["engine"]
        if mode == "garbage":
            return web.Response(text="sglang:num_requests_total{worker=\"x\" 12 oops\n")
        if mode == "500":
            return web.Response(status=500, text="no")
        if mode == "slow":
            await asyncio.sleep(0.6)
        return web.Response(body=generate_latest(eng.reg), content_type="text/plain")

    async def metrics(_r: web.Request) -> web.Response:
        return web.Response(text=f'smg_worker_requests_active{{worker="{P}"}} 3\nsmg_worker_requests_active{{worker="{D}"}} 4\n')

    async def workers(_r: web.Request) -> web.Response:
        return web.json_response({"workers": [
            {"id": "1", "url": P, "worker_type": "prefill", "is_healthy": True, "load": 1},
            {"id": "2", "url": D, "worker_type": "decode", "is_healthy": True, "load": 2},
            {"id": "3", "url": "http://127.0.0.1:7003", "worker_type": "decode", "is_healthy": False},
        ]})

    app.router.add_get("/engine_metrics", engine_metrics)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/workers", workers)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", eng, app
    await runner.cleanup()


async def test_scrape_deltas_give_stats_and_synthesized_events(router, registry):
    url, eng, _app = router
    t = [1000.0]
    hub = TelemetryHub(metrics=ControllerMetrics(registry))
    fleet = RouterFleet(url, hub, lambda: t[0])
    sc = PrometheusScraper(url, hub, lambda: t[0], metrics_url=url + "/metrics", synthesize=True,
                           roles=fleet.roles, metrics=ControllerMetrics(CollectorRegistry()))
    async with aiohttp.ClientSession() as s:
        assert await fleet.refresh(s)
        assert (fleet.view().serving_prefill, fleet.view().serving_decode) == (1, 1)  # unhealthy one not counted
        eng.serve(5, 100, 10, 0)
        first = await sc.scrape_once(s)
        assert first is not None and first.events.size == 0  # no baseline yet
        eng.serve(40, 1000, 50, 250)
        t[0] += 10.0
        res = await sc.scrape_once(s)
    assert res is not None
    ev = res.events
    assert ev.size == 40 and set(ev["flags"]) == {2}  # once per request (decode side), not once per worker
    assert set(ev["input_tokens"]) == {1000} and set(ev["output_tokens"]) == {50} and set(ev["cached_tokens"]) == {250}
    assert ev["arrival_s"].max() <= 1010.0 and ev["ttft_s"][0] == pytest.approx(0.2)
    st = res.stats
    assert st.in_flight == 4  # decode side of the router's active requests
    assert st.decode_running_mean == 6 and st.prefill_queued == 2
    assert st.decode_tpot_ms_mean == pytest.approx(20.0)
    assert res.per_worker[D]["running"] == 6 and res.per_worker[D]["tpot_ms"] == pytest.approx(20.0)
    assert res.per_worker[D]["ttft_s"] == pytest.approx(0.2) and res.per_worker[P]["queued"] == 2
    assert hub.events_total["scrape"] == 40


@pytest.mark.parametrize(("mode", "reason"), [("garbage", "scrape_parse_error"), ("500", "scrape_http_error"),
                                              ("slow", "scrape_timeout")])
async def test_bad_scrapes_counted_not_fatal(router, registry, mode, reason):
    url, _eng, app = router
    app[MODE]["engine"] = mode
    m = ControllerMetrics(registry)
    hub = TelemetryHub(metrics=m)
    sc = PrometheusScraper(url, hub, lambda: 1.0, timeout_s=0.2, metrics=m)
    async with aiohttp.ClientSession(timeout=sc.timeout) as s:
        assert await sc.scrape_once(s) is None
        app[MODE]["engine"] = "ok"
        assert await sc.scrape_once(s) is not None
    assert dict(hub.dropped_total) == {reason: 1}
    assert registry.get_sample_value("pdctl_scrapes_total", {"target": "engine", "result": "ok"}) == 1


async def test_unreachable_router_counted(registry):
    hub = TelemetryHub()
    sc = PrometheusScraper("http://127.0.0.1:9", hub, lambda: 1.0, timeout_s=0.5)
    fleet = RouterFleet("http://127.0.0.1:9", hub, lambda: 1.0)
    async with aiohttp.ClientSession(timeout=sc.timeout) as s:
        assert await sc.scrape_once(s) is None
        assert not await fleet.refresh(s)
    assert dict(hub.dropped_total) == {"scrape_unreachable": 1, "workers_error": 1}
    assert fleet.view() is None


def test_parse_exposition_skips_nan_and_negative():
    s = parse_exposition('a{worker="w"} NaN\nb{worker="w"} -3\nc{worker="w"} 2\nc{worker="v"} 1\n')
    assert s == {"c": {"w": 2.0, "v": 1.0}}
    with pytest.raises(ScrapeError):
        parse_exposition("x{ 1\n")


def test_parse_workers_rejects_bad_shapes():
    with pytest.raises(ValueError, match="unexpected /workers body"):
        parse_workers([1, 2])
    assert parse_workers({"workers": [{"url": "http://a/", "worker_type": "decode", "load": True}, "junk"]})[0].load is None
