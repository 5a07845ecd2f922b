"""The node agent: restarts the local SGLang server in another disaggregation mode when the controller asks.

Security model: the command channel is a ZeroMQ ROUTER socket with CURVE;
only clients whose public key is in `authorized_keys_dir` complete the
handshake (ZAP), everything else is dropped before a byte reaches us and is
logged and counted. A command names an operation and a role; the agent runs
only the argv templates of its own config, with `{role}`-style placeholders
replaced per element (no shell, no string from the message ever executed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from typing import Any

import aiohttp
import structlog
import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from controller.agent.config import AgentConfig
from controller.agent.protocol import Command, MalformedCommand, Reply, decode_command

log = structlog.get_logger("pd.agent")


class _CountingAuthenticator(AsyncioAuthenticator):
    """ZAP handler that logs and counts every refused handshake (unknown key, no CURVE)."""

    def __init__(self, ctx: zmq.asyncio.Context, refusals: Counter[str]) -> None:
        super().__init__(ctx)
        self.refusals = refusals

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200":
            self.refusals["unauthenticated"] += 1
            log.warning("agent_refused", why="unauthenticated", detail=status_text.decode("utf-8", "replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def render(template: list[str], values: dict[str, str]) -> list[str]:
    """Fill placeholders element by element. Values are validated (role in a fixed set, ints)."""
    out = []
    for a in template:
        for k, v in values.items():
            a = a.replace("{" + k + "}", v)
        out.append(a)
    return out


class NodeAgent:
    def __init__(self, cfg: AgentConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.asyncio.Context()
        self._own_ctx = ctx is None
        self.role: str | None = None
        self.state = "stopped"  # running | stopped | switching | failed
        self.progress = "idle"
        self.proc: asyncio.subprocess.Process | None = None
        self.refusals: Counter[str] = Counter()
        self.handled: Counter[str] = Counter()
        self._auth: _CountingAuthenticator | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._work: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.bound_endpoint: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if not self.cfg.insecure:
            assert self.cfg.server_secret_key is not None and self.cfg.authorized_keys_dir is not None
            self._auth = _CountingAuthenticator(self.ctx, self.refusals)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.cfg.authorized_keys_dir))
            public, secret = zmq.auth.load_certificate(str(self.cfg.server_secret_key))
            if secret is None:
                raise ValueError(f"server_secret_key={self.cfg.server_secret_key}: not a secret key file")
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.bind(self.cfg.endpoint)
        self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        if self.cfg.start_on_launch:
            await self._start_server(self.cfg.initial_role)

    async def serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            reply = await self._handle(frames[-1])
            await self._sock.send_multipart([*frames[:-1], reply.encode()])

    async def close(self, stop_server: bool = True) -> None:
        if self._work is not None:
            self._work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._work
        if stop_server:
            await self._stop_server()
        if self._sock is not None:
            self._sock.close(0)
        if self._auth is not None:
            self._auth.stop()
            await asyncio.sleep(0)
        if self._http is not None:
            await self._http.close()
        if self._own_ctx:
            self.ctx.term()

    # ---- commands --------------------------------------------------------------------------------
    async def _handle(self, raw: bytes) -> Reply:
        try:
            cmd = decode_command(raw)
        except MalformedCommand as e:
            self.refusals[e.reason] += 1
            log.warning("agent_refused", why=e.reason, detail=str(e))
            return self._reply("", ok=False, error=f"malformed command: {e}")
        self.handled[cmd.cmd] += 1
        log.info("agent_command", cmd=cmd.cmd, role=cmd.role, id=cmd.id)
        return await self._dispatch(cmd)

    async def _dispatch(self, cmd: Command) -> Reply:
        busy = self._work is not None and not self._work.done()
        if cmd.cmd == "status":
            healthy = await self._healthy() if self.state == "running" else False
            return self._reply(cmd.id, ok=True, healthy=healthy)
        if busy:
            return self._reply(cmd.id, ok=False, error=f"busy: {self.progress}")
        if cmd.cmd == "stop":
            self._work = asyncio.create_task(self._stop_server(), name="agent-stop")
            return self._reply(cmd.id, ok=True)
        assert cmd.role is not None
        if cmd.cmd == "start" and self.state == "running" and self.role == cmd.role:
            return self._reply(cmd.id, ok=True, healthy=await self._healthy())
        self.state = "switching"
        self.progress = f"{cmd.cmd} to {cmd.role}: queued"
        self._work = asyncio.create_task(self._restart(cmd.role), name="agent-switch")
        return self._reply(cmd.id, ok=True)

    def _reply(self, cid: str, *, ok: bool, error: str | None = None, healthy: bool = False) -> Reply:
        return Reply(id=cid, ok=ok, error=error, state=self.state, role=self.role, healthy=healthy,
                     url=self.cfg.worker_url, progress=self.progress,
                     pid=self.proc.pid if self.proc is not None and self.proc.returncode is None else None)

    # ---- the managed server ----------------------------------------------------------------------
    def _values(self, role: str) -> dict[str, str]:
        from urllib.parse import urlsplit

        u = urlsplit(self.cfg.worker_url)
        vals = {"role": role, "host": u.hostname or "127.0.0.1", "port": str(u.port or 80)}
        if self.cfg.bootstrap_port is not None:
            vals["bootstrap_port"] = str(self.cfg.bootstrap_port)
        return vals

    async def _restart(self, role: str) -> None:
        try:
            self.progress = "stopping"
            await self._stop_server()
            self.state = "switching"
            await self._start_server(role)
        except Exception as e:  # report any failure through status, never crash the agent
            self.state = "failed"
            self.progress = f"failed: {type(e).__name__}: {e}"
            log.error("agent_switch_failed", role=role, error=str(e))

    async def _start_server(self, role: str) -> None:
        argv = render(self.cfg.start, self._values(role))
        self.progress = f"starting as {role}"
        log.info("agent_start_server", argv=argv)
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.start_timeout_s
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while starting")
            if await self._healthy():
                self.role = role
                self.state = "running"
                self.progress = f"running as {role}"
                return
            await asyncio.sleep(self.cfg.poll_interval_s)
        raise TimeoutError(f"server not healthy {self.cfg.start_timeout_s:g}s after start")

    async def _stop_server(self) -> None:
        self.progress = "stopping"
        if self.cfg.stop is not None and self.role is not None:
            p = await asyncio.create_subprocess_exec(*render(self.cfg.stop, self._values(self.role)),
                                                     stdin=asyncio.subprocess.DEVNULL)
            await p.wait()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.cfg.stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        self.proc = None
        self.role = None
        self.state = "stopped"
        self.progress = "stopped"

    async def _healthy(self) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(self.cfg.worker_url.rstrip("/") + self.cfg.health_path) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def snapshot(self) -> dict[str, Any]:
        return {"role": self.role, "state": self.state, "progress": self.progress,
                "refused": dict(self.refusals), "handled": dict(self.handled)}


async def run_agent(cfg: AgentConfig) -> None:
    agent = NodeAgent(cfg)
    await agent.start()
    log.info("agent_ready", endpoint=agent.bound_endpoint, worker=cfg.worker_url, role=agent.role)
    try:
        await agent.serve()
    finally:
        await agent.close()
