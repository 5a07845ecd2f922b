"""ZeroMQ client of the node agents, and the role switcher that flips a worker by restarting it.

One DEALER socket per command, CURVE-authenticated (the controller's secret
key, the agent's public key), closed afterwards: a lost reply can never be
mistaken for the answer to a later command.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth

from controller.actuators.base import Role
from controller.actuators.errors import AgentError, TransientError
from controller.agent.protocol import Command, Reply, decode_reply

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class CurveKeys:
    """Client side of CURVE: our key pair and the agents' public key, loaded from zmq.auth key files."""

    def __init__(self, client_secret_file: Path, server_public_file: Path) -> None:
        try:
            self.public, self.secret = zmq.auth.load_certificate(str(client_secret_file))
            self.server_public, _ = zmq.auth.load_certificate(str(server_public_file))
        except (OSError, ValueError) as e:
            raise AgentError("load_keys", str(client_secret_file), f"cannot load CURVE keys: {e}") from None
        if self.secret is None:
            raise AgentError("load_keys", str(client_secret_file), "not a secret key file (.key_secret)")


class AgentClient:
    def __init__(self, keys: CurveKeys | None, timeout_s: float, ctx: zmq.asyncio.Context | None = None) -> None:
        self.keys = keys
        self.timeout_s = timeout_s
        self.ctx = ctx or zmq.asyncio.Context.instance()

    async def send(self, endpoint: str, cmd: str, role: Role | None = None) -> Reply:
        c = Command(id=uuid.uuid4().hex, cmd=cmd, role=role)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            sock.curve_publickey = self.keys.public
            sock.curve_secretkey = self.keys.secret
            sock.curve_serverkey = self.keys.server_public
        try:
            sock.connect(endpoint)
            await sock.send_multipart([b"", c.encode()])
            deadline = asyncio.get_running_loop().time() + self.timeout_s
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0 or not await sock.poll(timeout=int(left * 1000)):
                    raise TransientError(f"agent_{cmd}", endpoint, f"no reply in {self.timeout_s:g}s")
                frames = await sock.recv_multipart()
                try:
                    reply = decode_reply(frames[-1])
                except ValueError as e:
                    raise AgentError(f"agent_{cmd}", endpoint, f"malformed reply: {e}") from None
                if reply.id == c.id:
                    break
        finally:
            sock.close(0)
        if not reply.ok:
            raise AgentError(f"agent_{cmd}", endpoint, reply.error or "refused")
        return reply


class AgentSwitcher:
    """Flip by restart: ask the worker's agent to restart the server in the other mode, poll until done."""

    name = "agent"

    def __init__(
        self, client: AgentClient, endpoints: dict[str, str], *, poll_interval_s: float, clock: Clock,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.client = client
        self.endpoints = {k.rstrip("/"): v for k, v in endpoints.items()}
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.sleep = sleep

    def endpoint(self, url: str) -> str:
        ep = self.endpoints.get(url.rstrip("/"))
        if ep is None:
            raise AgentError("agent_lookup", url, "no agent endpoint configured for this worker")
        return ep

    async def status(self, url: str) -> Reply:
        return await self.client.send(self.endpoint(url), "status")

    async def switch(self, url: str, to_role: Role, timeout_s: float) -> None:
        """Idempotent: already running healthy in `to_role` is success; a restart in progress is waited for."""
        ep = self.endpoint(url)
        deadline = self.clock() + timeout_s
        while True:
            r = await self.client.send(ep, "status")
            if r.state == "running" and r.role == to_role and r.healthy:
                return
            if r.state != "switching":
                break
            if self.clock() >= deadline:
                raise AgentError("agent_switch", url, f"agent still busy after {timeout_s:g}s ({r.progress})")
            await self.sleep(self.poll_interval_s)
        await self.client.send(ep, "switch", to_role)
        while True:
            r = await self.client.send(ep, "status")
            if r.state == "failed":
                raise AgentError("agent_switch", url, f"agent reports failure: {r.progress}")
            if r.state == "running" and r.role == to_role and r.healthy:
                return
            if self.clock() >= deadline:
                raise AgentError("agent_switch", url, f"not running as {to_role} after {timeout_s:g}s ({r.progress})")
            await self.sleep(self.poll_interval_s)

    async def restart(self, url: str, role: Role, timeout_s: float) -> None:
        """Restart the server in `role` whatever the agent believes (a dead or orphaned server); poll until healthy.

        The `switch` command always stops and starts the managed server, even in the same role, so this is the
        reconciler's repair for a worker that does not answer while its agent reports it running."""
        ep = self.endpoint(url)
        deadline = self.clock() + timeout_s
        while (r := await self.client.send(ep, "status")).state == "switching":
            if self.clock() >= deadline:
                raise AgentError("agent_restart", url, f"agent still busy after {timeout_s:g}s ({r.progress})")
            await self.sleep(self.poll_interval_s)
        await self.client.send(ep, "switch", role)
        while True:
            r = await self.client.send(ep, "status")
            if r.state == "failed":
                raise AgentError("agent_restart", url, f"agent reports failure: {r.progress}")
            if r.state == "running" and r.role == role and r.healthy:
                return
            if self.clock() >= deadline:
                raise AgentError("agent_restart", url, f"not running as {role} after {timeout_s:g}s ({r.progress})")
            await self.sleep(self.poll_interval_s)
