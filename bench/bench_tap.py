"""Tap overhead: the same streaming load sent straight to the real router and through the tap, in one run.

Real PD router (smg or sglang-router) + emulated prefill/decode workers + `pd-router-tap`
as its own process, all on loopback. An open-loop Poisson load of `--rate`
streaming requests/s alternates request by request between the two paths, so
both see the same fleet state; the client measures TTFT (request sent -> first
SSE data event) and end-to-end time. Prints p50/p99 for each path and the
difference. Targets: <= 1 ms added p50 and <= 5 ms added p99 TTFT at >= 200 req/s.

    python bench/bench_tap.py [--rate 200] [--duration 20] [--tokens 16] [--router smg --router sglang-router]

Behind smg (the default router) and sglang-router 0.3.2 in turn, unless --router names one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from harness.fleet import EmulatedFleet
from tests.e2e._tap_procs import TapProc

USAGE = False  # --client-usage: the client asks for usage itself, so the tap has nothing to inject or strip


async def one(s: aiohttp.ClientSession, url: str, i: int, tokens: int) -> tuple[float, float, int]:
    body = {"model": "m", "prompt": f"bench request {i} " * 8, "max_tokens": tokens, "stream": True}
    if USAGE:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft = float("nan")
    try:
        async with s.post(url + "/v1/completions", json=body) as r:
            async for chunk in r.content.iter_any():
                if ttft != ttft and b"data:" in chunk:
                    ttft = time.perf_counter() - t0
            return ttft, time.perf_counter() - t0, r.status
    except aiohttp.ClientError:
        return ttft, time.perf_counter() - t0, -1


async def drive(direct: str, tapped: str, rate: float, duration: float, tokens: int) -> dict[str, list]:
    rng = random.Random(0)
    res: dict[str, list] = {"direct": [], "tap": []}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        # warm both paths (connections, router caches)
        await asyncio.gather(*(one(s, u, -k, tokens) for k in range(20) for u in (direct, tapped)))
        tasks = []
        t_end = time.perf_counter() + duration
        nxt = time.perf_counter()
        i = 0
        while nxt < t_end:
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
            name, url = ("direct", direct) if i % 2 == 0 else ("tap", tapped)
            tasks.append((name, asyncio.create_task(one(s, url, i, tokens))))
            i += 1
            nxt += rng.expovariate(rate)
        for name, t in tasks:
            res[name].append(await t)
    return res


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(rows: list[tuple[float, float, int]]) -> tuple[np.ndarray, np.ndarray, int]:
    ok = [(a, b) for a, b, st in rows if st == 200 and a == a]
    ttft = np.array([a for a, _ in ok]) * 1000
    e2e = np.array([b for _, b in ok]) * 1000
    return ttft, e2e, len(rows) - len(ok)


def run_one(router: str, a: argparse.Namespace) -> dict[str, float]:
    d = Path(tempfile.mkdtemp(prefix="bench-tap-"))
    with EmulatedFleet("llama2-70b-h100-tp8", 1, a.decode, time_scale=a.time_scale, log_dir=d / "fleet",
                       model="m", router=router) as fleet:
        tap = TapProc(fleet.router_url, d, extra_args=("--loop", a.tap_loop))
        try:
            c0 = cpu_s(tap.proc.pid)
            res = asyncio.run(drive(fleet.router_url, tap.url, a.rate, a.duration, a.tokens))
            tap_cpu = cpu_s(tap.proc.pid) - c0
        finally:
            tap.stop()
    got = {k: summary(v) for k, v in res.items()}
    n = sum(len(v) for v in res.values())
    print(f"[{router}] {n} streaming /v1/completions requests at {a.rate:g} req/s offered for {a.duration:g}s "
          f"({a.tokens} tokens each), alternating straight / through the tap")
    for k, (ttft, e2e, failed) in got.items():
        print(f"  {k:6s}: n={ttft.size:5d} failed={failed}  TTFT p50 {np.percentile(ttft, 50):7.2f} ms  "
              f"p99 {np.percentile(ttft, 99):7.2f} ms   e2e p50 {np.percentile(e2e, 50):7.2f} ms")
    (t_d, _, _), (t_t, _, _) = got["direct"], got["tap"]
    out = {
        "p50": float(np.percentile(t_t, 50) - np.percentile(t_d, 50)),
        "p99": float(np.percentile(t_t, 99) - np.percentile(t_d, 99)),
        "failed": float(got["direct"][2] + got["tap"][2]),
    }
    print(f"  added by the tap: TTFT p50 {out['p50']:+.2f} ms, p99 {out['p99']:+.2f} ms")
    n_tap = len(res["tap"]) + 20  # + the warm-up requests
    out["cpu_ms"] = tap_cpu / n_tap * 1000
    print(f"  tap process CPU: {tap_cpu:.2f} s for {n_tap} requests = {out['cpu_ms']:.2f} ms per request")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=200.0, help="total requests/s (half per path)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--time-scale", type=float, default=0.01, help="emulated worker speed-up")
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--router", action="append", default=None,
                    help="router(s) to measure behind (repeatable): smg, sglang-router (default: both)")
    ap.add_argument("--tap-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="the tap's event loop (auto = uvloop when installed)")
    ap.add_argument("--client-usage", action="store_true", help="clients ask for usage (no injection by the tap)")
    a = ap.parse_args()
    global USAGE
    USAGE = a.client_usage
    results = {r: run_one(r, a) for r in (a.router or ["smg", "sglang-router"])}
    print(f"\nadded TTFT at {a.rate:g} req/s (tap minus straight to the router; tap loop: {a.tap_loop}):")
    print(f"  {'router':14s} {'p50 ms':>8s} {'p99 ms':>8s} {'failed':>7s} {'tap CPU ms/req':>15s}")
    for r, x in results.items():
        print(f"  {r:14s} {x['p50']:+8.2f} {x['p99']:+8.2f} {x['failed']:7.0f} {x['cpu_ms']:15.2f}")
    print("target: <= 1 ms added p50, <= 5 ms added p99")


if __name__ == "__main__":
    main()
