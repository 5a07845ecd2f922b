"""`pd-controller plan` against NVIDIA aiconfigurator's disaggregated sizing, case by case.

Needs the aiconfigurator extra (aiconfigurator==0.12.0; run it in the venv that has it):

    HF_HUB_OFFLINE=1 /work/venvs/nvidia/bin/python bench/bench_plan_vs_aiconfigurator.py [--markdown]

For each case (model x GPU x TP x workload x objectives x rate):
- ours: `pd-controller plan --json` with the shipped profile that
  `profile import-aiconfigurator` built from the same database (mean TTFT, M/M/1
  prefill queueing, decode B* under the TPOT objective at the mean context);
- aiconfigurator: its own disaggregated estimate (`cli_estimate(mode="disagg")`)
  at the same TP for one prefill worker and one decode worker, the decode batch
  swept to the largest whose TPOT meets the objective; its per-worker request
  rates `(p)seq/s/worker` and `(d)seq/s/worker` then give P = ceil(rate / p) and
  D = ceil(rate / d) - the rate matching aiconfigurator's `recommend` does, with
  the TP pinned (its own `recommend` also picks the TP; that choice is printed
  as a note for the first case).

Prints per-instance capacities and P/D counts side by side; the docs table in
docs/profiles.md is this script's --markdown output.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Case:
    profile: str
    model: str
    system: str
    tp: int
    isl: int
    osl: int
    ttft_s: float
    tpot_ms: float
    rate_rps: float
    moe_ep: int | None = None
    mtp: tuple[int, float] | None = None


CASES = [
    Case("llama31-70b-h100-tp8", "meta-llama/Meta-Llama-3.1-70B", "h100_sxm", 8, 2048, 256, 1.5, 40, 35),
    Case("llama31-70b-h100-tp4", "meta-llama/Meta-Llama-3.1-70B", "h100_sxm", 4, 2048, 256, 1.5, 40, 20),
    Case("llama31-70b-h200-tp8", "meta-llama/Meta-Llama-3.1-70B", "h200_sxm", 8, 4096, 512, 2.0, 30, 20),
    Case("llama31-70b-h200-tp4", "meta-llama/Meta-Llama-3.1-70B", "h200_sxm", 4, 1024, 256, 1.0, 50, 30),
    Case("llama31-70b-b200-tp4", "meta-llama/Meta-Llama-3.1-70B", "b200_sxm", 4, 2048, 512, 1.5, 30, 40),
    Case("qwen3-32b-h100-tp2", "Qwen/Qwen3-32B", "h100_sxm", 2, 2048, 256, 1.0, 30, 20),
    Case("deepseek-v3-h200-tp8", "deepseek-ai/DeepSeek-V3", "h200_sxm", 8, 6144, 512, 2.0, 50, 5, moe_ep=8),
    Case("deepseek-v3-h200-tp8-mtp", "deepseek-ai/DeepSeek-V3", "h200_sxm", 8, 6144, 512, 2.0, 50, 5, moe_ep=8,
         mtp=(1, 0.85)),
]
DECODE_BATCHES = (8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)


def ours(c: Case) -> dict:
    from controller.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["plan", "--profile", c.profile, "--rate-rps", str(c.rate_rps), "--input-len", str(c.isl),
                     "--output-len", str(c.osl), "--ttft-s", str(c.ttft_s), "--tpot-ms", str(c.tpot_ms), "--json"])
    if code != 0:
        raise SystemExit(f"plan failed for {c.profile}")
    return json.loads(buf.getvalue())


def aic(c: Case) -> dict:
    from aiconfigurator.cli.api import cli_estimate

    kw: dict = {"tp_size": c.tp, "backend_name": "sglang"}
    if c.moe_ep:
        kw["moe_ep_size"] = c.moe_ep
    if c.mtp:
        kw["nextn"], kw["nextn_accepted"] = c.mtp
    best = None
    p_rate = None
    for b in DECODE_BATCHES:
        try:
            r = cli_estimate(c.model, c.system, mode="disagg", isl=c.isl, osl=c.osl, prefill_batch_size=1,
                             prefill_num_workers=1, decode_batch_size=b, decode_num_workers=1, **kw)
        except Exception:  # a batch past the KV cache: stop the sweep
            break
        p_rate = float(r.raw["(p)seq/s/worker"])
        if r.tpot <= c.tpot_ms:
            best = (b, float(r.tpot), float(r.raw["(d)seq/s/worker"]), float(r.ttft))
        else:
            break
    if best is None or p_rate is None:
        return {"error": "no decode batch meets the TPOT objective"}
    b, tpot, d_rate, ttft = best
    return {"p_rate": p_rate, "d_rate": d_rate, "batch": b, "tpot_ms": tpot, "ttft_ms": ttft,
            "n_prefill": math.ceil(c.rate_rps / p_rate - 1e-9), "n_decode": math.ceil(c.rate_rps / d_rate - 1e-9)}


def aic_recommend_note(c: Case) -> str:
    """aiconfigurator's own recommend (it also chooses the TP): for context on the first case."""
    from aiconfigurator.cli.api import cli_recommend

    r = cli_recommend(c.model, c.system, target_request_rate=c.rate_rps, backend="sglang", database_mode="SILICON",
                      isl=c.isl, osl=c.osl, ttft=c.ttft_s * 1000, tpot=c.tpot_ms)
    df = r.best_configs.get("disagg")
    if df is None or df.empty:
        return "aiconfigurator recommend: no disaggregated configuration"
    row = df.iloc[0]
    reps = int(row["replicas_needed"])
    return (f"aiconfigurator `recommend` (free TP) for {c.profile.split('-tp')[0]} at {c.rate_rps:g} req/s: "
            f"{reps} x ({int(row['(p)workers'])}P TP{int(row['(p)tp'])} + {int(row['(d)workers'])}D TP{int(row['(d)tp'])}) = "
            f"{int(row['total_gpus_needed'])} GPUs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print the docs table")
    ap.add_argument("--no-recommend", action="store_true", help="skip aiconfigurator's free-TP recommend note")
    args = ap.parse_args()
    try:
        import aiconfigurator  # noqa: F401
    except ModuleNotFoundError:
        print("needs the aiconfigurator extra: pip install 'pd-controller[aiconfigurator]' (own venv)", file=sys.stderr)
        return 2
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    rows = []
    for c in CASES:
        with contextlib.redirect_stdout(io.StringIO()):
            a = aic(c)
        o = ours(c)
        rows.append((c, o, a))
    hdr = ("| case | ISL/OSL | TTFT s / TPOT ms | rate req/s | ours P req/s/inst | ours D req/s/inst (B*) | ours P,D (GPUs) "
           "| aic P req/s/worker | aic D req/s/worker (batch) | aic P,D (GPUs) | dP, dD |")
    print(hdr)
    print("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
    within = 0
    for c, o, a in rows:
        g = c.tp
        if "error" in a:
            print(f"| {c.profile} | {c.isl}/{c.osl} | {c.ttft_s:g} / {c.tpot_ms:g} | {c.rate_rps:g} | "
                  f"{o['prefill_rate_max_rps']:.2f} | {o['decode_rate_max_rps']:.2f} ({o['decode_batch']}) | "
                  f"{o['n_prefill']}P{o['n_decode']}D ({o['gpus']}) | {a['error']} | | | |")
            continue
        dp, dd = o["n_prefill"] - a["n_prefill"], o["n_decode"] - a["n_decode"]
        within += abs(dp) <= 1 and abs(dd) <= 1
        print(f"| {c.profile} | {c.isl}/{c.osl} | {c.ttft_s:g} / {c.tpot_ms:g} | {c.rate_rps:g} | "
              f"{o['prefill_rate_max_rps']:.2f} | {o['decode_rate_max_rps']:.2f} ({o['decode_batch']}) | "
              f"{o['n_prefill']}P{o['n_decode']}D ({o['gpus']}) | {a['p_rate']:.2f} | {a['d_rate']:.2f} ({a['batch']}) | "
              f"{a['n_prefill']}P{a['n_decode']}D ({(a['n_prefill'] + a['n_decode']) * g}) | {dp:+d}, {dd:+d} |")
    print(f"\n{within}/{len(rows)} cases within one instance of aiconfigurator at the same TP "
          f"({time.perf_counter() - t0:.0f} s)")
    if not args.no_recommend:
        with contextlib.redirect_stdout(io.StringIO()):
            note = aic_recommend_note(CASES[0])
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
