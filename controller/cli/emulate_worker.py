"""`pd-controller emulate-worker`: an emulated SGLang worker timed from a profile (see docs/emulator.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
from typing import Any

from controller.core.errors import PdControllerError
from controller.profiles import load_profile


def _port(flag: str) -> Any:
    def check(s: str) -> int:
        if not s.isdigit() or not 0 <= int(s) <= 65535:
            raise argparse.ArgumentTypeError(f"{flag}={s[:40]!r}: expected a port number 0..65535")
        return int(s)

    return check


def _number(flag: str, *, minimum: float, strict: bool = False, integer: bool = False) -> Any:
    """A finite number >= minimum (> when strict); integers for counts."""
    def check(s: str) -> float | int:
        try:
            x: float | int = int(s) if integer else float(s)
        except ValueError:
            x = math.nan
        if not math.isfinite(x) or x < minimum or (strict and x == minimum):
            rel = ">" if strict else ">="
            kind = "an integer" if integer else "a finite number"
            raise argparse.ArgumentTypeError(f"{flag}={s[:40]!r}: expected {kind} {rel} {minimum:g}")
        return x

    return check


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "emulate-worker",
        help="run an emulated SGLang worker (prefill or decode) that the real sglang-router accepts",
        description="An aiohttp server speaking SGLang's HTTP API, with prefill/decode timing from a profile. "
        "No GPU, no model download.",
    )
    p.add_argument("--role", choices=("prefill", "decode"), required=True)
    p.add_argument("--profile", required=True, help="profile YAML path or shipped name (configs/profiles)")
    p.add_argument("--port", type=_port("--port"), required=True, help="HTTP port (0 = any free port; printed on start)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--bootstrap-port", type=_port("--bootstrap-port"), default=None,
                   help="PD bootstrap port (KV handshake); give it to prefill workers, and to any worker that may flip")
    p.add_argument("--model-path", default=None,
                   help="model directory reported to the router (default: the shipped stand-in tokenizer)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--enable-pd-role-switch", action="store_true", help="accept POST /pd_role_switch")
    p.add_argument("--role-switch-s", type=_number("--role-switch-s", minimum=0), default=0.0,
                   help="emulated time a role switch takes (profile seconds, scaled by --time-scale)")
    p.add_argument("--time-scale", type=_number("--time-scale", minimum=0, strict=True), default=1.0,
                   help="multiply every emulated duration (0.1 = ten times faster than the profiled GPU)")
    p.add_argument("--chunked-prefill-size", dest="chunk_tokens", default=None,
                   type=_number("--chunked-prefill-size", minimum=1, integer=True),
                   help="pack queued prefills into batches of up to this many tokens (default: one request at a time)")
    p.add_argument("--max-running-requests", type=_number("--max-running-requests", minimum=1, integer=True),
                   default=None,
                   help="decode batch limit (default: the largest batch in the profile)")
    p.add_argument("--kv-capacity-tokens", type=_number("--kv-capacity-tokens", minimum=0, strict=True),
                   default=None,
                   help="decode KV capacity (default: the profile's decode.kv_capacity_tokens, else unlimited)")
    p.add_argument("--natural-output-len", type=_number("--natural-output-len", minimum=1, integer=True),
                   default=256,
                   help="mean length at which the emulated model emits EOS when a request does not set ignore_eos")
    p.add_argument("--context-length", type=_number("--context-length", minimum=2, integer=True), default=131072)
    p.add_argument("--collect-tokens-histogram", action="store_true",
                   help="export SGLang's per-request token histograms (prompt, uncached prompt, generation)")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="exit when the process that started this one exits (the fleet harness sets it)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def options_from_args(args: argparse.Namespace) -> Any:
    from controller.emulator.server import TOKENIZER_DIR, WorkerOptions

    try:
        return WorkerOptions(
            role=args.role,
            host=args.host,
            port=args.port,
            bootstrap_port=args.bootstrap_port,
            model_path=args.model_path or str(TOKENIZER_DIR),
            served_model_name=args.served_model_name,
            time_scale=args.time_scale,
            enable_pd_role_switch=args.enable_pd_role_switch,
            role_switch_s=args.role_switch_s,
            chunk_tokens=args.chunk_tokens,
            max_running_requests=args.max_running_requests,
            kv_capacity_tokens=args.kv_capacity_tokens,
            natural_output_len=args.natural_output_len,
            context_length=args.context_length,
            collect_tokens_histogram=args.collect_tokens_histogram,
        )
    except ValueError as e:
        raise PdControllerError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from controller.emulator.server import EmulatedWorker, serve_forever

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the router probes workers with HTTP/2 prefaces (gRPC detection); aiohttp logs each as an error
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    profile = load_profile(args.profile)
    worker = EmulatedWorker(profile, options_from_args(args))

    def ready(w: EmulatedWorker) -> None:
        # one JSON line on stdout: harnesses read the bound ports from it
        print(json.dumps({"ready": True, "url": w.url, "port": w.port, "bootstrap_port": w.bootstrap_port,
                          "role": w.role, "profile": profile.name}), flush=True)

    try:
        asyncio.run(serve_forever(worker, ready, exit_with_parent=args.exit_with_parent))
    except (OSError, OverflowError) as e:
        print(f"pd-controller emulate-worker: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0
