"""The router actuator's registry client against both real routers: smg 1.13 and sglang-router 0.3.2.

The same calls (add, remove, reregister, reconcile) hold on both; on smg the
re-registration is one PUT that keeps the worker's id, a deregistered worker
is listed `draining` through the drain settle the client set, and a duplicate
POST's 409 is handled as what it is.
"""

from __future__ import annotations

import time
from urllib.parse import quote

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from controller.actuators.errors import RouterError
from controller.actuators.http import Http
from controller.actuators.metrics import ActuatorMetrics
from controller.actuators.retry import Retrier
from controller.actuators.router import RouterClient
from harness.fleet import EmulatedFleet

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["smg", "sglang-router"])
def fleet(request):
    with EmulatedFleet("llama2-70b-h100-tp8", n_prefill=1, n_decode=1, time_scale=0.05,
                       router=request.param) as f:
        spare = f.start_worker_sync("decode")
        yield f, spare


@pytest.fixture
async def client(fleet):
    f, _ = fleet
    c = RouterClient(f.router_url, Http(5.0), Retrier("router", ActuatorMetrics(CollectorRegistry())),
                     poll_interval_s=0.1, clock=time.monotonic, drain_settle_s=1.0)
    yield c
    await c.http.close()


async def test_dialect_is_told_from_the_router(fleet, client):
    f, _ = fleet
    assert await client.kind() == f.router_kind.dialect


async def test_add_remove_and_duplicate_add(fleet, client):
    _, spare = fleet
    w = await client.add(spare.url, "decode", None, 20)
    assert w.role == "decode" and w.healthy and w.router_id
    again = await client.add(spare.url, "decode", None, 20)  # idempotent: no second registration
    assert again.router_id == w.router_id
    roles = [x.role for x in await client.workers() if x.url == spare.url]
    assert roles == ["decode"]
    await client.remove(spare.url, 20)
    assert await client.find(spare.url) is None
    await client.remove(spare.url, 20)  # absent already: done


async def test_reregister_under_the_other_role(fleet, client):
    f, spare = fleet
    first = await client.add(spare.url, "decode", None, 20)
    w = await client.reregister(spare.url, "prefill", spare.bootstrap_port, 20)
    assert w.role == "prefill" and w.bootstrap_port == spare.bootstrap_port and w.healthy
    if f.router_kind.dialect == "smg":
        assert w.router_id == first.router_id  # one PUT: same id, no drain
    changes = await client.reconcile({x.url: "prefill" for x in f.prefill} | {x.url: "decode" for x in f.decode},
                                     {x.url: x.bootstrap_port for x in f.prefill}, 20)
    assert changes == [f"removed {spare.url} (prefill)"]
    assert {x.url for x in await client.workers()} == {x.url for x in f.workers}


async def test_smg_drains_for_the_settle_we_set_and_answers_409(fleet, client):
    f, spare = fleet
    if f.router_kind.dialect != "smg":
        pytest.skip("drain settle, draining status and 409 are smg's")
    w = await client.add(spare.url, "decode", None, 20)
    async with aiohttp.ClientSession() as s:
        # a raw duplicate POST: smg refuses it synchronously, naming the existing id
        r = await s.post(f"{f.router_url}/workers", json={"url": spare.url, "worker_type": "decode"})
        body = await r.json()
        assert r.status == 409 and body["code"] == "WORKER_ALREADY_EXISTS" and w.router_id in body["error"]
        listed = await (await s.get(f"{f.router_url}/workers/{w.router_id}")).json()
        assert listed["health"]["drain_settle_secs"] == 1  # what the client registered it with
        r = await s.delete(f"{f.router_url}/workers/{quote(spare.url, safe='')}")  # by URL: smg wants the UUID
        assert r.status == 400 and "UUID" in (await r.text())
        await s.delete(f"{f.router_url}/workers/{w.router_id}")
        states = []
        while (x := await client.find(spare.url)) is not None:
            states.append(x.state)
            await client.sleep(0.05)
    # listed draining (not serving: the client leaves it out of every pool), then gone
    assert states and set(states) == {"draining"}
    # a worker registered on smg's command line (5 s default settle): PATCHed to ours, removed, re-added
    d = f.decode[0]
    await client.remove(d.url, 20)
    assert await client.find(d.url) is None
    await client.add(d.url, "decode", None, 20)
    with pytest.raises(RouterError, match="not registered"):
        await client.set_drain_settle("http://127.0.0.1:1", 1)
