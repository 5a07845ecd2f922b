"""`pd-controller bench`: every policy and reference on every scenario of the matrix, in parallel."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.core.errors import ModelInputError
from controller.sim.matrix import POLICY_NAMES, Bar, jobs_for, reusable, run_jobs, write_report
from controller.sim.scenarios import SCENARIOS_DIR, find_scenarios, load_scenario


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run the scenario matrix (every policy, swept baselines, static-best, oracle) and write a report",
        description="Runs every policy on every scenario of configs/scenarios in worker processes and writes "
        "report.md, report.json and one plot per scenario into --out. References: static-best (the cheapest "
        "static fleet reaching the attainment target, or the best split of a fixed budget, by simulation), the "
        "oracle (per window the smallest fleet meeting the target, by simulation), threshold and throughput "
        "swept over their utilisation knob.",
    )
    p.add_argument("--scenario", action="append", metavar="GLOB|FILE",
                   help="scenario name glob (e.g. 'azure-*') or file; repeat or comma-separate (default: all)")
    p.add_argument("--scenario-dir", default=str(SCENARIOS_DIR), help="where scenario files are (default configs/scenarios)")
    p.add_argument("--policy", default=",".join(POLICY_NAMES),
                   help=f"comma-separated subset of {','.join(POLICY_NAMES)} (default all)")
    p.add_argument("--jobs", "-j", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    p.add_argument("--no-plots", action="store_true", help="skip the per-scenario plots")
    p.add_argument("--list", action="store_true", help="list the selected scenarios and exit")
    p.add_argument("--reuse", metavar="REPORT.json",
                   help="take the results of the policies not selected by --policy from a previous report, for "
                   "scenarios whose file content is unchanged (e.g. --policy slo --reuse docs/matrix/report.json "
                   "reruns only the controller and keeps the references and baselines)")


def _split(values: list[str] | None) -> list[str]:
    return [x.strip() for v in values or [] for x in v.split(",") if x.strip()]


def _source_state() -> tuple[str | None, bool | None]:
    """The commit the report describes, and whether controller/ had uncommitted changes then
    (the figures describe the working tree, which may be ahead of the commit)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "controller"], cwd=root, timeout=10)
        return rev, diff.returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None, None


def run(args: argparse.Namespace) -> int:
    pols = _split([args.policy])
    bad = [x for x in pols if x not in POLICY_NAMES]
    if bad or not pols:
        raise ModelInputError("policy", args.policy, f"expected a comma-separated subset of {','.join(POLICY_NAMES)}")
    workers = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
    if workers < 1 or workers > 256:
        raise ModelInputError("jobs", workers, "must be between 1 and 256")
    sdir = Path(args.scenario_dir)
    if not sdir.is_dir():
        raise ModelInputError("scenario_dir", args.scenario_dir, "no such directory")
    paths = find_scenarios(_split(args.scenario) or None, sdir)
    if not paths:
        raise ModelInputError("scenario", args.scenario, f"no scenario files in {sdir}")
    # validate every file before starting any worker: a typo fails in a second, not after the run
    scenarios = {str(p): load_scenario(p) for p in paths}
    if args.list:
        for p, sc in scenarios.items():
            print(f"{sc.name:<40} {sc.mode.value:<8} {sc.profile:<22} {p}")
        return 0
    reused: list[dict[str, Any]] = []
    if args.reuse:
        try:
            prev = json.loads(Path(args.reuse).read_text())
        except (OSError, ValueError) as e:
            raise ModelInputError("reuse", args.reuse, f"cannot read a report: {e}") from None
        if not isinstance(prev, dict):
            raise ModelInputError("reuse", args.reuse, "not a bench report.json")
        reused = reusable(prev, scenarios, set(POLICY_NAMES) - set(pols))
        hit = {r["scenario"] for r in reused}
        missing = [sc.name for p, sc in scenarios.items() if p not in hit]
        if missing and set(POLICY_NAMES) - set(pols):
            # a changed scenario file or simulator code: those rows will lack the references
            print(f"reuse: no matching results in {args.reuse} for {len(missing)} scenario(s) "
                  f"(scenario or simulator code changed): {', '.join(missing[:5])}"
                  + (" ..." if len(missing) > 5 else ""), file=sys.stderr)
    jobs = jobs_for(paths, pols)
    bar = Bar(len(jobs))
    t0 = time.perf_counter()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = run_jobs(jobs, workers, on_done=lambda r: bar.step(f"{r.get('name', '')} {r['label']}"))
    bar.close()
    results += reused
    wall = time.perf_counter() - t0
    cpu = sum(float(r.get("cpu_s", 0.0)) for r in results if not r.get("reused"))
    rev, dirty = _source_state()
    meta = {"scenarios": len(scenarios), "jobs": len(jobs), "workers": workers, "wall_s": wall, "started": started,
            "cpu_s": cpu, "commit": rev, "core_uncommitted_changes": dirty,
            "reused_from": args.reuse, "reused_jobs": len(reused),
            "command": "pd-controller bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1
            else "pd-controller bench", "policies": pols}
    out = Path(args.out)
    rows, summary = write_report(out, scenarios, results, meta, plots=not args.no_plots)
    errs = sum(1 for r in results if r.get("error"))
    print(f"{len(scenarios)} scenarios, {len(jobs)} jobs, {wall:.0f} s on {workers} workers ({cpu:.0f} CPU-s); "
          f"report {out / 'report.md'}" + (f"; {errs} jobs failed (see the report)" if errs else ""))
    for r in rows:
        fails = [k for k, c in r["checks"].items() if c["pass"] is False]
        slo = r["slo"]
        att = f"{slo['slo_attainment'] * 100:.2f}%" if slo else "-"
        verdict = "no targets checked (slo not run)" if not r["checks"] else \
            "all targets pass" if not fails else "fails: " + ", ".join(fails)
        print(f"  {r['scenario']:<40} slo {att:>8}  {verdict}")
    med = summary["median_gpu_vs_static_best"]
    if med is not None:
        print(f"  median elastic slo GPU-hours / static-best: {med:.2f}x (target <= 0.80x)")
    return 0
