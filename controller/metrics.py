"""Every Prometheus metric of the controller, prefix ``pdctl_``, on an injected registry.

One `ControllerMetrics` is built at start-up (the CLI passes the default
registry, tests a fresh one) and handed to the telemetry hub, the scraper and
the tick loop. docs/sidecar.md lists each metric with its meaning.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

PREFIX = "pdctl_"
ROLES = ("prefill", "decode")
# tick durations: sub-millisecond ticks on an idle fleet up to a pathological second
TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        # observed traffic (estimator outputs)
        self.arrival_rate = Gauge(f"{PREFIX}observed_arrival_rate_rps", "Estimated request arrival rate, req/s.", registry=r)
        self.input_len = Gauge(f"{PREFIX}observed_input_len_mean_tokens", "Mean input tokens per request in the window.", registry=r)
        self.output_len = Gauge(f"{PREFIX}observed_output_len_mean_tokens", "Mean output tokens per request in the window.", registry=r)
        self.cache_hit = Gauge(f"{PREFIX}observed_cache_hit_rate", "Share of input tokens served from the prefix cache.", registry=r)
        self.window_samples = Gauge(f"{PREFIX}estimator_samples", "Completed requests in the estimator window.", registry=r)
        # forecast
        self.forecast_level = Gauge(f"{PREFIX}forecast_level_rps", "Forecast level of the arrival rate, req/s.", registry=r)
        self.forecast_max = Gauge(
            f"{PREFIX}forecast_max_rps", "Forecast maximum arrival rate over the action lead time, with margin.", registry=r
        )
        # model vs reality
        self.predicted_ttft = Gauge(f"{PREFIX}predicted_ttft_seconds", "TTFT the model predicts for the current fleet and load.", registry=r)
        self.observed_ttft = Gauge(f"{PREFIX}observed_ttft_seconds", "Mean TTFT observed over the last tick.", registry=r)
        self.predicted_tpot = Gauge(f"{PREFIX}predicted_tpot_seconds", "TPOT the model predicts for the current fleet and load.", registry=r)
        self.observed_tpot = Gauge(f"{PREFIX}observed_tpot_seconds", "Mean TPOT observed over the last tick.", registry=r)
        self.model_error = Gauge(
            f"{PREFIX}model_error_ratio", "Calibration EMA of (predicted - observed) / observed, by quantity.", ["quantity"], registry=r
        )
        self.feedback_headroom = Gauge(
            f"{PREFIX}feedback_headroom", "Tail feedback's multiplier on each pool's model need (> 1 while its tail "
            "burns; decode < 1 while its TPOT budget stays unspent), by role.", ["role"], registry=r,
        )
        self.prefill_tps = Gauge(
            f"{PREFIX}prefill_throughput_effective_tps", "Effective prefill tokens/s per instance at the TTFT objective.", registry=r
        )
        self.decode_tps = Gauge(
            f"{PREFIX}decode_throughput_effective_tps", "Effective decode tokens/s per instance at the TPOT objective.", registry=r
        )
        self.calibration_scale = Gauge(
            f"{PREFIX}calibration_scale", "Fitted model scale (1 = the profile), by quantity.", ["quantity"], registry=r
        )
        # fleet
        self.target_instances = Gauge(f"{PREFIX}target_instances", "Instances the controller wants, by role.", ["role"], registry=r)
        self.needed_instances = Gauge(
            f"{PREFIX}needed_instances",
            "Exact (fractional) instances the plan needs, by role and by what reads it (plan, arrival_burst, running_batch).",
            ["role", "source"], registry=r,
        )
        self.current_instances = Gauge(f"{PREFIX}current_instances", "Instances serving now, by role.", ["role"], registry=r)
        # decisions and actions
        self.decisions = Counter(f"{PREFIX}decisions", "Decisions taken, by pool and reason.", ["pool", "reason"], registry=r)
        self.actions = Counter(f"{PREFIX}actions", "Actions proposed by the core, by kind and reason.", ["kind", "reason"], registry=r)
        self.actuations = Counter(
            f"{PREFIX}actuations", "Actions by actuation result (ok, failed, skipped_advisory, blocked).",
            ["result"], registry=r,
        )
        self.paused = Gauge(f"{PREFIX}advisory", "1 when the controller only decides and reports (advisory mode).", registry=r)
        # telemetry
        self.telemetry_events = Counter(f"{PREFIX}telemetry_events", "Valid request events received, by source.", ["source"], registry=r)
        self.telemetry_dropped = Counter(
            f"{PREFIX}telemetry_dropped", "Telemetry dropped, by reason (frames, records or scrapes; see docs).", ["reason"], registry=r
        )
        self.telemetry_frames_lost = Counter(
            f"{PREFIX}telemetry_frames_lost", "Tap frames missing from the sequence numbers, by source.", ["source"], registry=r
        )
        self.scrapes = Counter(f"{PREFIX}scrapes", "Prometheus scrapes of the router, by target and result.", ["target", "result"], registry=r)
        self.telemetry_age = Gauge(
            f"{PREFIX}telemetry_age_seconds", "Seconds since the last valid telemetry (events or scrape).", registry=r
        )
        # loop
        self.ticks = Counter(f"{PREFIX}ticks", "Control ticks run, by result (ok, error).", ["result"], registry=r)
        self.fleet_errors = Counter(
            f"{PREFIX}fleet_errors", "Failed reads of the fleet from the actuator (router down, timeouts).", registry=r
        )
        self.tick_duration = Histogram(
            f"{PREFIX}tick_duration_seconds", "Wall time of one control tick (decide, not actuate).", buckets=TICK_BUCKETS, registry=r
        )
        for role in ROLES:
            self.target_instances.labels(role=role)
            self.current_instances.labels(role=role)
        for result in ("ok", "error"):
            self.ticks.labels(result=result)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
