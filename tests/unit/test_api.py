"""The sidecar's aiohttp API on a real loopback socket: auth, metrics exposition, state, plan, readiness."""

from __future__ import annotations

import shutil
import subprocess

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.config import config_from_dict
from controller.core.events import empty_events
from controller.runtime.clock import ManualClock
from controller.runtime.sidecar import Sidecar
from tests.conftest import PROFILES

TOKEN = "s3cret-token"


@pytest.fixture
async def api(registry, monkeypatch):
    monkeypatch.delenv("PDCTL_API_TOKEN", raising=False)
    cfg = config_from_dict({
        "hardware": {"profile": str(PROFILES / "llama2-70b-h100-tp8.yaml")}, "slo": {"tpot_ms": 50.0},
        "telemetry": {"zmq_endpoints": ["tcp://127.0.0.1:1"], "fresh_s": 10},
        "api": {"token": TOKEN, "port": 0},
    })
    clock = ManualClock()
    sc = Sidecar(cfg, registry=registry, clock=clock)
    port = await sc.start_api()
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as s:
        yield sc, s, clock
    await sc.stop_api()


def _feed(sc, clock, n=200):
    ev = empty_events(n)
    ev["arrival_s"] = clock.now() - np.linspace(0, 10, n)
    ev["input_tokens"], ev["output_tokens"], ev["ttft_s"], ev["tpot_s"], ev["status"] = 1000, 100, 0.2, 0.02, 200
    sc.hub.add_events(ev, "tap", clock.now())


@pytest.mark.parametrize("path", ["/v1/pause", "/v1/resume"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic " + TOKEN, TOKEN, "Bearer "])
async def test_mutating_endpoints_refuse_missing_or_wrong_token(api, path, auth):
    sc, s, _ = api
    headers = {"Authorization": auth} if auth is not None else {}
    async with s.post(path, headers=headers) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert sc.loop.paused is False


async def test_pause_and_resume_with_token(api):
    sc, s, _ = api
    h = {"Authorization": f"Bearer {TOKEN}"}
    async with s.post("/v1/pause", headers=h) as r:
        assert r.status == 200 and (await r.json())["paused"] is True
    assert sc.loop.paused
    async with s.post("/v1/resume", headers=h) as r:
        body = await r.json()
    assert body["paused"] is False and body["mode"] == "advisory" and "no actuator" in body["note"]


async def test_no_token_configured_means_closed(registry, monkeypatch):
    monkeypatch.delenv("PDCTL_API_TOKEN", raising=False)
    cfg = config_from_dict({"hardware": {"profile": str(PROFILES / "llama2-70b-h100-tp8.yaml")}, "slo": {"tpot_ms": 50.0},
                            "telemetry": {"zmq_endpoints": ["tcp://127.0.0.1:1"]}, "api": {"port": 0}})
    sc = Sidecar(cfg, registry=registry)
    port = await sc.start_api()
    try:
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/v1/pause",
                                                         headers={"Authorization": "Bearer x"}) as r:
            assert r.status == 401 and "no API token configured" in (await r.json())["error"]
    finally:
        await sc.stop_api()


def test_token_from_environment(registry, monkeypatch):
    monkeypatch.setenv("PDCTL_API_TOKEN", "from-env")
    cfg = config_from_dict({"hardware": {"profile": str(PROFILES / "llama2-70b-h100-tp8.yaml")}, "slo": {"tpot_ms": 50.0},
                            "telemetry": {"zmq_endpoints": ["tcp://127.0.0.1:1"]}})
    assert Sidecar(cfg, registry=registry).token == "from-env"


async def test_readyz_follows_telemetry_freshness(api):
    sc, s, clock = api
    async with s.get("/healthz") as r:
        assert r.status == 200
    async with s.get("/readyz") as r:
        assert r.status == 503 and (await r.json())["reason"] == "no telemetry yet"
    _feed(sc, clock)
    async with s.get("/readyz") as r:
        assert r.status == 200
    clock.advance(11)
    async with s.get("/readyz") as r:
        assert r.status == 503 and "old" in (await r.json())["reason"]


async def test_state_after_ticks(api):
    sc, s, clock = api
    for _ in range(15):
        _feed(sc, clock)
        await sc.loop.tick_once()
        clock.advance(5)
    sc.hub.ingest_frame(b"junk", clock.now())
    async with s.get("/v1/state") as r:
        st = await r.json()
    assert set(st["estimates"]) >= {"arrival_rate_rps", "input_len_mean", "output_len_mean", "cache_hit_rate"}
    assert st["estimates"]["input_len_mean"] == 1000
    assert st["forecast"]["max_rps"] > 0 and st["target"]["prefill"] >= 1 and st["target"]["decode"] >= 1
    assert st["decisions"] and {"reason", "pool", "applied"} <= set(st["decisions"][-1])
    assert st["telemetry"]["events_total"] == 3000 and st["telemetry"]["dropped_total"] == {"short_frame": 1}
    assert st["mode"] == "advisory" and st["tick"] == 15


async def test_metrics_parse_and_pass_promtool(api):
    sc, s, clock = api
    _feed(sc, clock)
    await sc.loop.tick_once()
    sc.hub.ingest_frame(b"junk", clock.now())
    async with s.get("/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(n.startswith("pdctl_") for n in fams if not n.startswith(("python_", "process_")))
    for name in ("pdctl_tick_duration_seconds", "pdctl_telemetry_dropped", "pdctl_target_instances",
                 "pdctl_observed_arrival_rate_rps", "pdctl_decisions", "pdctl_actuations", "pdctl_needed_instances"):
        assert name in fams, name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`): parsed with prometheus_client only")
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


async def test_plan_what_if_matches_plan_cli(api):
    from controller.planning import execute, request_from

    sc, s, _ = api
    body = {"throughput_tpm": 5_000_000, "input_len": 6144, "output_len": 512, "overhead_s": 0.1,
            "profile": "deepseek-v31-h200", "rounding": "nearest"}
    async with s.post("/v1/plan", json=body) as r:
        assert r.status == 200
        got = await r.json()
    want = execute(request_from(sc.cfg, body))
    assert (got["n_prefill"], got["n_decode"]) == (want["n_prefill"], want["n_decode"]) == (3, 4)
    async with s.post("/v1/plan", json={"input_len": -1, "output_len": 5, "rate_rps": 1}) as r:
        assert r.status == 400 and "input_len=-1" in (await r.json())["error"]
    async with s.post("/v1/plan", data=b"not json") as r:
        assert r.status == 400


def test_every_metric_is_documented(registry):
    from controller.metrics import ControllerMetrics
    from tests.conftest import REPO

    ControllerMetrics(registry)
    doc = (REPO / "docs" / "sidecar.md").read_text()
    names = []
    for fam in registry.collect():
        name = fam.name + ("_total" if fam.type == "counter" else "")
        names.append(name)
        assert f"`{name}`" in doc, f"{name} is not documented in docs/sidecar.md"
    assert len(names) >= 25
