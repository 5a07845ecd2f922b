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


# ---- issue 13: the agent survives any message ------------------------------------------------------

async def _raw(agent, keys, payload: bytes) -> dict:
    k = CurveKeys(keys["client_sec"], keys["server_pub"])
    s = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = k.public, k.secret, k.server_public
    s.connect(agent.bound_endpoint)
    try:
        await s.send_multipart([b"", payload])
        assert await s.poll(5000)
        return json.loads((await s.recv_multipart())[-1])
    finally:
        s.close(0)


@pytest.mark.parametrize("payload", [
    b"[" * 2000 + b"]" * 2000,  # 4 KB of nesting: RecursionError escaped the parser before
    b'{"v": 1, "id": "a", "cmd": "status", "role": ' + b"[" * 1900 + b"]" * 1900 + b"}",
    b'{"v": 1, "id": "a", "cmd": "status", "x": {"y": {"z": 1}}}',
    b'{"v": 1e999, "id": "a", "cmd": "status"}',
    b'{"v": 1, "id": "' + b"\xff" * 10 + b'", "cmd": "status"}',
    b'{"v": ' + b"9" * 4000 + b"}",
])
async def test_hostile_messages_are_answered_and_the_agent_lives_on(agent, keys, payload):
    reply = await _raw(agent, keys, payload)
    assert reply["ok"] is False and reply["error"].startswith("malformed command")
    client = AgentClient(CurveKeys(keys["client_sec"], keys["server_pub"]), timeout_s=5.0)
    assert (await client.send(agent.bound_endpoint, "status")).ok  # still serving


async def test_an_unexpected_failure_is_one_error_reply(agent, keys, monkeypatch):
    async def boom(_cmd):
        raise RuntimeError("a bug")

    monkeypatch.setattr(agent, "_dispatch", boom)
    reply = await _raw(agent, keys, json.dumps({"v": 1, "id": "a", "cmd": "status"}).encode())
    assert reply["ok"] is False and "internal error: RuntimeError" in reply["error"]
    assert agent.refusals["internal_error"] == 1
    monkeypatch.undo()
    assert (await _raw(agent, keys, json.dumps({"v": 1, "id": "b", "cmd": "status"}).encode()))["ok"] is True


# ---- issue 13: keys 0600 from the start, names inside the key directory ---------------------------

def test_secret_key_is_created_0600_by_the_open_itself(tmp_path, monkeypatch):
    import os

    calls = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **kw):
        calls.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        _pub, sec = generate(tmp_path / "k", "agent")
    finally:
        os.umask(old)
    created = [(p, f, m) for p, f, m in calls if "key_secret" in p]
    assert created and all(f & os.O_CREAT and f & os.O_EXCL and m == 0o600 for _p, f, m in created), created
    assert (sec.stat().st_mode & 0o777) == 0o600
    assert (sec.parent.stat().st_mode & 0o777) == 0o700


def test_secret_key_is_never_seen_wider_than_0600(tmp_path):
    import os
    import threading

    d = tmp_path / "k"
    d.mkdir()
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for e in os.scandir(d):
                if "secret" in e.name:
                    with contextlib.suppress(FileNotFoundError):
                        seen.append((e.name, e.stat(follow_symlinks=False).st_mode & 0o777))

    old = os.umask(0o022)
    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(200):
            generate(d, f"n{i}")
    finally:
        stop.set()
        t.join()
        os.umask(old)
    assert seen and all(mode == 0o600 for _n, mode in seen), sorted({m for _n, m in seen})


@pytest.mark.parametrize("name", ["../x", "../../etc/x", "/abs/x", "a/b", "..", ".", ".hidden", "x\x00y", "", "a" * 65])
def test_key_name_cannot_escape_the_directory(tmp_path, capsys, name):
    from controller.cli.main import main

    d = tmp_path / "keys" / "inner"
    assert main(["agent", "--keygen", str(d), "--name", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--name=" in err and "Traceback" not in err
    assert not any(p.is_file() for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_keygen_refuses_to_overwrite(tmp_path, capsys):
    from controller.cli.main import main

    assert main(["agent", "--keygen", str(tmp_path), "--name", "a"]) == 0
    before = (tmp_path / "a.key_secret").read_bytes()
    assert main(["agent", "--keygen", str(tmp_path), "--name", "a"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "a.key_secret").read_bytes() == before


# ---- issue 13: the agent owns the process it started --------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_server(port: int):
    """A foreign HTTP server (not started by any agent) that answers 200 on /."""
    import socket
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return p
        time.sleep(0.05)
    p.kill()
    raise RuntimeError("http.server did not start")


def _owned_cfg(keys, tmp_path, port, role="prefill"):
    import sys

    return AgentConfig(
        endpoint="tcp://127.0.0.1:*", worker_url=f"http://127.0.0.1:{port}", initial_role=role,
        start=[sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"], health_path="/",
        server_secret_key=keys["server_sec"], authorized_keys_dir=keys["authorized"], poll_interval_s=0.05,
        start_timeout_s=20, stop_timeout_s=5, state_file=tmp_path / "state" / "server.json",
    )


@contextlib.asynccontextmanager
async def _agent(cfg):
    ctx = zmq.asyncio.Context()
    a = NodeAgent(cfg, ctx)
    try:
        await a.start()
        yield a
    finally:
        await a.close()
        ctx.term()


def _alive(pid: int) -> bool:
    from controller.agent.owned import start_time

    return start_time(pid) is not None


async def test_refuses_to_start_beside_a_server_it_did_not_start(keys, tmp_path):
    port = _free_port()
    foreign = _http_server(port)
    try:
        async with _agent(_owned_cfg(keys, tmp_path, port)) as a:
            assert a.state == "failed" and f"pid {foreign.pid}" in a.progress, a.progress
            r = await a._dispatch(__import__("controller.agent.protocol", fromlist=["Command"]).Command("x", "status"))
            assert (r.state, r.healthy, r.pid) == ("failed", False, None)
        assert foreign.poll() is None  # and it did not touch the foreign server
    finally:
        foreign.kill()
        foreign.wait()


async def test_health_is_our_process_on_its_port_not_whatever_answers(keys, tmp_path):
    import os
    import signal

    from controller.agent.protocol import Command

    port = _free_port()
    async with _agent(_owned_cfg(keys, tmp_path, port)) as a:
        assert (a.state, a.role) == ("running", "prefill")
        assert (await a._dispatch(Command("a", "status"))).healthy
        ours = a.proc.pid
        os.killpg(ours, signal.SIGKILL)
        for _ in range(200):
            if not a.proc.alive():
                break
            await __import__("asyncio").sleep(0.02)
        foreign = _http_server(port)  # someone else now answers 200 on the worker URL
        try:
            r = await a._dispatch(Command("b", "status"))
            assert (r.state, r.healthy) == ("failed", False) and "exited" in r.progress
        finally:
            foreign.kill()
            foreign.wait()


async def test_restarted_agent_adopts_its_server_and_reports_its_real_role(keys, tmp_path):
    from controller.agent.protocol import Command

    port = _free_port()
    cfg = _owned_cfg(keys, tmp_path, port, role="decode")
    ctx = zmq.asyncio.Context()
    first = NodeAgent(cfg, ctx)
    await first.start()
    pid = first.proc.pid
    await first.close(stop_server=False)  # the agent dies; its server lives on (as after kill -9)
    ctx.term()
    assert _alive(pid) and cfg.state_file.exists()
    # the new agent is configured for prefill, but what runs is decode: it says so
    async with _agent(cfg.model_copy(update={"initial_role": "prefill"})) as again:
        r = await again._dispatch(Command("a", "status"))
        assert (r.state, r.role, r.healthy, r.pid) == ("running", "decode", True, pid)
        assert "adopted" in r.progress
    # a clean stop ends the adopted server too: nothing left on the port, no state file
    assert not _alive(pid) and not cfg.state_file.exists()


async def test_stale_state_file_is_ignored_and_never_kills_a_stranger(keys, tmp_path):
    import os

    from controller.agent.owned import write_state

    port = _free_port()
    cfg = _owned_cfg(keys, tmp_path, port)
    # our own pid with a wrong start time: a reused pid, not the recorded server
    write_state(cfg.state_file, {"pid": os.getpid(), "start_time": 1, "role": "decode"})
    async with _agent(cfg) as a:
        assert (a.state, a.role) == ("running", "prefill") and a.proc.pid != os.getpid()
        assert json.loads(cfg.state_file.read_text())["pid"] == a.proc.pid


async def test_leftover_server_that_does_not_serve_is_stopped(keys, tmp_path):
    import subprocess

    from controller.agent.owned import start_time, write_state

    port = _free_port()
    cfg = _owned_cfg(keys, tmp_path, port)
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    write_state(cfg.state_file, {"pid": leftover.pid, "start_time": start_time(leftover.pid), "role": "decode"})
    try:
        async with _agent(cfg) as a:
            assert leftover.wait(timeout=10) is not None  # its group was stopped
            assert (a.state, a.role) == ("running", "prefill") and a.proc.pid != leftover.pid
    finally:
        if leftover.poll() is None:
            leftover.kill()
