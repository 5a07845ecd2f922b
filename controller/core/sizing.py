"""Static sizing: the source method's equations 5-7, capacity of an mPnD fleet, budget splits.

Everything is computed in request rates, which makes eq. 5-6 one line each:
TP_total * L_in / (L_in + L_out) is the input-token rate lambda * L_in, so

    N_prefill = lambda / lambda_max_prefill      (eq. 5; lambda_max = TP_prefill / L_in)
    N_decode  = lambda / lambda_max_decode       (eq. 6; lambda_max = TP_decode / L_out)
    R_P/D     = N_prefill / N_decode             (eq. 7)

Per-instance maxima depend on the workload's shape (lengths, cache hits,
objectives), not on its rate: the load balancer spreads lambda evenly, and each
prefill instance is its own queue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from controller.core.decode import DecodeOperatingPoint, decode_operating_point
from controller.core.errors import ModelInputError
from controller.core.prefill import PrefillQueueing, QueueModel, ServiceTime, service_time
from controller.core.profile import Profile


class Rounding(StrEnum):
    CEIL = "ceil"
    NEAREST = "nearest"


@dataclass(frozen=True)
class Workload:
    """Traffic shape and volume. Lengths are means in tokens; samples feed M/G/1."""

    rate_rps: float
    input_len: float
    output_len: float
    cache_hit_rate: float = 0.0
    input_len_samples: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("input_len", "output_len"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ModelInputError(name, v, "must be a positive number of tokens")
        if not (self.rate_rps >= 0 and math.isfinite(self.rate_rps)):
            raise ModelInputError("rate_rps", self.rate_rps, "must be a non-negative finite number")
        if not (0.0 <= self.cache_hit_rate < 1.0):
            raise ModelInputError("cache_hit_rate", self.cache_hit_rate, "must be in [0, 1)")

    @classmethod
    def from_throughput_tpm(
        cls, throughput_tpm: float, input_len: float, output_len: float, **kw: float | tuple[float, ...]
    ) -> Workload:
        """From total (input + output) tokens per minute, as the source states its load."""
        if not (throughput_tpm >= 0 and math.isfinite(throughput_tpm)):
            raise ModelInputError("throughput_tpm", throughput_tpm, "must be a non-negative finite number")
        if not (input_len > 0 and output_len > 0):
            bad = ("input_len", input_len) if not input_len > 0 else ("output_len", output_len)
            raise ModelInputError(bad[0], bad[1], "must be a positive number of tokens")
        rate = throughput_tpm / 60.0 / (input_len + output_len)
        return cls(rate, input_len, output_len, **kw)  # type: ignore[arg-type]

    @property
    def tokens_per_request(self) -> float:
        return self.input_len + self.output_len

    @property
    def throughput_tpm(self) -> float:
        return self.rate_rps * self.tokens_per_request * 60.0

    def scaled(self, factor: float) -> Workload:
        return Workload(self.rate_rps * factor, self.input_len, self.output_len, self.cache_hit_rate, self.input_len_samples)


@dataclass(frozen=True)
class Objectives:
    ttft_s: float
    tpot_ms: float
    ttft_quantile: float | None = None
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and math.isfinite(self.ttft_s)):
            raise ModelInputError("ttft_s", self.ttft_s, "must be a positive number of seconds")
        if not (self.tpot_ms > 0 and math.isfinite(self.tpot_ms)):
            raise ModelInputError("tpot_ms", self.tpot_ms, "must be a positive number of milliseconds")
        if not (self.overhead_s >= 0 and math.isfinite(self.overhead_s)):
            raise ModelInputError("overhead_s", self.overhead_s, "must be a non-negative number of seconds")
        if self.ttft_s <= self.overhead_s:
            raise ModelInputError(
                "ttft_s", self.ttft_s, f"must exceed the fixed overhead overhead_s={self.overhead_s:g}"
            )
        if self.ttft_quantile is not None and not (0.0 < self.ttft_quantile < 1.0):
            raise ModelInputError("ttft_quantile", self.ttft_quantile, "must be in (0, 1), e.g. 0.9, or unset for the mean")

    @property
    def ttft_budget_s(self) -> float:
        """TTFT - T_overhead: the time the prefill queue may take (eq. 12's left side)."""
        return self.ttft_s - self.overhead_s


@dataclass(frozen=True)
class Hardware:
    """What sizing needs from a profile, with CLI overrides applied."""

    profile: Profile
    prefill_model: QueueModel = QueueModel.MM1
    decode_tps_override: float | None = None

    @property
    def queueing(self) -> PrefillQueueing:
        return PrefillQueueing(self.prefill_model, self.profile.prefill_dp_groups)


@dataclass(frozen=True)
class InstanceCapacity:
    """Max request rate one instance of each pool sustains within the objectives."""

    prefill_rate_rps: float
    decode_rate_rps: float
    prefill_tps_effective: float  # input tokens/s (cached included) per prefill instance: TP_prefill
    decode: DecodeOperatingPoint
    prefill_service: ServiceTime

    @property
    def decode_tps_effective(self) -> float:
        return self.decode.tps


def instance_capacity(workload: Workload, objectives: Objectives, hw: Hardware) -> InstanceCapacity:
    lengths: float | Sequence[float] = workload.input_len_samples or workload.input_len
    svc = service_time(hw.profile.prefill, lengths, workload.cache_hit_rate)
    lam_p = hw.queueing.max_rate_rps(svc, objectives.ttft_budget_s, objectives.ttft_quantile)
    op = decode_operating_point(
        hw.profile.decode_curve,
        objectives.tpot_ms,
        workload.input_len,
        workload.output_len,
        fixed_tps=hw.decode_tps_override if hw.decode_tps_override is not None else (
            hw.profile.decode_fixed_tps if hw.profile.decode_curve is None else None
        ),
    )
    return InstanceCapacity(
        prefill_rate_rps=lam_p,
        decode_rate_rps=op.tps / workload.output_len,
        prefill_tps_effective=lam_p * workload.input_len,
        decode=op,
        prefill_service=svc,
    )


class Binding(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class Deployment:
    n_prefill: int
    n_decode: int

    def __post_init__(self) -> None:
        if self.n_prefill < 1 or self.n_decode < 1:
            raise ModelInputError("deployment", f"{self.n_prefill}P{self.n_decode}D", "each pool needs >= 1 instance")

    @classmethod
    def parse(cls, text: str) -> Deployment:
        """'3P4D' -> Deployment(3, 4)."""
        t = text.strip().upper()
        try:
            p, rest = t.split("P", 1)
            d = rest.rstrip("D")
            if not rest.endswith("D"):
                raise ValueError
            return cls(int(p), int(d))
        except ValueError:
            raise ModelInputError("evaluate", text, "expected a deployment like 3P4D") from None

    def gpus(self, hw: Hardware) -> int:
        return self.n_prefill * hw.profile.prefill_gpus_per_instance + self.n_decode * hw.profile.decode_gpus_per_instance

    def __str__(self) -> str:
        return f"{self.n_prefill}P{self.n_decode}D"


@dataclass(frozen=True)
class DeploymentCapacity:
    deployment: Deployment
    rate_rps: float
    throughput_tpm: float
    binding: Binding
    prefill_rate_rps: float
    decode_rate_rps: float


def deployment_capacity(dep: Deployment, cap: InstanceCapacity, workload: Workload) -> DeploymentCapacity:
    """Max load of an mPnD fleet meeting both objectives, and which pool binds first."""
    p = dep.n_prefill * cap.prefill_rate_rps
    d = dep.n_decode * cap.decode_rate_rps
    rate = min(p, d)
    return DeploymentCapacity(
        deployment=dep,
        rate_rps=rate,
        throughput_tpm=rate * workload.tokens_per_request * 60.0,
        binding=Binding.PREFILL if p <= d else Binding.DECODE,
        prefill_rate_rps=p,
        decode_rate_rps=d,
    )


def round_count(x: float, rounding: Rounding) -> int:
    # a tiny epsilon keeps 3.0000000001 (float noise) from becoming 4 under ceil
    n = math.ceil(x - 1e-9) if rounding is Rounding.CEIL else math.floor(x + 0.5)
    return max(1, int(n))


@dataclass(frozen=True)
class Plan:
    workload: Workload
    objectives: Objectives
    capacity: InstanceCapacity
    n_prefill_exact: float
    n_decode_exact: float
    deployment: Deployment
    deployment_capacity: DeploymentCapacity
    rounding: Rounding
    predicted_ttft_s: float | None = None
    predicted_tpot_ms: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ratio_pd(self) -> float:
        """eq. 7: R = N_prefill / N_decode = (L_in TP_decode) / (L_out TP_prefill)."""
        return self.n_prefill_exact / self.n_decode_exact if self.n_decode_exact > 0 else math.inf


def predict_at(
    dep: Deployment, cap: InstanceCapacity, workload: Workload, objectives: Objectives, hw: Hardware
) -> tuple[float | None, float | None]:
    """Predicted TTFT (objective's statistic) and TPOT of a deployment at this load; None if overloaded."""
    ttft: float | None = None
    tpot: float | None = None
    per_p = workload.rate_rps / dep.n_prefill
    try:
        ttft = hw.queueing.ttft_s(per_p, cap.prefill_service, objectives.overhead_s, objectives.ttft_quantile)
    except ModelInputError:
        ttft = None
    curve = hw.profile.decode_curve
    if curve is not None and hw.decode_tps_override is None:
        per_d_tps = workload.rate_rps * workload.output_len / dep.n_decode
        t = curve.tpot_ms_at_token_rate(per_d_tps, workload.input_len + workload.output_len / 2.0)
        tpot = None if math.isinf(t) else t
    return ttft, tpot


def plan(
    workload: Workload,
    objectives: Objectives,
    hw: Hardware,
    rounding: Rounding = Rounding.CEIL,
) -> Plan:
    """Size both pools for this load (eq. 5-7), round, and evaluate the rounded fleet."""
    cap = instance_capacity(workload, objectives, hw)
    n_p = workload.rate_rps / cap.prefill_rate_rps
    n_d = workload.rate_rps / cap.decode_rate_rps
    dep = Deployment(round_count(n_p, rounding), round_count(n_d, rounding))
    dcap = deployment_capacity(dep, cap, workload)
    notes: list[str] = []
    if dcap.rate_rps < workload.rate_rps * (1 - 1e-9):
        notes.append(
            f"{rounding.value} rounding gives {dep}, which carries {dcap.throughput_tpm / 1e6:.3g} M TPM: "
            f"below the requested {workload.throughput_tpm / 1e6:.3g} M TPM ({dcap.binding.value} binds)"
        )
    ttft, tpot = predict_at(dep, cap, workload, objectives, hw)
    return Plan(workload, objectives, cap, n_p, n_d, dep, dcap, rounding, ttft, tpot, tuple(notes))


@dataclass(frozen=True)
class BudgetSplit:
    gpus: int
    deployment: Deployment
    capacity: DeploymentCapacity
    gpus_used: int


def best_split(gpus: int, cap: InstanceCapacity, workload: Workload, hw: Hardware) -> BudgetSplit:
    """The mPnD within `gpus` GPUs that carries the most load under both objectives.

    Only maximal fleets are candidates (no pool could take another instance),
    so the split uses the whole budget up to less than one instance's GPUs.
    Ties go to the fleet using more GPUs, then to the better-balanced one.
    """
    gp, gd = hw.profile.prefill_gpus_per_instance, hw.profile.decode_gpus_per_instance
    if not isinstance(gpus, int) or gpus < gp + gd:
        raise ModelInputError("gpus", gpus, f"need at least {gp + gd} GPUs for one prefill ({gp}) and one decode ({gd}) instance")
    cands: set[tuple[int, int]] = set()
    for m in range(1, (gpus - gd) // gp + 1):
        cands.add((m, (gpus - m * gp) // gd))
    for n in range(1, (gpus - gp) // gd + 1):
        cands.add(((gpus - n * gd) // gp, n))

    def key(mn: tuple[int, int]) -> tuple[float, int, float]:
        m, n = mn
        p, d = m * cap.prefill_rate_rps, n * cap.decode_rate_rps
        return (min(p, d), m * gp + n * gd, -abs(p - d))

    m, n = max(cands, key=key)
    dep = Deployment(m, n)
    return BudgetSplit(gpus, dep, deployment_capacity(dep, cap, workload), dep.gpus(hw))
