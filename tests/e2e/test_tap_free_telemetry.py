"""Tap-free telemetry against the tap, on the same traffic: the controller's estimates from each agree.

One fleet (smg over emulated workers exporting SGLang's token histograms), the
real tap in front of it. The same 300 requests (log-normal prompts of ~20 to
~4000 tokens, outputs of 20 to 700) go through the tap; the tap's per-request
events arrive over ZeroMQ, while the scraper reads only what the router and
the workers export (`/engine_metrics`, smg's `/metrics`) and synthesizes
records from the token histograms. Both event sets go through the core's own
estimator. Stated tolerance (docs/telemetry.md):

- request count and rate: equal (both see every completed request);
- mean input, uncached input and output length: within 1 % (histogram sum / count is exact);
- second moment of the input length (the M/G/1 term): within 10 %;
- P50 / P90 of input and output length: within 15 % (linear interpolation inside SGLang's buckets,
  100-300-500-700-1000-1500-2000-3000-... tokens wide).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest

from controller.core.control.estimators import EventWindow, estimate
from controller.telemetry.hub import TelemetryHub
from controller.telemetry.scrape import PrometheusScraper
from controller.telemetry.zmq_source import ZmqSource
from harness.fleet import EmulatedFleet
from tests.e2e._tap_procs import TapProc

pytestmark = pytest.mark.e2e
N = 300


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("tapfree")
    with EmulatedFleet("llama2-70b-h100-tp8", 1, 1, time_scale=0.01, log_dir=d / "fleet") as fleet:
        tap = TapProc(fleet.router_url, d)
        try:
            yield fleet, tap
        finally:
            tap.stop()


async def send(url: str, model: str, ins: np.ndarray, outs: np.ndarray, concurrency: int = 16) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> int:
            # distinct words: each prompt is its own (no prefix-cache hits between requests)
            body = {"model": model, "text": " ".join(f"q{i}w{k}" for k in range(int(ins[i]))),
                    "sampling_params": {"max_new_tokens": int(outs[i]), "ignore_eos": True}}
            async with sem, s.post(f"{url}/generate", json=body) as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(one(i) for i in range(len(ins)))))


async def test_tap_free_estimates_match_the_taps(stack):
    fleet, tap = stack
    roles = {w.url: w.role for w in fleet.workers}
    tap_hub, scrape_hub = TelemetryHub(), TelemetryHub()
    zmq_task = asyncio.create_task(ZmqSource([tap.publish], tap_hub, time.time).run(), name="zmq")
    scraper = PrometheusScraper(fleet.router_url, scrape_hub, time.time, metrics_url=fleet.metrics_url,
                                synthesize=True, roles=lambda: roles)
    try:
        # the subscription joins asynchronously: warm up until the tap's events arrive, then start clean
        for _ in range(50):
            assert await send(tap.url, fleet.model, np.array([8]), np.array([4])) == [200]
            await asyncio.sleep(0.1)
            if tap_hub.drain().size:
                break
        await asyncio.sleep(0.3)
        tap_hub.drain()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            assert await scraper.scrape_once(session) is not None  # the baseline
            scrape_hub.drain()
            start = time.time()
            rng = np.random.default_rng(7)
            ins = np.clip(rng.lognormal(6.3, 0.9, N).astype(int), 20, 4000)
            outs = rng.integers(20, 700, N)
            assert await send(tap.url, fleet.model, ins, outs) == [200] * N
            got = [tap_hub.drain()]
            for _ in range(50):  # the tap flushes every 20 ms
                if sum(e.size for e in got) >= N:
                    break
                await asyncio.sleep(0.1)
                got.append(tap_hub.drain())
            res = await scraper.scrape_once(session)
        assert res is not None and res.length_source == "token_histograms"
        now = time.time()
        by_tap, by_scrape = np.concatenate(got), scrape_hub.drain()
    finally:
        zmq_task.cancel()
        await asyncio.gather(zmq_task, return_exceptions=True)
    assert by_tap.size == N and by_scrape.size == N
    # the exact lengths the tap saw are the ones sent
    assert sorted(by_tap["input_tokens"].tolist()) == sorted(ins.tolist())
    span = now - start + 1.0

    def est(ev: np.ndarray):
        return estimate(EventWindow.empty().extended(ev, now, span), now, start - 1.0, span)

    t, s = est(by_tap), est(by_scrape)
    for k in ("arrival_rate_rps", "input_len_mean", "input_len_m2", "input_len_p50", "input_len_p90",
              "output_len_mean", "output_len_p90"):
        print(f"{k:18s} tap {getattr(t, k):12.4g}  tap-free {getattr(s, k):12.4g}")  # shown with pytest -s
    assert s.samples == t.samples == N and s.arrival_rate_rps == pytest.approx(t.arrival_rate_rps, rel=0.01)
    assert s.input_len_mean == pytest.approx(t.input_len_mean, rel=0.01)
    assert s.output_len_mean == pytest.approx(t.output_len_mean, rel=0.01)
    assert s.input_len_m2 == pytest.approx(t.input_len_m2, rel=0.10)
    assert s.input_len_p50 == pytest.approx(t.input_len_p50, rel=0.15)
    assert s.input_len_p90 == pytest.approx(t.input_len_p90, rel=0.15)
    assert s.output_len_p90 == pytest.approx(t.output_len_p90, rel=0.15)
    unc_t = (by_tap["input_tokens"] - by_tap["cached_tokens"]).mean()
    unc_s = (by_scrape["input_tokens"] - by_scrape["cached_tokens"]).mean()
    assert unc_s == pytest.approx(unc_t, rel=0.01)
    # the router's own view of the same requests: smg's TTFT histogram counted every one
    assert res.router_latency["pd_ttft_s"]["count"] == N
