"""Faults at the boundary, in process: the router/worker HTTP contract (tests/unit/_fleet_contract.py) with the
real actuator code. Each test is a "did not" row of issue 13 (fleet, flips) and fails on the code before the
reconciler and the honest rollback/verify:

- a worker killed mid-flip: rollback failed in ~3 s and was never retried (a healthy worker out for good);
- router restarted during a flip: a worker listed as decode while it served prefill, reported "rolled back";
- light load: "router sent traffic to decode peers but not to it" rolled back good flips;
- the reconciler never gives up silently (a metric and a log line per attempt, a final state) and backs off.
"""

from __future__ import annotations

import pytest
from aiohttp import web

from controller.actuators.flip import FlipRecord, Step, miss_probability
from tests.unit._fleet_contract import ContractFleet, W
from tests.unit.test_actuator_flip import make, roles


@pytest.fixture
async def fleet():
    f = ContractFleet()
    runner = web.AppRunner(f.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    f.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    for key, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
        f.workers[key] = W(role)
        f.registry[f"id-{key}"] = (f.url(key), role, 9000 if role == "prefill" else None)
    f.initial = dict(f.registry)
    yield f
    await runner.cleanup()


def attempts(registry, action: str, result: str) -> float:
    return registry.get_sample_value("pdc_reconcile_attempts_total", {"action": action, "result": result}) or 0.0


async def test_worker_killed_mid_flip_is_repaired_when_it_answers_again(fleet: ContractFleet, registry):
    act = make(fleet, registry, drain_timeout_s=0.3)
    fleet.workers["d1"].load = 10_000

    async def kill(rec: FlipRecord) -> None:
        if rec.step is Step.DRAIN:
            fleet.workers["d1"].dead = True  # killed while draining: no agent here can restart it

    act.flipper.on_step = kill
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
        assert (res.ok, res.outcome) == (False, "failed")
        assert "rollback failed" in res.detail and "reconciler" in res.detail
        assert fleet.url("d1") in act.flipper.failed  # journaled for repair, not forgotten
        # while it is down: out of the router, out of capacity, never given up
        for _ in range(4):  # the first probe only notes it; each later one is an attempt
            await act.reconcile()
            act.reconciler.workers[fleet.url("d1")].next_at = 0.0  # skip the backoff wait (virtual time)
        st = act.reconciler.workers[fleet.url("d1")]
        assert st.state == "failed" and st.failures >= 3
        assert attempts(registry, "probe", "failed") >= 3
        view = await act.fleet()
        assert [w.state for w in view.workers if w.url == fleet.url("d1")] == ["failed"]
        assert view.count("decode") == 1
        # its supervisor restarts it (still decode, idle): the next pass puts it back in its pool
        fleet.workers["d1"].dead = False
        fleet.workers["d1"].load = 0
        st.next_at = 0.0
        report = await act.reconcile()
    finally:
        await act.close()
    assert report.consistent, report
    assert roles(fleet)["d1"] == "decode"
    assert act.flipper.failed == {}
    assert attempts(registry, "register", "ok") == 1
    assert act.reconciler.workers[fleet.url("d1")].state == "consistent"
    assert act.reconciler.workers[fleet.url("d1")].backoff.failures == 0  # reset on success


async def test_healthy_worker_left_out_is_registered_in_the_pool_it_serves(fleet: ContractFleet, registry, tmp_path):
    # what a controller killed mid-rollback leaves: d1 out of the router, serving decode, journaled FAILED
    import json

    del fleet.registry["id-d1"]
    journal = {fleet.url("d1"): {"worker": fleet.url("d1"), "from_role": "decode", "to_role": "prefill",
                                 "reason": "r", "started_at": 0.0, "step": "failed", "bootstrap_port": None,
                                 "history": []}}
    (tmp_path / "flips.json").write_text(json.dumps(journal))
    act = make(fleet, registry, tmp_path)
    try:
        before = await act.fleet()
        assert before.count("decode") == 1  # excluded from capacity until repaired
        report = await act.reconcile()
    finally:
        await act.close()
    assert report.consistent
    assert roles(fleet) == {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode"}
    assert json.loads((tmp_path / "flips.json").read_text()) == {}


async def test_router_restart_during_flip_never_lists_a_worker_in_the_wrong_pool(fleet: ContractFleet, registry):
    # the router dies after d1 switched to prefill and comes back with its start-up arguments: it lists d1 as
    # decode. Before: the rollback saw "listed as decode, healthy" and reported "rolled back" while d1 served
    # prefill. Now the flip rides out the outage and registers d1 where it serves.
    act = make(fleet, registry, register_timeout_s=5.0)

    async def restart(rec: FlipRecord) -> None:
        if rec.step is Step.REGISTER:
            fleet.restart_router(down_calls=8)

    act.flipper.on_step = restart
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
        report = await act.reconcile()
    finally:
        await act.close()
    assert res.ok and res.outcome == "done", res.detail
    assert fleet.workers["d1"].role == "prefill"
    assert roles(fleet)["d1"] == "prefill"
    assert report.consistent


async def test_rollback_checks_what_the_worker_serves(fleet: ContractFleet, registry):
    # verify fails (the worker is frozen and its peers got plenty), and meanwhile the router restarted and lists
    # d1 in its start-up role, decode, while d1 serves prefill: the rollback must switch it back, not assume
    fleet.frozen = {"d1"}
    fleet.traffic_per_scrape = 20
    act = make(fleet, registry, verify_timeout_s=0.05)

    async def restart(rec: FlipRecord) -> None:
        if rec.step is Step.ROLLBACK:
            fleet.restart_router()

    act.flipper.on_step = restart
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
    finally:
        await act.close()
    assert res.outcome == "rolled_back", res.detail
    assert fleet.workers["d1"].role == "decode"  # really back: it serves decode
    assert roles(fleet)["d1"] == "decode"


async def test_router_listing_a_worker_in_the_wrong_pool_is_reregistered(fleet: ContractFleet, registry):
    # a flip done long ago (d1 serves prefill), then a router restart lists it as decode
    fleet.workers["d1"].role = "prefill"
    act = make(fleet, registry)
    try:
        report = await act.reconcile()
    finally:
        await act.close()
    assert report.consistent and "reregister" in report.actions[0]
    assert roles(fleet)["d1"] == "prefill"
    assert attempts(registry, "reregister", "ok") == 1


async def test_light_load_flip_stands_unverified(fleet: ContractFleet, registry):
    # one request reached each peer and none reached d1 in the window: even spreading misses it with P = 4/9;
    # before, this rolled the flip back ("router sent traffic to prefill peers but not to it")
    fleet.frozen = {"d1"}
    act = make(fleet, registry, verify_timeout_s=0.05)
    try:
        res = await act.flip(fleet.url("d1"), "prefill", "r")
    finally:
        await act.close()
    assert res.ok and res.outcome == "done", res.detail
    assert "unverified traffic" in res.detail and "it reports prefill, healthy, listed" in res.detail
    assert roles(fleet)["d1"] == "prefill"


async def test_dead_listed_worker_is_deregistered_after_two_probes_and_excluded(fleet: ContractFleet, registry):
    act = make(fleet, registry)
    fleet.workers["d0"].dead = True
    try:
        first = await act.reconcile()
        assert not first.consistent and roles(fleet)["d0"] == "decode"  # one failed probe is not enough
        second = await act.reconcile()
        view = await act.fleet()
    finally:
        await act.close()
    assert not second.consistent
    assert "d0" not in roles(fleet)
    assert view.count("decode") == 1 and [w.state for w in view.workers if w.url == fleet.url("d0")] == ["failed"]
    assert attempts(registry, "deregister", "ok") == 1
    assert registry.get_sample_value("pdc_reconcile_workers", {"state": "failed"}) == 1


async def test_router_down_is_counted_and_retried(fleet: ContractFleet, registry):
    act = make(fleet, registry, retries=0)
    fleet.router_5xx = 3
    try:
        r = await act.reconcile()
        fleet.router_5xx = 0
        r2 = await act.reconcile()
    finally:
        await act.close()
    assert not r.router_ok and not r.consistent
    assert registry.get_sample_value("pdc_reconcile_passes_total", {"result": "router_unreachable"}) == 1
    assert r2.consistent


async def test_flips_and_repairs_keep_out_of_each_others_way(fleet: ContractFleet, registry):
    act = make(fleet, registry)
    try:
        act.flipper.busy.add(fleet.url("d1"))  # the reconciler is repairing it
        res = await act.flip(fleet.url("d1"), "prefill", "r")
        act.flipper.busy.clear()
        assert (res.outcome, res.why) == ("refused", "worker_repairing")
        # a worker a flip is moving is left alone, even though the router does not list it right now
        del fleet.registry["id-d1"]
        act.flipper.active.add(fleet.url("d1"))
        report = await act.reconcile()
        assert "d1" not in roles(fleet) and report.actions == ()
    finally:
        act.flipper.active.clear()
        await act.close()


async def test_background_reconciler_starts_with_the_fleet_and_stops_on_close(fleet: ContractFleet, registry):
    import asyncio

    fleet.workers["d1"].role = "prefill"  # listed as decode: inconsistent
    act = make(fleet, registry, reconcile_interval_s=0.05)
    try:
        await act.fleet()
        for _ in range(100):
            if roles(fleet)["d1"] == "prefill":
                break
            await asyncio.sleep(0.02)
    finally:
        await act.close()
    assert roles(fleet)["d1"] == "prefill"
    assert act._reconcile_task is None


@pytest.mark.parametrize(("peers", "m", "fails"), [(2, 2, False), (2, 17, False), (2, 18, True), (1, 10, True),
                                                   (0, 100, False)])
def test_miss_probability_threshold(peers, m, fails):
    # (n/(n+1))^m < 1e-3: with 2 peers that is 18 requests or more
    assert (miss_probability(peers, m) < 1e-3) is fails


class BelievingAgent:
    """An agent that reports what it believes (running/prefill, healthy by URL) whatever serves on its port."""

    def __init__(self, url: str, role: str) -> None:
        from controller.agent.protocol import Reply

        self.endpoints = {url: "tcp://127.0.0.1:1"}
        self.reply = Reply(id="x", ok=True, state="running", role=role, healthy=True, url=url)
        self.switches: list[str] = []

    async def status(self, url: str):
        return self.reply

    async def switch(self, url: str, to_role: str, timeout_s: float) -> None:
        self.switches.append(to_role)  # "already running as to_role": nothing to do, it believes


async def test_agent_report_never_overrides_what_the_worker_serves(fleet: ContractFleet, registry):
    # a restarted agent reports running/prefill while the (orphaned) server on its port serves decode: the
    # switcher must say decode, and a "switch to prefill" the agent claims done must fail, not register it
    from controller.actuators.errors import AgentError
    from controller.actuators.http import Http
    from controller.actuators.metrics import ActuatorMetrics
    from controller.actuators.retry import Retrier
    from controller.actuators.switch import AgentRestart
    from controller.actuators.worker import WorkerClient

    http = Http(2.0)
    url = fleet.url("d1")
    sw = AgentRestart(BelievingAgent(url, "prefill"), http,  # type: ignore[arg-type]
                      WorkerClient(http, Retrier("worker", ActuatorMetrics(registry), retries=0)))
    try:
        assert await sw.current_role(url) == "decode"
        with pytest.raises(AgentError, match=r"reports running as prefill but the server on .* serves decode"):
            await sw.switch(url, "prefill", 1.0)
    finally:
        await http.close()


async def test_controller_killed_during_a_switch_recovery_waits_for_it(fleet: ContractFleet, registry, tmp_path):
    # a controller died while d1 restarted as prefill (a 20 s switch): d1 does not answer yet. Before, recovery
    # saw "serves nothing", tried a rollback that waited for the dead worker to go idle, failed and never retried.
    import asyncio
    import json

    del fleet.registry["id-d1"]
    fleet.workers["d1"].dead = True
    journal = {fleet.url("d1"): {"worker": fleet.url("d1"), "from_role": "decode", "to_role": "prefill",
                                 "reason": "r", "started_at": 0.0, "step": "switch", "bootstrap_port": None,
                                 "history": []}}
    (tmp_path / "flips.json").write_text(json.dumps(journal))

    async def restart_finishes() -> None:
        await asyncio.sleep(0.3)
        fleet.workers["d1"].role = "prefill"
        fleet.workers["d1"].dead = False

    act = make(fleet, registry, tmp_path, switch_timeout_s=5.0)
    done = asyncio.create_task(restart_finishes())
    try:
        await act.fleet()  # the first look at the fleet recovers
        report = await act.reconcile()
    finally:
        await done
        await act.close()
    assert [(r.outcome, r.detail) for r in act.recovered] == [("done", "finished after restart")]
    assert roles(fleet)["d1"] == "prefill" and report.consistent
    assert json.loads((tmp_path / "flips.json").read_text()) == {}


async def test_advisory_or_paused_controller_reports_and_touches_nothing(fleet: ContractFleet, registry):
    fleet.workers["d1"].role = "prefill"  # listed as decode: inconsistent
    act = make(fleet, registry)
    act.heal_when = lambda: False  # the sidecar sets this to "the loop is acting"
    try:
        report = await act.reconcile()
        assert roles(fleet)["d1"] == "decode" and not report.consistent
        assert report.actions == (f"would reregister {fleet.url('d1')}",)
        assert attempts(registry, "reregister", "advised") == 1
        act.heal_when = lambda: True
        act.reconciler.workers[fleet.url("d1")].next_at = 0.0
        assert (await act.reconcile()).consistent
    finally:
        await act.close()
    assert roles(fleet)["d1"] == "prefill"


@pytest.mark.parametrize("advisory", [True, False])
async def test_sidecar_lets_the_reconciler_repair_only_while_acting(fleet: ContractFleet, registry, advisory):
    from prometheus_client import CollectorRegistry

    from controller.config import config_from_dict
    from controller.runtime.sidecar import Sidecar

    act = make(fleet, registry)
    try:
        sc = Sidecar(config_from_dict({}), registry=CollectorRegistry(), advisory=advisory, actuator=act,
                     decide=lambda state, obs, now: None)
        assert act.heal_when() is (not advisory)
        if not advisory:
            sc.loop.set_paused(True)
            assert act.heal_when() is False
    finally:
        await act.close()
