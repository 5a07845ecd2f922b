"""Retries with exponential backoff: delay doubles per consecutive failure, resets on success.

Like kopf's throttler, the backoff state lives per target, so one flaky
worker does not slow calls to the others, and a success forgets history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from controller.actuators.errors import ActuationError
from controller.actuators.metrics import ActuatorMetrics

T = TypeVar("T")
log = structlog.get_logger("pd.actuation")

Sleep = Callable[[float], Awaitable[None]]


@dataclass
class Backoff:
    initial_s: float = 0.2
    max_s: float = 5.0
    factor: float = 2.0
    failures: int = 0

    def next_delay(self) -> float:
        # delay_n = initial * factor^(n-1), capped: 0.2, 0.4, 0.8, ... max_s
        d = min(self.max_s, self.initial_s * self.factor ** max(0, self.failures - 1))
        return d

    def failed(self) -> float:
        self.failures += 1
        return self.next_delay()

    def succeeded(self) -> None:
        self.failures = 0


class Retrier:
    """Runs a call, retrying retryable `ActuationError`s up to `retries` times."""

    def __init__(
        self,
        actuator: str,
        metrics: ActuatorMetrics,
        *,
        retries: int = 4,
        initial_s: float = 0.2,
        max_s: float = 5.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.actuator = actuator
        self.metrics = metrics
        self.retries = retries
        self.initial_s = initial_s
        self.max_s = max_s
        self.sleep = sleep
        self._backoff: dict[str, Backoff] = {}

    def backoff_for(self, key: str) -> Backoff:
        b = self._backoff.get(key)
        if b is None:
            b = self._backoff[key] = Backoff(self.initial_s, self.max_s)
        return b

    async def call(self, op: str, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        b = self.backoff_for(key)
        attempt = 0
        while True:
            try:
                out = await fn()
            except ActuationError as e:
                if not e.retryable or attempt >= self.retries:
                    self.metrics.call(self.actuator, op, "error" if not e.retryable else "gave_up")
                    b.failed()
                    raise
                attempt += 1
                delay = b.failed()
                self.metrics.retry(self.actuator, op)
                log.warning("actuation_retry", op=op, target=key, attempt=attempt, delay_s=delay, why=e.why,
                            status=e.status)
                await self.sleep(delay)
                continue
            b.succeeded()
            self.metrics.call(self.actuator, op, "ok")
            return out
