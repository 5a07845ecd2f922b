"""The scenario matrix: every policy and reference on every scenario, in worker processes.

A job is (scenario file, what to run, knob). Jobs run in a multiprocessing pool
(each worker builds and caches the scenario's trace once); a job returns a
small JSON-able dict (scores, a down-sampled timeline, per-minute attainment,
flip reversals, the candidates a search simulated), so results travel cheaply.
`evaluate` turns a scenario's jobs into its table row and the pass/fail of each
target of issue 9; `write_report` writes report.md, report.json and one plot
per scenario.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from controller.core.control import Mode
from controller.core.errors import PdControllerError
from controller.sim.fleet import SimConfig
from controller.sim.policies import SimContext, ThresholdPolicy, ThroughputPolicy, make_policy
from controller.sim.references import best_split, cheapest_static, oracle
from controller.sim.runner import Result, simulate
from controller.sim.scenarios import REPO, Scenario, build, load_scenario

THRESHOLD_KNOBS = (0.5, 0.6, 0.7, 0.8, 0.9)  # HPA target utilisation
THROUGHPUT_KNOBS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # Dynamo-planner utilisation of per-instance throughput
POLICY_NAMES = ("slo", "static", "static-peak", "threshold", "throughput", "static-best", "oracle")
BASELINES = ("static", "static-peak", "threshold", "throughput")
# rough relative cost, so the pool starts the long jobs first
_COST = {"static-best": 6.0, "oracle": 8.0, "slo": 3.0}


@dataclass(frozen=True)
class Job:
    scenario: str  # path of the scenario file
    kind: str  # one of POLICY_NAMES
    knob: float | None = None

    @property
    def label(self) -> str:
        return self.kind if self.knob is None else f"{self.kind}@{self.knob:g}"


def jobs_for(paths: Iterable[Path], policies: Iterable[str]) -> list[Job]:
    pols = list(policies)
    out: list[Job] = []
    for p in paths:
        for k in pols:
            if k == "threshold":
                out += [Job(str(p), k, x) for x in THRESHOLD_KNOBS]
            elif k == "throughput":
                out += [Job(str(p), k, x) for x in THROUGHPUT_KNOBS]
            else:
                out.append(Job(str(p), k))
    return sorted(out, key=lambda j: -_COST.get(j.kind, 1.0))


_CACHE: dict[str, tuple[Scenario, SimContext, SimConfig]] = {}


# what a reference or baseline result depends on besides the scenario: the simulator's own code
_SIM_SOURCES = ("fleet.py", "runner.py", "policies.py", "references.py", "traces.py", "scenarios.py")


def _sim_digest() -> bytes:
    import hashlib

    h = hashlib.sha256()
    for name in _SIM_SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.digest()


def scenario_hash(sc: Scenario) -> str:
    """Identity of a scenario's content and of the simulator code (a reused result must come from both)."""
    import hashlib

    return hashlib.sha256(sc.model_dump_json().encode() + _sim_digest()).hexdigest()[:16]


def reusable(previous: dict[str, Any], scenarios: dict[str, Scenario], kinds: set[str]) -> list[dict[str, Any]]:
    """Jobs of a previous report.json to reuse: of the given kinds, for scenarios whose content is unchanged.

    The references and baselines do not depend on the control core, so a run that changes only the core
    can rerun `slo` alone and keep the rest (`bench --policy slo --reuse docs/matrix/report.json`)."""
    by_hash = {scenario_hash(sc): path for path, sc in scenarios.items()}
    out = []
    for j in previous.get("jobs", []):
        path = by_hash.get(j.get("scenario_hash", ""))
        if path is not None and j.get("kind") in kinds and not j.get("error"):
            out.append({**j, "scenario": path, "reused": True})
    return out


def _scenario(path: str) -> tuple[Scenario, SimContext, SimConfig]:
    if path not in _CACHE:
        sc = load_scenario(path)
        ctx, sim = build(sc, Path(path).parent)
        _CACHE[path] = (sc, ctx, sim)
    return _CACHE[path]


def _per_minute(arrival_s: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Sums over the minute of arrival (counts without weights), minute 0 to the last arrival's."""
    b = (arrival_s // 60.0).astype(np.int64)
    return np.bincount(b, weights=weights, minlength=int(b.max()) + 1 if b.size else 0)


def _minute_attainment(r: Result) -> list[float | None]:
    if r.met is None or r.arrival_s is None or r.arrival_s.size == 0:
        return []
    tot = _per_minute(r.arrival_s)
    ok = _per_minute(r.arrival_s, r.met.astype(np.float64))
    return [round(float(o / t), 4) if t else None for o, t in zip(ok, tot, strict=True)]


def _timeline(r: Result, ctx: SimContext) -> dict[str, list[float]]:
    tl = r.timeline
    if not tl.t:
        return {"t": [], "load_rps": [], "prefill": [], "decode": [], "gpus": []}
    # one point per 30 s of simulated time is plenty for a plot
    step = max(1, round(30.0 / max(tl.t[1] - tl.t[0], 1e-9))) if len(tl.t) > 1 else 1
    prof = ctx.profile
    idx = range(0, len(tl.t), step)
    return {
        "t": [round(tl.t[i], 1) for i in idx],
        "load_rps": [round(tl.load_rps[i], 3) for i in idx],
        "prefill": [tl.prefill[i] for i in idx],
        "decode": [tl.decode[i] for i in idx],
        # allocated instances times GPUs per instance (equal per pool in shipped profiles)
        "gpus": [tl.allocated[i] * max(prof.prefill_gpus_per_instance, prof.decode_gpus_per_instance) for i in idx],
    }


def _minute_load(r: Result, ctx: SimContext) -> dict[str, list[int]]:
    """Per minute of arrival: requests, input tokens, and the misses by objective (the report's why)."""
    tr = ctx.trace
    if r.arrival_s is None or r.ttft_each_s is None or r.tpot_each_ms is None or r.arrival_s.size != len(tr):
        return {}
    arr = r.arrival_s
    obj = ctx.spec.objectives
    with np.errstate(invalid="ignore"):
        late = r.ttft_each_s > obj.ttft_s  # NaN (never finished) compares False: counted apart
        slow = ~late & (r.tpot_each_ms > obj.tpot_ms)

    def per(w: np.ndarray | None) -> list[int]:
        return [round(float(x)) for x in _per_minute(arr, w)]

    return {"requests": per(None), "input_tokens": per(tr.input_tokens.astype(np.float64)),
            "missed_ttft": per(late.astype(np.float64)), "missed_tpot": per(slow.astype(np.float64))}


def _attainment_after(r: Result, t0: float) -> float | None:
    if r.met is None or r.arrival_s is None:
        return None
    m = r.arrival_s >= t0
    return round(float(r.met[m].mean()), 6) if m.any() else None


def _result_dict(r: Result, ctx: SimContext) -> dict[str, Any]:
    d = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.summary().items()}
    d.update(label=r.policy, wall_s=round(r.wall_s, 3), timeline=_timeline(r, ctx),
             minute_attainment=_minute_attainment(r),
             # misses before the start-up are the start from a guessed fleet (a controller running beside
             # production has history instead)
             startup_s=ctx.spec.params.startup_s,
             attainment_after_startup=_attainment_after(r, ctx.spec.params.startup_s),
             reversals=[{"t": t, "instance": i, "to": role, "after_s": dt, "attainment_before": att}
                        for t, i, role, dt, att in r.reversals])
    if r.policy == "slo":
        d.update(duration_s=r.duration_s, minute_load=_minute_load(r, ctx))
    return d


def run_job(job: Job) -> dict[str, Any]:
    """One job in a worker; never raises (an error is reported in the result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict[str, Any] = {"scenario": job.scenario, "kind": job.kind, "knob": job.knob, "label": job.label}
    try:
        sc, ctx, sim = _scenario(job.scenario)
        out["name"] = sc.name
        out["scenario_hash"] = scenario_hash(sc)
        target = sc.objectives.attainment_target
        if job.kind == "static-best":
            if ctx.mode is Mode.FIXED:
                assert ctx.instances_budget is not None
                s = best_split(ctx, sim, ctx.instances_budget)
            else:
                s = cheapest_static(ctx, sim, target, sc.max_per_pool)
            if s.result is None:
                raise PdControllerError("static-best: no fleet simulated")
            out["result"] = _result_dict(s.result, ctx)
            out["result"]["label"] = f"static-best ({s.best[0]}P{s.best[1]}D)" if s.best else "static-best"
            out["fleet"] = list(s.best) if s.best else None
            out["reached"] = s.reached if ctx.mode is Mode.ELASTIC else s.result.slo_attainment >= target
            out["candidates"] = [c.as_dict() for c in s.candidates]
        elif job.kind == "oracle":
            o = oracle(ctx, sim, target, sc.max_per_pool, sc.oracle_window_s)
            out["oracle"] = o.as_dict()
            out["result"] = {"label": "oracle", "slo_attainment": o.attainment, "gpu_hours": o.gpu_hours,
                             "goodput_rps": o.goodput_rps, "flips": 0, "flip_reversals": 0,
                             "flip_reversals_unjustified": 0, "requests": len(ctx.trace)}
        else:
            if job.kind == "threshold":
                pol = ThresholdPolicy(ctx, job.knob)
            elif job.kind == "throughput":
                pol = ThroughputPolicy(ctx, job.knob)
            else:
                pol = make_policy(job.kind, ctx)
            out["result"] = _result_dict(simulate(pol, ctx, sim), ctx)
        out["error"] = None
    except PdControllerError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        out["error"] = f"{type(e).__name__}: {e} ({Path(tb.filename).name}:{tb.lineno})"
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    out["cpu_s"] = round(time.process_time() - c0, 3)  # the job's own CPU time: what a shared machine cannot inflate
    return out


class Bar:
    """A one-line progress bar on stderr, drawn only on a terminal."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / max(self.total, 1)
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} jobs {el:5.0f}s eta {eta:4.0f}s  {label[:40]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run_jobs(jobs: list[Job], workers: int, on_done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if workers <= 1:
        for j in jobs:
            r = run_job(j)
            out.append(r)
            if on_done:
                on_done(r)
        return out
    # fork is cheap here (numpy, traces loaded lazily in each worker); spawn on platforms without fork
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, maxtasksperchild=None) as pool:
        for r in pool.imap_unordered(run_job, jobs, chunksize=1):
            out.append(r)
            if on_done:
                on_done(r)
    return out


# --- evaluation ---------------------------------------------------------------------------------

def _frontier_beats(slo: tuple[float, float], points: list[tuple[float, float]]) -> bool:
    """Is (gpu_h, attainment) of slo beyond the frontier of `points` (higher attainment at equal
    GPU-hours, or fewer GPU-hours at equal attainment)? The frontier is the upper envelope,
    linearly interpolated between Pareto points (a mix of two settings), flat beyond the largest."""
    g, a = slo
    pts = sorted(points)
    pareto: list[tuple[float, float]] = []
    for x, y in pts:
        if not pareto or y > pareto[-1][1]:
            pareto.append((x, y))
    if not pareto or g < pareto[0][0] - 1e-9:
        return not any(x <= g and y >= a for x, y in pts)
    env = pareto[-1][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pareto):
        if x0 <= g <= x1:
            env = y0 + (y1 - y0) * (g - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
            break
    return a > env + 1e-9 or (a >= env - 1e-9 and not any(x <= g + 1e-9 and y >= a for x, y in pts))


def _fleet_in_minute(tl: dict[str, list[float]], minute: int) -> tuple[int, int] | None:
    """The smallest serving pools slo had in the minute (timeline points are the ends of 30-s steps)."""
    pts = [(p, d) for t, p, d in zip(tl.get("t", []), tl.get("prefill", []), tl.get("decode", []), strict=False)
           if 60.0 * minute < t <= 60.0 * (minute + 1)]
    return (int(min(p for p, _ in pts)), int(min(d for _, d in pts))) if pts else None


def why_minute(slo: dict[str, Any], minute: int, attainment: float, lead: str, startup_s: float,
               static_fleet: tuple[int, int] | None, static_minutes: list[float | None] | None = None) -> str:
    """Why one minute missed, from what the run shows: which objective broke, whether the load was beyond
    any minute before it (capacity ordered at its onset serves one lead time later), and slo's fleet
    against the static fleet that met the target."""
    ml = slo.get("minute_load") or {}
    parts = [f"min {minute} {attainment:.0%}"]
    if not ml or minute >= len(ml.get("requests", [])):
        return parts[0]
    ttft, tpot = ml["missed_ttft"][minute], ml["missed_tpot"][minute]
    parts.append(f"{ttft} TTFT / {tpot} TPOT misses of {ml['requests'][minute]}")
    prefill_side = ttft >= tpot
    if 60.0 * (minute + 1) <= startup_s:
        parts.append("start-up: before one window and one lead time the fleet it started on serves alone")
    else:
        # prefill work is input tokens; decode's is the requests in flight
        load = ml["input_tokens"] if prefill_side else ml["requests"]
        before = max(load[:minute], default=0)
        if before > 0 and load[minute] > 1.05 * before:
            parts.append(f"{'input tokens' if prefill_side else 'arrivals'} {load[minute] / before:.1f}x any earlier "
                         f"minute's (capacity ordered at its onset serves after {lead})")
    have = _fleet_in_minute(slo.get("timeline") or {}, minute)
    if have is not None and static_fleet is not None:
        pool, mine, theirs = ("prefill", have[0], static_fleet[0]) if prefill_side else ("decode", have[1], static_fleet[1])
        than = "at least" if mine >= theirs else "fewer than"
        sb_here = static_minutes[minute] if static_minutes and minute < len(static_minutes) else None
        parts.append(f"slo served {have[0]}P{have[1]}D, {than} static-best's {theirs} {pool} "
                     f"({static_fleet[0]}P{static_fleet[1]}D"
                     + (f", {sb_here:.0%} in this minute)" if sb_here is not None else ")"))
    return "; ".join(parts)


def _time_above(slo: dict[str, Any], gpus: float) -> str:
    g = (slo.get("timeline") or {}).get("gpus") or []
    if not g:
        return ""
    above = sum(1 for x in g if x > gpus + 1e-9) / len(g)
    below = sum(1 for x in g if x < gpus - 1e-9) / len(g)
    return f"; slo allocated more than static-best's {gpus:g} GPUs {above:.0%} of the time, fewer {below:.0%}"


def evaluate(sc: Scenario, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario's row: the references, the best baseline at its best knob, and each target."""
    target = sc.objectives.attainment_target
    fixed = sc.mode is Mode.FIXED
    by: dict[str, dict[str, Any]] = {}
    errors = {j["label"]: j["error"] for j in jobs if j.get("error")}
    for j in jobs:
        if not j.get("error"):
            by[j["label"]] = j
    res = {k: v["result"] for k, v in by.items()}

    def score(r: dict[str, Any]) -> tuple[float, ...]:
        ok = r["slo_attainment"] >= target
        return (ok, r["goodput_rps"]) if fixed else (ok, -r["gpu_hours"] if ok else r["slo_attainment"])

    best_base = None
    for k, r in res.items():
        if k.split("@")[0] in BASELINES and (best_base is None or score(r) > score(res[best_base])):
            best_base = k
    slo = res.get("slo")
    sb = by.get("static-best")
    orc = res.get("oracle")
    row: dict[str, Any] = {
        "scenario": sc.name, "mode": sc.mode.value, "profile": sc.profile, "tags": list(sc.tags),
        "ttft_s": sc.objectives.ttft_s, "tpot_ms": sc.objectives.tpot_ms, "gpus": sc.gpus,
        "requests": (slo or (orc or {})).get("requests"),
        "slo": slo, "static_best": sb["result"] if sb else None, "static_best_fleet": sb["fleet"] if sb else None,
        "static_best_reached": bool(sb and sb["reached"]),
        "best_baseline": best_base, "best_baseline_result": res.get(best_base) if best_base else None,
        "oracle": orc, "errors": errors,
    }
    checks: dict[str, dict[str, Any]] = {}
    if slo is not None:
        sa = slo["slo_attainment"]
        if sb is not None:
            if row["static_best_reached"]:
                checks["attainment"] = {"pass": bool(sa >= target), "detail": f"slo {sa:.2%} (static-best reaches {target:.0%})"}
            else:
                checks["attainment"] = {"pass": None, "detail": f"n/a: static-best {sb['result']['slo_attainment']:.2%}"}
        if not fixed and sb is not None and row["static_best_reached"]:
            ratio = slo["gpu_hours"] / sb["result"]["gpu_hours"]
            row["gpu_vs_static_best"] = ratio
            ok = bool(ratio <= 1.0 + 1e-9 and sa >= target)
            sbg = max((sb["result"].get("timeline") or {}).get("gpus") or [0.0])
            why = "" if ok or not sbg else ("; fails on attainment" if ratio <= 1.0 + 1e-9 else _time_above(slo, sbg))
            checks["gpu_le_static_best"] = {"pass": ok, "detail": f"{ratio:.2f}x{why}"}
        if not fixed and orc is not None and orc["gpu_hours"] > 0:
            ratio = slo["gpu_hours"] / orc["gpu_hours"]
            row["gpu_vs_oracle"] = ratio
            checks["gpu_le_1.2x_oracle"] = {"pass": bool(ratio <= 1.2 + 1e-9 and sa >= target), "detail": f"{ratio:.2f}x"}
        if fixed and "mix-shift" in sc.tags and sb is not None:
            g = slo["goodput_rps"]
            vs_sb = g / max(sb["result"]["goodput_rps"], 1e-12)
            others = [r["goodput_rps"] for k, r in res.items()
                      if k not in ("slo", "static-best", "oracle") and r["slo_attainment"] >= target]
            vs_other = g / max(others) if others else math.inf
            row["goodput_vs_static_best"] = vs_sb
            offered = slo["requests"] / slo["duration_s"] if slo.get("duration_s") else None

            def bound(factor: float, of: str, rps: float) -> str:
                # goodput counts requests served within the objectives: it cannot exceed the offered rate
                if offered is None or factor * rps <= offered:
                    return ""
                return f"; unreachable here: {factor:g}x {of} is {factor * rps:.2f} rps, above the offered {offered:.2f} rps"

            checks["goodput_1.2x_static_best"] = {
                "pass": bool(vs_sb >= 1.2 and sa >= target),
                "detail": f"{vs_sb:.2f}x" + bound(1.2, "static-best", sb["result"]["goodput_rps"])}
            checks["goodput_1.1x_others"] = {
                "pass": bool(vs_other >= 1.1 and sa >= target),
                "detail": f"{vs_other:.2f}x" + bound(1.1, "the best other", max(others)) if others
                else "no other policy at target"}
        unj = int(slo.get("flip_reversals_unjustified", 0))
        checks["no_flip_reversal_5min"] = {"pass": unj == 0,
                                           "detail": f"{unj} unjustified of {slo.get('flip_reversals', 0)}"}
        fams: dict[str, list[tuple[float, float]]] = {}
        for k, r in res.items():
            fam = k.split("@")[0]
            if fam in BASELINES:
                fams.setdefault(fam, []).append((r["gpu_hours"], r["goodput_rps"] if fixed else r["slo_attainment"]))
        if fixed:
            beaten = {f: bool(slo["goodput_rps"] > max(y for _, y in pts) + 1e-9) for f, pts in fams.items()}
            top = max((y for pts in fams.values() for _, y in pts), default=0.0)
            tie = bool(fams) and abs(slo["goodput_rps"] - top) <= 1e-9 and sa >= target
        else:
            beaten = {f: bool(_frontier_beats((slo["gpu_hours"], sa), pts)) for f, pts in fams.items()}
            tie = False
        lost = [f for f, b in beaten.items() if not b]
        if not fams:
            # `--policy` without any baseline: there is no frontier to be beyond
            checks["beyond_frontier"] = {"pass": None, "detail": "no baseline run"}
        elif tie:
            # every policy serves everything within the budget: nobody can be beyond anybody
            checks["beyond_frontier"] = {"pass": None, "detail": "tie: slo and the best baseline have the same goodput"}
        else:
            checks["beyond_frontier"] = {"pass": not lost,
                                         "detail": "not beyond: " + ", ".join(lost) if lost else "all"}
    if slo is not None:
        # where slo's misses are: the worst minutes and the objective each miss broke
        ma = slo.get("minute_attainment") or []
        worst = sorted((a, m) for m, a in enumerate(ma) if a is not None and a < target)[:3]
        # the static fleet that met the target, beside slo's in the minute (none where it did not)
        fleet, sb_minutes = None, None
        if sb is not None and sb.get("fleet") and sb["reached"]:
            fleet, sb_minutes = (int(sb["fleet"][0]), int(sb["fleet"][1])), sb["result"].get("minute_attainment")
        lead = f"a {sc.flip_time_s:g}-s flip and its drain" if fixed else f"a {sc.cold_start_s:g}-s cold start"
        row["slo_why"] = [why_minute(slo, m, a, lead,
                                     float(slo.get("startup_s") or 0.0), fleet, sb_minutes) for a, m in worst]
        row["slo_misses"] = {"ttft": slo.get("missed_ttft"), "tpot": slo.get("missed_tpot"),
                             "unfinished": slo.get("unfinished"), "shed": slo.get("shed"),
                             "minutes_below_target": sum(1 for a in ma if a is not None and a < target),
                             "worst_minutes": [{"minute": m, "attainment": a} for a, m in worst],
                             "startup_s": slo.get("startup_s"),
                             "attainment_after_startup": slo.get("attainment_after_startup"),
                             "static_best_after_startup": (row.get("static_best") or {}).get("attainment_after_startup")}
    row["checks"] = checks
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["gpu_vs_static_best"] for r in rows if r.get("gpu_vs_static_best") is not None]
    med = statistics.median(ratios) if ratios else None
    tally: dict[str, dict[str, int]] = {}
    for r in rows:
        for k, c in r["checks"].items():
            t = tally.setdefault(k, {"pass": 0, "fail": 0, "n/a": 0})
            t["pass" if c["pass"] is True else "fail" if c["pass"] is False else "n/a"] += 1
    return {"median_gpu_vs_static_best": med, "median_le_0.80": None if med is None else med <= 0.80, "checks": tally}


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:.2f}%"


def _num(x: float | None, f: str = ".1f") -> str:
    return "-" if x is None else format(x, f)


def _mark(c: dict[str, Any] | None) -> str:
    if c is None:
        return ""
    return "pass" if c["pass"] is True else "FAIL" if c["pass"] is False else "n/a"


CHECK_COLS = ("attainment", "gpu_le_static_best", "gpu_le_1.2x_oracle", "goodput_1.2x_static_best",
              "goodput_1.1x_others", "no_flip_reversal_5min", "beyond_frontier")


def render_markdown(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    out = ["# Scenario matrix", "",
           f"{meta['scenarios']} scenarios, {meta['jobs']} jobs on {meta['workers']} worker processes, "
           f"{meta['wall_s']:.0f} s wall, {meta.get('cpu_s', 0):.0f} CPU-seconds in the jobs ({meta['started']}). "
           f"Command: `{meta['command']}`. Source: commit {meta.get('commit')}"
           + (" with uncommitted changes under controller/" if meta.get("core_uncommitted_changes") else "")
           + (f"; {meta['reused_jobs']} job results reused from {meta['reused_from']}" if meta.get("reused_jobs") else "")
           + ".", "",
           "Elastic rows: SLO attainment / GPU-hours. Fixed-budget rows: attainment / goodput (req/s). "
           "`static-best` and `oracle` are found by simulation (docs/simulate.md); the best baseline is the best of "
           "static, static-peak, threshold and throughput at their best swept knob. Flips: slo's flips / reversals "
           "within 5 min (unjustified: the minute before met the objectives).", ""]
    head = ["scenario", "mode", "slo", "static-best", "best baseline", "oracle", "slo flips/rev", *CHECK_COLS]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in rows:
        fixed = r["mode"] == "fixed"

        def cell(x: dict[str, Any] | None, fixed: bool = fixed) -> str:
            if x is None:
                return "error"
            second = f"{x['goodput_rps']:.2f} rps" if fixed else f"{x['gpu_hours']:.1f} GPU-h"
            return f"{_pct(x['slo_attainment'])} / {second}"

        sb = cell(r["static_best"])
        if r["static_best_fleet"]:
            sb += f" ({r['static_best_fleet'][0]}P{r['static_best_fleet'][1]}D)"
        bb = cell(r["best_baseline_result"]) + (f" ({r['best_baseline']})" if r["best_baseline"] else "")
        slo = r["slo"]
        flips = f"{slo['flips']}/{slo['flip_reversals']} ({slo['flip_reversals_unjustified']} unj.)" if slo else "-"
        mode = f"fixed {r['gpus']} GPUs" if fixed else "elastic"
        cols = [r["scenario"], mode, cell(slo), sb, bb, cell(r["oracle"]), flips]
        cols += [_mark(r["checks"].get(c)) for c in CHECK_COLS]
        out.append("| " + " | ".join(cols) + " |")
    out += ["", "## Targets", ""]
    med = summary["median_gpu_vs_static_best"]
    out.append(f"- Median elastic slo GPU-hours / static-best: {_num(med, '.2f')}x "
               f"(target <= 0.80x: {'pass' if summary['median_le_0.80'] else 'FAIL'}).")
    for k, t in summary["checks"].items():
        out.append(f"- {k}: {t['pass']} pass, {t['fail']} fail, {t['n/a']} n/a")
    out += ["", "## Per scenario", ""]
    for r in rows:
        out.append(f"### {r['scenario']}")
        out.append("")
        out.append(f"{r['mode']}, profile {r['profile']}, P99 TTFT <= {r['ttft_s']:g} s, TPOT <= {r['tpot_ms']:g} ms, "
                   f"{r['requests']} requests. Plot: `plots/{r['scenario']}.png`.")
        out.append("")
        for k, c in r["checks"].items():
            out.append(f"- {k}: {_mark(c)} ({c['detail']})")
        m = r.get("slo_misses")
        if m:
            worst = ", ".join(f"min {w['minute']} {w['attainment']:.0%}" for w in m["worst_minutes"])
            out.append(f"- slo misses: {m['ttft']} TTFT, {m['tpot']} TPOT, {m['unfinished']} unfinished "
                       f"({m['shed']} shed at the gate); {m['minutes_below_target']} minutes below target"
                       + (f"; worst: {worst}" if worst else ""))
            for w in r.get("slo_why") or []:
                out.append(f"  - {w}")
            after, sb_after = m.get("attainment_after_startup"), m.get("static_best_after_startup")
            if after is not None and m.get("startup_s") is not None:
                out.append(f"- after the start-up (window + one lead time, t >= {m['startup_s']:g} s): slo {after:.2%}"
                           + (f", static-best {sb_after:.2%}" if sb_after is not None else ""))
        if r.get("errors"):
            for k, e in r["errors"].items():
                out.append(f"- error in {k}: {e}")
        out.append("")
    return "\n".join(out) + "\n"


def _rel(path: str) -> str:
    """A scenario path relative to the repository when it is inside it (the JSON then travels)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def render_compact(rows: list[dict[str, Any]]) -> str:
    """The README table: one row per scenario, attainment and GPU-hours (elastic) or goodput (fixed)."""
    out = ["| scenario | slo | static-best | best baseline (knob) | oracle | targets missed |", "|---|---|---|---|---|---|"]
    for r in rows:
        fixed = r["mode"] == "fixed"

        def cell(x: dict[str, Any] | None, fixed: bool = fixed) -> str:
            if x is None:
                return "-"
            return f"{x['slo_attainment'] * 100:.1f}% / " + (f"{x['goodput_rps']:.1f} rps" if fixed else f"{x['gpu_hours']:.0f} GPU-h")

        fails = [k for k, c in r["checks"].items() if c["pass"] is False]
        name = r["scenario"] + (f" (fixed {r['gpus']} GPUs)" if fixed else "")
        out.append(f"| {name} | {cell(r['slo'])} | {cell(r['static_best'])} | {cell(r['best_baseline_result'])} "
                   f"({r['best_baseline']}) | {cell(r['oracle'])} | {', '.join(fails) or 'none'} |")
    return "\n".join(out) + "\n"


def write_report(outdir: Path, scenarios: dict[str, Scenario], results: list[dict[str, Any]], meta: dict[str, Any],
                 plots: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    outdir.mkdir(parents=True, exist_ok=True)
    per: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        per.setdefault(r["scenario"], []).append(r)
    rows = [evaluate(scenarios[path], per.get(path, [])) for path in scenarios]
    summary = summarise(rows)
    slim = []
    for r in results:  # keep the JSON moderate: the timelines only for the plotted policies
        r2 = dict(r)
        r2["scenario"] = _rel(str(r["scenario"]))
        if "result" in r2 and r2["kind"] in ("threshold", "throughput", "static", "static-peak"):
            r2["result"] = {k: v for k, v in r2["result"].items() if k not in ("timeline", "minute_attainment")}
        slim.append(r2)
    (outdir / "report.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows, "jobs": slim},
                                                   indent=1, default=float))
    (outdir / "report.md").write_text(render_markdown(rows, summary, meta))
    (outdir / "readme_table.md").write_text(render_compact(rows))
    if plots:
        from controller.sim.plot import plot_scenario

        for path, sc in scenarios.items():
            plot_scenario(sc, per.get(path, []), outdir / "plots" / f"{sc.name}.png")
    return rows, summary
