"""ZeroMQ SUB ingest from one or many taps (several routers can feed one controller).

The SUB socket connects to every tap's PUB endpoint; ZeroMQ reconnects by
itself when a tap restarts. After each awaited frame the loop drains what is
already queued without awaiting again, so a burst costs one wake-up.

Security (docs/security.md): with `curve` the socket is a CURVE client. It proves
its own key to each tap (which admits only authorised controller keys) and checks
each tap's public key, so a process squatting on a tap's port cannot feed the
controller events: the handshake fails and nothing is read. Without keys every
endpoint must be on this host (loopback, ipc://, inproc://) unless
`allow_insecure` says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from controller.telemetry.hub import TelemetryHub
from router_plugin.keys import CurveKeyError, is_loopback_endpoint, load_keypair, load_public

# frames handled per wake-up at most, so one busy socket cannot starve the tick loop
BURST = 256


@dataclass(frozen=True, slots=True)
class ClientCurve:
    """The controller's CURVE key pair and each tap's public key (one per endpoint, in order)."""

    public: bytes
    secret: bytes
    server_keys: tuple[bytes, ...]


def load_client_curve(secret_key: Path | str, server_keys: Sequence[Path | str], n_endpoints: int) -> ClientCurve:
    """Read the key files (the node agent's format). One server key for all endpoints, or one each.

    Raises CurveKeyError with a one-line message naming the file or the count.
    """
    if len(server_keys) not in (1, n_endpoints):
        raise CurveKeyError(
            f"curve_server_keys: {len(server_keys)} given for {n_endpoints} endpoints (give 1, or one per endpoint)"
        )
    public, secret = load_keypair(secret_key, "curve_secret_key")
    keys = tuple(load_public(k, "curve_server_keys item") for k in server_keys)
    return ClientCurve(public, secret, keys * n_endpoints if len(keys) == 1 else keys)


class ZmqSource:
    def __init__(
        self,
        endpoints: Sequence[str],
        hub: TelemetryHub,
        clock: Callable[[], float],
        *,
        rcvhwm: int = 10_000,
        ctx: zmq.asyncio.Context | None = None,
        curve: ClientCurve | None = None,
        allow_insecure: bool = False,
    ) -> None:
        if not endpoints:
            raise ValueError("endpoints: need at least one tcp://HOST:PORT")
        if curve is not None and len(curve.server_keys) != len(endpoints):
            raise ValueError(f"curve: {len(curve.server_keys)} server keys for {len(endpoints)} endpoints")
        if curve is None and not allow_insecure:
            remote = [ep for ep in endpoints if not is_loopback_endpoint(ep)]
            if remote:
                raise ValueError(
                    f"zmq_endpoints item {remote[0]!r}: not on this host, and no CURVE keys: anyone who can bind "
                    "that address could feed the controller events (set telemetry.curve_secret_key and "
                    "curve_server_keys, or allow_insecure_telemetry: true)"
                )
        self.endpoints = tuple(endpoints)
        self.hub = hub
        self.clock = clock
        self.rcvhwm = rcvhwm
        self.curve = curve
        self._ctx = ctx
        self.frames = 0

    def _connect(self, sock: Any) -> None:
        for i, ep in enumerate(self.endpoints):
            if self.curve is not None:
                # the server key is taken per connect: each tap can have its own
                sock.curve_serverkey = self.curve.server_keys[i]
            sock.connect(ep)

    async def run(self) -> None:
        ctx = self._ctx or zmq.asyncio.Context.instance()
        sock: Any = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            if self.curve is not None:
                sock.curve_publickey = self.curve.public
                sock.curve_secretkey = self.curve.secret
            self._connect(sock)
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
