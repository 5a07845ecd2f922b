"""ZeroMQ SUB ingest from one or many taps (several routers can feed one controller).

The SUB socket connects to every tap's PUB endpoint; ZeroMQ reconnects by
itself when a tap restarts. After each awaited frame the loop drains what is
already queued without awaiting again, so a burst costs one wake-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio

from controller.telemetry.hub import TelemetryHub

# frames handled per wake-up at most, so one busy socket cannot starve the tick loop
BURST = 256


class ZmqSource:
    def __init__(
        self,
        endpoints: Sequence[str],
        hub: TelemetryHub,
        clock: Callable[[], float],
        *,
        rcvhwm: int = 10_000,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("endpoints: need at least one tcp://HOST:PORT")
        self.endpoints = tuple(endpoints)
        self.hub = hub
        self.clock = clock
        self.rcvhwm = rcvhwm
        self._ctx = ctx
        self.frames = 0

    async def run(self) -> None:
        ctx = self._ctx or zmq.asyncio.Context.instance()
        sock: Any = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            for ep in self.endpoints:
                sock.connect(ep)
            # the same socket, synchronous: a NOBLOCK recv on it raises zmq.Again when empty
            sync: zmq.Socket[Any] = zmq.Socket.shadow(sock.underlying)
            while True:
                frame = await sock.recv(copy=False)
                now = self.clock()
                self.hub.ingest_frame(frame.buffer, now)
                self.frames += 1
                for _ in range(BURST):
                    try:
                        frame = sync.recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.hub.ingest_frame(frame.buffer, now)
                    self.frames += 1
        finally:
            sock.close(linger=0)
