"""The API cannot hurt the controller (issue 13, item 2): every "did not" row of the API, as a hostile client.

Real aiohttp server on a loopback socket, the real Sidecar as the view, the real plan worker process.
Each test names the row it covers; before the fix each of them failed (a 200 after an 11 s freeze, a read
of /dev/zero, a hang on a FIFO, a 500 with a traceback).
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os

import aiohttp
import pytest
from aiohttp import web

from controller.api.app import POOL, build_app
from controller.api.planpool import PlanPool
from controller.api.view import ControllerView
from controller.config import config_from_dict
from controller.planning import build_inputs, execute_tagged, objectives_and_hardware, request_from
from controller.runtime.clock import ManualClock
from controller.runtime.sidecar import Sidecar
from tests.conftest import PROFILES, REPO

TOKEN = "s3cret-token"
GOOD = {"rate_rps": 2, "input_len": 1000, "output_len": 100, "tpot_ms": 50}


def spin_forever(_req: object) -> tuple[str, object]:
    """A plan that never ends (runs in the worker process): what the time limit is for."""
    while True:
        pass


def _cfg(**api: object):
    return config_from_dict({
        "hardware": {"profile": str(PROFILES / "llama2-70b-h100-tp8.yaml")}, "slo": {"tpot_ms": 50.0},
        "telemetry": {"zmq_endpoints": ["tcp://127.0.0.1:1"]},
        "api": {"token": TOKEN, "port": 0, **api},
    })


class Served:
    def __init__(self, sc: Sidecar, app: web.Application, runner: web.AppRunner, port: int) -> None:
        self.sc, self.app, self.runner, self.port = sc, app, runner, port
        self.url = f"http://127.0.0.1:{port}"


async def _serve(registry, pool: PlanPool | None = None, **api: object) -> Served:
    sc = Sidecar(_cfg(**api), registry=registry, clock=ManualClock())
    app = build_app(sc)
    if pool is not None:
        app[POOL] = pool
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Served(sc, app, runner, port)


@pytest.fixture
async def served(registry, monkeypatch):
    monkeypatch.delenv("PDCTL_API_TOKEN", raising=False)
    s = await _serve(registry)
    yield s
    await s.runner.cleanup()


@pytest.fixture
def no_tracebacks(caplog):
    caplog.set_level(logging.DEBUG)
    yield
    bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


async def _post(url: str, body: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    # a client-side limit: before the fix a FIFO profile froze the server, so this must fail, not hang
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.post(url, data=body, headers={
            "Content-Type": "application/json", **(headers or {})}) as r:
        return r.status, await r.json(content_type=None)


# ---- row 1: a large `gpus` was enumerated on the event loop (11.7 s frozen at 5e7) --------------------

@pytest.mark.parametrize("gpus", [50_000_000, 200_000_000, 10**30])
async def test_large_gpu_budget_is_refused_not_enumerated(served, no_tracebacks, gpus):
    status, body = await _post(served.url + "/v1/plan", json.dumps({**GOOD, "gpus": gpus}))
    assert status == 400 and "gpus" in body["error"] and "\n" not in body["error"]


async def test_healthz_and_ticks_answer_while_a_plan_runs(registry, monkeypatch, no_tracebacks):
    monkeypatch.delenv("PDCTL_API_TOKEN", raising=False)
    pool = PlanPool(timeout_s=3.0, memory_mb=512, target=spin_forever)
    s = await _serve(registry, pool=pool)
    try:
        plan = asyncio.create_task(_post(s.url + "/v1/plan", json.dumps(GOOD)))
        answered = 0
        async with aiohttp.ClientSession() as c:
            while not plan.done():
                async with c.get(s.url + "/healthz") as r:
                    assert r.status == 200
                answered += 1
                await s.sc.loop.tick_once()  # the control loop runs too
                await asyncio.sleep(0.05)
        status, body = await plan
        assert answered >= 2 and s.sc.loop.ticks >= 2
        # the runaway plan was stopped at its time limit and said so in one line
        assert status == 503 and "plan_timeout_s=3" in body["error"]
        assert pool.timeouts == 1
        # the worker was replaced: the next plan works
        pool.target = execute_tagged
        status, body = await _post(s.url + "/v1/plan", json.dumps(GOOD))
        assert status == 200 and body["n_prefill"] >= 1
    finally:
        await s.runner.cleanup()


# ---- row 2: `profile` opened any server-side path ---------------------------------------------------

async def test_profile_paths_are_never_opened_and_do_not_leak_existence(served, tmp_path, no_tracebacks):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    shipped = str(PROFILES / "llama2-70b-h100-tp8.yaml")  # exists, is a valid profile, but is a path
    errors = {}
    for p in ("/dev/zero", str(fifo), "/etc/shadow", "/no/such/file", "../../etc/passwd", shipped,
              "..", ".hidden", "a/b", "x\x00y"):
        status, body = await _post(served.url + "/v1/plan", json.dumps({**GOOD, "profile": p}))
        assert status == 400, (p, body)
        assert body["error"].startswith("profile=")
        errors[p] = body["error"].split(": ", 1)[1]  # what follows the (quoted) name
    # the same answer whether the path exists or not, names no file, and lists the names one may use
    assert len(set(errors.values())) == 1, errors
    assert "not a profile name" in errors["/dev/zero"] and "llama2-70b-h100-tp8" in errors["/dev/zero"]


async def test_profile_by_name_from_the_configured_directories(registry, monkeypatch, tmp_path):
    monkeypatch.delenv("PDCTL_API_TOKEN", raising=False)
    (tmp_path / "mine.yaml").write_text((PROFILES / "deepseek-v31-h200.yaml").read_text())
    s = await _serve(registry, profile_dirs=[str(tmp_path)])
    try:
        status, body = await _post(s.url + "/v1/plan", json.dumps({**GOOD, "profile": "mine"}))
        assert status == 200 and body["profile"]
        # a shipped profile is not in the configured directories: refused, and the known names are listed
        status, body = await _post(s.url + "/v1/plan", json.dumps({**GOOD, "profile": "llama2-70b-h100-tp8"}))
        assert status == 400 and "unknown profile" in body["error"] and "mine" in body["error"]
    finally:
        await s.runner.cleanup()


# ---- row 3: malformed input gave a 500 with a traceback ----------------------------------------------

@pytest.mark.parametrize(("body", "field"), [
    (b"[" * 4096 + b"]" * 4096, "too_deep"),
    (b'{"rate_rps": 1, "input_len": 1000, "output_len": 100, "x": ' + b"[" * 40 + b"]" * 40 + b"}", "too_deep"),
    (json.dumps({**GOOD, "input_len": 1e308}).encode(), "input_len"),
    (b'{"rate_rps": 1, "input_len": 1e400, "output_len": 100}', "not_finite"),
    (b'{"rate_rps": NaN, "input_len": 1, "output_len": 100}', "not_finite"),
    (b'{"rate_rps": 1, "input_len": ' + b"9" * 5000 + b', "output_len": 100}', "number_too_long"),
    (json.dumps({**GOOD, "profile": "p" * 60_000}).encode(), "profile"),
    (json.dumps({**GOOD, "k" * 60_000: 1}).encode(), "Extra inputs"),
    (json.dumps({**GOOD, "profile": "p" * 100_000}).encode(), "Too Large"),
    (json.dumps({**GOOD, "input_len": "abc"}).encode(), "input_len"),
    (json.dumps({**GOOD, "gpus": 1.5}).encode(), "gpus"),
    (json.dumps({**GOOD, "gpus": [1]}).encode(), "gpus"),
    (json.dumps({**GOOD, "profile": 5}).encode(), "profile"),
    (json.dumps({**GOOD, "rounding": {"a": 1}}).encode(), "rounding"),
    (json.dumps({**GOOD, "evaluate": "9" * 30 + "P1D"}).encode(), "evaluate"),
    (json.dumps({**GOOD, "ttft_quantile": 1 - 1e-17}).encode(), "ttft_quantile"),
    (json.dumps({**GOOD, "ttft_s": 1e-300, "overhead_s": 0}).encode(), None),
    (json.dumps({**GOOD, "rate_rps": 1e7, "input_len": 1e7, "output_len": 1e7}).encode(), None),
    (json.dumps([1, 2]).encode(), "got list"),
    (b'"\\ud800"', "got str"),
    (b"\xff\xfe\x00", "not_utf8"),
    (b"", "not_json"),
], ids=lambda v: None if isinstance(v, str | None) else repr(v[:40]))
async def test_malformed_input_is_a_one_line_4xx(served, no_tracebacks, body, field):
    status, got = await _post(served.url + "/v1/plan", body)
    assert 400 <= status < 500, got
    assert "\n" not in got["error"] and len(got["error"]) < 2000
    if field is not None:
        assert field in got["error"] or got.get("reason") == field, got


async def _raw_request(port: int, head: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize("path", [b"/v1/pause", b"/v1/resume", b"/v1/plan"])
async def test_byte_0xff_in_authorization_is_401(registry, monkeypatch, no_tracebacks, path):
    monkeypatch.delenv("PDCTL_API_TOKEN", raising=False)
    s = await _serve(registry, plan_requires_token=True)
    try:
        for auth in (b"Bearer \xff\xfe" + TOKEN.encode(), b"\xff", b"Bearer " + TOKEN.encode() + b"\xff"):
            status, _ = await _raw_request(s.port, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
                                           + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            assert status == 401
        assert s.sc.loop.paused is False
    finally:
        await s.runner.cleanup()


async def test_plan_token_when_configured(registry, monkeypatch):
    monkeypatch.delenv("PDCTL_API_TOKEN", raising=False)
    s = await _serve(registry, plan_requires_token=True)
    try:
        status, body = await _post(s.url + "/v1/plan", json.dumps(GOOD))
        assert status == 401 and "bearer token" in body["error"]
        status, body = await _post(s.url + "/v1/plan", json.dumps(GOOD), {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
    finally:
        await s.runner.cleanup()


async def test_body_over_the_limit_is_413_json(registry, monkeypatch, no_tracebacks):
    monkeypatch.delenv("PDCTL_API_TOKEN", raising=False)
    s = await _serve(registry, max_body_bytes=4096)
    try:
        status, body = await _post(s.url + "/v1/plan", b'{"a": "' + b"x" * 10_000 + b'"}')
        assert status == 413 and "\n" not in body["error"]
        async with aiohttp.ClientSession() as c, c.get(s.url + "/v1/nothing") as r:
            assert r.status == 404 and "error" in await r.json()
        async with aiohttp.ClientSession() as c, c.get(s.url + "/v1/plan") as r:
            assert r.status == 405 and "POST" in r.headers["Allow"]
    finally:
        await s.runner.cleanup()


# ---- issue 10: the API depends on a small view, not on the runtime ---------------------------------

def test_api_package_does_not_import_the_runtime():
    for f in sorted((REPO / "controller" / "api").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert not n.startswith("controller.runtime"), f"{f.name} imports {n}"


def test_sidecar_satisfies_the_view(registry):
    sc = Sidecar(_cfg(), registry=registry, clock=ManualClock())
    assert isinstance(sc, ControllerView)
    assert sc.set_paused(True)["paused"] is True and sc.loop.paused
    assert b"pdctl_" in sc.metrics_exposition()


def test_objectives_and_hardware_without_a_placeholder_load():
    cfg = config_from_dict({"hardware": {"profile": "deepseek-v31-h200"}, "slo": {"ttft_s": 3, "ttft_quantile": 0.9}})
    obj, hw = objectives_and_hardware(cfg)
    _, want_obj, want_hw = build_inputs(request_from(cfg, {"rate_rps": 2, "input_len": 1000, "output_len": 100}))
    assert obj == want_obj and hw == want_hw
    assert obj.ttft_s == 3 and obj.ttft_quantile == 0.9


# ---- every bounded input is answered: a plan, or a one-line reason; never a crash -----------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from controller.planning import MAX_GPUS, MAX_RATE_RPS, MAX_TOKENS, MAX_TPS  # noqa: E402

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.text(max_size=20),
                    st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.floats(0, MAX_RATE_RPS), input_len=st.floats(1e-9, MAX_TOKENS), output_len=st.floats(1e-9, MAX_TOKENS),
    ttft_s=st.floats(1e-9, 86_400), tpot_ms=st.floats(1e-9, 1e6), q=st.none() | st.floats(1e-6, 1 - 1e-9),
    cv=st.none() | st.floats(0, 100), prefill_tps=st.floats(1e-9, MAX_TPS), decode_tps=st.floats(1e-9, MAX_TPS),
    gpus=st.none() | st.integers(2, MAX_GPUS), model=st.sampled_from(["mm1", "md1", "mg1"]),
    extra=st.dictionaries(st.sampled_from(["evaluate", "cache_hit_rate", "dp_groups", "overhead_s"]), _VALUES),
)
def test_any_bounded_plan_is_answered_never_crashes(rate, input_len, output_len, ttft_s, tpot_ms, q, cv,
                                                    prefill_tps, decode_tps, gpus, model, extra):
    from controller.config import ConfigError
    from controller.core.errors import PdControllerError

    body = {"rate_rps": rate, "input_len": input_len, "output_len": output_len, "ttft_s": ttft_s, "tpot_ms": tpot_ms,
            "ttft_quantile": q, "input_len_cv": cv, "prefill_max_tps": prefill_tps, "decode_tps": decode_tps,
            "gpus": gpus, "prefill_model": model, **extra}
    try:
        req = request_from(None, body)
    except (ConfigError, PdControllerError) as e:
        assert "\n" not in str(e)
        return
    kind, value = execute_tagged(req)
    assert kind in ("ok", "invalid"), value  # "error" is a crash of the math on a valid input
    if kind == "ok":
        json.dumps(value, allow_nan=False)  # strict JSON: no NaN or infinity reaches a client


@pytest.mark.parametrize("raw", [
    b"\xff\xfe garbage\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"POST /v1/plan HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/plan HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"%ff" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["garbage", "huge_header", "negative_length", "bad_chunk", "long_path"])
async def test_malformed_http_is_4xx_without_traceback(served, no_tracebacks, raw):
    status, _ = await _raw_request(served.port, raw)
    assert 400 <= status < 500
    async with aiohttp.ClientSession() as c, c.get(served.url + "/healthz") as r:
        assert r.status == 200


async def test_a_trickled_body_is_408(served, monkeypatch):
    import controller.api.app as app_mod

    monkeypatch.setattr(app_mod, "BODY_TIMEOUT_S", 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(b"POST /v1/plan HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100\r\n\r\n{\"r")
        await writer.drain()  # ... and never the rest
        data = await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert data.startswith(b"HTTP/1.1 408")
    # let the server finish with the connection it answered (its handler task ends on the close)
    for _ in range(100):
        if not [t for t in asyncio.all_tasks() if "RequestHandler" in repr(t) and not t.done()]:
            break
        await asyncio.sleep(0.02)
