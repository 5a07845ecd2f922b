"""Supervised, named asyncio tasks: the first to stop (crash or return) stops the rest, with a grace period.

After kopf's aiotasks: every long-running part of the sidecar (telemetry,
tick loop, API, actuation) is one named task; a stop request (SIGTERM/SIGINT
or a test) or any task ending cancels the others, waits at most `grace_s`
for their cleanup, and reports which task ended first and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

TaskFactory = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Outcome:
    first: str | None  # the task that ended first; None when a stop was requested
    error: BaseException | None
    stuck: tuple[str, ...]  # tasks that did not finish within the grace period

    @property
    def ok(self) -> bool:
        return self.error is None and not self.stuck


class Supervisor:
    def __init__(self, *, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self._factories: dict[str, TaskFactory] = {}
        self.stop_requested = asyncio.Event()
        self.log = structlog.get_logger("pd-controller.supervisor")

    def add(self, name: str, factory: TaskFactory) -> None:
        if name in self._factories:
            raise ValueError(f"task name={name!r} already supervised")
        self._factories[name] = factory

    def request_stop(self) -> None:
        self.stop_requested.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.log.info("shutdown_requested", signal=sig.name)
        self.request_stop()

    async def run(self) -> Outcome:
        async def guarded(name: str, factory: TaskFactory) -> None:
            await factory()

        tasks: dict[asyncio.Task[Any], str] = {
            asyncio.create_task(guarded(n, f), name=f"pdctl-{n}"): n for n, f in self._factories.items()
        }
        stopper: asyncio.Task[Any] = asyncio.create_task(self.stop_requested.wait(), name="pdctl-stop-wait")
        first: str | None = None
        error: BaseException | None = None
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is stopper:
                    continue
                first = tasks[t]
                if not t.cancelled() and t.exception() is not None:
                    error = t.exception()
                    self.log.error("task_crashed", task=first, error=repr(error))
                else:
                    self.log.warning("task_ended", task=first)
                break
        finally:
            stopper.cancel()
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            stuck: tuple[str, ...] = ()
            if pending:
                _, still = await asyncio.wait(pending, timeout=self.grace_s)
                stuck = tuple(sorted(tasks[t] for t in still))
                if stuck:
                    self.log.error("tasks_stuck_after_grace", tasks=stuck, grace_s=self.grace_s)
            with contextlib.suppress(asyncio.CancelledError):
                await stopper
            for t in tasks:  # retrieve exceptions of tasks that died during cancellation
                if t.done() and not t.cancelled():
                    t.exception()
        return Outcome(first, error, stuck)
