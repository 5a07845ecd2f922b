"""The demo's schedule in the simulator: per phase, every static split of the four instances and the controller.

    python bench/demo_sim.py [--duration-s 130] [--time-scale 2] [--code-rps R] [--conv-rps R]

Same schedule (`pd-controller demo`'s build_schedule), same scaled profile, same objectives and
control parameters as the live demo; prints per phase the attainment and TTFT/TPOT percentiles of
1P3D, 2P2D, 3P1D and `slo`, and the flips `slo` made. bench/sim_vs_live.py sets this beside a live run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.config import config_from_dict
from controller.core.control import ControlSpec, Mode
from controller.core.prefill import QueueModel
from controller.core.sizing import Hardware, Objectives
from controller.profiles import load_profile, resolve_profile_path
from controller.sim.fleet import SimConfig
from controller.sim.policies import FixedSplitPolicy, SimContext, make_policy
from controller.sim.runner import simulate
from controller.sim.traces import Trace
from harness import demo as D


def demo_trace(duration_s: float, time_scale: float) -> Trace:
    reqs = D.build_schedule(duration_s, time_scale)
    arr = np.array([r.at_s for r in reqs])
    order = np.argsort(arr, kind="stable")
    return Trace("demo", arr[order], np.array([r.input_tokens for r in reqs])[order],
                 np.array([r.output_tokens for r in reqs])[order], np.zeros(len(reqs), dtype=np.int64))


def context(duration_s: float, time_scale: float, work: Path) -> tuple[SimContext, SimConfig]:
    prof_path = D.scaled_profile(resolve_profile_path(D.PROFILE), time_scale, work / "profile.yaml")
    # the live demo's own controller config, less what only the live stack has (router, tap, agents)
    stub = SimpleNamespace(router_url="http://127.0.0.1:1", router_metrics_url="http://127.0.0.1:1/metrics",
                           endpoints={}, client_sec="k", server_pub="k", bootstrap={})
    raw = D.controller_config(prof_path, stub, "tcp://127.0.0.1:1", time_scale, work / "flips.json")
    cfg = config_from_dict({"slo": raw["slo"], "hardware": raw["hardware"], "control": raw["control"]}, origin="demo")
    prof = load_profile(prof_path)
    obj = Objectives(cfg.slo.ttft_s, cfg.slo.tpot_ms, cfg.slo.ttft_quantile, prof.overhead_s)
    params = cfg.control.to_params()
    spec = ControlSpec(obj, Hardware(prof, QueueModel.MG1), params)
    tr = demo_trace(duration_s, time_scale)
    ctx = SimContext(tr, spec, Mode.FIXED, spec.budget_instances())
    sim = SimConfig(flip_time_s=params.flip_time_s, cold_start_s=params.cold_start_s, arrivals_max_tokens=True)
    return ctx, sim


def phase_rows(res: Any, half_s: float, obj: Objectives) -> dict[str, dict[str, Any]]:
    out = {}
    for name, lo, hi in (("code", 0.0, half_s), ("conv", half_s, 2 * half_s)):
        m = (res.arrival_s >= lo) & (res.arrival_s < hi)
        out[name] = {"slo_attainment": round(float(res.met[m].mean()), 4) if m.any() else None}
    return out


def run(duration_s: float, time_scale: float, initial: tuple[int, int] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx, sim = context(duration_s, time_scale, Path(tmp))
        half = duration_s / 2
        out: dict[str, Any] = {}
        for p in (1, 2, 3):
            r = simulate(FixedSplitPolicy(ctx, p, 4 - p), ctx, sim)
            out[f"{p}P{4 - p}D"] = {"phases": phase_rows(r, half, ctx.spec.objectives),
                                    "slo_attainment": round(r.slo_attainment, 4)}
        pol = make_policy("slo", ctx)
        start = initial or D.initial_split(D.INITIAL)
        pol.initial = lambda: start  # type: ignore[method-assign]  # the live demo's starting split
        r = simulate(pol, ctx, sim)
        out["slo"] = {"phases": phase_rows(r, half, ctx.spec.objectives), "slo_attainment": round(r.slo_attainment, 4),
                      "flips": r.flips, "flip_log": getattr(r, "flip_log", None)}
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=D.DURATION_S)
    ap.add_argument("--time-scale", type=float, default=2.0)
    ap.add_argument("--code-rps", type=float, default=None, help="the code phase's rate (default: the demo's)")
    ap.add_argument("--conv-rps", type=float, default=None, help="the conversation phase's rate (default: the demo's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.code_rps is not None:
        D.CODE_RPS = a.code_rps
    if a.conv_rps is not None:
        D.CONV_RPS = a.conv_rps
    res = run(a.duration_s, a.time_scale)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{'policy':8} {'all':>7} {'code':>7} {'conv':>7}")
    for k, v in res.items():
        ph = v["phases"]
        print(f"{k:8} {v['slo_attainment']:7.3f} {ph['code']['slo_attainment']:7.3f} {ph['conv']['slo_attainment']:7.3f}"
              + (f"  flips={v['flips']}" if "flips" in v else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
