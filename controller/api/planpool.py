"""What-if plans off the event loop: one worker process, a time limit, a memory limit.

Inputs are bounded (controller.planning.PlanRequest), so a plan normally takes
milliseconds; the worker process is the guard against what bounds cannot
foresee (a search in the core that does not converge, a pathological profile).
The event loop only waits on a future: ticks and /healthz keep running.
A plan past `timeout_s` has its worker terminated (the pool is rebuilt on the
next request); at most `max_waiting` requests wait for the worker, beyond
that the API answers 429 at once, so a burst of requests cannot queue up work.

The worker is started with `spawn` (not fork: the parent holds ZeroMQ
contexts and an event loop that must not be duplicated), ignores SIGINT (the
parent handles Ctrl-C and ends it) and caps its data segment (RLIMIT_DATA),
so a runaway allocation is a MemoryError in the worker, not in the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.pool
import signal
from collections.abc import Callable
from typing import Any

from controller.planning import PlanRequest, execute_tagged


class PlanBusy(Exception):
    """Too many plans waiting for the worker."""


class PlanTimeout(Exception):
    """The plan ran past its time limit; its worker was terminated."""


def _init_worker(memory_mb: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource

        limit = memory_mb * 1024 * 1024
        _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # not Linux, or not allowed: the time limit still holds


class PlanPool:
    def __init__(self, *, timeout_s: float, memory_mb: int, max_waiting: int = 4,
                 target: Callable[[PlanRequest], tuple[str, Any]] = execute_tagged) -> None:
        # `target` runs in the worker: a module-level function (it is pickled by reference)
        self.target = target
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_waiting = max_waiting
        self._pool: multiprocessing.pool.Pool | None = None
        self._lock = asyncio.Lock()
        self._waiting = 0
        self.timeouts = 0
        self.plans = 0

    def _ensure(self) -> multiprocessing.pool.Pool:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(1, initializer=_init_worker, initargs=(self.memory_mb,))
        return self._pool

    async def run(self, req: PlanRequest) -> tuple[str, Any]:
        """("ok", result) | ("invalid", message) | ("error", message); PlanBusy; PlanTimeout."""
        if self._waiting >= self.max_waiting:
            raise PlanBusy(f"{self._waiting} plans already waiting")
        self._waiting += 1
        try:
            async with self._lock:
                return await self._run_one(req)
        finally:
            self._waiting -= 1

    async def _run_one(self, req: PlanRequest) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[str, Any]] = loop.create_future()

        def done(value: Any) -> None:
            loop.call_soon_threadsafe(_settle, fut, value, None)

        def failed(exc: BaseException) -> None:
            loop.call_soon_threadsafe(_settle, fut, None, exc)

        # starting the pool (a spawn) takes a moment: do it off the loop too
        pool = await asyncio.to_thread(self._ensure)
        pool.apply_async(self.target, (req,), callback=done, error_callback=failed)
        try:
            result = await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            self.timeouts += 1
            await self.close()
            raise PlanTimeout(f"the plan ran past api.plan_timeout_s={self.timeout_s:g}; stopped") from None
        self.plans += 1
        return result

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # terminate() kills the worker and joins the pool's threads: off the loop
            await asyncio.to_thread(_terminate, pool)


def _terminate(pool: multiprocessing.pool.Pool) -> None:
    pool.terminate()
    with contextlib.suppress(Exception):
        pool.join()


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return  # timed out already
    if exc is not None:
        fut.set_result(("error", f"{type(exc).__name__}: {str(exc)[:300]}"))
    else:
        fut.set_result(value)
