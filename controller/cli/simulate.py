"""`pd-controller simulate`: replay real traces through a simulated P/D fleet under each policy."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from controller.config import ConfigError, load_config
from controller.core.control import ControlParams, ControlSpec, Mode
from controller.core.errors import ModelInputError
from controller.core.prefill import QueueModel
from controller.core.sizing import Hardware, Objectives
from controller.profiles import load_profile
from controller.sim.fleet import SimConfig
from controller.sim.policies import POLICIES, FixedSplitPolicy, SimContext, make_policy
from controller.sim.runner import Progress, Result, simulate
from controller.sim.traces import load_trace, splice

DEFAULT_PROFILE = "llama2-70b-h100-tp8"
MAX_SIM_REQUESTS = 5_000_000


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="replay traces through a simulated P/D fleet under each policy",
        description="Discrete-event P/D fleet on virtual time, fed by real traces; compares the SLO "
        "controller with static, static-peak, threshold (HPA), throughput (Dynamo-planner) and oracle.",
    )
    p.add_argument("--trace", action="append", metavar="FILE",
                   help="Azure CSV, Mooncake JSONL or generic CSV/JSONL; repeat to play traces in sequence")
    p.add_argument("--scenario", metavar="FILE",
                   help="a scenario file (configs/scenarios): its traffic, profile, objectives, mode, budget, flip "
                   "and cold-start times replace those flags (pd-controller bench runs the whole matrix)")
    p.add_argument("--trace-format", choices=["auto", "azure", "mooncake", "generic"], default="auto")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help=f"profile YAML or shipped name (default {DEFAULT_PROFILE})")
    p.add_argument("--config", help="YAML config: its control section sets the controller's parameters")
    p.add_argument("--ttft-s", type=float, default=2.0, help="TTFT objective, seconds (default 2)")
    p.add_argument("--ttft-quantile", type=float, default=0.99,
                   help="statistic the controller sizes prefill for (default 0.99: attainment counts every request)")
    p.add_argument("--tpot-ms", type=float, default=50.0, help="TPOT objective, milliseconds (default 50)")
    # "dynamo": NVIDIA Dynamo's planner (optional extra, controller/sim/dynamo_policy.py), not part of "all"
    p.add_argument("--policy", default="all", choices=[*POLICIES, "dynamo", "all"])
    p.add_argument("--gpus", type=int, help="fixed budget of GPUs: only flips move capacity")
    p.add_argument("--elastic", action="store_true", help="pools scale between bounds (the default without --gpus)")
    p.add_argument("--min-per-pool", type=int, default=1, help="elastic: minimum instances per pool")
    p.add_argument("--max-gpus", type=int, help="elastic: cap on allocated GPUs")
    p.add_argument("--flip-time-s", type=float, default=30.0, help="role switch time once drained (default 30)")
    p.add_argument("--cold-start-s", type=float, default=300.0, help="time for a new instance to serve (default 300)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the request rate (superposed shifted copies)")
    p.add_argument("--time-scale", type=float, default=1.0, help="stretch (>1) or compress (<1) trace time")
    p.add_argument("--router", choices=["least-load", "round-robin"], default="least-load")
    p.add_argument("--prefill-model", choices=["mm1", "md1", "mg1"], default="mg1",
                   help="prefill queue model of the slo controller and oracle (default mg1)")
    p.add_argument("--tick-s", type=float, help="control tick period (default 5 s, or the config's)")
    p.add_argument("--sweep-static", action="store_true",
                   help="fixed budget: also simulate every static split and report the best (static-best)")
    p.add_argument("--seed", type=int, default=0, help="seed for rate scaling")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="write load, P/D counts and rolling SLO attainment")


def _params(args: argparse.Namespace, prof_gpi: int) -> ControlParams:
    base: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise ConfigError(f"config={args.config!r}: no such file")
        base = load_config(path).control.model_dump()
    fixed = args.gpus is not None and not args.elastic
    if args.elastic and args.gpus is not None:
        raise ModelInputError("gpus", args.gpus, "--gpus is the fixed budget; with --elastic use --max-gpus")
    if fixed and args.gpus < 2 * prof_gpi:
        raise ModelInputError("gpus", args.gpus, f"need at least {2 * prof_gpi} GPUs (one instance per pool)")
    base.update(
        mode=Mode.FIXED if fixed else Mode.ELASTIC,
        gpus=args.gpus if fixed else args.max_gpus,
        flip_time_s=args.flip_time_s,
        cold_start_s=args.cold_start_s,
        min_prefill=max(1, args.min_per_pool),
        min_decode=max(1, args.min_per_pool),
    )
    if args.tick_s is not None:
        base["tick_period_s"] = args.tick_s
    base["mode"] = Mode(base["mode"])
    if "calibration_bounds" in base:
        base["calibration_bounds"] = tuple(base["calibration_bounds"])
    return ControlParams(**base)


def build_context(args: argparse.Namespace) -> tuple[SimContext, SimConfig]:
    if getattr(args, "scenario", None):
        from controller.sim.scenarios import build, load_scenario

        if args.trace:
            raise ModelInputError("trace", args.trace, "--scenario names its own traffic; drop --trace")
        sc = load_scenario(args.scenario)
        return build(sc, Path(args.scenario).parent)
    if not args.trace:
        raise ModelInputError("trace", None, "give --trace FILE (repeatable) or --scenario FILE")
    for name in ("rate_scale", "time_scale", "flip_time_s", "cold_start_s"):
        v = getattr(args, name)
        if not (v >= 0 and math.isfinite(v)) or (name.endswith("scale") and v <= 0):
            raise ModelInputError(name, v, "must be a positive number" if name.endswith("scale") else "must be >= 0")
    prof = load_profile(args.profile)
    traces = [load_trace(t, args.trace_format) for t in args.trace]
    # superposed copies cost memory per request: bound the result before building it
    total = sum(len(t) for t in traces) * args.rate_scale
    if total > MAX_SIM_REQUESTS:
        raise ModelInputError("rate_scale", args.rate_scale,
                              f"{total:.3g} requests: above the simulator's bound of {MAX_SIM_REQUESTS}")
    # scale each trace before splicing, so scaled copies never leak across the splice
    if args.time_scale != 1.0:
        traces = [t.time_scaled(args.time_scale) for t in traces]
    if args.rate_scale != 1.0:
        traces = [t.rate_scaled(args.rate_scale, seed=args.seed + i) for i, t in enumerate(traces)]
    tr = splice(traces)
    if len(tr) == 0:
        raise ModelInputError("trace", args.trace, "no requests")
    gpi = max(prof.prefill_gpus_per_instance, prof.decode_gpus_per_instance)
    params = _params(args, gpi)
    obj = Objectives(args.ttft_s, args.tpot_ms, args.ttft_quantile, prof.overhead_s)
    spec = ControlSpec(obj, Hardware(prof, QueueModel(args.prefill_model)), params)
    ctx = SimContext(tr, spec, params.mode, spec.budget_instances() if params.mode is Mode.FIXED else None)
    return ctx, SimConfig(flip_time_s=args.flip_time_s, cold_start_s=args.cold_start_s, router=args.router)


def run_policies(ctx: SimContext, sim: SimConfig, names: list[str], sweep_static: bool = False,
                 progress: bool | None = None) -> dict[str, Result]:
    out: dict[str, Result] = {}
    for name in names:
        bar = Progress(name, progress)
        out[name] = simulate(make_policy(name, ctx), ctx, sim, bar)
        bar.done()
    if sweep_static and ctx.mode is Mode.FIXED and ctx.instances_budget is not None:
        best: Result | None = None
        for p in range(1, ctx.instances_budget):
            pol = FixedSplitPolicy(ctx, p, ctx.instances_budget - p)
            bar = Progress(pol.name, progress)
            r = simulate(pol, ctx, sim, bar)
            bar.done()
            key = (r.slo_attainment >= 0.99, r.goodput_rps)
            if best is None or key > (best.slo_attainment >= 0.99, best.goodput_rps):
                best = r
        if best is not None:
            best.policy = f"static-best ({best.policy.removeprefix('static-')})"
            out["static-best"] = best
    return out


def to_json(results: dict[str, Result], ctx: SimContext) -> dict[str, Any]:
    oracle = results.get("oracle")
    pol: dict[str, Any] = {}
    for name, r in results.items():
        d = r.summary()
        d = {k: (float(v) if isinstance(v, float) else v) for k, v in d.items()}
        d["wall_s"] = r.wall_s
        d["label"] = r.policy
        if oracle is not None and oracle.gpu_hours > 0:
            d["gpu_hours_vs_oracle"] = r.gpu_hours / oracle.gpu_hours
        pol[name] = d
    return {
        "trace": ctx.trace.name,
        "requests": len(ctx.trace),
        "duration_s": ctx.trace.duration_s,
        "mode": ctx.mode.value,
        "gpus": ctx.spec.params.gpus,
        "objectives": {"ttft_s": ctx.spec.objectives.ttft_s, "tpot_ms": ctx.spec.objectives.tpot_ms},
        "policies": pol,
    }


def render(results: dict[str, Result], ctx: SimContext) -> str:
    names = list(results)
    oracle = results.get("oracle")
    rows: list[tuple[str, list[str]]] = [
        ("requests", [f"{results[n].requests}" for n in names]),
        ("SLO attainment", [f"{results[n].slo_attainment * 100:.2f}%" for n in names]),
        ("TTFT p50/p90/p99 s", [f"{r.ttft_p50_s:.2f}/{r.ttft_p90_s:.2f}/{r.ttft_p99_s:.2f}" for r in results.values()]),
        ("TPOT p50/p90 ms", [f"{r.tpot_p50_ms:.1f}/{r.tpot_p90_ms:.1f}" for r in results.values()]),
        ("GPU-hours", [f"{r.gpu_hours:.1f}" for r in results.values()]),
    ]
    if oracle is not None and oracle.gpu_hours > 0:
        rows.append(("GPU-hours / oracle", [f"{r.gpu_hours / oracle.gpu_hours:.2f}x" for r in results.values()]))
    rows += [
        ("flips", [f"{r.flips}" for r in results.values()]),
        ("scale events", [f"{r.scale_events}" for r in results.values()]),
        ("goodput req/s", [f"{r.goodput_rps:.2f}" for r in results.values()]),
    ]
    heads = [results[n].policy for n in names]
    w0 = max(len(k) for k, _ in rows)
    ws = [max(len(h), *(len(v[i]) for _, v in rows)) for i, h in enumerate(heads)]
    mode = f"fixed budget {ctx.spec.params.gpus} GPUs" if ctx.mode is Mode.FIXED else "elastic"
    o = ctx.spec.objectives
    lines = [
        f"trace {ctx.trace.name}: {len(ctx.trace)} requests over {ctx.trace.duration_s / 3600:.2f} h; {mode}; "
        f"TTFT <= {o.ttft_s:g} s and TPOT <= {o.tpot_ms:g} ms",
        " ".join([" " * w0] + [h.rjust(w) for h, w in zip(heads, ws, strict=True)]),
    ]
    for k, vals in rows:
        lines.append(" ".join([k.ljust(w0)] + [v.rjust(w) for v, w in zip(vals, ws, strict=True)]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    ctx, sim = build_context(args)
    names = list(POLICIES) if args.policy == "all" else [args.policy]
    if args.policy == "all":
        names = ["slo", "static", "static-peak", "threshold", "throughput", "oracle"]
    results = run_policies(ctx, sim, names, sweep_static=args.sweep_static)
    if args.plot:
        from controller.sim.plot import plot

        plot(list(results.values()), Path(args.plot), title=render(results, ctx).splitlines()[0])
    print(json.dumps(to_json(results, ctx), indent=2) if args.json else render(results, ctx))
    return 0
