"""`pd-controller run`: the live sidecar (telemetry, tick loop, API, actuation).

It acts through the actuator built once from `actuation` in the config
(dry-run by default); `--advisory` decides and reports without acting.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from prometheus_client import REGISTRY

from controller.config import Config, ConfigError, config_from_dict, load_config
from controller.logging import configure_logging
from controller.planning import check_path


def _listen(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--listen={s!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the live controller sidecar (telemetry, tick loop, API)",
        description="Watch the fleet (tap events over ZeroMQ, router/worker Prometheus metrics), re-solve every "
        "tick, report decisions on /v1/state, /metrics and one log line per tick.",
    )
    p.add_argument("--config", help="YAML config (slo, hardware, control, telemetry, api sections)")
    p.add_argument("--router", help="router base URL (GET /workers, /engine_metrics); overrides telemetry.router_url")
    p.add_argument("--router-metrics", help="router's own /metrics URL (its --prometheus-port)")
    p.add_argument("--telemetry", nargs="+", metavar="tcp://HOST:PORT", help="taps' PUB endpoints; overrides telemetry.zmq_endpoints")
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
        tel["zmq_endpoints"] = list(args.telemetry)
    if not tel:
        return cfg
    raw = cfg.model_dump(mode="json", exclude_none=True)
    raw["telemetry"] = {**raw.get("telemetry", {}), **tel}
    # validate the merged result: a bad flag fails like a bad config value, naming the field
    return config_from_dict(raw, origin="flags")


def run(args: argparse.Namespace) -> int:
    from controller.runtime.sidecar import Sidecar

    cfg = effective_config(args)
    if not cfg.telemetry.zmq_endpoints and not cfg.telemetry.router_url:
        raise ConfigError("telemetry: no source: give --telemetry tcp://HOST:PORT and/or --router URL")
    configure_logging(json={"auto": None, "json": True, "console": False}[args.log_format], level=args.log_level)
    import structlog

    log = structlog.get_logger("pd-controller")
    from controller.actuators import build_actuator

    act = cfg.actuation
    if act.router_url is None and cfg.telemetry.router_url:
        # the router we watch is the router we act on, unless the config says otherwise
        act = act.model_copy(update={"router_url": cfg.telemetry.router_url})
    # built once at start-up; the runtime never asks which kind it is
    actuator = build_actuator(act, REGISTRY)
    sidecar = Sidecar(cfg, registry=REGISTRY, advisory=bool(args.advisory), actuator=actuator, listen=args.listen)

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

    return asyncio.run(main())
