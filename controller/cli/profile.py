"""`pd-controller profile`: measure a deployment (see profile_measure), or import measured data."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from controller.core.errors import PdControllerError
from controller.profile_import import import_splitwise
from controller.profiles import write_profile


def _measure_module() -> ModuleType | None:
    try:
        return importlib.import_module("controller.cli.profile_measure")
    except ModuleNotFoundError as e:
        if e.name == "controller.cli.profile_measure":
            return None
        raise


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure TPmax and TPOT(batch) of a deployment, or import measured data into a profile",
        description="Without a subcommand: benchmark a running deployment (the source method's empirical step).",
    )
    measure = _measure_module()
    if measure is not None:
        measure.add_arguments(p)
    psub = p.add_subparsers(dest="profile_command", metavar="SUBCOMMAND")
    imp = psub.add_parser(
        "import-splitwise",
        help="build a profile from splitwise-sim's perf_model.csv (real measurements)",
    )
    imp.add_argument("--csv", type=Path, required=True, help="perf_model.csv from Mutinifni/splitwise-sim")
    imp.add_argument("--model", required=True, help="e.g. llama2-70b, bloom-176b")
    imp.add_argument("--hardware", required=True, help="e.g. h100-80gb, a100-80gb, h100-80gb-pcap")
    imp.add_argument("--tp", type=int, required=True, help="tensor parallelism (2, 4 or 8)")
    imp.add_argument("--kv-capacity-tokens", type=float, default=None, help="KV cache capacity per decode instance")
    imp.add_argument("--overhead-s", type=float, default=0.0, help="fixed per-request TTFT overhead to record")
    imp.add_argument("--kv-transfer-per-token-s", type=float, default=0.0, help="P->D KV transfer seconds per input token")
    imp.add_argument("--kv-bytes-per-token", type=float, default=None,
                     help="KV bytes of one token across the instance (model shape), for `profile check`")
    imp.add_argument("--out", type=Path, required=True)
    aic = psub.add_parser(
        "import-aiconfigurator",
        help="build a profile from NVIDIA aiconfigurator's per-op database (needs the aiconfigurator extra)",
        description="Queries aiconfigurator (prefill at batch 1 per input length, decode step time per batch and "
        "context, KV capacity from its memory model) and writes a profile. Only this import needs the package.",
    )
    aic.add_argument("--model", required=True, help="Hugging Face id aiconfigurator knows, e.g. meta-llama/Meta-Llama-3.1-70B")
    aic.add_argument("--system", required=True, help="aiconfigurator system: h100_sxm, h200_sxm, b200_sxm, ...")
    aic.add_argument("--backend", default="sglang", choices=["sglang", "vllm", "trtllm"])
    aic.add_argument("--backend-version", default=None, help="database version (default: the newest for this system)")
    aic.add_argument("--tp", type=int, required=True, help="tensor parallelism of one instance")
    aic.add_argument("--moe-ep", type=int, default=None, help="MoE expert parallelism (MoE models)")
    aic.add_argument("--moe-tp", type=int, default=None, help="MoE tensor parallelism (MoE models)")
    aic.add_argument("--mtp", type=int, default=0, metavar="N", help="MTP draft tokens per step (0: off)")
    aic.add_argument("--mtp-accepted", type=float, default=None, help="accepted draft tokens per step, on average")
    aic.add_argument("--memory-fraction", type=float, default=0.9, help="GPU memory fraction of the server (SGLang mem-fraction-static)")
    aic.add_argument("--prefill-correction", type=float, default=1.1,
                     help="multiply prefill times (aiconfigurator's default disagg correction 1.1; 1 = raw)")
    aic.add_argument("--decode-correction", type=float, default=1.08,
                     help="multiply decode step times (aiconfigurator's default disagg correction 1.08; 1 = raw)")
    aic.add_argument("--name", default=None, help="profile name (default: derived from model/system/tp)")
    aic.add_argument("--out", type=Path, required=True)
    chk = psub.add_parser(
        "check",
        help="sanity-check profile files: monotone curves, context dependence, plausible KV capacity",
    )
    chk.add_argument("files", nargs="+", metavar="FILE", help="profile YAML path(s) or shipped names")


def run(args: argparse.Namespace) -> int:
    if args.profile_command == "import-splitwise":
        raw = import_splitwise(
            args.csv,
            args.model,
            args.hardware,
            args.tp,
            kv_capacity_tokens=args.kv_capacity_tokens,
            overhead_s=args.overhead_s,
            kv_transfer_per_token_s=args.kv_transfer_per_token_s,
            kv_bytes_per_token=args.kv_bytes_per_token,
        )
        header = f"# generated by: pd-controller profile import-splitwise --model {args.model} --hardware {args.hardware} --tp {args.tp}"
        write_profile(raw, args.out, header)
        print(f"wrote {args.out} ({raw['name']}: {len(raw['prefill']['input_len'])} prefill points, "
              f"{len(raw['decode']['batch'])}x{len(raw['decode']['context'])} decode grid)")
        return 0
    if args.profile_command == "import-aiconfigurator":
        return _import_aic(args)
    if args.profile_command == "check":
        return _check(args.files)
    measure = _measure_module()
    if measure is None:
        raise PdControllerError("profile: measuring a live deployment is not available in this build")
    return int(measure.run(args))


def _import_aic(args: argparse.Namespace) -> int:
    from controller.aiconfigurator_import import AicRequest, import_aiconfigurator

    req = AicRequest(
        model=args.model, system=args.system, tp=args.tp, backend=args.backend, backend_version=args.backend_version,
        moe_ep=args.moe_ep, moe_tp=args.moe_tp, nextn=args.mtp, nextn_accepted=args.mtp_accepted,
        memory_fraction=args.memory_fraction, name=args.name,
        prefill_correction=args.prefill_correction, decode_correction=args.decode_correction,
    )
    raw = import_aiconfigurator(req)
    flags = f"--model {args.model} --system {args.system} --backend {args.backend} --tp {args.tp}"
    for flag, v in (("--backend-version", args.backend_version), ("--moe-ep", args.moe_ep), ("--moe-tp", args.moe_tp),
                    ("--mtp", args.mtp or None), ("--mtp-accepted", args.mtp_accepted)):
        if v is not None:
            flags += f" {flag} {v}"
    if args.memory_fraction != 0.9:
        flags += f" --memory-fraction {args.memory_fraction}"
    if args.prefill_correction != 1.1:
        flags += f" --prefill-correction {args.prefill_correction}"
    if args.decode_correction != 1.08:
        flags += f" --decode-correction {args.decode_correction}"
    write_profile(raw, args.out, f"# generated by: pd-controller profile import-aiconfigurator {flags}")
    dec = raw["decode"]
    print(f"wrote {args.out} ({raw['name']}: {len(raw['prefill']['input_len'])} prefill points, "
          f"{len(dec['batch'])}x{len(dec['context'])} decode grid, KV {dec['kv_capacity_tokens']:,.0f} tokens)")
    return 0


def _check(files: list[str]) -> int:
    """One line per problem, `FILE: field: what`; exit 1 if any file has one."""
    from controller.core.profile import sanity_problems
    from controller.profiles import load_profile, resolve_profile_path

    bad = 0
    for ref in files:
        try:
            path = resolve_profile_path(ref)
            problems = sanity_problems(load_profile(path))
        except PdControllerError as e:
            print(f"{ref}: {e}")
            bad += 1
            continue
        errors = [p for p in problems if not p.startswith("note: ")]
        for p in problems:
            print(f"{path}: {p}")
        if errors:
            bad += 1
        else:
            print(f"{path}: ok")
    return 1 if bad else 0
