"""Drained flips on a live fleet: the real sglang-router (PD mode) + emulated SGLang workers as processes,
the router actuator flipping workers under client load. Zero failed client requests across the flips; the
router's /workers shows the new split; router 5xx/timeouts (through a fault-injecting proxy in front of the
real router) are retried with backoff and counted in the metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from controller.actuators import build_actuator
from controller.actuators.fleet import RouterActuator
from controller.config import ActuationConfig
from harness.fleet import EmulatedFleet

pytestmark = pytest.mark.e2e
PROFILE = "llama2-70b-h100-tp8"


class ClientLoad:
    """`n` closed-loop clients sending /generate through the router; counts outcomes."""

    def __init__(self, url: str, n: int = 4, max_new_tokens: int = 24) -> None:
        self.url = url
        self.n = n
        self.max_new = max_new_tokens
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> ClientLoad:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._tasks = [asyncio.create_task(self._client(i), name=f"client-{i}") for i in range(self.n)]
        return self

    async def _client(self, i: int) -> None:
        assert self._session is not None
        k = 0
        while not self._stop.is_set():
            k += 1
            body = {"text": f"client {i} request {k} " + "lorem ipsum dolor sit amet " * 20,
                    "sampling_params": {"max_new_tokens": self.max_new, "ignore_eos": True}}
            try:
                async with self._session.post(f"{self.url}/generate", json=body) as r:
                    text = await r.text()
                    if r.status == 200:
                        self.outcomes["ok"] += 1
                    else:
                        self.outcomes[f"http_{r.status}"] += 1
                        self.errors.append(text[:200])
            except (TimeoutError, aiohttp.ClientError) as e:
                self.outcomes[type(e).__name__] += 1
                self.errors.append(str(e)[:200])

    @property
    def failed(self) -> int:
        return sum(v for k, v in self.outcomes.items() if k != "ok")

    async def wait_for(self, n_ok: int) -> None:
        while self.outcomes["ok"] < n_ok:
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        assert self._session is not None
        await self._session.close()


def actuation(fleet: EmulatedFleet, router_url: str | None = None, **kw) -> ActuationConfig:
    cfg = dict(
        kind="router", router_url=router_url or fleet.router_url, drain_timeout_s=30, switch_timeout_s=30,
        register_timeout_s=30, verify_timeout_s=20, poll_interval_s=0.1,
        backoff_initial_s=0.05, backoff_max_s=0.5, retries=4,
        bootstrap_ports={w.url: w.bootstrap_port for w in fleet.workers},
    )
    cfg.update(kw)
    return ActuationConfig(**cfg)


async def router_split(url: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/workers") as r:
        body = await r.json()
    return {w["url"]: w["worker_type"] for w in body["workers"] if w["is_healthy"]}


@pytest.fixture
async def fleet():
    async with EmulatedFleet(PROFILE, n_prefill=2, n_decode=2, time_scale=0.02) as f:
        yield f


async def test_flips_under_load_zero_failed_requests(fleet, registry):
    act = build_actuator(actuation(fleet), registry)
    assert isinstance(act, RouterActuator)
    d1 = fleet.decode[1].url
    try:
        async with ClientLoad(fleet.router_url) as load:
            await load.wait_for(10)
            to_prefill = await act.flip(d1, "prefill", "e2e: more prefill")
            split = await router_split(fleet.router_url)
            n_mid = load.outcomes["ok"]
            await load.wait_for(n_mid + 10)  # the fleet serves in its new shape
            back = await act.flip(d1, "decode", "e2e: back")
            await load.wait_for(load.outcomes["ok"] + 10)
    finally:
        await act.close()
    assert to_prefill.ok, to_prefill.detail
    assert to_prefill.detail.startswith("done: verified"), to_prefill.steps
    assert sorted(split.values()) == ["decode", "prefill", "prefill", "prefill"]
    assert split[d1] == "prefill"
    assert back.ok, back.detail
    assert (await router_split(fleet.router_url))[d1] == "decode"
    assert load.failed == 0, (load.outcomes, load.errors[:3])
    assert registry.get_sample_value("pdc_flips_total", {"result": "ok", "to_role": "prefill"}) == 1


class FaultProxy:
    """Forwards to the real router; answers the first `n_5xx` /workers calls with 503 and stalls the next
    `n_stall` past the client's timeout."""

    def __init__(self, target: str, n_5xx: int, n_stall: int) -> None:
        self.target = target
        self.n_5xx = n_5xx
        self.n_stall = n_stall
        self.seen: Counter[str] = Counter()

    async def handle(self, req: web.Request) -> web.StreamResponse:
        self.seen[req.method] += 1
        if req.path.startswith("/workers"):
            if self.n_5xx > 0:
                self.n_5xx -= 1
                return web.Response(status=503, text="injected: upstream unavailable")
            if self.n_stall > 0:
                self.n_stall -= 1
                await asyncio.sleep(3.0)
        body = await req.read()
        async with aiohttp.ClientSession() as s, s.request(
            req.method, self.target + req.path_qs, data=body, headers={"Content-Type": "application/json"}
        ) as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")


async def test_router_5xx_and_timeouts_are_retried_with_backoff(fleet, registry):
    proxy = FaultProxy(fleet.router_url, n_5xx=3, n_stall=1)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    act = build_actuator(actuation(fleet, router_url=url, http_timeout_s=1.0), registry)
    try:
        res = await act.flip(fleet.prefill[1].url, "decode", "e2e: faults")
    finally:
        await act.close()
        with contextlib.suppress(Exception):
            await runner.cleanup()
    assert res.ok, res.detail
    assert (await router_split(fleet.router_url))[fleet.prefill[1].url] == "decode"
    # three 503s and one timeout, each retried once the backoff elapsed; which router call meets a fault
    # (list, remove, add) depends on timing, so count the router's retries over all its operations
    retries = sum(
        s.value for m in registry.collect() if m.name == "pdc_actuator_retries"
        for s in m.samples if s.name.endswith("_total") and s.labels.get("actuator") == "router"
    )
    assert retries == 4, [s for m in registry.collect() if m.name == "pdc_actuator_retries" for s in m.samples]
    assert proxy.seen["GET"] + proxy.seen["POST"] + proxy.seen["DELETE"] >= 4


CRASHING_CONTROLLER = """
import asyncio, os, sys
from controller.actuators import build_actuator
from controller.config import ActuationConfig

cfg = ActuationConfig.model_validate_json(sys.argv[1])
worker, to_role, crash_at = sys.argv[2], sys.argv[3], sys.argv[4]

async def main():
    act = build_actuator(cfg)
    async def crash(rec):
        if rec.step.value == crash_at:
            os._exit(17)  # the controller dies here: no cleanup, no finally, the journal stays behind
    act.flipper.on_step = crash
    await act.flip(worker, to_role, "e2e: crash")

asyncio.run(main())
"""


async def test_restarted_controller_finishes_or_rolls_back_interrupted_flips(fleet, registry, tmp_path):
    import json
    import subprocess
    import sys

    cfg = actuation(fleet, journal=tmp_path / "flips.json")
    d1, p1 = fleet.decode[1].url, fleet.prefill[1].url

    def crash(worker: str, to_role: str, at: str) -> None:
        r = subprocess.run([sys.executable, "-c", CRASHING_CONTROLLER, cfg.model_dump_json(), worker, to_role, at],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 17, r.stderr[-2000:]

    # 1: dies after switching d1 to prefill, before registering it: the new controller finishes the flip
    await asyncio.to_thread(crash, d1, "prefill", "register")
    journal = json.loads((tmp_path / "flips.json").read_text())
    assert journal[d1]["step"] == "register"
    assert d1 not in await router_split(fleet.router_url)
    act = build_actuator(cfg, registry)
    try:
        view = await act.fleet()  # the first look at the fleet recovers
        assert view.count("prefill") == 3 and view.count("decode") == 1
        assert [r.detail for r in act.recovered] == ["finished after restart"]
    finally:
        await act.close()
    assert (await router_split(fleet.router_url))[d1] == "prefill"

    # 2: dies while draining p1 (still prefill, out of the router): the new controller rolls it back
    await asyncio.to_thread(crash, p1, "decode", "drain")
    assert p1 not in await router_split(fleet.router_url)
    from prometheus_client import CollectorRegistry

    act = build_actuator(cfg, CollectorRegistry())
    try:
        await act.fleet()
        (res,) = act.recovered
    finally:
        await act.close()
    assert not res.ok and "rolled back to prefill" in res.detail
    split = await router_split(fleet.router_url)
    assert split[p1] == "prefill" and sorted(split.values()) == ["decode", "prefill", "prefill", "prefill"]
    assert json.loads((tmp_path / "flips.json").read_text()) == {}
