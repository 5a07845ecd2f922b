"""One typed configuration, validated at start.

Units are in field names. A bad value fails with a message that names the
field path and quotes the value (see `format_validation_error`).
Sections are added here as capabilities land; each is optional with defaults
except where a value has no sensible default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controller.core.errors import PdControllerError


class ConfigError(PdControllerError):
    """A configuration file or flag is invalid; the message names field and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SloConfig(_Section):
    ttft_s: float = Field(2.0, gt=0, description="TTFT objective, seconds")
    ttft_quantile: float | None = Field(
        None, gt=0, lt=1, description="objective statistic: None = mean (the source method), 0.9 = P90"
    )
    tpot_ms: float = Field(20.0, gt=0, description="TPOT objective, milliseconds")
    overhead_s: float | None = Field(
        None, ge=0, description="fixed per-request TTFT overhead (client + KV transfer); None = the profile's"
    )

    @model_validator(mode="after")
    def _overhead_below_ttft(self) -> SloConfig:
        if self.overhead_s is not None and self.overhead_s >= self.ttft_s:
            raise ValueError(f"overhead_s={self.overhead_s!r} must be below ttft_s={self.ttft_s!r}")
        return self


class WorkloadConfig(_Section):
    throughput_tpm: float | None = Field(None, ge=0, description="total (input+output) tokens per minute")
    rate_rps: float | None = Field(None, ge=0, description="request rate, requests/s")
    input_len: float = Field(..., gt=0, description="mean input tokens per request")
    output_len: float = Field(..., gt=0, description="mean output tokens per request")
    cache_hit_rate: float = Field(0.0, ge=0, lt=1, description="share of input tokens served from prefix cache")

    @model_validator(mode="after")
    def _one_load(self) -> WorkloadConfig:
        if self.throughput_tpm is not None and self.rate_rps is not None:
            raise ValueError(
                f"give throughput_tpm={self.throughput_tpm!r} or rate_rps={self.rate_rps!r}, not both"
            )
        return self


class HardwareConfig(_Section):
    profile: Path | None = Field(None, description="profile YAML (configs/profiles/...)")
    prefill_max_tps: float | None = Field(None, gt=0, description="override: saturated prefill tokens/s (TPmax)")
    decode_tps: float | None = Field(None, gt=0, description="override: decode tokens/s at the TPOT objective")
    prefill_model: Literal["mm1", "md1", "mg1"] = "mm1"
    dp_groups: int | None = Field(None, ge=1, description="override: DP attention groups per prefill instance")
    prefill_gpus_per_instance: int | None = Field(None, ge=1)
    decode_gpus_per_instance: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _source(self) -> HardwareConfig:
        if self.profile is None and (self.prefill_max_tps is None or self.decode_tps is None):
            raise ValueError(
                "need a profile, or both prefill_max_tps and decode_tps "
                f"(got prefill_max_tps={self.prefill_max_tps!r}, decode_tps={self.decode_tps!r})"
            )
        return self


class PlanConfig(_Section):
    rounding: Literal["ceil", "nearest"] = "ceil"


class ActuationConfig(_Section):
    """How decisions reach the fleet (see docs/actuation.md)."""

    kind: Literal["dry-run", "router", "kubernetes"] = Field(
        "dry-run", description="dry-run logs only; router = registry + switch; kubernetes = scale workloads"
    )
    router_url: str | None = Field(None, description="sglang-router base URL, e.g. http://127.0.0.1:30000")
    switch: Literal["role-switch", "agent"] = Field(
        "role-switch", description="how a worker changes role: SGLang /pd_role_switch, or a node agent restart"
    )
    agents: dict[str, str] = Field(
        default_factory=dict, description="worker URL -> node agent ZeroMQ endpoint (switch: agent)"
    )
    agent_server_key: Path | None = Field(None, description="agents' CURVE public key file (.key)")
    agent_client_key: Path | None = Field(None, description="controller's CURVE secret key file (.key_secret)")
    bootstrap_ports: dict[str, int] = Field(
        default_factory=dict, description="worker URL -> disaggregation bootstrap port, used when it serves prefill"
    )
    spare_workers: list[str] = Field(
        default_factory=list, description="URLs of started, unregistered workers that scale-up may register"
    )
    min_pool_size: int = Field(1, ge=1, description="never take a pool below this many healthy workers")
    drain_timeout_s: float = Field(60.0, gt=0, description="wait this long for a removed worker to go idle")
    switch_timeout_s: float = Field(120.0, gt=0, description="wait this long for the switched worker to be healthy")
    register_timeout_s: float = Field(30.0, gt=0, description="wait this long for the router to list a worker")
    verify_timeout_s: float = Field(30.0, ge=0, description="wait this long for traffic to reach it; 0 skips")
    poll_interval_s: float = Field(0.5, gt=0, description="polling period of the waits above")
    http_timeout_s: float = Field(5.0, gt=0, description="per-request timeout to router, workers, agents")
    retries: int = Field(4, ge=0, description="retries of a failed router/worker call (5xx, timeout)")
    backoff_initial_s: float = Field(0.2, gt=0, description="first retry delay; doubles per failure")
    backoff_max_s: float = Field(5.0, gt=0, description="retry delay cap")
    journal: Path | None = Field(None, description="file recording in-flight flips, for recovery after restart")
    reconcile_interval_s: float = Field(
        3.0, ge=0, description="heal the fleet (router registry vs what workers serve) this often; 0 = off")
    k8s_namespace: str = "default"
    k8s_prefill_workload: str | None = Field(None, description="kind/name, e.g. Deployment/sglang-prefill")
    k8s_decode_workload: str | None = Field(None, description="kind/name, e.g. LeaderWorkerSet/sglang-decode")
    k8s_role_label: str = Field("pd.sglang.io/role", description="pod label patched on a flip")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, raw: Any) -> Any:
        # one flip budget: the control parameters (control.max_flips_in_flight, control.max_flips_per_hour)
        moved = {"max_flips_in_flight": "control.max_flips_in_flight",
                 "flip_budget_per_hour": "control.max_flips_per_hour"}
        for old, new in moved.items():
            if isinstance(raw, dict) and old in raw:
                raise ValueError(f"actuation.{old}={raw[old]!r}: flip limits live in {new} (one budget, the core's)")
        return raw

    @model_validator(mode="after")
    def _needs(self) -> ActuationConfig:
        if self.kind == "router" and not self.router_url:
            raise ValueError(f"kind={self.kind!r} needs router_url")
        if self.switch == "agent" and self.kind == "router" and not self.agents:
            raise ValueError(f"switch={self.switch!r} needs agents (worker URL -> endpoint)")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s={self.backoff_max_s!r} must be >= backoff_initial_s={self.backoff_initial_s!r}"
            )
        return self


class ControlConfig(_Section):
    """The online controller (controller.core.control): tick, windows, bounds, limits, forecaster."""

    mode: Literal["fixed", "elastic"] = "elastic"
    tick_period_s: float = Field(5.0, gt=0)
    window_s: float = Field(60.0, gt=0, description="estimator sliding window")
    min_samples: int = Field(20, ge=1, description="fewer completed requests in the window: insufficient_data")
    max_age_s: float = Field(120.0, gt=0, description="newest sample older than this: stale")
    tolerance: float = Field(0.1, ge=0, lt=1)
    tolerance_up: float = Field(0.03, ge=0, lt=1)
    stabilization_up_s: float = Field(0.0, ge=0)
    stabilization_up_quantile: float = Field(0.5, ge=0, le=1, description="scale up to this quantile of the up "
                                             "window's recommendations (0 = HPA's minimum)")
    stabilization_down_s: float = Field(300.0, ge=0)
    min_prefill: int = Field(1, ge=1)
    max_prefill: int = Field(64, ge=1)
    min_decode: int = Field(1, ge=1)
    max_decode: int = Field(64, ge=1)
    gpus: int | None = Field(None, ge=2, description="fixed mode: the GPU budget; elastic: an optional cap")
    max_flips_in_flight: int = Field(2, ge=0)
    max_flips_per_hour: int = Field(30, ge=0)
    max_scale_step: int = Field(4, ge=1)
    flip_time_s: float = Field(30.0, ge=0)
    drain_s: float = Field(10.0, ge=0)
    cold_start_s: float = Field(300.0, ge=0)
    level_tau_s: float = Field(30.0, gt=0)
    trend_tau_s: float = Field(300.0, gt=0)
    trend_damping_s: float = Field(600.0, ge=0)
    trend_lcb_z: float = Field(2.0, ge=0, allow_inf_nan=False,
                               description="a trend sustained over one lead time is extrapolated at slope - z SE (0 = off)")
    season_period_s: float = Field(86400.0, gt=0)
    season_bucket_s: float = Field(60.0, gt=0)
    forecast_z: float = Field(1.5, ge=0)
    rise_quantile: float = Field(0.9, ge=0, lt=1)
    rise_history: int = Field(120, ge=1)
    rise_min_samples: int = Field(10, ge=1)
    rise_prior_frac: float = Field(0.15, ge=0, description="assumed rise within a 10-minute lead time before any is learned")
    prefill_pooled: bool = Field(True, description="least-load routing: the prefill pool is one M/G/c queue")
    max_prefill_utilization: float = Field(0.85, gt=0, le=1, description="no prefill instance planned busier than this")
    max_arrival_scv: float = Field(16.0, ge=1, description="bound on the arrival variability c_a^2 the prefill "
                                   "queueing model reads from the window (1 = assume Poisson arrivals)")
    observed_need_hold_s: float = Field(30.0, ge=0, description="observed decode need must hold this long")
    decode_margin_z: float = Field(1.0, ge=0)
    burst_bin_s: float = Field(10.0, gt=0)
    burst_quantile: float = Field(0.9, ge=0, lt=1)
    calibrate: bool = True
    calibration_alpha: float = Field(0.1, gt=0, le=1)
    calibration_max_step: float = Field(0.05, gt=0)
    calibration_bounds: tuple[float, float] = (0.5, 2.0)
    miss_allowance: float = Field(0.01, gt=0, lt=1, description="share of requests a TPOT objective may miss")
    feedback_gain: float = Field(0.2, ge=0, description="tail feedback: log-headroom per window of burn rate 2")
    feedback_decay_s: float = Field(600.0, gt=0)
    feedback_max: float = Field(1.5, ge=1)
    decode_slack_min: float = Field(0.8, gt=0, le=1, description="elastic: decode's lowest headroom while its "
                                    "TPOT budget stays unspent (the model's need x this; 1 = off)")
    slack_burn: float = Field(0.25, ge=0, lt=0.5, description="... while decode's burn averaged over slack_avg_s "
                              "stays below this")
    slack_avg_s: float = Field(900.0, gt=0)
    slack_rate: float = Field(0.02, ge=0, description="log-headroom decode gives up per window of such calm")
    regrow_hold_factor: float = Field(1.0, ge=0, description="scale-down holds the peak load of this many regrow times")

    @model_validator(mode="after")
    def _check(self) -> ControlConfig:
        if self.max_prefill < self.min_prefill:
            raise ValueError(f"max_prefill={self.max_prefill!r} must be >= min_prefill={self.min_prefill!r}")
        if self.max_decode < self.min_decode:
            raise ValueError(f"max_decode={self.max_decode!r} must be >= min_decode={self.min_decode!r}")
        if self.mode == "fixed" and self.gpus is None:
            raise ValueError("mode='fixed' needs gpus (the GPU budget)")
        lo, hi = self.calibration_bounds
        if not (0 < lo <= 1 <= hi):
            raise ValueError(f"calibration_bounds={self.calibration_bounds!r}: need 0 < low <= 1 <= high")
        return self

    def to_params(self) -> Any:
        """The core's ControlParams (controller.core.control.params)."""
        from controller.core.control.params import ControlParams, Mode

        return ControlParams(**{**self.model_dump(), "mode": Mode(self.mode)})


class TelemetryConfig(_Section):
    """Where the live sidecar reads traffic from (see docs/sidecar.md)."""

    zmq_endpoints: list[str] = Field(
        default_factory=list, description="taps' PUB endpoints to subscribe to, e.g. tcp://127.0.0.1:5557"
    )
    router_url: str | None = Field(None, description="router base URL: GET /workers and /engine_metrics")
    router_metrics_url: str | None = Field(
        None, description="router's own Prometheus endpoint (--prometheus-port), e.g. http://127.0.0.1:29000/metrics"
    )
    scrape_interval_s: float = Field(5.0, gt=0)
    scrape_timeout_s: float = Field(2.0, gt=0)
    workers_interval_s: float = Field(5.0, gt=0, description="GET /workers period")
    synthesize_from_scrape: bool | None = Field(
        None, description="request events from worker counters; None = only when no tap endpoint is configured"
    )
    fresh_s: float = Field(30.0, gt=0, description="/readyz: telemetry newer than this counts as fresh")
    max_pending_events: int = Field(1_000_000, ge=1, description="events buffered between two ticks at most")
    rcvhwm: int = Field(10_000, ge=1, description="SUB receive high-water mark, frames")
    # the tap channel's security and plausibility (docs/security.md, "Router tap and telemetry")
    curve_secret_key: Path | None = Field(
        None, description="the controller's CURVE secret key file (NAME.key_secret, `agent --keygen`)"
    )
    curve_server_keys: list[Path] = Field(
        default_factory=list, description="the taps' public key files (.key): one for all endpoints, or one each"
    )
    allow_insecure: bool = Field(
        False, description="subscribe to non-loopback zmq_endpoints without CURVE (anyone there can feed events)"
    )
    max_context_tokens: int = Field(
        10_000_000, ge=1, description="events claiming more input or output tokens are dropped as too_long"
    )
    max_sources: int = Field(32, ge=1, description="distinct tap source ids labelled in metrics; the rest are 'other'")

    @model_validator(mode="after")
    def _curve(self) -> TelemetryConfig:
        from router_plugin.keys import is_loopback_endpoint

        if (self.curve_secret_key is None) != (not self.curve_server_keys):
            raise ValueError("curve_secret_key and curve_server_keys go together "
                             f"(got {self.curve_secret_key!r}, {len(self.curve_server_keys)} server keys)")
        n = len(self.zmq_endpoints)
        if self.curve_server_keys and n and len(self.curve_server_keys) not in (1, n):
            raise ValueError(f"curve_server_keys: {len(self.curve_server_keys)} given for {n} zmq_endpoints "
                             "(give 1, or one per endpoint)")
        if self.curve_secret_key is None and not self.allow_insecure:
            for ep in self.zmq_endpoints:
                if not is_loopback_endpoint(ep):
                    raise ValueError(f"zmq_endpoints item {ep!r}: not loopback and no CURVE keys "
                                     "(set curve_secret_key and curve_server_keys, or allow_insecure: true)")
        return self

    @model_validator(mode="after")
    def _endpoints(self) -> TelemetryConfig:
        for ep in self.zmq_endpoints:
            if not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"zmq_endpoints item {ep!r}: expected tcp://HOST:PORT")
        for name in ("router_url", "router_metrics_url"):
            v = getattr(self, name)
            if v is not None and not v.startswith(("http://", "https://")):
                raise ValueError(f"{name}={v!r}: expected an http:// URL")
        return self


class ApiConfig(_Section):
    """The sidecar's HTTP API. Mutating endpoints need `Authorization: Bearer <token>`."""

    host: str = Field("127.0.0.1", description="bind address; loopback unless you mean it")
    port: int = Field(9109, ge=0, le=65535, description="0 = an ephemeral port")
    token: str | None = Field(None, description="bearer token for POST /v1/pause and /v1/resume")
    token_env: str = Field("PDCTL_API_TOKEN", description="environment variable read when token is not set")
    plan_requires_token: bool = Field(False, description="POST /v1/plan needs the bearer token too")
    plan_timeout_s: float = Field(10.0, gt=0, le=600, description="what-if plan time limit (its worker is killed)")
    plan_memory_mb: int = Field(1024, ge=128, description="what-if plan worker's data memory limit (RLIMIT_DATA)")
    profile_dirs: list[Path] | None = Field(
        None, description="directories whose *.yaml profiles POST /v1/plan may name; None = the shipped "
        "configs/profiles/ and the directory of hardware.profile"
    )
    max_body_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024, description="request bodies above: 413")


class Config(_Section):
    """The whole configuration file."""

    slo: SloConfig = SloConfig()
    workload: WorkloadConfig | None = None
    hardware: HardwareConfig | None = None
    plan: PlanConfig = PlanConfig()
    control: ControlConfig = ControlConfig()
    actuation: ActuationConfig = ActuationConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    api: ApiConfig = ApiConfig()


def _short_repr(x: Any, limit: int = 80) -> str:
    r = repr(x)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} chars)"


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: `origin: slo.ttft_s=-1: Input should be greater than 0`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        loc = loc if len(loc) <= 80 else f"{loc[:80]}... ({len(loc)} chars)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("missing",):
            parts.append(f"{origin}: {loc}: missing")
        elif "input" in e and e["type"] not in ("value_error",) and not isinstance(e["input"], dict):
            parts.append(f"{origin}: {loc}={_short_repr(e['input'])}: {msg}")
        else:
            parts.append(f"{origin}: {loc}: {msg}")
    if len(parts) > 4:  # a file that is not a config at all (e.g. /etc/passwd) would list every line
        parts = [*parts[:4], f"and {len(parts) - 4} more problems"]
    return "; ".join(parts)


def load_yaml(path: Path | str) -> Any:
    """Safe-load a YAML file with limits on size, depth and aliases (controller.safeyaml).

    The one loader for configs, profiles and agent configs: a FIFO, a device,
    a huge or non-UTF-8 file, malformed YAML and alias bombs are one-line ConfigErrors.
    """
    from controller.safeyaml import FileError, load_yaml_file

    try:
        return load_yaml_file(path)
    except FileError as e:
        raise ConfigError(str(e)) from None


def config_from_dict(raw: Any, origin: str = "config", base_dir: Path | None = None) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping at top level, got {type(raw).__name__}")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None
    # relative profile paths are relative to the config file that names them
    if base_dir is not None and cfg.hardware is not None and cfg.hardware.profile is not None:
        p = cfg.hardware.profile
        if not p.is_absolute() and not p.exists() and (base_dir / p).exists():
            cfg = cfg.model_copy(update={"hardware": cfg.hardware.model_copy(update={"profile": base_dir / p})})
    return cfg


def load_config(path: Path | str) -> Config:
    path = Path(path)
    return config_from_dict(load_yaml(path), origin=str(path), base_dir=path.parent)
