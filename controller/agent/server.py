"""The node agent: restarts the local SGLang server in another disaggregation mode when the controller asks.

Security model: the command channel is a ZeroMQ ROUTER socket with CURVE;
only clients whose public key is in `authorized_keys_dir` complete the
handshake (ZAP), everything else is dropped before a byte reaches us and is
logged and counted. A command names an operation and a role; the agent runs
only the argv templates of its own config, with `{role}`-style placeholders
replaced per element (no shell, no string from the message ever executed).

Robustness: every message is parsed within limits (size, nesting depth) and
handled inside its own try/except, so no message can end the agent or the
server it manages; a failure is answered as an error reply.

Ownership (controller.agent.owned): the agent starts the server in its own
process group and records pid, start time and role in a state file. A
restarted agent adopts the server recorded there when that very process
(pid *and* start time) still runs and still holds the worker port; it kills
the recorded group when it does not answer; and it never reports `running`
for a server it did not start: if another process holds the port, the agent
refuses to start and says who holds it. "Healthy" means: our process is
alive, a process of its group listens on the worker port, and the health
URL answers 200 -- not merely that something answers on the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import aiohttp
import structlog
import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from controller.agent import owned
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


def check_key_files(cfg: AgentConfig) -> None:
    """The secret key is a small regular file, the authorized keys a directory (never /dev/zero or a FIFO)."""
    from controller.safeyaml import read_bounded

    assert cfg.server_secret_key is not None and cfg.authorized_keys_dir is not None
    read_bounded(cfg.server_secret_key, 65536)  # FileError names the file
    if not cfg.authorized_keys_dir.is_dir():
        raise ValueError(f"authorized_keys_dir={str(cfg.authorized_keys_dir)!r}: not a directory")


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
        self.proc: owned.Server | None = None
        self.state_file = cfg.state_path()
        self.refusals: Counter[str] = Counter()
        self.handled: Counter[str] = Counter()
        self._auth: _CountingAuthenticator | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._work: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.bound_endpoint: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.cfg.insecure:
            check_key_files(self.cfg)  # before any thread or socket exists: a bad file is one clear error
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        self._sock = sock  # closed by close() even when a step below fails
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
        if await self._adopt():
            return
        if self.cfg.start_on_launch:
            try:
                await self._start_server(self.cfg.initial_role)
            except Exception as e:  # report it through status; the agent keeps serving commands
                self._failed(e)

    async def serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            try:
                reply = await self._handle(frames[-1])
            except Exception as e:  # no message may end the agent: answer it and go on
                self.refusals["internal_error"] += 1
                log.error("agent_internal_error", error=f"{type(e).__name__}: {str(e)[:200]}")
                reply = self._reply("", ok=False, error=f"internal error: {type(e).__name__}")
            try:
                await self._sock.send_multipart([*frames[:-1], reply.encode()])
            except zmq.ZMQError as e:  # the client went away: nothing to answer
                log.warning("agent_reply_lost", error=str(e))

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
            self._notice_exit()
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
                     pid=self.proc.pid if self.proc is not None and self.proc.alive() else None)

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
            self._failed(e, role)

    def _failed(self, e: BaseException, role: str | None = None) -> None:
        self.state = "failed"
        self.progress = f"failed: {type(e).__name__}: {e}"
        log.error("agent_switch_failed", role=role, error=str(e))

    def _notice_exit(self) -> None:
        """A server of ours that exited is not running, whatever we believed."""
        if self.proc is not None and not self.proc.alive() and self.state == "running":
            self.state = "failed"
            self.progress = f"server exited ({self.proc.describe_exit()})"
            log.error("agent_server_exited", role=self.role, pid=self.proc.pid)
            owned.clear_state(self.state_file)

    def _port(self) -> tuple[str, int]:
        from urllib.parse import urlsplit

        u = urlsplit(self.cfg.worker_url)
        return u.hostname or "127.0.0.1", u.port or 80

    async def _adopt(self) -> bool:
        """Take over the server a previous agent recorded, if it is that process and it serves; else clean up."""
        rec = owned.read_state(self.state_file)
        if rec is None:
            return False
        srv = owned.Server.adopt(rec)
        if srv is None:  # gone (or the pid now belongs to another process): forget it
            owned.clear_state(self.state_file)
            log.info("agent_state_stale", pid=rec.get("pid"))
            return False
        self.proc = srv
        if rec.get("role") in ("prefill", "decode") and await self._healthy_within(2.0):
            self.role = rec["role"]
            self.state = "running"
            self.progress = f"running as {self.role} (adopted pid {srv.pid})"
            log.info("agent_adopted", pid=srv.pid, role=self.role)
            return True
        # ours, but not serving: stop it, so the port is free for a server we start and watch
        log.warning("agent_leftover_stopped", pid=srv.pid, role=rec.get("role"))
        self.role = rec.get("role") if rec.get("role") in ("prefill", "decode") else None
        await self._stop_server()
        return False

    async def _start_server(self, role: str) -> None:
        host, port = self._port()
        holder = await asyncio.to_thread(owned.port_holder, host, port)
        if holder is not None:
            # never report `running` for a server we did not start
            raise RuntimeError(f"port {port} is already in use by {holder}, not by a server this agent started")
        argv = render(self.cfg.start, self._values(role))
        self.progress = f"starting as {role}"
        log.info("agent_start_server", argv=argv)
        self.proc = await owned.Server.spawn(argv)
        owned.write_state(self.state_file, self.proc.record(role=role, port=port, argv=argv))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.start_timeout_s
        while loop.time() < deadline:
            if not self.proc.alive():
                owned.clear_state(self.state_file)
                raise RuntimeError(f"server exited with {self.proc.describe_exit()} while starting")
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
        if self.proc is not None:
            await self.proc.stop(self.cfg.stop_timeout_s)
        owned.clear_state(self.state_file)
        self.proc = None
        self.role = None
        self.state = "stopped"
        self.progress = "stopped"

    async def _healthy_within(self, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            if await self._healthy():
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(self.cfg.poll_interval_s)

    async def _healthy(self) -> bool:
        """Our process is alive, its process group holds the worker port, and the health URL answers 200."""
        assert self._http is not None
        proc = self.proc
        if proc is None or not proc.alive():
            return False
        _host, port = self._port()
        if not await asyncio.to_thread(proc.holds_port, port):
            return False  # whatever answers on the URL, it is not our server
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
