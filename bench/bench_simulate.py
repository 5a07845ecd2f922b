"""Benchmark: every policy on the full Azure conversation trace; wall time and simulated requests/s.

Target: one simulated hour per policy in <= 30 s on one core.

    python bench/bench_simulate.py [--trace FILE] [--rate-scale X] [--json]

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
    a = ap.parse_args()
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


if __name__ == "__main__":
    raise SystemExit(main())
