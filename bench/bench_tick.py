"""Tick duration with 100 000 events in the estimator window (target p99 <= 10 ms).

Drives the real sidecar tick (drain the hub -> core tick -> metrics -> canonical
log line) on a manual clock: the window holds `--window-events` completed
requests over 60 s, and each 5 s tick adds the next 5 s of them.

    python bench/bench_tick.py [--window-events 100000] [--ticks 300]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time

import numpy as np
from prometheus_client import CollectorRegistry

from controller.config import config_from_dict
from controller.core.events import empty_events
from controller.logging import configure_logging
from controller.runtime.clock import ManualClock
from controller.runtime.sidecar import Sidecar

PERIOD_S, WINDOW_S = 5.0, 60.0


def batch(rng: np.random.Generator, n: int, t_end: float) -> np.ndarray:
    ev = empty_events(n)
    ev["arrival_s"] = t_end - rng.uniform(0, PERIOD_S, n)
    ev["input_tokens"] = rng.lognormal(7.5, 0.8, n).astype(np.uint32) + 1
    ev["cached_tokens"] = ev["input_tokens"] // 4
    ev["output_tokens"] = rng.lognormal(5.0, 0.7, n).astype(np.uint32) + 1
    ev["ttft_s"], ev["tpot_s"], ev["e2e_s"], ev["status"] = 0.4, 0.03, 0.0, 200
    return ev


async def run(window_events: int, ticks: int, profile: str) -> None:
    configure_logging(json=True, stream=io.StringIO())  # the canonical line is built and rendered, not printed
    cfg = config_from_dict({
        "hardware": {"profile": profile},
        # objectives the profile can meet: an infeasible one (the 20 ms default TPOT on a 70B profile)
        # ends the tick before the model, and the bench would time the estimators alone
        "slo": {"ttft_s": 2.0, "tpot_ms": 50.0},
        "control": {"tick_period_s": PERIOD_S, "window_s": WINDOW_S},
        "telemetry": {"zmq_endpoints": ["tcp://127.0.0.1:1"]},
    })
    clock = ManualClock()
    sc = Sidecar(cfg, registry=CollectorRegistry(), clock=clock)
    rng = np.random.default_rng(0)
    per_tick = int(window_events * PERIOD_S / WINDOW_S)
    warm = int(WINDOW_S / PERIOD_S) + 2
    durations: list[float] = []
    core: list[float] = []
    inner = sc.loop.decide

    def timed_decide(state, obs, now):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return inner(state, obs, now)
        finally:
            core.append(time.perf_counter() - t)

    sc.loop.decide = timed_decide
    for i in range(warm + ticks):
        sc.hub.add_events(batch(rng, per_tick, clock.now()), "bench", clock.now())
        t0 = time.perf_counter()
        await sc.loop.tick_once()
        dt = time.perf_counter() - t0
        if i >= warm:
            durations.append(dt)
        clock.advance(PERIOD_S)
    d = np.array(durations) * 1000
    c = np.array(core[warm:]) * 1000
    in_window = len(sc.loop.state.window)
    print(f"tick with {in_window:,} events in the window ({per_tick:,} new per tick), {ticks} ticks:")
    print(f"  p50 {np.percentile(d, 50):.2f} ms   p90 {np.percentile(d, 90):.2f} ms   p99 {np.percentile(d, 99):.2f} ms"
          f"   max {d.max():.2f} ms")
    print(f"  of which the pure core tick(): p50 {np.percentile(c, 50):.2f} ms   p99 {np.percentile(c, 99):.2f} ms;"
          f" shell (drain, metrics, log line) p50 {np.percentile(d - c, 50):.2f} ms")
    print("target: p99 <= 10 ms")
    diag = sc.loop.last_diagnostics
    if diag is None or diag.target is None:  # the timing means nothing if the tick never reached the model
        reasons = [] if diag is None else [d.reason.value for d in diag.decisions]
        raise SystemExit(f"the tick stopped before the model: {reasons}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window-events", type=int, default=100_000)
    ap.add_argument("--ticks", type=int, default=300)
    ap.add_argument("--profile", default="configs/profiles/llama2-70b-h100-tp8.yaml")
    a = ap.parse_args()
    asyncio.run(run(a.window_events, a.ticks, a.profile))


if __name__ == "__main__":
    main()
