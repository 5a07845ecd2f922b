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


async def _status(client: AgentClient, endpoint: str, want: tuple[str, str], timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    r = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            r = await client.send(endpoint, "status")
            if (r.state, r.role) == want and r.healthy:
                return r
        await asyncio.sleep(0.2)
    raise AssertionError(f"agent never reported {want}: last {r}")


async def test_agent_killed_and_restarted_adopts_its_server_no_orphan(tmp_path):
    """Issue 13: a restarted agent reported running/prefill while the orphaned server on its port served decode."""
    import json
    import os
    import signal
    import subprocess

    import yaml
    import zmq

    spub, ssec = generate(tmp_path, "agent")
    cpub, csec = generate(tmp_path, "controller")
    (tmp_path / "authorized").mkdir()
    (tmp_path / "authorized" / "controller.key").write_text(cpub.read_text())
    port, bport, zport = free_port(), free_port(), free_port()
    url, endpoint = f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{zport}"
    cfg = {"endpoint": endpoint, "worker_url": url, "initial_role": "prefill", "bootstrap_port": bport,
           "server_secret_key": str(ssec), "authorized_keys_dir": str(tmp_path / "authorized"),
           "poll_interval_s": 0.1, "start_timeout_s": 60, "state_file": str(tmp_path / "state" / "server.json"),
           "start": [sys.executable, "-m", "controller", "emulate-worker", "--role", "{role}", "--profile",
                     "llama2-70b-h100-tp8", "--host", "{host}", "--port", "{port}", "--bootstrap-port",
                     "{bootstrap_port}", "--time-scale", "0.05"]}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def launch() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "controller", "agent", "--config", str(path)],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agent.log", "ab"),
                                stdin=subprocess.DEVNULL, start_new_session=True)

    ctx = zmq.asyncio.Context()
    client = AgentClient(CurveKeys(csec, spub), timeout_s=5.0, ctx=ctx)
    agent = launch()
    server_pid = None
    try:
        await _status(client, endpoint, ("running", "prefill"))
        await client.send(endpoint, "switch", "decode")
        r = await _status(client, endpoint, ("running", "decode"))
        server_pid = r.pid
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        assert await server_role(url) == "decode"  # the server outlived its agent
        agent = launch()  # configured initial_role: prefill
        r = await _status(client, endpoint, ("running", "decode"))
        assert r.pid == server_pid and "adopted" in r.progress
        assert await server_role(url) == "decode"
        # 4 KB of nested JSON from an authorised client: an error reply; agent and server live on
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        k = CurveKeys(csec, spub)
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = k.public, k.secret, k.server_public
        s.connect(endpoint)
        await s.send_multipart([b"", b"[" * 2000 + b"]" * 2000])
        assert await s.poll(5000)
        assert json.loads((await s.recv_multipart())[-1])["ok"] is False
        s.close(0)
        r = await _status(client, endpoint, ("running", "decode"))
        assert r.pid == server_pid and agent.poll() is None
        # a clean stop of the agent stops its server: nothing left on the port
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
        with pytest.raises(aiohttp.ClientError):
            await server_role(url)
        assert not (tmp_path / "state" / "server.json").exists()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if server_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server_pid, signal.SIGKILL)
        ctx.term()
