"""Benchmark: every policy on the full Azure conversation trace; wall time and simulated requests/s.

Target: one simulated hour per policy in <= 30 s on one core.

    python bench/bench_simulate.py [--trace FILE] [--rate-scale X] [--json]
    python bench/bench_simulate.py --matrix [--jobs 2]   # the whole scenario matrix (target <= 15 min on 2 cores)

Prints one row per policy: wall seconds, simulated hours, wall seconds per
simulated hour, simulated requests per wall second, and the policy's scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from controller.cli.main import build_parser  # noqa: E402
from controller.cli.simulate import build_context, run_policies  # noqa: E402

CONV = REPO / "data" / "traces" / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"
POLICIES = ["slo", "static", "static-peak", "threshold", "throughput", "oracle"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(CONV))
    ap.add_argument("--rate-scale", default="1")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--matrix", action="store_true", help="time the whole scenario matrix (pd-controller bench)")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    if a.matrix:
        return matrix(a.jobs, a.json)
    parser, _ = build_parser()
    args = parser.parse_args(["simulate", "--trace", a.trace, "--rate-scale", a.rate_scale])
    ctx, sim = build_context(args)
    results = run_policies(ctx, sim, POLICIES)
    hours = ctx.trace.duration_s / 3600.0
    rows = []
    for name, r in results.items():
        rows.append({
            "policy": name,
            "wall_s": round(r.wall_s, 2),
            "simulated_h": round(hours, 3),
            "wall_s_per_sim_hour": round(r.wall_s / hours, 2),
            "sim_requests_per_s": round(r.requests / r.wall_s, 0),
            "slo_attainment": round(r.slo_attainment, 4),
            "gpu_hours": round(r.gpu_hours, 2),
            "meets_30s_per_hour": r.wall_s / hours <= 30.0,
        })
    if a.json:
        print(json.dumps({"trace": ctx.trace.name, "requests": len(ctx.trace), "rows": rows}, indent=2))
        return 0
    print(f"trace {ctx.trace.name}: {len(ctx.trace)} requests, {hours:.2f} simulated hours, one core")
    print(f"{'policy':<12} {'wall s':>7} {'s/sim-h':>8} {'req/s':>8} {'attain':>7} {'GPU-h':>7}  <=30 s/h")
    for row in rows:
        print(f"{row['policy']:<12} {row['wall_s']:>7.2f} {row['wall_s_per_sim_hour']:>8.2f} "
              f"{row['sim_requests_per_s']:>8.0f} {row['slo_attainment'] * 100:>6.2f}% {row['gpu_hours']:>7.2f}  "
              f"{'yes' if row['meets_30s_per_hour'] else 'NO'}")
    return 0


def matrix(workers: int, as_json: bool) -> int:
    """Wall and CPU time of every job of the matrix; the CPU total over the workers is what an
    unshared machine with that many cores would take (a shared one inflates the wall time)."""
    import time

    from controller.sim.matrix import POLICY_NAMES, jobs_for, run_jobs
    from controller.sim.scenarios import find_scenarios

    jobs = jobs_for(find_scenarios(), POLICY_NAMES)
    t0 = time.perf_counter()
    res = run_jobs(jobs, workers)
    wall = time.perf_counter() - t0
    cpu = sum(r["cpu_s"] for r in res)
    by_kind: dict[str, float] = {}
    for r in res:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0.0) + r["cpu_s"]
    out = {"jobs": len(jobs), "workers": workers, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "cpu_s_per_worker": round(cpu / workers, 1), "cpu_s_by_kind": {k: round(v, 1) for k, v in by_kind.items()},
           "meets_15_min": cpu / workers <= 900.0, "errors": sum(1 for r in res if r["error"])}
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['jobs']} jobs on {workers} workers: {wall:.0f} s wall, {cpu:.0f} CPU-s "
              f"({cpu / workers:.0f} s per worker; <= 900 s: {'yes' if out['meets_15_min'] else 'NO'})")
        for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<12} {v:7.1f} CPU-s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
