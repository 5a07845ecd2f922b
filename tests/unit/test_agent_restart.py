"""The node agent restarts a real emulated SGLang worker in the other role, over CURVE, and reports it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time

import aiohttp
import pytest
import zmq.asyncio

from controller.actuators.agent import AgentClient, AgentSwitcher, CurveKeys
from controller.actuators.errors import AgentError
from controller.agent.config import AgentConfig, load_agent_config
from controller.agent.keys import generate
from controller.agent.server import NodeAgent

pytestmark = pytest.mark.e2e

REPO_AGENT_CONFIG = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "agent" / "agent.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def setup(tmp_path):
    spub, ssec = generate(tmp_path, "agent")
    cpub, csec = generate(tmp_path, "controller")
    auth = tmp_path / "authorized"
    auth.mkdir()
    (auth / "controller.key").write_text(cpub.read_text())
    port, bport = free_port(), free_port()
    cfg = AgentConfig(
        endpoint="tcp://127.0.0.1:*", worker_url=f"http://127.0.0.1:{port}", initial_role="prefill",
        bootstrap_port=bport, server_secret_key=ssec, authorized_keys_dir=auth, poll_interval_s=0.1,
        start_timeout_s=60,
        start=[sys.executable, "-m", "controller", "emulate-worker", "--role", "{role}", "--profile",
               "llama2-70b-h100-tp8", "--host", "{host}", "--port", "{port}", "--bootstrap-port",
               "{bootstrap_port}", "--time-scale", "0.05"],
    )
    ctx = zmq.asyncio.Context()
    agent = NodeAgent(cfg, ctx)
    await agent.start()
    serve = asyncio.create_task(agent.serve(), name="agent-serve")
    client = AgentClient(CurveKeys(csec, spub), timeout_s=10.0, ctx=ctx)
    sw = AgentSwitcher(client, {cfg.worker_url: agent.bound_endpoint}, poll_interval_s=0.1, clock=time.monotonic)
    yield agent, sw, cfg
    serve.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serve
    await agent.close()
    ctx.term()


async def server_role(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/server_info") as r:
        return (await r.json())["disaggregation_mode"]


async def test_agent_restarts_worker_in_other_role(setup):
    agent, sw, cfg = setup
    st = await sw.status(cfg.worker_url)
    assert (st.state, st.role, st.healthy) == ("running", "prefill", True)
    first_pid = agent.proc.pid
    await sw.switch(cfg.worker_url, "decode", timeout_s=60)
    st = await sw.status(cfg.worker_url)
    assert (st.state, st.role, st.healthy) == ("running", "decode", True)
    assert await server_role(cfg.worker_url) == "decode"
    assert agent.proc.pid != first_pid  # a restart, not an in-place switch
    assert agent.handled["switch"] == 1


async def test_busy_agent_refuses_second_switch(setup):
    _agent, sw, cfg = setup
    await sw.client.send(sw.endpoint(cfg.worker_url), "switch", "decode")
    with pytest.raises(AgentError, match="busy"):
        await sw.client.send(sw.endpoint(cfg.worker_url), "switch", "prefill")
    await sw.switch(cfg.worker_url, "decode", timeout_s=60)  # the first one completes


def test_shipped_agent_config_is_valid(tmp_path):
    cfg = load_agent_config(REPO_AGENT_CONFIG)
    assert cfg.start[0] == "pd-controller" and "{role}" in cfg.start
    assert cfg.server_secret_key is not None and cfg.server_secret_key.is_absolute()
