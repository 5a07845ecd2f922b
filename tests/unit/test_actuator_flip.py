"""The drained flip state machine, against the router/worker HTTP contract (see _fleet_contract.py).

Every branch: happy path, refusals by the safety rules, drain, rollback on a refused or failed switch,
router 5xx retried with backoff (counted in metrics), recovery after a restart, and drained scale-down.
"""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from controller.actuators import build_actuator
from controller.actuators.base import FleetView, WorkerView
from controller.actuators.fleet import RouterActuator
from controller.actuators.flip import FlipGuard, Step
from controller.actuators.retry import Backoff
from controller.config import ActuationConfig
from tests.unit._fleet_contract import ContractFleet, W


@pytest.fixture
async def fleet():
    f = ContractFleet()
    runner = web.AppRunner(f.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    f.base = f"http://127.0.0.1:{port}"
    for key, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
        f.workers[key] = W(role)
        f.registry[f"id-{key}"] = (f.url(key), role, 9000 if role == "prefill" else None)
    f.initial = dict(f.registry)
    yield f
    await runner.cleanup()


def make(f: ContractFleet, registry, tmp_path=None, **kw) -> RouterActuator:
    cfg = dict(
        kind="router", router_url=f.base + "/router", reconcile_interval_s=0, drain_timeout_s=2.0, switch_timeout_s=2.0,
        register_timeout_s=2.0, verify_timeout_s=1.0, poll_interval_s=0.01, backoff_initial_s=0.001,
        backoff_max_s=0.01, retries=3,
        bootstrap_ports={f.url("d0"): 9100, f.url("d1"): 9101},
    )
    if tmp_path is not None:
        cfg["journal"] = tmp_path / "flips.json"
    cfg.update(kw)
    act = build_actuator(ActuationConfig(**cfg), registry)
    assert isinstance(act, RouterActuator)
    return act


def roles(f: ContractFleet) -> dict[str, str]:
    return {url.rsplit("/", 1)[1]: wt for url, wt, _ in f.registry.values()}


async def test_drained_flip_moves_worker_to_other_pool(fleet, registry):
    act = make(fleet, registry)
    fleet.workers["d1"].load = 3  # three requests still decoding: the flip must wait for them
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "ttft_violation")
    finally:
        await act.close()
    assert res.ok, res.detail
    assert [s.split(":")[0] for s in res.steps] == ["planned", "deregister", "drain", "switch", "register",
                                                     "verify", "done"]
    assert "verified" in res.detail
    assert roles(fleet) == {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "prefill"}
    assert fleet.workers["d1"].role == "prefill"
    # registered in the prefill pool with its configured bootstrap port
    assert [p for u, _, p in fleet.registry.values() if u.endswith("/d1")] == [9101]
    assert registry.get_sample_value("pdc_flips_total", {"result": "ok", "to_role": "prefill"}) == 1


async def test_never_flips_last_instance(fleet, registry):
    del fleet.registry["id-p1"]
    act = make(fleet, registry)
    try:
        res = await act.flip(fleet.url("p0"), "decode", "tpot_violation")
    finally:
        await act.close()
    assert not res.ok and res.detail == "refused: last_instance_of_pool"
    assert (res.outcome, res.why, res.refused, res.started) == ("refused", "last_instance_of_pool", True, False)
    assert "DELETE /workers" not in fleet.calls
    assert registry.get_sample_value("pdc_flips_total", {"result": "refused", "to_role": "decode"}) == 1


async def test_no_budget_of_its_own_only_hard_rules(fleet, registry):
    # flip limits live in the control parameters: the actuator flips as often as it is asked, one flip per
    # worker at a time, never the last worker of a pool
    act = make(fleet, registry)
    try:
        results = [await act.flip(fleet.url("d1"), role, "r") for role in ("prefill", "decode") * 4]
        last = await act.flip(fleet.url("d0"), "prefill", "r")
    finally:
        await act.close()
    assert all(r.ok and r.outcome == "done" for r in results), [r.detail for r in results]
    assert last.ok
    # now 3P (p0, p1, d0) 1D (d1): d1 is the last decode worker
    act = make(fleet, CollectorRegistry())
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
        same = await act.flip(fleet.url("p0"), "prefill", "r")
    finally:
        await act.close()
    assert (res.outcome, res.why, res.refused, res.changed) == ("refused", "last_instance_of_pool", True, False)
    assert (same.outcome, same.why) == ("refused", "already_in_role")


async def test_refused_switch_rolls_back_to_old_pool(fleet, registry):
    act = make(fleet, registry)
    fleet.workers["d1"].switch_refuses = True
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
    finally:
        await act.close()
    assert not res.ok
    assert "failed at switch" in res.detail and "rolled back to decode" in res.detail
    assert roles(fleet) == {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode"}


async def test_failed_rebuild_leaves_broken_worker_out_of_router(fleet, registry):
    act = make(fleet, registry)
    fleet.workers["d1"].switch_fails = True
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
    finally:
        await act.close()
    # the worker marked itself unhealthy after the failed rebuild: rollback cannot make it serve again,
    # so it stays out of the router (never registered broken) and the fleet keeps serving on the others
    assert not res.ok
    assert "failed at switch" in res.detail and "worker left out of the router" in res.detail
    assert roles(fleet) == {"p0": "prefill", "p1": "prefill", "d0": "decode"}
    assert registry.get_sample_value("pdc_flips_total", {"result": "failed", "to_role": "prefill"}) == 1


async def test_drain_timeout_rolls_back(fleet, registry):
    act = make(fleet, registry, drain_timeout_s=0.05)
    fleet.workers["d1"].load = 10_000  # never drains in time
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
    finally:
        await act.close()
    assert not res.ok
    assert "failed at drain" in res.detail and "rolled back to decode" in res.detail
    assert roles(fleet)["d1"] == "decode"
    assert fleet.workers["d1"].switch_calls == 0
    assert res.steps[-1] == "rolled_back"
    assert registry.get_sample_value("pdc_flips_total", {"result": "rolled_back", "to_role": "prefill"}) == 1


async def test_verify_failure_when_peers_get_traffic(fleet, registry):
    # the router lists it but never sends it traffic: scrapes of d1 do not grow while its new peers serve
    # 20 requests each between scrapes: even spreading would have missed it with P = (2/3)^40 ~ 1e-7
    fleet.frozen = {"d1"}
    fleet.traffic_per_scrape = 20
    act = make(fleet, registry, verify_timeout_s=0.05)
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
    finally:
        await act.close()
    assert not res.ok
    assert "failed at verify" in res.detail and "rolled back to decode" in res.detail
    assert roles(fleet)["d1"] == "decode" and fleet.workers["d1"].role == "decode"


async def test_router_5xx_retried_with_backoff_and_counted(fleet, registry):
    act = make(fleet, registry)
    fleet.router_5xx = 2
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
    finally:
        await act.close()
    assert res.ok
    assert registry.get_sample_value("pdc_actuator_retries_total", {"actuator": "router", "op": "list_workers"}) == 2


async def test_router_5xx_beyond_retries_is_an_error(fleet, registry):
    act = make(fleet, registry, retries=1)
    fleet.router_5xx = 5
    try:
        with pytest.raises(Exception, match="HTTP 503"):
            await act.fleet()
    finally:
        await act.close()
    assert registry.get_sample_value(
        "pdc_actuator_calls_total", {"actuator": "router", "op": "list_workers", "result": "gave_up"}
    ) == 1


async def test_recovery_finishes_switched_flip_and_rolls_back_early_one(fleet, registry, tmp_path):
    # a previous controller died: d1 was already switched to prefill (out of the router),
    # d0 was being drained (out of the router, still decode)
    del fleet.registry["id-d1"]
    del fleet.registry["id-d0"]
    fleet.registry["id-d2"] = (fleet.url("d2"), "decode", None)
    fleet.workers["d2"] = W("decode")
    fleet.workers["d1"].role = "prefill"
    journal = {
        fleet.url("d1"): {"worker": fleet.url("d1"), "from_role": "decode", "to_role": "prefill", "reason": "r",
                          "started_at": 0.0, "step": "switch", "bootstrap_port": None, "history": []},
        fleet.url("d0"): {"worker": fleet.url("d0"), "from_role": "decode", "to_role": "prefill", "reason": "r",
                          "started_at": 0.0, "step": "drain", "bootstrap_port": None, "history": []},
    }
    (tmp_path / "flips.json").write_text(json.dumps(journal))
    act = make(fleet, registry, tmp_path)
    try:
        assert set(act.flipper.in_flight) == {fleet.url("d0"), fleet.url("d1")}
        view = await act.fleet()  # the first look at the fleet runs recovery
        assert view.flips_in_flight == ()
        results = {r.target.rsplit("/", 1)[1]: r for r in act.recovered}
    finally:
        await act.close()
    assert results["d1"].ok and results["d1"].detail == "finished after restart"
    assert not results["d0"].ok and "rolled back to decode" in results["d0"].detail
    assert roles(fleet) == {"p0": "prefill", "p1": "prefill", "d2": "decode", "d1": "prefill", "d0": "decode"}
    assert json.loads((tmp_path / "flips.json").read_text()) == {}


async def test_scale_down_drains_and_scale_up_reuses_spare(fleet, registry):
    act = make(fleet, registry)
    fleet.workers["d0"].load = 2
    fleet.workers["d1"].load = 2
    try:
        down = await act.scale("decode", -1, "over_provisioned")
        refused = await act.scale("decode", -1, "over_provisioned")
        up = await act.scale("prefill", 1, "ttft_violation")
        view = await act.fleet()
    finally:
        await act.close()
    assert down.ok and "drained" in down.detail
    assert refused.detail == "refused: last_instance_of_pool"
    assert up.ok
    assert view.count("prefill") == 3 and view.count("decode") == 1
    assert registry.get_sample_value("pdc_scale_actions_total", {"result": "ok", "pool": "decode"}) == 1


@given(
    p=st.integers(0, 5), d=st.integers(0, 5), min_pool=st.integers(1, 3),
    flying=st.lists(st.sampled_from(["prefill", "decode"]), max_size=3),
    target=st.integers(0, 9),
)
def test_guard_never_drains_a_pool_below_minimum(p, d, min_pool, flying, target):
    ws = [WorkerView(f"p{i}", "prefill") for i in range(p)] + [WorkerView(f"d{i}", "decode") for i in range(d)]
    if not ws:
        return
    fleet = FleetView(tuple(ws))
    from controller.actuators.flip import FlipRecord

    in_flight = {f"x{i}": FlipRecord(f"x{i}", r, "decode" if r == "prefill" else "prefill", "r", 0.0)
                 for i, r in enumerate(flying)}
    w = ws[target % len(ws)]
    to = "decode" if w.role == "prefill" else "prefill"
    g = FlipGuard(min_pool_size=min_pool)
    why = g.refusal(fleet, w.url, to, in_flight)
    if why is None:
        leaving = sum(1 for r in flying if r == w.role) + 1
        assert fleet.count(w.role) - leaving >= min_pool
    # one flip per worker at a time, and never one the reconciler is repairing
    assert g.refusal(fleet, w.url, to, {w.url: FlipRecord(w.url, w.role, to, "r", 0.0)}) == "already_flipping"
    assert g.refusal(fleet, w.url, to, {}, busy={w.url}) == "worker_repairing"


def test_backoff_doubles_caps_and_resets():
    b = Backoff(initial_s=0.5, max_s=3.0)
    assert [b.failed() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.succeeded()
    assert b.failed() == 0.5


def test_step_names_are_stable():
    # journal files written by an older controller must still load
    assert [s.value for s in Step] == ["planned", "deregister", "drain", "switch", "register", "verify", "done",
                                       "rollback", "rolled_back", "failed"]
