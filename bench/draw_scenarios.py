"""Draw random scenarios the defaults were not chosen on, for `pd-controller bench --scenario-dir`.

The matrix in configs/scenarios is what the defaults were set on and checked against; a
controller judged only there is judged on its training set. This draws fresh ones from
the same space (every shipped trace and generator, every shipped profile, rate scale,
TTFT objective and quantile, TPOT, cold start and flip time, both modes), seeded, so a
draw can be repeated and a new seed gives scenarios nobody has looked at:

    python bench/draw_scenarios.py --seed 74 --count 16 --out /tmp/draw74
    pd-controller bench --scenario-dir /tmp/draw74 --policy slo,static,static-peak,static-best --out /tmp/draw74-out

A draw whose objective no instance of its profile can meet at any load (an idle prefill
instance already misses the TTFT quantile) is redrawn: it would measure nothing. TPOT is
drawn within 30-60 ms and at least 1.4x the profile's fastest token. Fixed budgets are
sized at 1.25x the GPUs of the source method's static plan for the draw's busiest minute
(the plan for its whole-trace means left budgets of one instance per pool where every policy fails),
and at least four instances, so that there is a split to move.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from controller.core.errors import InfeasibleError  # noqa: E402
from controller.profiles import PROFILES_DIR, known_profiles, load_profile  # noqa: E402
from controller.sim.policies import StaticPeakPolicy, make_policy  # noqa: E402
from controller.sim.scenarios import Scenario, build  # noqa: E402

AZURE = "data/traces/azure-llm-2023/AzureLLMInferenceTrace_{}.csv"
MOONCAKE = "data/traces/mooncake-fast25/{}_trace.jsonl"
KINDS = ("azure", "gamma", "ramp", "shift", "mooncake")


def _traffic(rng: random.Random, kind: str, duration_s: int) -> list[dict[str, Any]]:
    lengths = AZURE.format(rng.choice(["code", "conv"]))
    if kind == "azure":
        return [{"trace": lengths, "end_s": duration_s, "rate_scale": rng.choice([1, 2, 3, 4, 6])}]
    if kind == "gamma":
        return [{"generator": "gamma", "lengths_from": lengths, "duration_s": duration_s,
                 "rate_rps": round(rng.uniform(2.0, 12.0), 1), "cv": rng.choice([2, 3, 4, 6])}]
    if kind == "ramp":
        r0 = round(rng.uniform(1.0, 4.0), 1)
        return [{"generator": "ramp", "lengths_from": lengths, "duration_s": duration_s, "rate_rps": r0,
                 "peak_rps": round(r0 * rng.uniform(3.0, 8.0), 1), "cv": 1}]
    if kind == "shift":
        first, second = rng.choice([("code", "conv"), ("conv", "code")])
        scale = rng.choice([1, 2, 3])
        return [{"trace": AZURE.format(first), "end_s": duration_s // 2, "rate_scale": scale},
                {"trace": AZURE.format(second), "end_s": duration_s // 2, "rate_scale": scale}]
    return [{"trace": MOONCAKE.format(rng.choice(["conversation", "synthetic"])), "end_s": duration_s,
             "max_input_tokens": 16384, "rate_scale": rng.choice([1, 2, 3])}]


def _draw(rng: random.Random, seed: int, i: int, profiles: list[str]) -> dict[str, Any]:
    prof_name = rng.choice(profiles)
    prof = load_profile(prof_name)
    fastest = prof.decode_curve.fastest_tpot_ms if prof.decode_curve is not None else 20.0
    lo = max(30.0, 1.4 * fastest)
    tpot = float(round(rng.uniform(lo, 60.0))) if lo < 60.0 else 60.0
    kind = rng.choice(KINDS)
    duration_s = rng.choice([1800, 2400, 3000])
    mode = rng.choice(["elastic", "elastic", "fixed"])
    return {
        "name": f"draw{seed}-{i:02d}-{kind}-{prof_name}",
        "description": f"drawn by bench/draw_scenarios.py --seed {seed} (held out)",
        "traffic": _traffic(rng, kind, duration_s),
        "seed": rng.randrange(1000),
        "profile": prof_name,
        "objectives": {"ttft_s": rng.choice([1.0, 2.0, 3.0, 5.0]), "ttft_quantile": rng.choice([0.9, 0.99, 0.99]),
                       "tpot_ms": tpot},
        "mode": mode,
        "flip_time_s": rng.choice([2, 30, 60]),
        "cold_start_s": rng.choice([60, 300, 600]),
        "tags": ["held-out"] + (["mix-shift"] if kind == "shift" else []),
    }


def _with_budget(d: dict[str, Any]) -> dict[str, Any] | None:
    """A fixed budget of 1.25x the source method's plan for the busiest minute (None if infeasible)."""
    elastic = Scenario.model_validate({**d, "mode": "elastic"})
    ctx, _ = build(elastic, REPO)
    try:
        make_policy("slo", ctx).initial()
    except InfeasibleError:
        return None
    if d["mode"] != "fixed":
        return d
    try:
        p, dd = StaticPeakPolicy(ctx).initial()
    except InfeasibleError:  # the source method's M/M/1 can be where M/G/1 is not: no plan to size from
        return None
    prof = ctx.profile
    per = max(prof.prefill_gpus_per_instance, prof.decode_gpus_per_instance)
    return {**d, "gpus": max(4, round(1.25 * (p + dd))) * per}  # at least 4 instances: a split to move


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    profiles = sorted(known_profiles([PROFILES_DIR]))
    a.out.mkdir(parents=True, exist_ok=True)
    made = redrawn = 0
    while made < a.count:
        d = _with_budget(_draw(rng, a.seed, made, profiles))
        if d is None:
            redrawn += 1
            if redrawn > 10 * a.count:
                print("too many infeasible draws", file=sys.stderr)
                return 1
            continue
        Scenario.model_validate(d)  # the file must load as written
        path = a.out / f"{d['name']}.yaml"
        path.write_text("# " + d["description"] + "\n" + yaml.safe_dump(d, sort_keys=False))
        print(path)
        made += 1
    print(f"{made} scenarios in {a.out} ({redrawn} infeasible draws redrawn)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
