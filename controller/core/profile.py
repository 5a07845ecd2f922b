"""Hardware/model profiles: what one prefill and one decode instance can do.

A profile is plain data (parsed here from a dict; the YAML file is read by the
shell in `controller.profiles`). Errors name the field path and the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.core.decode import DecodeProfile
from controller.core.errors import ModelInputError, ProfileError
from controller.core.prefill import PrefillCurve

SCHEMA = "pd-controller/profile/v1"


@dataclass(frozen=True)
class KvTransfer:
    """P->D KV-cache transfer time: base + per_token * input tokens (seconds)."""

    base_s: float = 0.0
    per_token_s: float = 0.0

    def time_s(self, input_tokens: float) -> float:
        return self.base_s + self.per_token_s * input_tokens


@dataclass(frozen=True)
class Profile:
    name: str
    prefill: PrefillCurve
    decode_curve: DecodeProfile | None = None
    decode_fixed_tps: float | None = None
    decode_fixed_at_tpot_ms: float | None = None
    prefill_gpus_per_instance: int = 1
    decode_gpus_per_instance: int = 1
    prefill_dp_groups: int = 1
    overhead_s: float = 0.0
    kv_transfer: KvTransfer = field(default_factory=KvTransfer)
    model: str = ""
    hardware: str = ""
    tensor_parallel: int = 1
    source: str = ""
    license: str = ""
    notes: str = ""
    # Optional facts for `profile check` (absent in older profiles): memory of one GPU, and the KV bytes
    # one token takes across a whole decode instance (all its GPUs together).
    gpu_memory_gib: float | None = None
    kv_bytes_per_token: float | None = None

    def __post_init__(self) -> None:
        if self.decode_curve is None and self.decode_fixed_tps is None:
            raise ProfileError(f"profile {self.name!r}: decode needs either a tpot_ms grid or a measured tps")


def _num(d: Mapping[str, Any], key: str, path: str, *, positive: bool = True, default: Any = ...) -> float:
    if key not in d:
        if default is ...:
            raise ProfileError(f"{path}.{key}: missing")
        return float(default)
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise ProfileError(f"{path}.{key}={v!r}: not a finite number")
    if positive and float(v) <= 0:
        raise ProfileError(f"{path}.{key}={v!r}: must be positive")
    if not positive and float(v) < 0:
        raise ProfileError(f"{path}.{key}={v!r}: must be non-negative")
    return float(v)


def _num_list(d: Mapping[str, Any], key: str, path: str) -> tuple[float, ...]:
    return _floats(d.get(key), f"{path}.{key}")


def _floats(v: Any, path: str) -> tuple[float, ...]:
    if not isinstance(v, list) or not v:
        raise ProfileError(f"{path}={v!r}: must be a non-empty list of numbers")
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(float(x)):
            raise ProfileError(f"{path}[{i}]={x!r}: not a finite number")
        out.append(float(x))
    return tuple(out)


def _int(d: Mapping[str, Any], key: str, path: str, default: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ProfileError(f"{path}.{key}={v!r}: must be an integer >= 1")
    return int(v)


def profile_from_dict(raw: Any, origin: str = "profile") -> Profile:
    """Build and validate a Profile from parsed YAML/JSON."""
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{origin}: expected a mapping at top level, got {type(raw).__name__}")
    schema = raw.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise ProfileError(f"{origin}: schema={schema!r}: expected {SCHEMA!r}")
    pre = raw.get("prefill")
    dec = raw.get("decode")
    if not isinstance(pre, Mapping):
        raise ProfileError(f"{origin}.prefill={pre!r}: missing or not a mapping")
    if not isinstance(dec, Mapping):
        raise ProfileError(f"{origin}.decode={dec!r}: missing or not a mapping")
    tp = _int(raw, "tensor_parallel", origin, 1)
    try:
        if "max_tps" in pre:
            curve = PrefillCurve(max_tps=_num(pre, "max_tps", f"{origin}.prefill"))
        else:
            curve = PrefillCurve(
                input_len=_num_list(pre, "input_len", f"{origin}.prefill"),
                time_ms=_num_list(pre, "time_ms", f"{origin}.prefill"),
            )
    except ModelInputError as e:
        raise ProfileError(f"{origin}.{e.quantity}={e.value!r}: {e.why}") from None
    decode_curve = None
    fixed_tps = None
    fixed_at = None
    if "tps" in dec:
        fixed_tps = _num(dec, "tps", f"{origin}.decode")
        fixed_at = _num(dec, "at_tpot_ms", f"{origin}.decode") if "at_tpot_ms" in dec else None
    if "tpot_ms" in dec:
        grid = dec["tpot_ms"]
        if not isinstance(grid, list) or not grid or not all(isinstance(r, list) for r in grid):
            raise ProfileError(f"{origin}.decode.tpot_ms={grid!r}: must be a list of rows (one per context)")
        rows = tuple(_floats(r, f"{origin}.decode.tpot_ms[{i}]") for i, r in enumerate(grid))
        kv = dec.get("kv_capacity_tokens")
        decode_curve = DecodeProfile(
            batch=_num_list(dec, "batch", f"{origin}.decode"),
            context=_num_list(dec, "context", f"{origin}.decode"),
            tpot_ms=rows,
            kv_capacity_tokens=None if kv is None else _num(dec, "kv_capacity_tokens", f"{origin}.decode"),
        )
    if decode_curve is None and fixed_tps is None:
        raise ProfileError(f"{origin}.decode: needs either tpot_ms (with batch and context) or tps")
    kv_raw = raw.get("kv_transfer", {}) or {}
    if not isinstance(kv_raw, Mapping):
        raise ProfileError(f"{origin}.kv_transfer={kv_raw!r}: not a mapping")
    return Profile(
        name=str(raw.get("name", origin)),
        prefill=curve,
        decode_curve=decode_curve,
        decode_fixed_tps=fixed_tps,
        decode_fixed_at_tpot_ms=fixed_at,
        prefill_gpus_per_instance=_int(pre, "gpus_per_instance", f"{origin}.prefill", tp),
        decode_gpus_per_instance=_int(dec, "gpus_per_instance", f"{origin}.decode", tp),
        prefill_dp_groups=_int(pre, "dp_groups", f"{origin}.prefill", 1),
        overhead_s=_num(raw, "overhead_s", origin, positive=False, default=0.0),
        kv_transfer=KvTransfer(
            base_s=_num(kv_raw, "base_s", f"{origin}.kv_transfer", positive=False, default=0.0),
            per_token_s=_num(kv_raw, "per_token_s", f"{origin}.kv_transfer", positive=False, default=0.0),
        ),
        model=str(raw.get("model", "")),
        hardware=str(raw.get("hardware", "")),
        tensor_parallel=tp,
        source=str(raw.get("source", "")),
        license=str(raw.get("license", "")),
        notes=str(raw.get("notes", "")),
        gpu_memory_gib=_num(raw, "gpu_memory_gib", origin) if "gpu_memory_gib" in raw else None,
        kv_bytes_per_token=(
            _num(dec, "kv_bytes_per_token", f"{origin}.decode") if "kv_bytes_per_token" in dec else None
        ),
    )


# GiB of memory per GPU, for hardware names that do not say it ("h100-80gb" does; "h200" alone does not).
GPU_MEMORY_GIB = {"a100": 80.0, "h100": 80.0, "h200": 141.0, "h20": 96.0, "b200": 180.0, "b300": 288.0,
                  "gb200": 186.0, "gb300": 288.0, "l40s": 48.0}


def gpu_memory_gib(profile: Profile) -> float | None:
    """The profile's own figure, else NN from a `...-NNgb` hardware name, else the table by GPU family."""
    if profile.gpu_memory_gib is not None:
        return profile.gpu_memory_gib
    hw = profile.hardware.lower()
    for part in hw.replace("_", "-").split("-"):
        if part.endswith("gb") and part[:-2].isdigit():
            return float(part[:-2])
    for family in sorted(GPU_MEMORY_GIB, key=len, reverse=True):
        if hw.startswith(family):
            return GPU_MEMORY_GIB[family]
    return None


def sanity_problems(profile: Profile) -> list[str]:
    """What a loadable profile still gets wrong, one line each (`note: ...` lines are not errors).

    Loading already enforces positive, monotone curves (TPOT non-decreasing in batch and in context,
    prefill time non-decreasing in input length). On top of that:
    - context dependence: a decode step reads every running sequence's KV, so at the largest batch TPOT
      must grow from each context row to the next; identical rows mean the grid lost its context axis;
    - prefill throughput L/t(L) must not fall as L grows up to the knee (a curve flat in time is a
      floor, fine), so only a falling time is an error, already caught at load;
    - KV capacity: capacity tokens x KV bytes per token must fit in the instance's GPU memory, and
      the capacity must hold at least one sequence at the grid's smallest context.
    """
    out: list[str] = []
    d = profile.decode_curve
    if d is None:
        out.append("note: decode is a fixed operating point (no TPOT grid): batch and context dependence not checked")
        return out
    col = [row[-1] for row in d.tpot_ms]
    for i in range(len(d.context) - 1):
        if col[i + 1] <= col[i]:
            out.append(
                f"decode.tpot_ms: no context dependence at batch {d.batch[-1]:g}: context {d.context[i]:g} -> "
                f"{col[i]:g} ms, context {d.context[i + 1]:g} -> {col[i + 1]:g} ms (a step reads every sequence's KV)"
            )
    if len(d.context) < 2:
        out.append("note: decode grid has one context row: TPOT cannot grow with context")
    if d.kv_capacity_tokens is None:
        out.append("note: decode.kv_capacity_tokens absent: KV capacity not checked")
        return out
    if d.kv_capacity_tokens < d.context[0]:
        out.append(
            f"decode.kv_capacity_tokens={d.kv_capacity_tokens:g}: below the smallest grid context {d.context[0]:g}"
        )
    mem = gpu_memory_gib(profile)
    if mem is None or profile.kv_bytes_per_token is None:
        missing = "gpu memory" if mem is None else "decode.kv_bytes_per_token"
        out.append(f"note: {missing} unknown: KV capacity checked only against the grid")
        return out
    kv_gib = d.kv_capacity_tokens * profile.kv_bytes_per_token / 2**30
    total = mem * profile.decode_gpus_per_instance
    if kv_gib > total:
        out.append(
            f"decode.kv_capacity_tokens={d.kv_capacity_tokens:g}: needs {kv_gib:.0f} GiB of KV "
            f"({profile.kv_bytes_per_token:g} B/token), more than the instance's {total:.0f} GiB "
            f"({profile.decode_gpus_per_instance} x {mem:g} GiB)"
        )
    return out
