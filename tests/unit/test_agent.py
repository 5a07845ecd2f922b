"""Node agent: CURVE-authenticated command channel, refusal of forged/unauthenticated/malformed commands,
config rules (argv templates only, never a shell string). Real ZeroMQ sockets on loopback."""

from __future__ import annotations

import contextlib
import json

import pytest
import zmq
import zmq.asyncio
from hypothesis import given
from hypothesis import strategies as st

from controller.actuators.agent import AgentClient, CurveKeys
from controller.actuators.errors import AgentError, TransientError
from controller.agent.config import AgentConfig
from controller.agent.keys import generate
from controller.agent.protocol import MalformedCommand, decode_command
from controller.agent.server import NodeAgent, render


@pytest.fixture
def keys(tmp_path):
    server_pub, server_sec = generate(tmp_path / "server", "agent")
    client_pub, client_sec = generate(tmp_path / "client", "controller")
    auth = tmp_path / "authorized"
    auth.mkdir()
    (auth / "controller.key").write_text(client_pub.read_text())
    _rogue_pub, rogue_sec = generate(tmp_path / "rogue", "rogue")
    return {"server_pub": server_pub, "server_sec": server_sec, "client_sec": client_sec,
            "authorized": auth, "rogue_sec": rogue_sec}


@pytest.fixture
async def agent(keys):
    cfg = AgentConfig(
        endpoint="tcp://127.0.0.1:*", worker_url="http://127.0.0.1:9", start=["true"],
        server_secret_key=keys["server_sec"], authorized_keys_dir=keys["authorized"], start_on_launch=False,
    )
    ctx = zmq.asyncio.Context()
    a = NodeAgent(cfg, ctx)
    await a.start()
    import asyncio

    task = asyncio.create_task(a.serve(), name="agent-serve")
    yield a
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await a.close()
    ctx.term()


async def test_authenticated_status(agent, keys):
    client = AgentClient(CurveKeys(keys["client_sec"], keys["server_pub"]), timeout_s=5.0)
    r = await client.send(agent.bound_endpoint, "status")
    assert r.ok and r.state == "stopped" and r.role is None and r.url == "http://127.0.0.1:9"
    assert agent.handled["status"] == 1


async def test_unknown_key_is_refused_and_logged(agent, keys):
    rogue = AgentClient(CurveKeys(keys["rogue_sec"], keys["server_pub"]), timeout_s=0.5)
    with pytest.raises(TransientError, match="no reply"):
        await rogue.send(agent.bound_endpoint, "switch", "prefill")
    assert agent.refusals["unauthenticated"] >= 1
    assert agent.handled["switch"] == 0
    assert agent.state == "stopped"


async def test_plaintext_client_gets_nothing(agent):
    plain = AgentClient(None, timeout_s=0.5)
    with pytest.raises(TransientError):
        await plain.send(agent.bound_endpoint, "switch", "decode")
    assert sum(agent.handled.values()) == 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"rm -rf /", "not_json"),
        (json.dumps({"v": 1, "id": "a", "cmd": "exec", "role": "prefill"}).encode(), "bad_cmd"),
        (json.dumps({"v": 1, "id": "a", "cmd": "switch", "role": "prefill; reboot"}).encode(), "bad_role"),
        (json.dumps({"v": 1, "id": "a", "cmd": "switch", "role": "decode", "argv": ["sh"]}).encode(),
         "unknown_field"),
        (json.dumps({"v": 2, "id": "a", "cmd": "status"}).encode(), "bad_version"),
        (b"x" * 10_000, "too_large"),
    ],
)
async def test_malformed_commands_are_refused_with_reason(agent, keys, payload, reason):
    k = CurveKeys(keys["client_sec"], keys["server_pub"])
    ctx = zmq.asyncio.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = k.public, k.secret, k.server_public
    s.connect(agent.bound_endpoint)
    try:
        await s.send_multipart([b"", payload])
        assert await s.poll(5000)
        reply = json.loads((await s.recv_multipart())[-1])
    finally:
        s.close(0)
    assert reply["ok"] is False and reply["error"].startswith("malformed command")
    assert agent.refusals[reason] == 1
    assert agent.state == "stopped" and agent.proc is None


async def test_agent_error_reply_raises(agent, keys):
    # a start that cannot work: the agent accepts, the work fails, status reports it
    client = AgentClient(CurveKeys(keys["client_sec"], keys["server_pub"]), timeout_s=5.0)
    r = await client.send(agent.bound_endpoint, "start", "prefill")
    assert r.ok
    import asyncio

    for _ in range(200):
        st_ = await client.send(agent.bound_endpoint, "status")
        if st_.state == "failed":
            break
        await asyncio.sleep(0.02)
    assert st_.state == "failed" and "exited" in st_.progress  # `true` exits at once: not a server


def test_wrong_key_file_is_a_clear_error(keys):
    with pytest.raises(AgentError, match="not a secret key file"):
        CurveKeys(keys["server_pub"], keys["server_pub"])


def test_config_refuses_shell_strings_and_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="shell string"):
        AgentConfig(endpoint="tcp://127.0.0.1:1", worker_url="http://x", start=["sh", "-c", "echo {role}"],
                    insecure=True)
    with pytest.raises(ValueError, match="CURVE needs"):
        AgentConfig(endpoint="tcp://127.0.0.1:1", worker_url="http://x", start=["srv"])
    with pytest.raises(ValueError, match="insecure mode binds loopback"):
        AgentConfig(endpoint="tcp://0.0.0.0:1", worker_url="http://x", start=["srv"], insecure=True)


def test_render_substitutes_per_element_only():
    argv = render(["srv", "--mode", "{role}", "--port={port}", "{role}{role}"], {"role": "prefill", "port": "8"})
    assert argv == ["srv", "--mode", "prefill", "--port=8", "prefillprefill"]


@given(st.binary(max_size=300) | st.dictionaries(st.text(max_size=5), st.text(max_size=5)).map(
    lambda d: json.dumps(d).encode()))
def test_decoder_only_accepts_or_refuses(raw):
    try:
        c = decode_command(raw)
    except MalformedCommand as e:
        assert e.reason
    else:
        assert c.cmd in ("status", "switch", "stop", "start")
