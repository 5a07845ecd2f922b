"""Cross-check `pd-controller simulate` against NVIDIA Dynamo's own replay, same trace, same fleet, same profile.

Needs ai-dynamo 1.6.1 (the dynamo extra; see docs/profiles.md), run in its venv:

    HF_HUB_OFFLINE=1 /work/venvs/nvidia/bin/python bench/bench_dynamo_replay.py [--markdown]

For each case (trace, rate scale, profile, fixed fleet P prefill + D decode):
- ours: the trace-driven fleet simulator with a fixed split (no policy moves),
  round-robin routing;
- Dynamo: `dynamo.replay.run_trace_replay`, the Rust discrete-event replay of
  Dynamo's mocker engines (SGLang scheduler model: chunked prefill, continuous
  decode batching, P->D KV hand-off), disaggregated with the same P and D,
  round-robin routing, prefix caching off (the trace has no shared prefixes),
  timed by a mocker-format NPZ written from the same profile: prefill time per
  input length, and decode ITL on an (active KV tokens, context) grid taken as
  TPOT(batch = KV tokens / context, context) from the profile's grid.
Both replay the identical request list (our scaled trace written as Mooncake
JSONL, one unique hash block per 512 tokens). Prints TTFT and TPOT p50/p90 of
both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
AZURE_CODE = REPO / "data/traces/azure-llm-2023/AzureLLMInferenceTrace_code.csv"
AZURE_CONV = REPO / "data/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"

# (label, trace, rate scale, profile, P, D): fleets sized so neither pool is hopelessly overloaded
CASES = [
    ("azure-code x2, 70B H100 TP8, 1P1D", AZURE_CODE, 2.0, "llama31-70b-h100-tp8", 1, 1),
    ("azure-code x4, 70B H100 TP8, 2P1D", AZURE_CODE, 4.0, "llama31-70b-h100-tp8", 2, 1),
    ("azure-conv x2, 70B H200 TP8, 1P1D", AZURE_CONV, 2.0, "llama31-70b-h200-tp8", 1, 1),
    ("azure-conv x1, Qwen3-32B H100 TP2, 1P1D", AZURE_CONV, 1.0, "qwen3-32b-h100-tp2", 1, 1),
    ("azure-conv x1, 70B H100 TP8 (splitwise 2023), 1P2D", AZURE_CONV, 1.0, "llama2-70b-h100-tp8", 1, 2),
]


def ours(trace: Path, rate: float, profile: str, p: int, d: int):  # type: ignore[no-untyped-def]
    from controller.cli.main import build_parser
    from controller.cli.simulate import build_context
    from controller.sim.policies import FixedSplitPolicy
    from controller.sim.runner import simulate

    prof_gpi = 8 if "tp8" in profile else (4 if "tp4" in profile else 2)
    args = build_parser()[0].parse_args([
        "simulate", "--trace", str(trace), "--profile", profile, "--rate-scale", str(rate),
        "--gpus", str((p + d) * prof_gpi), "--router", "round-robin", "--ttft-s", "2", "--tpot-ms", "50",
    ])
    ctx, sim = build_context(args)
    r = simulate(FixedSplitPolicy(ctx, p, d), ctx, sim, None)
    return ctx, r


def write_mooncake(ctx, path: Path) -> int:  # type: ignore[no-untyped-def]
    tr = ctx.trace
    nxt = 0
    with path.open("w") as f:
        for a, i, o in zip(tr.arrival_s, tr.input_tokens, tr.output_tokens, strict=True):
            n = max(1, math.ceil(int(i) / 512))
            f.write(json.dumps({"timestamp": round(float(a) * 1000.0, 3), "input_length": int(i),
                                "output_length": max(1, int(o)), "hash_ids": list(range(nxt, nxt + n))}) + "\n")
            nxt += n
    return len(tr.arrival_s)


def write_npz(profile, path: Path) -> None:  # type: ignore[no-untyped-def]
    pre, d = profile.prefill, profile.decode_curve
    isl = np.linspace(16, 32768, 200)
    kv = np.linspace(0, d.kv_capacity_tokens or d.batch[-1] * d.context[-1], 120)
    ctxs = np.linspace(1, d.context[-1], 120)
    itl = np.array([[d.tpot_ms_at(max(1.0, k / c), c) for c in ctxs] for k in kv])
    np.savez(path, prefill_isl=isl, prefill_ttft_ms=np.array([float(pre.time_s(x)) * 1000 for x in isl]),
             decode_active_kv_tokens=kv, decode_context_length=ctxs, decode_itl=itl)


def dynamo(trace_path: Path, npz: Path, p: int, d: int) -> dict:
    sys.path.append(str(REPO / "controller/sim/_dynamo_compat"))
    from dynamo.replay import run_trace_replay

    def eng(role: str) -> dict:
        return {"engine": {"backend": "sglang", "worker_type": role, "block_size": 512, "enable_prefix_caching": False,
                           "timing_model": {"type": "external", "provider": "dynamo_profile", "config": {"path": str(npz)}}}}

    r = run_trace_replay([str(trace_path)], prefill_engine_args=eng("prefill"), decode_engine_args=eng("decode"),
                         num_prefill_workers=p, num_decode_workers=d, router_mode="round_robin", trace_format="mooncake")
    return dict(r.summary)


def scenario_table(paths: list[str]) -> None:
    """`dynamo` (Dynamo's planner engine) next to the `throughput` imitation and `slo` on matrix scenarios."""
    from controller.sim.policies import ThroughputPolicy, make_policy
    from controller.sim.runner import simulate
    from controller.sim.scenarios import build, load_scenario

    print("| scenario | policy | SLO attainment | GPU-hours | TTFT p99 s | scale events | flips |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        sc = load_scenario(path)
        ctx, sim = build(sc)
        for name in ("dynamo", "throughput", "slo"):
            if name == "dynamo":
                from controller.sim.dynamo_policy import DynamoPolicy

                pol = DynamoPolicy(ctx)
            elif name == "throughput":
                pol = ThroughputPolicy(ctx)
            else:
                pol = make_policy(name, ctx)
            r = simulate(pol, ctx, sim)
            print(f"| {sc.name} | {name} | {r.slo_attainment:.1%} | {r.gpu_hours:.1f} | {r.ttft_p99_s:.2f} | "
                  f"{r.scale_events} | {r.flips} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--scenario", action="append", default=[],
                    help="instead of the replay cross-check: run dynamo / throughput / slo on these matrix scenarios")
    a = ap.parse_args()
    import importlib.util

    if importlib.util.find_spec("dynamo") is None:
        print("needs ai-dynamo 1.6.1 (the dynamo extra; docs/profiles.md)", file=sys.stderr)
        return 2
    logging.disable(logging.WARNING)
    os.environ.setdefault("DYN_LOG", "error")
    if a.scenario:
        scenario_table(a.scenario)
        return 0
    from controller.profiles import load_profile

    print("| case | requests | TTFT p50 s ours / Dynamo | TTFT p90 s ours / Dynamo | TPOT p50 ms ours / Dynamo "
          "| TPOT p90 ms ours / Dynamo | worst p50/p90 gap |")
    print("|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label, trace, rate, profile, p, d in CASES:
            ctx, r = ours(trace, rate, profile, p, d)
            tpath, npz = Path(tmp) / "trace.jsonl", Path(tmp) / "perf.npz"
            n = write_mooncake(ctx, tpath)
            write_npz(load_profile(profile), npz)
            s = dynamo(tpath, npz, p, d)
            pairs = [(r.ttft_p50_s, s["median_ttft_ms"] / 1000), (r.ttft_p90_s, s["p90_ttft_ms"] / 1000),
                     (r.tpot_p50_ms, s["median_tpot_ms"]), (r.tpot_p90_ms, s["p90_tpot_ms"])]
            gap = max(abs(a / b - 1) for a, b in pairs if b > 0)
            cells = " | ".join(f"{a:.3g} / {b:.3g}" for a, b in pairs)
            print(f"| {label} | {n} | {cells} | {gap:.0%} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
