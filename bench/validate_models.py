"""Check the models against emulated fleets: the source method's Figures 1 and 3, reproduced.

Figure 1 (prefill queueing): one prefill instance behind the real sglang-router,
open-loop Poisson arrivals at several utilisations; measured client TTFT (mean
and P90) next to the M/M/1, M/D/1 and M/G/1 predictions of controller.core.prefill,
for a fixed input length and for input lengths drawn from the Azure LLM 2023
code trace (data/traces). Requests have random token ids (no prefix-cache hits)
and 2 output tokens (decode is not the bottleneck).

Figure 3 (fleet capacity): the largest request rate at which a few mPnD fleets
meet both objectives (mean TTFT and mean TPOT, measured by the decode workers'
own histograms via the router's /engine_metrics), next to `plan --evaluate`
(controller.planning.execute, M/M/1 as the source method, and M/D/1).

The emulated GPUs run `--time-scale` times the profile's durations; every figure
is reported in the profile's units (rates x scale, times / scale).

    python bench/validate_models.py                # ~8 minutes on 2 cores
    python bench/validate_models.py --quick        # ~3 minutes, fewer points
Writes docs/validation/validation.md, validation.png and validation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from controller.core.prefill import QueueModel, service_time, sojourn_s  # noqa: E402
from controller.planning import PlanRequest, execute  # noqa: E402
from controller.profiler.measure import parse_engine_sample  # noqa: E402
from controller.profiles import load_profile  # noqa: E402
from harness.fleet import EmulatedFleet  # noqa: E402

PROFILE = "llama2-70b-h100-tp8"
TRACE = REPO / "data" / "traces" / "azure-llm-2023" / "AzureLLMInferenceTrace_code.csv"
OUT_DIR = REPO / "docs" / "validation"
MODELS = (QueueModel.MM1, QueueModel.MD1, QueueModel.MG1)


def trace_lengths(n: int, seed: int = 1) -> list[int]:
    with TRACE.open() as f:
        xs = [int(r["ContextTokens"]) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    return [max(16, min(8192, rng.choice(xs))) for _ in range(n)]


@dataclass
class Shot:
    ttft_s: float
    ok: bool


async def one_request(session: aiohttp.ClientSession, url: str, n_in: int, n_out: int, rng: random.Random) -> Shot:
    body = {"input_ids": [rng.randrange(3, 256) for _ in range(n_in)],
            "sampling_params": {"max_new_tokens": n_out, "ignore_eos": True}, "stream": True}
    t0 = time.monotonic()
    first = math.nan
    try:
        async with session.post(f"{url}/generate", json=body) as r:
            if r.status != 200:
                return Shot(math.nan, False)
            async for line in r.content:
                if line.startswith(b"data: {") and math.isnan(first):
                    first = time.monotonic() - t0
    except aiohttp.ClientError:
        return Shot(math.nan, False)
    return Shot(first, not math.isnan(first))


async def poisson(url: str, rate: float, lengths: list[int], n_out: int, seed: int, stream: bool = True) -> list[Shot]:
    """Open-loop Poisson arrivals at `rate`, one request per entry of `lengths`.

    The realised rate (n - 1) / (last - first send) is left in `poisson.realised_rps`.
    """
    rng = random.Random(seed)
    # fresh connections, as for the idle requests: the router stalls streams on reused ones (docs/emulator.md)
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
        tasks = []
        # a Poisson process conditioned on n arrivals in [0, n / rate]: sorted uniform times. The run then
        # carries exactly the intended load, instead of a rate off by ~1/sqrt(n) from the exponential gaps.
        horizon = len(lengths) / rate
        offsets = sorted(rng.uniform(0.0, horizon) for _ in lengths)
        t0 = time.monotonic()
        sent = []
        for n_in, off in zip(lengths, offsets, strict=True):
            await asyncio.sleep(max(0.0, t0 + off - time.monotonic()))
            sent.append(time.monotonic())
            tasks.append(asyncio.ensure_future(one_request(s, url, n_in, n_out, rng) if stream
                                               else _plain(s, url, n_in, n_out, rng)))
        poisson.realised_rps = (len(sent) - 1) / (sent[-1] - sent[0]) if len(sent) > 1 else rate  # type: ignore[attr-defined]
        return list(await asyncio.gather(*tasks))


async def _plain(session: aiohttp.ClientSession, url: str, n_in: int, n_out: int, rng: random.Random) -> Shot:
    body = {"input_ids": [rng.randrange(3, 256) for _ in range(n_in)],
            "sampling_params": {"max_new_tokens": n_out, "ignore_eos": True}}
    try:
        async with session.post(f"{url}/generate", json=body) as r:
            await r.read()
            return Shot(math.nan, r.status == 200)
    except aiohttp.ClientError:
        return Shot(math.nan, False)


# ---- Figure 1 ---------------------------------------------------------------------------------------


async def figure1(scale: float, rhos: list[float], per_point_s: float, quick: bool) -> list[dict[str, Any]]:
    prof = load_profile(PROFILE)
    rows: list[dict[str, Any]] = []
    workloads = {"fixed 2048": [2048] * 4000, "azure-code trace": trace_lengths(4000)}
    async with EmulatedFleet(PROFILE, 1, 1, time_scale=scale, worker_args=["--max-running-requests", "256"]) as fleet:
        for name, lens in workloads.items():
            svc_s = service_time(prof.prefill, np.asarray(lens[:2000], dtype=float)).mean_s * scale
            # fixed overhead: a lone request's TTFT less its prefill (router hop, KV transfer, HTTP)
            idle = []
            for i in range(12 if quick else 25):
                # one connection per request: sglang-router 0.3 holds the first ~40 ms of a streamed answer
                # on a reused keep-alive connection (docs/emulator.md)
                L = lens[i]
                idle.append(await one_request_session(fleet.router_url, L) - float(prof.prefill.time_s(L)) * scale)
            overhead = float(np.median(idle))
            for rho in rhos:
                n = max(80, int(rho / svc_s * per_point_s))
                # the rate that gives this utilisation for the very lengths sent
                rate = rho / (service_time(prof.prefill, np.asarray(lens[:n], dtype=float)).mean_s * scale)
                shots = await poisson(fleet.router_url, rate, lens[:n], 2, seed=int(rho * 1000))
                ok = [x.ttft_s for x in shots if x.ok]
                warm = ok[len(ok) // 10:]  # drop the first 10 % (the queue starts empty)
                # predict for what was really sent: the realised rate and these very lengths
                real = poisson.realised_rps * scale  # type: ignore[attr-defined]
                svc = service_time(prof.prefill, np.asarray(lens[:n], dtype=float))
                row: dict[str, Any] = {
                    "workload": name, "rho": real * svc.mean_s, "rate_rps": real, "n": len(warm),
                    "errors": len(shots) - len(ok),
                    "measured_mean_s": float(np.mean(warm)) / scale, "measured_p90_s": float(np.percentile(warm, 90)) / scale,
                    "overhead_s": overhead / scale, "service_scv": svc.scv,
                }
                for m in MODELS:
                    stable = real * svc.mean_s < 1.0
                    row[f"{m.value}_mean_s"] = row["overhead_s"] + sojourn_s(m, real, svc) if stable else math.inf
                    row[f"{m.value}_p90_s"] = row["overhead_s"] + sojourn_s(m, real, svc, 0.9) if stable else math.inf
                rows.append(row)
                print(f"fig1 {name:>17} rho={rho:.2f}: measured mean {row['measured_mean_s']:.3f} s "
                      f"p90 {row['measured_p90_s']:.3f} | mm1 {row['mm1_mean_s']:.3f} md1 {row['md1_mean_s']:.3f} "
                      f"mg1 {row['mg1_mean_s']:.3f} (n={len(warm)})", flush=True)
    return rows


_idle_seq = iter(range(10**9))


async def figure1_engine(scale: float, rhos: list[float], n: int) -> list[dict[str, Any]]:
    """The prefill engine alone, in-process, long runs: what the queue does, free of HTTP and sample noise.

    Sojourn times come from the engine's virtual schedule (arrival to the end of the batch that served
    the request), so the event loop's timing does not enter; n requests per point.
    """
    from controller.emulator.engine import PrefillEngine

    prof = load_profile(PROFILE)
    rows: list[dict[str, Any]] = []
    for name, lens in {"fixed 2048": [2048] * n, "azure-code trace": trace_lengths(n, seed=7)}.items():
        svc = service_time(prof.prefill, np.asarray(lens, dtype=float))
        for rho in rhos:
            rate = rho / (svc.mean_s * scale)
            eng = PrefillEngine(prof, scale)
            eng.start()
            loop = asyncio.get_running_loop()
            rng = random.Random(int(rho * 100))
            soj: list[float] = []

            async def one(tokens: int, t: float, eng: PrefillEngine = eng, soj: list[float] = soj) -> None:
                # the intended (virtual) arrival time: a late wake-up of this loop does not bunch arrivals
                soj.append(await eng.submit(tokens, arrival=t) - t)

            offsets = sorted(rng.uniform(0.0, n / rate) for _ in lens)
            t0 = loop.time()
            tasks = []
            for L, off in zip(lens, offsets, strict=True):
                await asyncio.sleep(max(0.0, t0 + off - loop.time()))
                tasks.append(asyncio.ensure_future(one(L, t0 + off)))
            await asyncio.gather(*tasks)
            await eng.stop()
            x = np.asarray(soj[n // 10:]) / scale
            row: dict[str, Any] = {"workload": name, "rho": rho, "rate_rps": rate * scale, "n": int(x.size),
                                   "measured_mean_s": float(x.mean()), "measured_p90_s": float(np.percentile(x, 90))}
            for m in MODELS:
                row[f"{m.value}_mean_s"] = sojourn_s(m, rate * scale, svc)
                row[f"{m.value}_p90_s"] = sojourn_s(m, rate * scale, svc, 0.9)
            rows.append(row)
            print(f"fig1-engine {name:>17} rho={rho:.2f}: mean {row['measured_mean_s']:.3f} s | mm1 "
                  f"{row['mm1_mean_s']:.3f} md1 {row['md1_mean_s']:.3f} mg1 {row['mg1_mean_s']:.3f}", flush=True)
    return rows


async def one_request_session(url: str, n_in: int) -> float:
    """TTFT of one request on an otherwise idle fleet (fresh random tokens: no prefix-cache hit)."""
    async with aiohttp.ClientSession() as s:
        shot = await one_request(s, url, n_in, 2, random.Random(10_000 + next(_idle_seq)))
    if not shot.ok:
        raise RuntimeError(f"idle request of {n_in} tokens failed")
    return shot.ttft_s


# ---- Figure 3 ---------------------------------------------------------------------------------------


async def engine_window(router_url: str, decode_urls: set[str]) -> tuple[float, float, float, float]:
    """(ttft_sum, ttft_count, itl_sum, itl_count) over the decode workers, from the router's /engine_metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as s, s.get(f"{router_url}/engine_metrics") as r:
        text = await r.text()
    smp = parse_engine_sample(text, decode_urls)
    ttft_sum = ttft_n = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name.removeprefix("sglang_").removeprefix("sglang:") == "time_to_first_token_seconds":
            for x in fam.samples:
                if x.labels.get("worker_addr", "").rstrip("/") in decode_urls:
                    if x.name.endswith("_sum"):
                        ttft_sum += x.value
                    elif x.name.endswith("_count"):
                        ttft_n += x.value
    return ttft_sum, ttft_n, (smp.itl_sum_s if smp else 0.0), (smp.itl_count if smp else 0.0)


async def figure3(scale: float, fleets: list[tuple[int, int]], fractions: list[float], per_point_s: float,
                  l_in: int, l_out: int, ttft_s: float, tpot_ms: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n_p, n_d in fleets:
        dep = f"{n_p}P{n_d}D"
        async with EmulatedFleet(PROFILE, n_p, n_d, time_scale=scale) as fleet:
            # the fixed overhead the plan subtracts from the TTFT budget: measured on this fleet, idle
            idle = [await one_request_session(fleet.router_url, l_in) for _ in range(10)]
            prof = load_profile(PROFILE)
            overhead = float(np.median(idle)) / scale - float(prof.prefill.time_s(l_in))
            preds = {}
            for model in ("mm1", "md1"):
                out = execute(PlanRequest(rate_rps=1.0, input_len=l_in, output_len=l_out, ttft_s=ttft_s, tpot_ms=tpot_ms,
                                          overhead_s=max(0.0, overhead), profile=PROFILE, prefill_model=model,
                                          evaluate=dep))
                preds[model] = out["evaluate"]
            anchor = preds["md1"]["capacity_rps"]
            decode_urls = {w.url for w in fleet.decode}
            results = []
            for f in fractions:
                rate = anchor * f
                n = max(40, int(rate / scale * per_point_s))
                lens = [l_in] * n
                task = asyncio.ensure_future(poisson(fleet.router_url, rate / scale, lens, l_out, seed=int(f * 100),
                                                     stream=False))
                # measure in the middle of the run: from 30 % to 90 % of the arrivals' span
                span = n / (rate / scale)
                await asyncio.sleep(0.3 * span)
                a = await engine_window(fleet.router_url, decode_urls)
                await asyncio.sleep(0.6 * span)
                b = await engine_window(fleet.router_url, decode_urls)
                shots = await task
                ttft = (b[0] - a[0]) / max(b[1] - a[1], 1) / scale
                tpot = 1000.0 * (b[2] - a[2]) / max(b[3] - a[3], 1) / scale
                ok = ttft <= ttft_s and tpot <= tpot_ms and all(s.ok for s in shots)
                results.append((rate, ttft, tpot, ok))
                print(f"fig3 {dep} rate {rate:.2f} rps ({f:.2f}x md1 plan): TTFT {ttft:.3f} s, TPOT {tpot:.1f} ms "
                      f"-> {'meets' if ok else 'misses'}", flush=True)
            meeting = [r for r in results if r[3]]
            failing = [r for r in results if not r[3] and (not meeting or r[0] > max(m[0] for m in meeting))]
            rows.append({
                "deployment": dep,
                "measured_max_rps": max((r[0] for r in meeting), default=0.0),
                "first_failing_rps": min((r[0] for r in failing), default=math.inf),
                "plan_mm1_rps": preds["mm1"]["capacity_rps"], "plan_mm1_binding": preds["mm1"]["binding"],
                "plan_md1_rps": preds["md1"]["capacity_rps"], "plan_md1_binding": preds["md1"]["binding"],
                "overhead_s": overhead,
                "points": [{"rate_rps": r[0], "ttft_s": r[1], "tpot_ms": r[2], "meets": r[3]} for r in results],
            })
    return rows


# ---- output -----------------------------------------------------------------------------------------


def _fig1_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| workload | rho | rate (req/s) | measured mean (s) | M/M/1 | M/D/1 | M/G/1 | measured P90 (s) | M/M/1 P90 | M/D/1 P90 | M/G/1 P90 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['rho']:.2f} | {r['rate_rps']:.2f} | {r['measured_mean_s']:.3f} | "
            f"{r['mm1_mean_s']:.3f} | {r['md1_mean_s']:.3f} | {r['mg1_mean_s']:.3f} | {r['measured_p90_s']:.3f} | "
            f"{r['mm1_p90_s']:.3f} | {r['md1_p90_s']:.3f} | {r['mg1_p90_s']:.3f} |"
        )
    lines += ["", "Mean absolute relative error, by model and workload:", "",
              "| workload | statistic | M/M/1 | M/D/1 | M/G/1 |", "|---|---|---|---|---|"]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        rs = [r for r in rows if r["workload"] == wl]
        for stat in ("mean", "p90"):
            errs = [np.mean([abs(r[f"{m.value}_{stat}_s"] / r[f"measured_{stat}_s"] - 1) for r in rs]) for m in MODELS]
            lines.append(f"| {wl} | {stat} | " + " | ".join(f"{100 * e:.0f} %" for e in errs) + " |")
    return lines


def write_outputs(fig1: list[dict[str, Any]], fig1e: list[dict[str, Any]], fig3: list[dict[str, Any]],
                  meta: dict[str, Any]) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "validation.json").write_text(
        json.dumps({"meta": meta, "figure1": fig1, "figure1_engine": fig1e, "figure3": fig3}, indent=1))
    lines = [
        "# Model validation on emulated fleets",
        "",
        f"Generated by `python bench/validate_models.py{' --quick' if meta['quick'] else ''}` "
        f"({meta['date']}); profile `{PROFILE}`, emulator time scale {meta['scale']}; "
        "all figures in the profile's units. See docs/emulator.md for what the emulator models and where the "
        "queueing models err.",
        "",
        "## Figure 1: TTFT against load, one prefill instance",
        "",
        "Through the real router, client-measured TTFT (first streamed token), open-loop Poisson arrivals, "
        f"{meta['per1']:g} s of emulated time per point (at least 80 requests; the first 10 % dropped). "
        "Predictions: fixed overhead (median idle TTFT less prefill time) + the model's sojourn time.",
        "",
        *_fig1_table(fig1),
        "",
        f"## Figure 1b: the prefill queue alone, long runs ({meta['n_engine']} requests per point)",
        "",
        "The emulator's prefill engine in-process, sojourn from its virtual schedule: no HTTP, no client, "
        "no overhead; separates the models' error from the measurement noise of Figure 1.",
        "",
        *_fig1_table(fig1e),
        "",
    ]
    lines += [
        "",
        f"## Figure 3: maximum load meeting both objectives (mean TTFT <= {meta['ttft_s']} s, mean TPOT <= "
        f"{meta['tpot_ms']} ms; L_in {meta['l_in']}, L_out {meta['l_out']})",
        "",
        "| fleet | measured max (req/s) | first failing (req/s) | plan --evaluate M/M/1 | M/D/1 | binding (M/D/1) |",
        "|---|---|---|---|---|---|",
    ]
    for r in fig3:
        lines.append(
            f"| {r['deployment']} | {r['measured_max_rps']:.2f} | {r['first_failing_rps']:.2f} | "
            f"{r['plan_mm1_rps']:.2f} | {r['plan_md1_rps']:.2f} | {r['plan_md1_binding']} |"
        )
    (OUT_DIR / "validation.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(dict.fromkeys(r["workload"] for r in fig1))
    fig, grid = plt.subplots(2, 3, figsize=(16, 8.4))
    panels = [(grid[0][i], fig1, wl, "TTFT via router") for i, wl in enumerate(wls)]
    panels += [(grid[1][i], fig1e, wl, "prefill queue alone, long run") for i, wl in enumerate(wls)]
    for ax, data, wl, what in panels:
        rs = [r for r in data if r["workload"] == wl]
        x = [r["rate_rps"] for r in rs]
        ax.plot(x, [r["measured_mean_s"] for r in rs], "ko-", label="measured mean")
        ax.plot(x, [r["measured_p90_s"] for r in rs], "k^--", label="measured P90", alpha=0.6)
        for m, c in zip(MODELS, ("tab:red", "tab:blue", "tab:green"), strict=True):
            ax.plot(x, [r[f"{m.value}_mean_s"] for r in rs], "-", color=c, label=f"{m.value.upper()} mean")
            ax.plot(x, [r[f"{m.value}_p90_s"] for r in rs], ":", color=c, alpha=0.6)
        ax.set_title(f"{what}: {wl}", fontsize=10)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("time (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    grid[1][2].axis("off")
    grid[1][2].text(0.0, 0.5, "solid: mean, dotted: P90 predictions\n"
                    f"profile {PROFILE}\nFig. 3: L_in {meta['l_in']}, L_out {meta['l_out']},\n"
                    f"TTFT <= {meta['ttft_s']} s, TPOT <= {meta['tpot_ms']} ms (means)", fontsize=9)
    ax = grid[0][2]
    deps = [r["deployment"] for r in fig3]
    xs = np.arange(len(deps))
    ax.bar(xs - 0.27, [r["measured_max_rps"] for r in fig3], 0.27, label="measured (emulated)", color="k")
    ax.bar(xs, [r["plan_mm1_rps"] for r in fig3], 0.27, label="plan M/M/1", color="tab:red")
    ax.bar(xs + 0.27, [r["plan_md1_rps"] for r in fig3], 0.27, label="plan M/D/1", color="tab:blue")
    ax.set_xticks(xs, deps)
    ax.set_ylabel("max rate meeting both objectives (req/s)")
    ax.set_title("Fleet capacity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(OUT_DIR / "validation.png", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer and shorter points")
    ap.add_argument("--scale", type=float, default=0.5, help="emulator time scale for Figure 1")
    ap.add_argument("--reuse", choices=("fig1", "fig3"), action="append", default=[],
                    help="take this figure's rows from the existing validation.json instead of measuring again")
    ap.add_argument("--scale3", type=float, default=0.25, help="emulator time scale for Figure 3")
    args = ap.parse_args()
    rhos = [0.3, 0.6, 0.8] if args.quick else [0.3, 0.5, 0.65, 0.75, 0.85]
    per1 = 10.0 if args.quick else 16.0
    fleets = [(1, 1), (1, 2)] if args.quick else [(1, 1), (1, 2), (2, 3)]
    fractions = [0.8, 1.0, 1.2] if args.quick else [0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25]
    per3 = 8.0 if args.quick else 10.0
    meta = {"quick": args.quick, "scale": args.scale, "scale3": args.scale3, "date": time.strftime("%Y-%m-%d"),
            "l_in": 2048, "l_out": 128, "ttft_s": 0.5, "tpot_ms": 35.0}
    # SIGTERM unwinds like Ctrl-C, so the fleets' context managers stop their processes
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()
    n_engine = 800 if args.quick else 3000
    meta["per1"] = per1
    meta["n_engine"] = n_engine
    old = json.loads((OUT_DIR / "validation.json").read_text()) if args.reuse else {}
    if "fig1" in args.reuse:
        f1e, f1 = old["figure1_engine"], old["figure1"]
    else:
        f1e = asyncio.run(figure1_engine(0.03, rhos, n_engine))
        f1 = asyncio.run(figure1(args.scale, rhos, per1, args.quick))
    f3 = old["figure3"] if "fig3" in args.reuse else asyncio.run(figure3(
        args.scale3, fleets, fractions, per3, meta["l_in"], meta["l_out"], meta["ttft_s"], meta["tpot_ms"]))
    write_outputs(f1, f1e, f3, meta)
    print(f"wrote {OUT_DIR}/validation.md, validation.png, validation.json in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
