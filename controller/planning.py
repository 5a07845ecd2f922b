"""Static planning as a service: one request type shared by `pd-controller plan` and `POST /v1/plan`.

`PlanRequest` carries the same inputs as the CLI flags (snake_case). It can be
merged over a config file (flags win), validated, and executed into a JSON-able
result with the keys the CLI's `--json` promises.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from controller.config import Config, ConfigError, format_validation_error
from controller.core.errors import ModelInputError, PdControllerError
from controller.core.prefill import PrefillCurve, QueueModel
from controller.core.profile import Profile
from controller.core.sizing import (
    Deployment,
    Hardware,
    Objectives,
    Plan,
    Rounding,
    Workload,
    best_split,
    deployment_capacity,
    plan,
)
from controller.profiles import load_profile

# Upper bounds on every input: well beyond any real fleet, and they bound the work of one plan
# (best_split enumerates O(gpus) candidates; 1e5 GPUs take a few ms) and keep the math finite.
MAX_GPUS = 100_000
MAX_TOKENS = 10_000_000.0  # per request, input or output (10 M-token contexts)
MAX_RATE_RPS = 10_000_000.0
MAX_TPM = 1e13
MAX_TPS = 1e9  # tokens/s of one instance
MAX_SECONDS = 86_400.0
# quantiles are kept a little inside (0, 1): ln(1/(1-q)) stays finite and meaningful
QUANTILE_MIN, QUANTILE_MAX = 1e-6, 1 - 1e-9


class PlanRequest(BaseModel):
    # floats are finite (1e309 parses as inf; NaN compares false with every bound)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    throughput_tpm: float | None = Field(None, ge=0, le=MAX_TPM)
    rate_rps: float | None = Field(None, ge=0, le=MAX_RATE_RPS)
    input_len: float = Field(..., gt=0, le=MAX_TOKENS)
    output_len: float = Field(..., gt=0, le=MAX_TOKENS)
    input_len_cv: float | None = Field(None, ge=0, le=100, description="input-length coefficient of variation (M/G/1)")
    cache_hit_rate: float = Field(0.0, ge=0, lt=1)
    ttft_s: float = Field(2.0, gt=0, le=MAX_SECONDS)
    ttft_quantile: float | None = Field(None, ge=QUANTILE_MIN, le=QUANTILE_MAX)
    tpot_ms: float = Field(20.0, gt=0, le=MAX_SECONDS * 1000)
    overhead_s: float | None = Field(None, ge=0, le=MAX_SECONDS)
    prefill_max_tps: float | None = Field(None, gt=0, le=MAX_TPS)
    decode_tps: float | None = Field(None, gt=0, le=MAX_TPS)
    profile: str | None = Field(None, max_length=4096)
    prefill_model: Literal["mm1", "md1", "mg1"] = "mm1"
    dp_groups: int | None = Field(None, ge=1, le=1024)
    rounding: Literal["ceil", "nearest"] = "ceil"
    evaluate: str | None = Field(None, max_length=32)
    gpus: int | None = Field(None, ge=2, le=MAX_GPUS)

    @field_validator("evaluate")
    @classmethod
    def _deployment(cls, v: str | None) -> str | None:
        if v is not None:
            d = Deployment.parse(v)  # the one-line "expected a deployment like 3P4D"
            if not (0 <= d.n_prefill <= MAX_GPUS and 0 <= d.n_decode <= MAX_GPUS):
                raise ValueError(f"evaluate={v!r}: at most {MAX_GPUS} instances per pool")
        return v

    @model_validator(mode="after")
    def _check(self) -> PlanRequest:
        if self.throughput_tpm is None and self.rate_rps is None:
            raise ValueError("need the load: throughput_tpm or rate_rps")
        if self.throughput_tpm is not None and self.rate_rps is not None:
            raise ValueError(f"give throughput_tpm={self.throughput_tpm!r} or rate_rps={self.rate_rps!r}, not both")
        if self.profile is None and (self.prefill_max_tps is None or self.decode_tps is None):
            raise ValueError(
                "need a profile, or both prefill_max_tps and decode_tps "
                f"(got prefill_max_tps={self.prefill_max_tps!r}, decode_tps={self.decode_tps!r})"
            )
        return self


def request_from(cfg: Config | None, overrides: dict[str, Any]) -> PlanRequest:
    """Config file values first, then the non-None overrides (CLI flags or JSON body)."""
    merged: dict[str, Any] = {}
    if cfg is not None:
        merged.update(cfg.slo.model_dump(exclude_none=True))
        if cfg.workload is not None:
            merged.update(cfg.workload.model_dump(exclude_none=True))
        if cfg.hardware is not None:
            hw = cfg.hardware.model_dump(exclude_none=True)
            if "profile" in hw:
                hw["profile"] = str(hw["profile"])
            for k in ("prefill_gpus_per_instance", "decode_gpus_per_instance"):
                hw.pop(k, None)
            merged.update(hw)
        merged.update(cfg.plan.model_dump(exclude_none=True))
    given = {k: v for k, v in overrides.items() if v is not None}
    # a load given on the command line replaces the config's, whichever unit it is in
    if "throughput_tpm" in given or "rate_rps" in given:
        merged.pop("throughput_tpm", None)
        merged.pop("rate_rps", None)
    merged.update(given)
    try:
        return PlanRequest.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "plan")) from None


def _input_samples(mean: float, cv: float | None) -> tuple[float, ...]:
    """Lognormal input lengths with this mean and CV (fixed seed: plans are reproducible)."""
    if not cv:
        return ()
    sigma2 = math.log1p(cv * cv)
    mu = math.log(mean) - sigma2 / 2.0
    x = np.random.default_rng(0).lognormal(mu, math.sqrt(sigma2), 4096)
    return tuple(float(v) for v in np.maximum(x, 1.0))


def _profile(ref: str | None, prefill_max_tps: float | None, decode_tps: float | None,
             dp_groups: int | None) -> Profile:
    """The profile file (or the two measured numbers) with the overrides applied."""
    prof: Profile
    if ref is not None:
        prof = load_profile(ref)
    else:
        prof = Profile(name="flags", prefill=PrefillCurve(max_tps=prefill_max_tps), decode_fixed_tps=decode_tps)
    updates: dict[str, Any] = {}
    if prefill_max_tps is not None:
        updates["prefill"] = PrefillCurve(max_tps=prefill_max_tps)
    if dp_groups is not None:
        updates["prefill_dp_groups"] = dp_groups
    if updates:
        prof = Profile(**{**prof.__dict__, **updates})
    return prof


def _objectives(prof: Profile, ttft_s: float, tpot_ms: float, ttft_quantile: float | None,
                overhead_s: float | None) -> Objectives:
    return Objectives(ttft_s, tpot_ms, ttft_quantile, overhead_s if overhead_s is not None else prof.overhead_s)


def build_inputs(req: PlanRequest) -> tuple[Workload, Objectives, Hardware]:
    prof = _profile(req.profile, req.prefill_max_tps, req.decode_tps, req.dp_groups)
    samples = _input_samples(req.input_len, req.input_len_cv)
    if req.throughput_tpm is not None:
        wl = Workload.from_throughput_tpm(
            req.throughput_tpm, req.input_len, req.output_len,
            cache_hit_rate=req.cache_hit_rate, input_len_samples=samples,
        )
    else:
        assert req.rate_rps is not None
        wl = Workload(req.rate_rps, req.input_len, req.output_len, req.cache_hit_rate, samples)
    obj = _objectives(prof, req.ttft_s, req.tpot_ms, req.ttft_quantile, req.overhead_s)
    hw = Hardware(prof, QueueModel(req.prefill_model), req.decode_tps)
    return wl, obj, hw


def objectives_and_hardware(cfg: Config) -> tuple[Objectives, Hardware]:
    """Objectives and hardware of a config, exactly as `plan` builds them, without a workload.

    The live controller measures its load; only the objectives (slo) and the
    hardware (profile and overrides) come from the config.
    """
    hwc = cfg.hardware
    if hwc is None:
        raise ConfigError("hardware: missing: `run` needs a profile (hardware.profile) or prefill_max_tps + decode_tps")
    prof = _profile(str(hwc.profile) if hwc.profile is not None else None, hwc.prefill_max_tps, hwc.decode_tps,
                    hwc.dp_groups)
    slo = cfg.slo
    try:
        obj = _objectives(prof, slo.ttft_s, slo.tpot_ms, slo.ttft_quantile, slo.overhead_s)
    except ModelInputError as e:
        raise ConfigError(f"slo: {e}") from None
    curve = prof.decode_curve
    if curve is not None and hwc.decode_tps is None and slo.tpot_ms < curve.fastest_tpot_ms:
        # below the fastest step no fleet meets the objective, whatever the workload; the controller
        # would only log `infeasible` every tick
        raise ConfigError(
            f"slo.tpot_ms={slo.tpot_ms!r}: profile {prof.name!r} decodes no faster than "
            f"{curve.fastest_tpot_ms:.1f} ms per token (batch {curve.batch[0]:g}, context {curve.context[0]:g}): "
            "no decode instance can meet it; raise slo.tpot_ms (run: --tpot-ms) or choose the profile of faster hardware"
        )
    return obj, Hardware(prof, QueueModel(hwc.prefill_model), hwc.decode_tps)


def _dep_json(d: Any) -> dict[str, Any]:
    return {
        "deployment": str(d.deployment),
        "capacity_tpm": d.throughput_tpm,
        "capacity_rps": d.rate_rps,
        "binding": d.binding.value,
    }


def execute(req: PlanRequest) -> dict[str, Any]:
    """Run the plan (and --evaluate / --gpus) and return the JSON object."""
    wl, obj, hw = build_inputs(req)
    p: Plan = plan(wl, obj, hw, Rounding(req.rounding))
    cap = p.capacity
    out: dict[str, Any] = {
        "profile": hw.profile.name,
        "prefill_model": hw.prefill_model.value,
        "ttft_objective": "mean" if obj.ttft_quantile is None else f"p{obj.ttft_quantile * 100:g}",
        "rate_rps": wl.rate_rps,
        "throughput_tpm": wl.throughput_tpm,
        "prefill_tps_effective": cap.prefill_tps_effective,
        "prefill_max_tps": hw.profile.prefill.max_tps_at(wl.input_len * (1 - wl.cache_hit_rate)),
        "prefill_rate_max_rps": cap.prefill_rate_rps,
        "decode_tps_effective": cap.decode_tps_effective,
        "decode_rate_max_rps": cap.decode_rate_rps,
        "decode_batch": cap.decode.batch,
        "decode_tpot_ms_at_batch": cap.decode.tpot_ms,
        "n_prefill_exact": p.n_prefill_exact,
        "n_decode_exact": p.n_decode_exact,
        "ratio_pd": p.ratio_pd,
        "rounding": p.rounding.value,
        "n_prefill": p.deployment.n_prefill,
        "n_decode": p.deployment.n_decode,
        "gpus": p.deployment.gpus(hw),
        "capacity_tpm": p.deployment_capacity.throughput_tpm,
        "binding": p.deployment_capacity.binding.value,
        "predicted_ttft_s": p.predicted_ttft_s,
        "predicted_tpot_ms": p.predicted_tpot_ms,
        "notes": list(p.notes),
    }
    if req.evaluate is not None:
        dep = Deployment.parse(req.evaluate)
        d = deployment_capacity(dep, cap, wl)
        out["evaluate"] = _dep_json(d) | {"gpus": dep.gpus(hw)}
        out["capacity_tpm"] = d.throughput_tpm
        out["binding"] = d.binding.value
    if req.gpus is not None:
        split = best_split(req.gpus, cap, wl, hw)
        out["split"] = _dep_json(split.capacity) | {
            "gpus": split.gpus,
            "gpus_used": split.gpus_used,
            "n_prefill": split.deployment.n_prefill,
            "n_decode": split.deployment.n_decode,
        }
    return out


def finite_json(x: Any) -> Any:
    """The result as strict JSON values: NaN and infinities (JSON has neither) become null."""
    if isinstance(x, dict):
        return {str(k): finite_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite_json(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str | int):
        return x
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return str(x)


def execute_tagged(req: PlanRequest) -> tuple[str, Any]:
    """`execute` for a worker process: never raises, so nothing but plain data crosses the pipe.

    ("ok", result) | ("invalid", message) for an expected error of the inputs |
    ("error", "TypeName: message") for anything else (a bug: reported in one line).
    """
    try:
        return "ok", finite_json(execute(req))
    except (PdControllerError, ArithmeticError) as e:
        return "invalid", str(e).splitlines()[0][:500] if str(e) else type(e).__name__
    except MemoryError:
        return "error", "MemoryError: the plan exceeded the worker's memory limit"
    except Exception as e:
        return "error", f"{type(e).__name__}: {str(e)[:300]}"


def check_path(p: str | None) -> Path | None:
    if p is None:
        return None
    path = Path(p)
    if not path.exists():
        raise ModelInputError("config", p, "no such file")
    return path
