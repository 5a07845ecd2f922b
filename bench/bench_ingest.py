"""Ingest throughput: tap frames -> decode + validate -> hub -> the core's estimator window, on one core.

Prints events/s for (1) the in-process path (no socket) and (2) through a real
ZeroMQ PUB/SUB pair on loopback with the publisher in another process.
Target: >= 200 000 events/s with batched frames (512 events per frame).

    python bench/bench_ingest.py [--events 2000000] [--batch 512]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time

import numpy as np

from controller.core.control.estimators import EventWindow, estimate
from controller.core.events import EVENT_DTYPE
from controller.telemetry.hub import TelemetryHub
from router_plugin.wire import (
    HEADER,
    KIND_ARRIVAL,
    KIND_COMPLETION,
    ArrivalEvent,
    RequestEvent,
    encode_frame,
    encode_frame_v2,
)


def make_frames(n_events: int, batch: int, now: float) -> list[bytes]:
    rng = np.random.default_rng(0)
    recs = [
        RequestEvent(now - float(rng.uniform(0, 30)), int(rng.integers(100, 8000)), 0, int(rng.integers(10, 800)),
                     0.3, 0.02, 2.0, 200, 2, 1).pack()
        for _ in range(min(n_events, 4096))
    ]
    frames = []
    for seq, i in enumerate(range(0, n_events, batch)):
        k = min(batch, n_events - i)
        frames.append(encode_frame("bench", seq, [recs[(i + j) % len(recs)] for j in range(k)]))
    return frames


def make_frames_v2(n_requests: int, batch: int, now: float) -> list[bytes]:
    """Wire v2 as the tap sends it: per batch of requests, an arrival frame, then their completions."""
    rng = np.random.default_rng(0)
    frames = []
    seq = 0
    for i in range(0, n_requests, batch):
        k = min(batch, n_requests - i)
        t = now - float(rng.uniform(0, 30))
        arr = [ArrivalEvent(t, i + j + 1, 1000 + j, 256, 2, 4, "model").pack() for j in range(k)]
        done = [RequestEvent(t, 1000 + j, 0, 200, 0.3, 0.02, 2.0, 200, 2, 1, i + j + 1).pack_v2() for j in range(k)]
        frames += [encode_frame_v2("bench", seq, KIND_ARRIVAL, arr), encode_frame_v2("bench", seq + 1, KIND_COMPLETION, done)]
        seq += 2
    return frames


def v2_decode_join(frames: list[bytes], now: float) -> tuple[float, int, int]:
    """Decode + validate + hub with the arrival/completion join; (seconds, records kept, in flight at the end)."""
    hub = TelemetryHub(max_pending=10_000_000, max_pending_arrivals=10_000_000)
    t0 = time.perf_counter()
    n = sum(hub.ingest_frame(f, now) for f in frames)
    hub.drain_arrivals()
    hub.drain()
    return time.perf_counter() - t0, n, hub.in_flight(now)


def decode_only(frames: list[bytes], now: float) -> tuple[float, int]:
    hub = TelemetryHub(max_pending=10_000_000)
    t0 = time.perf_counter()
    n = sum(hub.ingest_frame(f, now) for f in frames)
    hub.drain()
    return time.perf_counter() - t0, n


def in_process(frames: list[bytes], now: float, tick_every: int) -> tuple[float, int]:
    hub = TelemetryHub(max_pending=10_000_000)
    win = EventWindow.empty()
    t0 = time.perf_counter()
    n = 0
    for i, f in enumerate(frames, 1):
        n += hub.ingest_frame(f, now)
        if i % tick_every == 0 or i == len(frames):
            # what each tick does with the new events: extend the window, estimate
            win = win.extended(hub.drain(), now, 60.0)
            estimate(win, now, now - 60.0, 60.0)
    return time.perf_counter() - t0, n


def _publisher(endpoint: str, frames: list[bytes], go: mp.Event) -> None:  # type: ignore[valid-type]
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.SNDHWM, 0)  # the benchmark measures the receiver: the sender must not drop
    s.connect(endpoint)
    go.wait()  # type: ignore[attr-defined]
    time.sleep(0.5)
    for f in frames:
        s.send(f)
    s.send(b"STOP")
    s.close(linger=-1)
    ctx.term()


async def over_zmq(frames: list[bytes], now: float) -> tuple[float, int, int]:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVHWM, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    go = mp.get_context("fork").Event()
    p = mp.get_context("fork").Process(target=_publisher, args=(f"tcp://127.0.0.1:{port}", frames, go))
    p.start()
    go.set()
    hub = TelemetryHub(max_pending=10_000_000)
    sync = zmq.Socket.shadow(sock.underlying)
    n = 0
    first = await sock.recv(copy=False)
    t0 = time.perf_counter()
    n += hub.ingest_frame(first.buffer, now)
    done = False
    while not done:
        msg = await sock.recv(copy=False)
        batch = [msg]
        for _ in range(256):
            try:
                batch.append(sync.recv(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        for m in batch:
            if m.bytes[:4] == b"STOP":
                done = True
                break
            n += hub.ingest_frame(m.buffer, now)
    dt = time.perf_counter() - t0
    p.join()
    sock.close(linger=0)
    ctx.term()
    sent = sum((len(f) - HEADER.size) // EVENT_DTYPE.itemsize for f in frames)
    return dt, n, sent - n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--tick-every-frames", type=int, default=200, help="frames between two estimator updates")
    a = ap.parse_args()
    now = time.time()
    frames = make_frames(a.events, a.batch, now)
    dt, n = decode_only(frames, now)
    print(f"in-process  decode+validate+hub: {n:,} events in {dt:.3f}s = {n / dt:,.0f} events/s")
    dt, n = in_process(frames, now, a.tick_every_frames)
    print(f"in-process  decode+validate+hub+core window/estimators: {n:,} events in {dt:.3f}s = {n / dt:,.0f} events/s "
          f"({a.batch} events/frame)")
    n_req = a.events // 2
    dt, n, open_ = v2_decode_join(make_frames_v2(n_req, a.batch, now), now)
    print(f"in-process  wire v2 arrivals + completions, joined by request id: {n:,} records ({n_req:,} requests) "
          f"in {dt:.3f}s = {n / dt:,.0f} records/s = {n_req / dt:,.0f} requests/s (in flight after: {open_})")
    dt, n, lost = asyncio.run(over_zmq(frames, now))
    print(f"ZeroMQ SUB  loopback tcp, publisher in another process: {n:,} events in {dt:.3f}s = {n / dt:,.0f} events/s"
          f" (lost {lost})")
    print("target: >= 200,000 events/s")


if __name__ == "__main__":
    main()
