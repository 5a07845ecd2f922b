"""One typed configuration, validated at start.

Units are in field names. A bad value fails with a message that names the
field path and quotes the value (see `format_validation_error`).
Sections are added here as capabilities land; each is optional with defaults
except where a value has no sensible default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
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


class Config(_Section):
    """The whole configuration file."""

    slo: SloConfig = SloConfig()
    workload: WorkloadConfig | None = None
    hardware: HardwareConfig | None = None
    plan: PlanConfig = PlanConfig()


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: `origin: slo.ttft_s=-1: Input should be greater than 0`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("missing",):
            parts.append(f"{origin}: {loc}: missing")
        elif "input" in e and e["type"] not in ("value_error",) and not isinstance(e["input"], dict):
            parts.append(f"{origin}: {loc}={e['input']!r}: {msg}")
        else:
            parts.append(f"{origin}: {loc}: {msg}")
    return "; ".join(parts)


def load_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None


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
