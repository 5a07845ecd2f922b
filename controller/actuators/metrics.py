"""Prometheus metrics of actuation, on an injected registry (a fresh one per test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ActuatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg
        self.calls = Counter(
            "pdc_actuator_calls",
            "Calls to the fleet (router, workers, agents, API server) by outcome",
            ["actuator", "op", "result"],
            registry=reg,
        )
        self.retries = Counter(
            "pdc_actuator_retries", "Retried calls after a 5xx or timeout", ["actuator", "op"], registry=reg
        )
        self.flips = Counter(
            "pdc_flips", "Role flips by outcome (ok, refused, rolled_back, failed)", ["result", "to_role"],
            registry=reg,
        )
        self.scales = Counter("pdc_scale_actions", "Pool scale actions by outcome", ["result", "pool"], registry=reg)
        self.in_flight = Gauge("pdc_flips_in_flight", "Drained flips in progress", registry=reg)
        self.flip_seconds = Histogram(
            "pdc_flip_duration_seconds",
            "Wall time of a drained flip, start to verified (or rolled back)",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=reg,
        )

        self.reconcile_attempts = Counter(
            "pdc_reconcile_attempts",
            "Reconciler repair attempts (register, reregister, deregister, restart, probe) by result",
            ["action", "result"], registry=reg,
        )
        self.reconcile_passes = Counter(
            "pdc_reconcile_passes",
            "Reconciler passes by result (consistent, repaired, inconsistent, router_unreachable, error)",
            ["result"], registry=reg,
        )
        self.reconcile_workers = Gauge(
            "pdc_reconcile_workers", "Workers by reconciled state (consistent, repairing, failed, spare)", ["state"],
            registry=reg,
        )

    def call(self, actuator: str, op: str, result: str) -> None:
        self.calls.labels(actuator, op, result).inc()

    def retry(self, actuator: str, op: str) -> None:
        self.retries.labels(actuator, op).inc()
