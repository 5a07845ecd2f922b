"""Time for the runtime, injected: the system clock live, a manual clock in tests.

`now()` is wall-clock seconds (tap events carry unix arrival times, and the core
compares them with `now`); `sleep` is interruptible through a `Waker`, so the
API can ask for "re-solve now" without waiting out the tick period.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float, waker: Waker | None = None) -> bool:
        """Sleep; True if woken early by `waker`."""
        ...


class Waker:
    """An interruptible sleep's alarm: `wake()` ends the current (or next) sleep at once."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        if seconds <= 0 and not self._event.is_set():
            await asyncio.sleep(0)
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=max(seconds, 0.0))
        woke = self._event.is_set()
        self._event.clear()
        return woke


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float, waker: Waker | None = None) -> bool:
        if waker is not None:
            return await waker.wait(seconds)
        await asyncio.sleep(max(seconds, 0.0))
        return False


class ManualClock:
    """Virtual time: `sleep` advances the clock instantly (one event-loop turn), so long runs take milliseconds."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep(self, seconds: float, waker: Waker | None = None) -> bool:
        await asyncio.sleep(0)
        if waker is not None and waker._event.is_set():
            waker._event.clear()
            return True
        self.t += max(seconds, 0.0)
        return False
