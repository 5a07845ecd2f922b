"""How a worker changes role: SGLang's in-place `/pd_role_switch`, or a node agent restarting it.

Both answer the same questions for the flip state machine and the
reconciler: switch now, restart a dead worker (only an agent can), and what
role the worker serves right now. That last answer always comes from the
worker itself (`/health`, then `/server_info` `disaggregation_mode`): an
agent's report is what the agent believes, and a restarted agent can believe
`running/prefill` while an orphaned server on its port serves decode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from controller.actuators.agent import AgentSwitcher
from controller.actuators.base import Role
from controller.actuators.errors import ActuationError, AgentError, TransientError, WorkerError
from controller.actuators.http import Http
from controller.actuators.worker import WorkerClient

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
log = structlog.get_logger("pd.actuation")


class Switcher(Protocol):
    name: str

    async def switch(self, url: str, to_role: Role, timeout_s: float) -> None:
        """Switch and return once healthy in `to_role` (as the worker itself reports); raise ActuationError otherwise."""
        ...

    async def current_role(self, url: str) -> Role | None:
        """The role the worker serves now, from the worker itself, or None if it cannot tell (down, unhealthy)."""
        ...

    async def restart(self, url: str, role: Role, timeout_s: float) -> None:
        """Bring a dead or wedged worker back serving `role`; raise ActuationError if this switcher cannot."""
        ...


async def server_role(http: Http, url: str) -> Role | None:
    """The worker's own answer: /server_info (fallback /get_server_info) `disaggregation_mode`."""
    for path in ("/server_info", "/get_server_info"):
        try:
            _, body = await http.request("GET", f"{url}{path}", op="server_info", target=url, refusal=WorkerError)
        except ActuationError:
            continue
        mode: Any = body.get("disaggregation_mode") if isinstance(body, dict) else None
        if mode in ("prefill", "decode"):
            return Role(mode)
    return None


async def serving_role(workers: WorkerClient, http: Http, url: str) -> Role | None:
    """What the worker really serves: healthy, and its own /server_info mode; None when it cannot serve now."""
    if not await workers.healthy(url):
        return None
    return await server_role(http, url)


class RoleSwitchEndpoint:
    """SGLang `POST /pd_role_switch {"new_role"}` on a worker started with --enable-pd-role-switch."""

    name = "role-switch"

    def __init__(
        self, workers: WorkerClient, http: Http, *, poll_interval_s: float, clock: Clock,
        sleep: Sleep = asyncio.sleep, restarter: AgentSwitcher | None = None,
    ) -> None:
        self.workers = workers
        self.http = http
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.sleep = sleep
        self.restarter = restarter  # node agents, when configured: they can restart a dead worker

    async def switch(self, url: str, to_role: Role, timeout_s: float) -> None:
        deadline = self.clock() + timeout_s
        while True:
            try:
                await self.workers.role_switch(url, to_role, timeout_s=max(1.0, deadline - self.clock()))
                break
            except WorkerError as e:
                # "not idle": a KV handoff, a last request or a switch already running is settling; ask again
                if "not idle" not in e.why or self.clock() >= deadline:
                    raise
                await self.sleep(self.poll_interval_s)
        # the switch rebuilds the scheduler; the worker marks itself unhealthy if that fails
        while True:
            if await self.workers.healthy(url):
                role = await server_role(self.http, url)
                if role in (None, to_role):
                    return
                raise WorkerError("role_switch", url, f"reports role {role} after switching to {to_role}")
            if self.clock() >= deadline:
                raise TransientError("role_switch", url, f"not healthy {timeout_s:g}s after the switch")
            await self.sleep(self.poll_interval_s)

    async def current_role(self, url: str) -> Role | None:
        return await serving_role(self.workers, self.http, url)

    async def restart(self, url: str, role: Role, timeout_s: float) -> None:
        # without an agent nothing here can start a process: the worker's own supervisor (systemd, Kubernetes)
        # must; once it answers again, a switch puts it in `role`
        if await self.workers.healthy(url):
            await self.switch(url, role, timeout_s)
            return
        if self.restarter is not None and url.rstrip("/") in self.restarter.endpoints:
            await self.restarter.restart(url, role, timeout_s)
            if await self.current_role(url) != role:
                raise WorkerError("restart", url, f"restarted by its agent but does not serve {role}")
            return
        raise WorkerError("restart", url, "down, and no node agent is configured to restart it")


class AgentRestart:
    """Adapter: the agent switcher as a Switcher. The role comes from the worker, never from the agent's belief."""

    name = "agent"

    def __init__(self, agents: AgentSwitcher, http: Http, workers: WorkerClient | None = None) -> None:
        self.agents = agents
        self.http = http
        self.workers = workers

    async def _healthy(self, url: str) -> bool:
        if self.workers is not None:
            return await self.workers.healthy(url)
        try:
            await self.http.request("GET", f"{url}/health", op="health", target=url, refusal=WorkerError)
        except ActuationError:
            return False
        return True

    async def _check_serves(self, url: str, role: Role, op: str) -> None:
        actual = await self.current_role(url)
        if actual != role:
            raise AgentError(op, url, f"the agent reports running as {role} but the server on {url} "
                             f"{'serves ' + actual if actual else 'does not answer'}")

    async def switch(self, url: str, to_role: Role, timeout_s: float) -> None:
        await self.agents.switch(url, to_role, timeout_s)
        await self._check_serves(url, to_role, "agent_switch")

    async def restart(self, url: str, role: Role, timeout_s: float) -> None:
        await self.agents.restart(url, role, timeout_s)
        await self._check_serves(url, role, "agent_restart")

    async def current_role(self, url: str) -> Role | None:
        if not await self._healthy(url):
            return None
        role = await server_role(self.http, url)
        if role is not None:
            try:
                r = await self.agents.status(url)
            except ActuationError:
                return role
            if r.state == "running" and r.role not in (None, role):
                # the agent believes something else (e.g. restarted beside an orphaned server): say so, trust
                # the worker
                log.warning("agent_report_mismatch", worker=url, agent_role=r.role, serves=role)
        return role
