"""How a worker changes role: SGLang's in-place `/pd_role_switch`, or a node agent restarting it.

Both answer the same three questions for the flip state machine: switch now,
is it healthy in the new role, and what role does it serve right now (for
recovery after a controller restart).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from controller.actuators.agent import AgentSwitcher
from controller.actuators.base import Role
from controller.actuators.errors import ActuationError, TransientError, WorkerError
from controller.actuators.http import Http
from controller.actuators.worker import WorkerClient

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Switcher(Protocol):
    name: str

    async def switch(self, url: str, to_role: Role, timeout_s: float) -> None:
        """Switch and return once healthy in `to_role`; raise ActuationError otherwise."""
        ...

    async def current_role(self, url: str) -> Role | None:
        """The role the worker serves now, or None if it cannot tell (down, unreachable)."""
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
            return mode  # type: ignore[no-any-return]
    return None


class RoleSwitchEndpoint:
    """SGLang `POST /pd_role_switch {"new_role"}` on a worker started with --enable-pd-role-switch."""

    name = "role-switch"

    def __init__(
        self, workers: WorkerClient, http: Http, *, poll_interval_s: float, clock: Clock,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.workers = workers
        self.http = http
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.sleep = sleep

    async def switch(self, url: str, to_role: Role, timeout_s: float) -> None:
        deadline = self.clock() + timeout_s
        while True:
            try:
                await self.workers.role_switch(url, to_role, timeout_s=max(1.0, deadline - self.clock()))
                break
            except WorkerError as e:
                # "not idle": a KV handoff or a last request is still settling after the drain; ask again
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
        if not await self.workers.healthy(url):
            return None
        return await server_role(self.http, url)


class AgentRestart:
    """Adapter: the agent switcher as a Switcher (role from the agent's report, else from the worker)."""

    name = "agent"

    def __init__(self, agents: AgentSwitcher, http: Http) -> None:
        self.agents = agents
        self.http = http

    async def switch(self, url: str, to_role: Role, timeout_s: float) -> None:
        await self.agents.switch(url, to_role, timeout_s)

    async def current_role(self, url: str) -> Role | None:
        try:
            r = await self.agents.status(url)
        except ActuationError:
            return await server_role(self.http, url)
        if r.state == "running" and r.healthy and r.role in ("prefill", "decode"):
            return r.role  # type: ignore[return-value]
        return None
