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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controller.config import Config, ConfigError, format_validation_error
from controller.core.errors import ModelInputError, ProfileError
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


class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    throughput_tpm: float | None = Field(None, ge=0)
    rate_rps: float | None = Field(None, ge=0)
    input_len: float = Field(..., gt=0)
    output_len: float = Field(..., gt=0)
    input_len_cv: float | None = Field(None, ge=0, description="input-length coefficient of variation (M/G/1)")
    cache_hit_rate: float = Field(0.0, ge=0, lt=1)
    ttft_s: float = Field(2.0, gt=0)
    ttft_quantile: float | None = Field(None, gt=0, lt=1)
    tpot_ms: float = Field(20.0, gt=0)
    overhead_s: float | None = Field(None, ge=0)
    prefill_max_tps: float | None = Field(None, gt=0)
    decode_tps: float | None = Field(None, gt=0)
    profile: str | None = None
    prefill_model: Literal["mm1", "md1", "mg1"] = "mm1"
    dp_groups: int | None = Field(None, ge=1)
    rounding: Literal["ceil", "nearest"] = "ceil"
    evaluate: str | None = None
    gpus: int | None = Field(None, ge=2)

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


def build_inputs(req: PlanRequest) -> tuple[Workload, Objectives, Hardware]:
    prof: Profile
    if req.profile is not None:
        prof = load_profile(req.profile)
    else:
        prof = Profile(name="flags", prefill=PrefillCurve(max_tps=req.prefill_max_tps), decode_fixed_tps=req.decode_tps)
    updates: dict[str, Any] = {}
    if req.prefill_max_tps is not None:
        updates["prefill"] = PrefillCurve(max_tps=req.prefill_max_tps)
    if req.dp_groups is not None:
        updates["prefill_dp_groups"] = req.dp_groups
    if updates:
        prof = Profile(**{**prof.__dict__, **updates})
    overhead = req.overhead_s if req.overhead_s is not None else prof.overhead_s
    samples = _input_samples(req.input_len, req.input_len_cv)
    if req.throughput_tpm is not None:
        wl = Workload.from_throughput_tpm(
            req.throughput_tpm, req.input_len, req.output_len,
            cache_hit_rate=req.cache_hit_rate, input_len_samples=samples,
        )
    else:
        assert req.rate_rps is not None
        wl = Workload(req.rate_rps, req.input_len, req.output_len, req.cache_hit_rate, samples)
    obj = Objectives(req.ttft_s, req.tpot_ms, req.ttft_quantile, overhead)
    hw = Hardware(prof, QueueModel(req.prefill_model), req.decode_tps)
    return wl, obj, hw


def _dep_json(d: Any) -> dict[str, Any]:
    return {
        "deployment": str(d.deployment),
        "capacity_tpm": d.throughput_tpm,
        "capacity_rps": d.rate_rps,
        "binding": d.binding.value,
    }


def execute(req: PlanRequest) -> dict[str, Any]:
    """Run the plan (and --evaluate / --gpus) and return the JSON object."""
    try:
        wl, obj, hw = build_inputs(req)
        p: Plan = plan(wl, obj, hw, Rounding(req.rounding))
    except ProfileError:
        raise
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


def check_path(p: str | None) -> Path | None:
    if p is None:
        return None
    path = Path(p)
    if not path.exists():
        raise ModelInputError("config", p, "no such file")
    return path
