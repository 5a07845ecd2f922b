"""The assembled sidecar (issue 10): real scraper against a recorded exposition, a fake actuator, known roles.

Two bugs of the first build fail here:
- with an actuator configured the scraper never learned worker roles, counted every worker in both
  pools, and read a prefill backlog as `decode_queued` (-> a flip-back to decode under prefill overload);
- the core recorded proposed flips as if they had started: advisory mode exhausted the flip budget
  (`rate_limited`) within minutes although the fleet never changed.
"""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from controller.actuators.fake import FakeActuator
from controller.config import config_from_dict
from controller.core.events import empty_arrivals, empty_events
from controller.runtime.clock import ManualClock
from controller.runtime.sidecar import Sidecar
from tests.conftest import PROFILES

P, D0, D1 = "http://fake-p0", "http://fake-d0", "http://fake-d1"

# /engine_metrics as smg 1.13 passes it through (sglang: spelling, worker_addr label): the single
# prefill worker has a backlog of 30 requests, the decode workers run light batches and queue nothing.
ENGINE = f"""# HELP sglang:num_requests_total Requests served
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{{worker_addr="{P}"}} 1200
sglang:num_requests_total{{worker_addr="{D0}"}} 600
sglang:num_requests_total{{worker_addr="{D1}"}} 600
# HELP sglang:num_queue_reqs The number of requests in the waiting queue
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{{worker_addr="{P}"}} 30
sglang:num_queue_reqs{{worker_addr="{D0}"}} 0
sglang:num_queue_reqs{{worker_addr="{D1}"}} 0
# HELP sglang:num_running_reqs The number of running requests
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{{worker_addr="{P}"}} 1
sglang:num_running_reqs{{worker_addr="{D0}"}} 4
sglang:num_running_reqs{{worker_addr="{D1}"}} 4
"""


@pytest.fixture
async def router():
    app = web.Application()

    async def engine(_r: web.Request) -> web.Response:
        return web.Response(text=ENGINE, content_type="text/plain")

    async def metrics(_r: web.Request) -> web.Response:
        return web.Response(text="", content_type="text/plain")

    app.router.add_get("/engine_metrics", engine)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _cfg(router_url: str) -> object:
    return config_from_dict({
        "hardware": {"profile": str(PROFILES / "llama2-70b-h100-tp8.yaml")},
        "slo": {"ttft_s": 2.0, "ttft_quantile": 0.99, "tpot_ms": 50.0},
        "control": {"mode": "fixed", "gpus": 24, "tick_period_s": 5.0, "window_s": 60.0, "min_samples": 20,
                    "max_flips_per_hour": 4},
        "telemetry": {"zmq_endpoints": ["tcp://127.0.0.1:1"], "router_url": router_url},
    })


async def test_scraper_learns_roles_from_the_one_fleet_reader(router, registry):
    sc = Sidecar(_cfg(router), registry=registry, clock=ManualClock(), actuator=FakeActuator(1, 2),
                 advisory=True)
    await sc.refresh_actuator_fleet()
    assert sc.scraper is not None
    async with aiohttp.ClientSession() as s:
        res = await sc.scraper.scrape_once(s)
    assert res is not None
    st = res.stats
    assert st.prefill_queued == 30
    assert not st.decode_queued  # the prefill backlog is not decode demand
    assert st.decode_running_mean == pytest.approx(4.0)
    workers = sc.state()["fleet"]["workers"]
    assert {w["url"]: w["role"] for w in workers} == {P: "prefill", D0: "decode", D1: "decode"}


async def test_advisory_proposals_never_exhaust_the_flip_budget(router, registry):
    """Ten minutes of a prefill-starved fleet, advisory: the same flip is proposed throughout, never rate limited."""
    clock = ManualClock()
    sc = Sidecar(_cfg(router), registry=registry, clock=clock, actuator=FakeActuator(1, 2), advisory=True)
    await sc.refresh_actuator_fleet()
    rng = np.random.default_rng(4)
    proposals = 0
    reasons: set[str] = set()
    for _ in range(120):
        now = clock.now()
        n = 50  # 10 req/s of 2000-token prompts: one prefill instance cannot keep up
        ev = empty_events(n)
        ev["arrival_s"] = now - rng.uniform(5, 10, n)
        ev["input_tokens"], ev["output_tokens"], ev["cached_tokens"] = 2000, 100, 0
        ev["ttft_s"], ev["tpot_s"], ev["e2e_s"], ev["status"] = 4.0, 0.02, 6.0, 200
        sc.hub.add_events(ev, "tap", now)
        arr = empty_arrivals(n)
        arr["arrival_s"] = now - rng.uniform(0, 5, n)
        arr["input_tokens"] = 2000
        arr["request_id"] = rng.integers(1, 2**62, n, dtype=np.uint64)
        sc.hub.add_arrivals(arr, "tap", now)
        r = await sc.loop.tick_once()
        assert r is not None
        proposals += sum(a.count for a in r.actions if a.kind.value == "flip_to_prefill")
        reasons |= set(r.diagnostics.reasons)
        clock.advance(5.0)
    assert proposals > 4 * 3, proposals  # far beyond the hourly budget of 4: proposals are not history
    assert "rate_limited" not in reasons
    assert sc.loop.state.history.flip_times == ()
    assert sc.state()["fleet"]["prefill"] == 1  # advisory: nothing moved
