"""The demo's schedule in the simulator and live, side by side (issue 10 item 4).

    python bench/sim_vs_live.py [--live-json FILE] [--duration-s 130] [--time-scale 2]

Simulated: bench/demo_sim.py (same schedule, scaled profile, objectives, control parameters, four
instances, the same starting split). Live: `pd-controller demo --json` through the real router with
emulated workers (run here unless --live-json gives the JSON of a run already made). Prints, per phase,
attainment and TTFT/TPOT p50 of both, and the flips of each with their times. Target: attainment
within 5 points per phase and the same flip directions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_sim

from controller.sim.policies import make_policy
from controller.sim.runner import simulate
from harness import demo as D


class _FlipLog:
    """Wraps a policy to record its flips (time, direction) as the simulator applies them."""

    def __init__(self, pol: Any) -> None:
        self.pol = pol
        self.flips: list[tuple[float, str]] = []
        self._decide = pol.decide
        pol.decide = self.decide

    def decide(self, now: float, obs: Any) -> Any:
        acts = self._decide(now, obs)
        for a in acts:
            if a.kind.value.startswith("flip_to_"):
                self.flips += [(now, a.kind.value.removeprefix("flip_to_"))] * a.count
        return acts


def _q(x: np.ndarray, k: float) -> float | None:
    return round(float(np.nanquantile(x, k)), 4) if np.isfinite(x).any() else None


def sim_side(duration_s: float, time_scale: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx, sim = demo_sim.context(duration_s, time_scale, Path(tmp))
        pol = make_policy("slo", ctx)
        start = demo_sim.D.initial_split(demo_sim.D.INITIAL)
        pol.initial = lambda: start  # type: ignore[method-assign]
        log = _FlipLog(pol)
        r = simulate(pol, ctx, sim)
        half = duration_s / 2
        phases = {}
        for name, lo, hi in (("code", 0.0, half), ("conv", half, 2 * half)):
            m = (r.arrival_s >= lo) & (r.arrival_s < hi)
            tt, tp = r.ttft_each_s[m], r.tpot_each_ms[m] / 1000.0
            tp = tp[np.isfinite(tp) & (tp > 0)]
            # a request that never finished is the simulator's failure (the live side's: an error reply)
            phases[name] = {"requests": int(m.sum()), "failed": int(np.sum(~np.isfinite(r.ttft_each_s[m]))),
                            "slo_attainment": round(float(r.met[m].mean()), 4) if m.any() else None,
                            "ttft_p50_s": _q(tt, 0.5), "ttft_p90_s": _q(tt, 0.9),
                            "tpot_p50_s": _q(tp, 0.5), "tpot_p90_s": _q(tp, 0.9)}
        return {"phases": phases, "flips": [{"t_s": t, "to": d} for t, d in log.flips]}


def live_side(duration_s: float, time_scale: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "controller", "demo", "--json", "--duration-s", str(duration_s),
                          "--time-scale", str(time_scale), "--plot", str(Path(tempfile.gettempdir()) / "svl.png")],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--live-json", type=Path, help="a `pd-controller demo --json` output to compare with")
    ap.add_argument("--duration-s", type=float, default=D.DURATION_S)
    ap.add_argument("--time-scale", type=float, default=2.0)
    a = ap.parse_args()
    live = json.loads(a.live_json.read_text()) if a.live_json else live_side(a.duration_s, a.time_scale)
    sim = sim_side(float(live.get("duration_s", a.duration_s)), float(live.get("time_scale", a.time_scale)))
    print(f"{'phase':<6} {'sim attainment':>15} {'live attainment':>16} {'diff (points)':>14}")
    worst = 0.0
    for name in ("code", "conv"):
        s_att = sim["phases"][name]["slo_attainment"]
        l_att = live["phases"][name]["slo_attainment"]
        d = 100 * (l_att - s_att) if s_att is not None and l_att is not None else float("nan")
        worst = max(worst, abs(d))
        print(f"{name:<6} {100 * s_att:>14.1f}% {100 * l_att:>15.1f}% {d:>+14.1f}")
    print(f"{'phase':<6} {'':>6} {'requests':>9} {'failed':>7}")
    for name in ("code", "conv"):
        for side, src in (("sim", sim), ("live", live)):
            ph = src["phases"][name]
            print(f"{name:<6} {side:>6} {ph.get('requests', '-'):>9} {ph.get('failed', '-'):>7}")
    print(f"{'phase':<6} {'':>6} {'TTFT p50 s':>11} {'TTFT p90 s':>11} {'TPOT p50 ms':>12} {'TPOT p90 ms':>12}")
    for name in ("code", "conv"):
        for side, src in (("sim", sim), ("live", live)):
            ph = src["phases"][name]
            cells = [ph.get(k) for k in ("ttft_p50_s", "ttft_p90_s")] + [
                None if ph.get(k) is None else 1000 * ph[k] for k in ("tpot_p50_s", "tpot_p90_s")]
            print(f"{name:<6} {side:>6} " + " ".join("{:>11}".format("-" if c is None else f"{c:.3g}") for c in cells))
    print("sim flips : " + ", ".join(f"t={f['t_s']:.0f}s ->{f['to']}" for f in sim["flips"]))
    print("live flips: " + ", ".join(f"t={f['t_s']:.0f}s ->{f['to']}" for f in live["flip_log"] if f["ok"]))
    same = [f["to"] for f in sim["flips"]] == [f["to"] for f in live["flip_log"] if f["ok"]]
    print(f"largest per-phase difference {worst:.1f} points (target <= 5); same flip directions: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
