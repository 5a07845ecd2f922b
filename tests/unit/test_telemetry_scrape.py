"""Prometheus scraping of a router-shaped HTTP server: deltas -> pool stats and synthesized events; garbage counted."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
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


# ---- the one /workers reader: smg's shape (status, draining) and 0.3.2's --------------------------------------

def smg_body(*entries: tuple[str, str, str]) -> dict:
    return {"workers": [{"id": f"01a2-{i}", "url": u, "worker_type": t, "is_healthy": st == "ready", "status": st,
                         "load": 0, **({"bootstrap_port": 9000 + i} if t == "prefill" else {})}
                        for i, (u, t, st) in enumerate(entries)], "total": len(entries)}


def test_fleet_snapshot_counts_serving_workers_and_tracks_changes(registry):
    hub = TelemetryHub(metrics=ControllerMetrics(registry))
    fleet = RouterFleet("http://r", hub, lambda: 0.0)
    a, b, c = "http://a:1", "http://b:1", "http://c:1"
    snap = fleet.ingest(smg_body((a, "prefill", "ready"), (b, "decode", "ready"), (c, "decode", "ready")), 10.0)
    assert snap.dialect == "smg" and snap.view().serving_prefill == 1 and snap.view().serving_decode == 2 and not snap.changes
    # c deregistered: smg lists it draining (not healthy) through its settle; it no longer serves decode
    snap = fleet.ingest(smg_body((a, "prefill", "ready"), (b, "decode", "ready"), (c, "decode", "draining")), 12.0)
    assert snap.view().serving_decode == 1 and snap.roles()[c] == "decode"
    assert [(x.url, x.kind, x.since_s) for x in snap.changes] == [(c, "draining", 12.0)]
    snap = fleet.ingest(smg_body((a, "prefill", "ready"), (b, "decode", "ready"), (c, "decode", "draining")), 14.0)
    assert snap.changes[0].since_s == 12.0  # first seen, not last seen
    assert [(t.target_role, t.kind, t.started_s, t.worker) for t in snap.view().transitions] == [
        (None, "stop", 12.0, c)]
    # gone (still a transition: it holds its GPU), then back as prefill, not yet healthy: a flip from decode
    snap = fleet.ingest(smg_body((a, "prefill", "ready"), (b, "decode", "ready")), 16.0)
    assert [(x.kind, x.since_s) for x in snap.changes] == [("gone", 12.0)]
    snap = fleet.ingest(smg_body((a, "prefill", "ready"), (b, "decode", "ready"), (c, "prefill", "pending")), 18.0)
    kinds = {(x.kind, x.from_role, x.since_s) for x in snap.changes}
    assert ("role_changed", "decode", 12.0) in kinds and snap.view().serving_prefill == 1
    assert [(t.target_role, t.kind, t.started_s) for t in snap.view().transitions] == [("prefill", "flip", 12.0)]
    snap = fleet.ingest(smg_body((a, "prefill", "ready"), (b, "decode", "ready"), (c, "prefill", "ready")), 20.0)
    assert not snap.changes and snap.view().serving_prefill == 2 and not snap.view().transitions
    w = snap.by_url()[c]
    assert w.id == "01a2-2" and w.bootstrap_port == 9002 and not w.draining
    # 0.3.2 lists no status: legacy; an empty fleet keeps what was learnt
    legacy = RouterFleet("http://r", hub, lambda: 0.0)
    assert legacy.ingest({"workers": [{"id": "x", "url": a, "worker_type": "decode", "is_healthy": True}]},
                         1.0).dialect == "legacy"
    assert legacy.ingest({"workers": []}, 2.0).dialect == "legacy"


def test_router_actuator_reads_workers_through_the_same_parser():
    from controller.actuators.router import worker_views

    views = worker_views(smg_body(("http://a:1", "prefill", "ready"), ("http://c:1", "decode", "draining"),
                                  ("http://r:1", "regular", "ready")))
    assert [(v.url, v.role, v.state, v.router_id) for v in views] == [
        ("http://a:1", "prefill", "serving", "01a2-0"), ("http://c:1", "decode", "draining", "01a2-1")]


# ---- tap-free telemetry: length distributions from SGLang's token histograms -----------------------------------

def test_hist_delta_quantiles_follow_promql_and_sample_keeps_the_mean():
    from controller.telemetry.scrape import hist_delta

    def samples(c100, c300, c500, total):
        cum = [c100, c100 + c300, c100 + c300 + c500]
        d = {f"h_bucket|{b}": {"w": float(v)} for b, v in zip(("100.0", "300.0", "+Inf"), cum, strict=True)}
        return d | {"h_sum": {"w": float(total)}, "h_count": {"w": float(cum[-1])}}

    old, cur = samples(0, 0, 0, 0), samples(10, 30, 0, 10 * 50 + 30 * 200)
    h = hist_delta(cur, old, "h", lambda _w: True)
    assert h is not None and h.count == 40 and h.mean == pytest.approx(162.5)
    assert h.quantile(0.25) == pytest.approx(100.0)  # rank 10 = top of the first bucket
    assert h.quantile(0.625) == pytest.approx(100 + 200 * 15 / 30)  # linear inside (100, 300]
    v = h.sample(40)
    assert v.mean() == pytest.approx(162.5) and v.min() >= 0 and len(v) == 40
    assert hist_delta(cur, old, "missing", lambda _w: True) is None


def _token_engine(obs: list[tuple[int, int, int]]):
    """A P and a D worker exporting the three token histograms (SGLang's buckets) after `obs` requests."""
    from controller.emulator.metrics import TOKEN_BUCKETS

    r = CollectorRegistry()
    lab = ["worker_addr", "model_name"]
    hp = Histogram("sglang:prompt_tokens_histogram", "", lab, buckets=TOKEN_BUCKETS, registry=r)
    hu = Histogram("sglang:uncached_prompt_tokens_histogram", "", lab, buckets=TOKEN_BUCKETS, registry=r)
    hg = Histogram("sglang:generation_tokens_histogram", "", lab, buckets=TOKEN_BUCKETS, registry=r)
    ttft = Histogram("sglang:time_to_first_token_seconds", "", lab, registry=r)
    gen = Counter("sglang:generation_tokens", "", lab, registry=r)
    for w in (P, D):  # every series exists from the first scrape, as on a worker that has started
        for h in (hp, hu, hg, ttft, gen):
            h.labels(w, "m")
    for n_in, n_cached, n_out in obs:
        hp.labels(P, "m").observe(n_in)
        hu.labels(P, "m").observe(n_in - n_cached)
        hg.labels(D, "m").observe(n_out)
        ttft.labels(D, "m").observe(0.3)
        gen.labels(D, "m").inc(n_out)
    return parse_exposition(generate_latest(r).decode())


def test_tap_free_synthesis_follows_the_token_histograms():
    from controller.telemetry.scrape import ScrapeState, interpret

    rng = np.random.default_rng(3)
    ins = rng.integers(200, 6000, 400)
    cached = (ins * rng.uniform(0, 0.5, 400)).astype(int)
    outs = rng.integers(50, 900, 400)
    roles = {P: "prefill", D: "decode"}
    _, st = interpret(ScrapeState(), _token_engine([]), None, roles, 100.0, True)
    res, _ = interpret(st, _token_engine(list(zip(ins, cached, outs, strict=True))), None, roles, 110.0, True)
    ev = res.events
    assert res.length_source == "token_histograms" and ev.size == 400
    unc = ins - cached
    got_unc = ev["input_tokens"] - ev["cached_tokens"]
    for want, got in ((ins, ev["input_tokens"]), (unc, got_unc), (outs, ev["output_tokens"])):
        assert got.mean() == pytest.approx(want.mean(), rel=0.01)  # exact mean (sum / count), up to rounding
        assert (got ** 2).mean() == pytest.approx((want ** 2).mean(), rel=0.10)
        for q in (50, 90):
            assert np.percentile(got, q) == pytest.approx(np.percentile(want, q), rel=0.15)
    assert (ev["cached_tokens"] >= 0).all() and np.allclose(ev["ttft_s"].mean(), 0.3, rtol=0.35)


def test_decode_gate_and_router_histograms_from_smg_metrics():
    from controller.telemetry.scrape import ScrapeState, interpret

    def router(waits: int, sheds: int, ttft_obs: int) -> dict:
        return parse_exposition(
            f'smg_pd_admission_window{{worker="{D}"}} 64\n'
            f'smg_worker_requests_active{{worker="{P}"}} 3\nsmg_worker_requests_active{{worker="{D}"}} 80\n'
            f'smg_engine_waiting_requests{{worker="{D}",model="m",dp_rank="0"}} 6\n'
            f'smg_pd_admission_waits_total{{reason="window_full"}} {waits}\n'
            f'smg_pd_admission_sheds_total {sheds}\n'
            f'smg_worker_overload_shed_total{{stage="selection"}} 5\n'
            f'smg_worker_overload_shed_total{{stage="pd_admission"}} {sheds}\n'
            '# TYPE smg_pd_ttft_seconds histogram\n'
            f'smg_pd_ttft_seconds_bucket{{model="m",le="0.5"}} {ttft_obs}\n'
            f'smg_pd_ttft_seconds_bucket{{model="m",le="1"}} {2 * ttft_obs}\n'
            f'smg_pd_ttft_seconds_bucket{{model="m",le="+Inf"}} {2 * ttft_obs}\n'
            f'smg_pd_ttft_seconds_sum{{model="m"}} {ttft_obs * 1.0}\n'
            f'smg_pd_ttft_seconds_count{{model="m"}} {2 * ttft_obs}\n')

    roles = {P: "prefill", D: "decode"}
    eng = _token_engine([])
    r0, st = interpret(ScrapeState(), eng, router(2, 1, 0), roles, 1.0, False)
    # 80 active for a window of 64, 6 of them waiting at the worker itself: 10 held at the router's gate
    assert r0.decode_gate_waiting == 10 and r0.per_worker[D]["gate_window"] == 64
    r1, _ = interpret(st, eng, router(9, 4, 50), roles, 2.0, False)
    assert r1.gate == {"waits": 7.0, "sheds": 3.0}
    lat = r1.router_latency["pd_ttft_s"]
    assert lat["count"] == 100 and lat["mean"] == pytest.approx(0.5) and lat["p50"] == pytest.approx(0.5)
    assert interpret(ScrapeState(), eng, None, roles, 1.0, False)[0].decode_gate_waiting is None  # 0.3.2: no gate


def test_smg_spelling_with_worker_addr_is_read():
    text = (f'sglang:num_queue_reqs{{model_name="m",worker_addr="{P}"}} 4\n'
            f'sglang_num_queue_reqs{{model_name="m",worker_addr="{D}"}} 2\n')
    s = parse_exposition(text)
    assert s["sglang:num_queue_reqs"] == {P: 4.0, D: 2.0}
