"""Actuators: how decisions reach the fleet, behind one small async Protocol (see base.Actuator).

`build_actuator(cfg.actuation, registry)` is called once at start-up; the
runtime gets the object and never asks which kind it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from controller.actuators.base import ActionResult, Actuator, FleetView, Outcome, Role, WorkerView, other_role
from controller.actuators.errors import (
    ActuationError,
    AgentError,
    KubernetesError,
    RouterError,
    TransientError,
    WorkerError,
)
from controller.actuators.metrics import ActuatorMetrics
from controller.config import ActuationConfig

__all__ = [
    "ActionResult",
    "ActuationError",
    "Actuator",
    "ActuatorMetrics",
    "AgentError",
    "FleetView",
    "KubernetesError",
    "Outcome",
    "Role",
    "RouterError",
    "TransientError",
    "WorkerError",
    "WorkerView",
    "build_actuator",
    "other_role",
]


def build_actuator(
    cfg: ActuationConfig,
    registry: CollectorRegistry | None = None,
    *,
    metrics: ActuatorMetrics | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = asyncio.sleep,
) -> Actuator:
    from controller.actuators.agent import AgentClient, AgentSwitcher, CurveKeys
    from controller.actuators.dryrun import DryRunActuator
    from controller.actuators.fleet import RouterActuator
    from controller.actuators.flip import DrainedFlipper, FlipGuard, FlipTimeouts, Journal
    from controller.actuators.http import Http
    from controller.actuators.retry import Retrier
    from controller.actuators.router import RouterClient
    from controller.actuators.switch import AgentRestart, RoleSwitchEndpoint, Switcher
    from controller.actuators.worker import WorkerClient

    metrics = metrics or ActuatorMetrics(registry)
    http = Http(cfg.http_timeout_s)

    def retrier(name: str) -> Retrier:
        return Retrier(name, metrics, retries=cfg.retries, initial_s=cfg.backoff_initial_s,
                       max_s=cfg.backoff_max_s, sleep=sleep)  # type: ignore[arg-type]

    router = None
    if cfg.router_url:
        router = RouterClient(cfg.router_url, http, retrier("router"), poll_interval_s=cfg.poll_interval_s,
                              clock=clock, sleep=sleep)  # type: ignore[arg-type]
    if cfg.kind == "dry-run":
        return DryRunActuator(metrics, router)
    if cfg.kind == "kubernetes":
        from controller.actuators.kubernetes import KubernetesActuator

        return KubernetesActuator.from_config(cfg, metrics, router=router)
    assert router is not None  # validated by ActuationConfig
    workers = WorkerClient(http, retrier("worker"))
    agents = None
    switcher: Switcher
    if cfg.agents:
        # agents restart workers: the flip itself (switch: agent), and the reconciler's repair of a dead
        # worker in either switch mode
        keys = None
        if cfg.agent_client_key is not None and cfg.agent_server_key is not None:
            keys = CurveKeys(cfg.agent_client_key, cfg.agent_server_key)
        agents = AgentSwitcher(AgentClient(keys, cfg.http_timeout_s), cfg.agents,
                               poll_interval_s=cfg.poll_interval_s, clock=clock, sleep=sleep)  # type: ignore[arg-type]
    if cfg.switch == "agent":
        assert agents is not None  # validated by ActuationConfig
        switcher = AgentRestart(agents, http, workers)
    else:
        switcher = RoleSwitchEndpoint(workers, http, poll_interval_s=cfg.poll_interval_s, clock=clock,
                                      sleep=sleep, restarter=agents)  # type: ignore[arg-type]
    guard = FlipGuard(min_pool_size=cfg.min_pool_size)
    flipper = DrainedFlipper(
        router, workers, switcher, guard, Journal(cfg.journal), metrics,
        timeouts=FlipTimeouts(cfg.drain_timeout_s, cfg.switch_timeout_s, cfg.register_timeout_s,
                              cfg.verify_timeout_s, cfg.poll_interval_s, settle_s=min(cfg.switch_timeout_s, 30.0)),
        bootstrap_ports=cfg.bootstrap_ports, clock=clock, sleep=sleep,  # type: ignore[arg-type]
    )
    return RouterActuator(router, flipper, switcher, metrics, spares=cfg.spare_workers, agents=agents,
                          closers=(http,), reconcile_interval_s=cfg.reconcile_interval_s)
