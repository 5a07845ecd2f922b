"""`pd-controller plan`: size prefill and decode pools for a steady load (the source method, and beyond)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from controller.config import load_config
from controller.planning import check_path, execute, request_from

FLAGS = (
    # (flag, type, help)
    ("--throughput-tpm", float, "load as total (input+output) tokens per minute"),
    ("--rate-rps", float, "load as requests per second"),
    ("--input-len", float, "mean input tokens per request"),
    ("--output-len", float, "mean output tokens per request"),
    ("--input-len-cv", float, "coefficient of variation of input length (feeds M/G/1)"),
    ("--cache-hit-rate", float, "share of input tokens served from the prefix cache, [0, 1)"),
    ("--ttft-s", float, "TTFT objective, seconds"),
    ("--ttft-quantile", float, "objective statistic, e.g. 0.9 for P90 (default: the mean, as the source)"),
    ("--tpot-ms", float, "TPOT objective, milliseconds"),
    ("--overhead-s", float, "fixed per-request TTFT overhead: client + KV transfer (default: the profile's)"),
    ("--prefill-max-tps", float, "saturated prefill throughput TPmax of one instance, tokens/s"),
    ("--decode-tps", float, "decode tokens/s of one instance at the TPOT objective (overrides the curve)"),
    ("--profile", str, "profile YAML, or the name of one in configs/profiles/"),
    ("--dp-groups", int, "DP attention groups per prefill instance (each its own queue)"),
    ("--evaluate", str, "capacity of this deployment, e.g. 3P4D"),
    ("--gpus", int, "best split of this many GPUs"),
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="size the prefill and decode pools for a steady load",
        description="Static sizing: M/M/1 prefill under a TTFT objective (eq. 8-13), decode under TPOT, eq. 5-7.",
    )
    p.add_argument("--config", help="YAML config with slo/workload/hardware/plan sections; flags win")
    for flag, typ, hlp in FLAGS:
        p.add_argument(flag, type=typ, default=None, help=hlp)
    p.add_argument("--prefill-model", choices=["mm1", "md1", "mg1"], default=None, help="prefill queue model (default mm1)")
    p.add_argument("--rounding", choices=["ceil", "nearest"], default=None, help="instance rounding (default ceil)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _fmt(x: float | None, unit: str = "", digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}g}{unit}" if abs(x) < 1e4 else f"{x:,.0f}{unit}"


def render(r: dict[str, Any]) -> str:
    obj = r["ttft_objective"]
    rows = [
        ("load", f"{r['throughput_tpm'] / 1e6:.4g} M tokens/min = {r['rate_rps']:.4g} req/s"),
        ("prefill model", f"{r['prefill_model']} ({obj} TTFT), profile {r['profile']}"),
        ("prefill TPmax", _fmt(r["prefill_max_tps"], " tok/s")),
        ("prefill effective", f"{_fmt(r['prefill_tps_effective'], ' tok/s')} per instance ({r['prefill_rate_max_rps']:.4g} req/s)"),
        ("decode effective", f"{_fmt(r['decode_tps_effective'], ' tok/s')} per instance ({r['decode_rate_max_rps']:.4g} req/s)"
         + (f", batch {r['decode_batch']} at {r['decode_tpot_ms_at_batch']:.3g} ms" if r["decode_batch"] else "")),
        ("N prefill (exact)", f"{r['n_prefill_exact']:.3f}"),
        ("N decode (exact)", f"{r['n_decode_exact']:.3f}"),
        ("P:D ratio", f"{r['ratio_pd']:.3f}"),
        (f"deployment ({r['rounding']})", f"{r['n_prefill']}P{r['n_decode']}D = {r['gpus']} GPUs"),
    ]
    if "evaluate" not in r:
        rows.append(("capacity", f"{r['capacity_tpm'] / 1e6:.3f} M tokens/min ({r['binding']} binds)"))
    if r.get("predicted_ttft_s") is not None:
        rows.append((f"predicted {obj} TTFT", f"{r['predicted_ttft_s']:.3f} s at this load"))
    if r.get("predicted_tpot_ms") is not None:
        rows.append(("predicted TPOT", f"{r['predicted_tpot_ms']:.3f} ms at this load"))
    if "evaluate" in r:
        e = r["evaluate"]
        rows.append((f"evaluate {e['deployment']}", f"{e['capacity_tpm'] / 1e6:.3f} M tokens/min ({e['binding']} binds), {e['gpus']} GPUs"))
    if "split" in r:
        s = r["split"]
        rows.append((f"best split of {s['gpus']} GPUs", f"{s['deployment']} ({s['gpus_used']} used): "
                     f"{s['capacity_tpm'] / 1e6:.3f} M tokens/min ({s['binding']} binds)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg_path = check_path(args.config)
    cfg = load_config(cfg_path) if cfg_path is not None else None
    overrides = {
        flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_"))
        for flag, _, _ in FLAGS
    }
    overrides["prefill_model"] = args.prefill_model
    overrides["rounding"] = args.rounding
    result = execute(request_from(cfg, overrides))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
