"""Flips by restart through node agents (real `pd-controller agent` processes, CURVE over real ZeroMQ), in
front of the real sglang-router: an agent killed in the middle of a flip -> the flip rolls back and the
fleet keeps serving; a forged (unknown key) command is refused and logged by the agent."""

from __future__ import annotations

import asyncio
import signal

import pytest

from controller.actuators import build_actuator
from controller.actuators.errors import TransientError
from controller.actuators.fleet import RouterActuator
from controller.actuators.flip import FlipRecord, Step
from controller.config import ActuationConfig
from harness.agentfleet import AgentFleet
from tests.e2e.test_flip_e2e import ClientLoad, router_split

pytestmark = pytest.mark.e2e
PROFILE = "llama2-70b-h100-tp8"


@pytest.fixture
async def agents(tmp_path):
    f = AgentFleet(tmp_path, ["prefill", "prefill", "decode", "decode"], profile=PROFILE, time_scale=0.02)
    await f.start()
    try:
        yield f
    finally:
        await asyncio.to_thread(f.stop)


def actuation(f: AgentFleet, **kw) -> ActuationConfig:
    cfg = dict(
        kind="router", router_url=f.router_url, switch="agent", agents=f.endpoints,
        agent_client_key=f.client_sec, agent_server_key=f.server_pub, bootstrap_ports=f.bootstrap,
        drain_timeout_s=30, switch_timeout_s=60, register_timeout_s=30, verify_timeout_s=20, poll_interval_s=0.1,
        http_timeout_s=2.0, backoff_initial_s=0.05, backoff_max_s=0.5,
    )
    cfg.update(kw)
    return ActuationConfig(**cfg)


async def test_flip_by_agent_restart(agents, registry):
    act = build_actuator(actuation(agents), registry)
    d1 = agents.urls[3]
    try:
        async with ClientLoad(agents.router_url) as load:
            await load.wait_for(5)
            res = await act.flip(d1, "prefill", "e2e: restart flip")
            await load.wait_for(load.outcomes["ok"] + 10)
    finally:
        await act.close()
    assert res.ok, res.detail
    assert (await router_split(agents.router_url))[d1] == "prefill"
    assert load.failed == 0, (load.outcomes, load.errors[:3])


async def test_agent_killed_mid_flip_rolls_back_and_fleet_keeps_serving(agents, registry):
    act = build_actuator(actuation(agents), registry)
    assert isinstance(act, RouterActuator)
    d1 = agents.urls[3]
    idx = agents.urls.index(d1)
    status = await agents.client().send(agents.endpoints[d1], "status")
    assert status.pid is not None
    agents.orphans.append(status.pid)  # its server outlives the agent (own session); cleaned up at the end

    async def kill_agent(rec: FlipRecord) -> None:
        if rec.step is Step.SWITCH:  # drained and out of the router; the restart is next
            agents.agents[idx].send_signal(signal.SIGKILL)
            agents.agents[idx].wait()

    act.flipper.on_step = kill_agent
    try:
        async with ClientLoad(agents.router_url) as load:
            await load.wait_for(5)
            res = await act.flip(d1, "prefill", "e2e: agent dies")
            await load.wait_for(load.outcomes["ok"] + 10)
    finally:
        await act.close()
    assert not res.ok
    assert "failed at switch" in res.detail and "rolled back to decode" in res.detail, res.detail
    split = await router_split(agents.router_url)
    assert split[d1] == "decode"  # back serving its old role: the worker itself was fine
    assert sorted(split.values()) == ["decode", "decode", "prefill", "prefill"]
    assert load.failed == 0, (load.outcomes, load.errors[:3])
    assert registry.get_sample_value("pdc_flips_total", {"result": "rolled_back", "to_role": "prefill"}) == 1


async def test_forged_command_is_refused_and_logged(agents):
    rogue = agents.client(secret=agents.rogue_sec, timeout_s=1.0)
    with pytest.raises(TransientError, match="no reply"):
        await rogue.send(agents.endpoints[agents.urls[0]], "switch", "decode")
    # nothing happened: the agent still serves prefill, and its log names the refusal
    r = await agents.client().send(agents.endpoints[agents.urls[0]], "status")
    assert (r.state, r.role) == ("running", "prefill")
    log = ""
    for _ in range(100):  # the agent writes its log line asynchronously
        log = (agents.tmp / "agent0.log").read_text()
        if "agent_refused" in log:
            break
        await asyncio.sleep(0.1)
    assert "agent_refused" in log and "unauthenticated" in log
