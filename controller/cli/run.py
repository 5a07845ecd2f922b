"""`pd-controller run`: the live sidecar (telemetry, tick loop, API, actuation).

It acts through the actuator built once from `actuation` in the config
(dry-run by default); `--advisory` decides and reports without acting.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from controller.config import Config, ConfigError, config_from_dict, load_config
from controller.core.errors import PdControllerError
from controller.logging import configure_logging
from controller.planning import check_path

EXAMPLE = """\
example (beside a running router, configs/examples/run-beside-router.yaml explains each part):
  pd-router-tap --listen 127.0.0.1:8080 --router http://127.0.0.1:30000 --publish tcp://127.0.0.1:5557 &
  pd-controller run --config configs/examples/run-beside-router.yaml --profile llama31-70b-h100-tp8 \\
      --router http://127.0.0.1:30000 --router-metrics http://127.0.0.1:29000/metrics \\
      --telemetry tcp://127.0.0.1:5557 --listen 127.0.0.1:9109 --advisory
  curl -s 127.0.0.1:9109/v1/state
"""


def _listen(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--listen={s!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def _url(flag: str) -> Any:
    def check(s: str) -> str:
        try:
            u = urlsplit(s)
            port = u.port  # raises ValueError when it is not a number in 0..65535
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}={s[:200]!r}: expected http://HOST:PORT") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise argparse.ArgumentTypeError(f"{flag}={s[:200]!r}: expected http://HOST:PORT")
        del port
        return s

    return check


def _endpoint(s: str) -> str:
    """A tap's PUB endpoint: tcp://HOST:PORT (PORT 1..65535) or ipc://PATH."""
    if s.startswith("ipc://") and len(s) > len("ipc://"):
        return s
    if s.startswith("tcp://"):
        host, sep, port = s[len("tcp://"):].rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) <= 65535:
            return s
    raise argparse.ArgumentTypeError(f"--telemetry={s[:200]!r}: expected tcp://HOST:PORT or ipc://PATH")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the live controller sidecar (telemetry, tick loop, API)",
        description="Watch the fleet (tap events over ZeroMQ, router/worker Prometheus metrics), re-solve every "
        "tick, report decisions on /v1/state, /metrics and one log line per tick.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (slo, hardware, control, telemetry, api sections)")
    p.add_argument("--profile", help="profile YAML, or the name of one in configs/profiles/ (overrides "
                   "hardware.profile; like `plan --profile`)")
    p.add_argument("--ttft-s", type=float, help="TTFT objective in seconds (overrides slo.ttft_s)")
    p.add_argument("--tpot-ms", type=float, help="TPOT objective in milliseconds (overrides slo.tpot_ms; "
                   "it must be reachable on the profile: a 70B model on A100 decodes no faster than ~45 ms)")
    p.add_argument("--router", type=_url("--router"),
                   help="router base URL (GET /workers, /engine_metrics); overrides telemetry.router_url")
    p.add_argument("--router-metrics", type=_url("--router-metrics"),
                   help="router's own /metrics URL (its --prometheus-port)")
    p.add_argument("--telemetry", nargs="+", action="extend", type=_endpoint, metavar="tcp://HOST:PORT",
                   help="taps' PUB endpoints; repeat the flag or list several (they accumulate); "
                   "overrides telemetry.zmq_endpoints")
    p.add_argument("--listen", type=_listen, help="API HOST:PORT (default 127.0.0.1:9109, or api.host/api.port)")
    p.add_argument("--advisory", action="store_true", help="decide and report, never act (POST /v1/resume with the token switches to acting)")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto", help="auto: console on a TTY")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


def effective_config(args: argparse.Namespace) -> Config:
    path = check_path(args.config)
    cfg = load_config(path) if path is not None else Config()
    tel: dict[str, Any] = {}
    if args.router:
        tel["router_url"] = args.router
    if args.router_metrics:
        tel["router_metrics_url"] = args.router_metrics
    if args.telemetry:
        tel["zmq_endpoints"] = list(dict.fromkeys(args.telemetry))  # every flag, in order, once each
    profile = getattr(args, "profile", None)
    slo = {k: v for k, v in (("ttft_s", getattr(args, "ttft_s", None)), ("tpot_ms", getattr(args, "tpot_ms", None)))
           if v is not None}
    if not tel and profile is None and not slo:
        return cfg
    raw = cfg.model_dump(mode="json", exclude_none=True)
    if tel:
        raw["telemetry"] = {**raw.get("telemetry", {}), **tel}
    if slo:
        raw["slo"] = {**raw.get("slo", {}), **slo}
    if profile is not None:
        from controller.profiles import load_profile, resolve_profile_path

        path_ = resolve_profile_path(profile)
        load_profile(path_)  # a bad profile fails here, in one line, not at the first tick
        raw["hardware"] = {**raw.get("hardware", {}), "profile": str(path_)}
    # validate the merged result: a bad flag fails like a bad config value, naming the field
    return config_from_dict(raw, origin="flags")


def process_registry() -> CollectorRegistry:
    """A registry of our own (injected, STYLE 13) with the process, platform and GC collectors of the default one."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def run(args: argparse.Namespace) -> int:
    from controller.runtime.sidecar import Sidecar

    cfg = effective_config(args)
    if not cfg.telemetry.zmq_endpoints and not cfg.telemetry.router_url:
        raise ConfigError("telemetry: no source: give --telemetry tcp://HOST:PORT and/or --router URL")
    from controller.planning import objectives_and_hardware

    objectives_and_hardware(cfg)  # a bad profile or objective fails here, in one line, before anything starts
    configure_logging(json={"auto": None, "json": True, "console": False}[args.log_format], level=args.log_level)
    import structlog

    log = structlog.get_logger("pd-controller")
    from controller.actuators import build_actuator

    act = cfg.actuation
    if act.router_url is None and cfg.telemetry.router_url:
        # the router we watch is the router we act on, unless the config says otherwise
        act = act.model_copy(update={"router_url": cfg.telemetry.router_url})
    # built once at start-up; the runtime never asks which kind it is
    from controller.safeyaml import read_bounded

    for key in (act.agent_client_key, act.agent_server_key):
        if key is not None:
            read_bounded(key, 65536)  # a key file is small and regular: never /dev/zero or a FIFO
    registry = process_registry()
    actuator = build_actuator(act, registry)
    sidecar = Sidecar(cfg, registry=registry, advisory=bool(args.advisory), actuator=actuator, listen=args.listen)

    host = sidecar.listen[0]
    if host not in ("127.0.0.1", "localhost", "::1") and not cfg.api.plan_requires_token:
        # read-only endpoints and what-if plans are open to whoever reaches this address (docs/security.md)
        log.warning("api_open_beyond_loopback", host=host, hint="set api.plan_requires_token: true and a token")

    async def main() -> int:
        log.info(
            "starting", mode=sidecar.loop.mode, zmq=cfg.telemetry.zmq_endpoints, router=cfg.telemetry.router_url,
            tick_period_s=cfg.control.tick_period_s,
            actuator=cfg.actuation.kind,
        )
        outcome = await sidecar.run()
        log.info("stopped", first=outcome.first, error=repr(outcome.error) if outcome.error else None,
                 stuck=list(outcome.stuck))
        return 0 if outcome.ok and outcome.first is None else 1

    try:
        return asyncio.run(main())
    except OSError as e:  # the API address is taken or not ours to bind
        host, port = sidecar.listen
        raise PdControllerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
