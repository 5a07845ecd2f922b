"""Scenario files: one simulated experiment as typed, validated data (`configs/scenarios/*.yaml`).

A scenario names its traffic (segments played one after another: a real trace,
optionally windowed and rate/time scaled, or a generator built from a real
trace's length distribution), the profile, the objectives, the mode (elastic
or a fixed GPU budget), the flip and cold-start times and a seed. Errors name
the file and the field: `configs/scenarios/x.yaml: objectives.ttft_s=-1: ...`.

Generators (arrival processes on top of resampled real (input, output) pairs):
- `gamma`: a renewal process with Gamma inter-arrival times of the given
  coefficient of variation (CV > 1 is burstier than Poisson; production studies
  measure CV 1-4 for LLM serving), at a constant mean rate.
- `ramp`: a slow triangle: the rate rises linearly from `rate_rps` to
  `peak_rps` over the first half and falls back over the second half; arrivals
  are the Gamma renewal process run on the integrated rate (time change), so
  CV applies here too (1 = Poisson).
"""

from __future__ import annotations

import fnmatch
import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from controller.config import ConfigError, format_validation_error, load_yaml
from controller.core.control import ControlParams, ControlSpec, Mode
from controller.core.errors import PdControllerError
from controller.core.prefill import QueueModel
from controller.core.sizing import Hardware, Objectives
from controller.profiles import load_profile
from controller.sim.fleet import SimConfig
from controller.sim.policies import SimContext
from controller.sim.traces import MOONCAKE_BLOCK_TOKENS, Trace, TraceError, load_trace, splice

REPO = Path(__file__).resolve().parents[2]
SCENARIOS_DIR = REPO / "configs" / "scenarios"
# a scenario may not ask for more than this many simulated requests (the matrix must fit its time budget;
# a typo such as rate_scale: 600 should fail here, not after an hour of simulation)
MAX_REQUESTS = 400_000


class ScenarioError(PdControllerError, ValueError):
    """A scenario file is malformed; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class TraceSegment(_Strict):
    """A real trace file, optionally cut to [start_s, end_s) of its own time, then scaled."""

    trace: Path
    format: Literal["auto", "azure", "mooncake", "generic"] = "auto"
    start_s: NonNegFloat = 0.0
    end_s: PosFloat | None = None
    time_scale: PosFloat = 1.0  # >1 stretches time (rate / factor), applied after the cut
    rate_scale: PosFloat = 1.0  # superposed shifted copies, duration kept
    # truncate longer prompts (as a server with --allow-auto-truncate does): Mooncake's 100k-token inputs
    # exceed what the 4k-context Llama-2-70B profiles were measured at, and no TTFT of a few seconds holds them
    max_input_tokens: Annotated[int, Field(ge=16)] | None = None

    @model_validator(mode="after")
    def _window(self) -> TraceSegment:
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s={self.end_s} must be > start_s={self.start_s}")
        return self


class GeneratorKind(StrEnum):
    GAMMA = "gamma"
    RAMP = "ramp"


class GeneratorSegment(_Strict):
    """Synthetic arrivals with (input, output) pairs resampled from a real trace."""

    generator: GeneratorKind
    lengths_from: Path
    format: Literal["auto", "azure", "mooncake", "generic"] = "auto"
    duration_s: Annotated[float, Field(gt=0, le=86400, allow_inf_nan=False)]
    rate_rps: PosFloat  # gamma: the mean rate; ramp: the rate at both ends
    peak_rps: PosFloat | None = None  # ramp: the rate at the middle
    cv: Annotated[float, Field(gt=0, le=20, allow_inf_nan=False)] = 1.0  # inter-arrival coefficient of variation

    @model_validator(mode="after")
    def _peak(self) -> GeneratorSegment:
        if self.generator is GeneratorKind.RAMP and self.peak_rps is None:
            raise ValueError("peak_rps: a ramp needs its peak rate")
        if self.generator is GeneratorKind.GAMMA and self.peak_rps is not None:
            raise ValueError(f"peak_rps={self.peak_rps}: only a ramp has a peak")
        return self


def _segment_kind(v: Any) -> str:
    # a mapping with `generator` is a generator segment, anything else a trace segment: errors then name
    # the fields of the one the user meant, not of both members of the union
    if isinstance(v, dict):
        return "generator" if "generator" in v else "file"
    return "generator" if isinstance(v, GeneratorSegment) else "file"


Segment = Annotated[
    Annotated[TraceSegment, Tag("file")] | Annotated[GeneratorSegment, Tag("generator")],
    Discriminator(_segment_kind),
]


class ObjectivesSpec(_Strict):
    ttft_s: Annotated[float, Field(gt=0, le=600, allow_inf_nan=False)]
    ttft_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.99
    tpot_ms: Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False)]
    attainment_target: Annotated[float, Field(gt=0, lt=1)] = 0.99


class Scenario(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,80}$")]
    description: str = ""
    tags: tuple[Annotated[str, Field(pattern=r"^[a-z0-9-]{1,40}$")], ...] = ()  # e.g. mix-shift (fixed-budget target)
    traffic: Annotated[list[Segment], Field(min_length=1, max_length=16)]
    seed: Annotated[int, Field(ge=0)] = 0
    profile: str
    objectives: ObjectivesSpec
    mode: Mode = Mode.ELASTIC
    gpus: Annotated[int, Field(gt=0, le=100_000)] | None = None  # fixed: the budget; elastic: optional cap
    flip_time_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 30.0
    cold_start_s: Annotated[float, Field(ge=0, le=7200, allow_inf_nan=False)] = 300.0
    router: Literal["least-load", "round-robin"] = "least-load"
    decode_max_running: Annotated[int, Field(ge=0)] = 0  # smg decode admission gate per worker; 0 = none
    max_per_pool: Annotated[int, Field(ge=1, le=256)] = 64  # elastic bound, and the references' search bound
    oracle_window_s: Annotated[float, Field(ge=30, le=3600, allow_inf_nan=False)] = 300.0

    @model_validator(mode="after")
    def _mode(self) -> Scenario:
        if self.mode is Mode.FIXED and self.gpus is None:
            raise ValueError("gpus: a fixed-budget scenario needs its GPU budget")
        return self


def _err(path: Path, e: ValidationError) -> ScenarioError:
    return ScenarioError(format_validation_error(e, str(path)))


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file; every error is one line naming the file and field."""
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(f"scenario={str(path)!r}: no such file")
    try:
        raw = load_yaml(p)
    except ConfigError as e:
        raise ScenarioError(str(e)) from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{p}: expected a mapping at top level, got {type(raw).__name__}")
    try:
        sc = Scenario.model_validate(raw)
    except ValidationError as e:
        raise _err(p, e) from None
    if p.stem != sc.name:
        raise ScenarioError(f"{p}: name={sc.name!r}: must match the file name {p.stem!r}")
    return sc


def find_scenarios(patterns: list[str] | None = None, directory: Path = SCENARIOS_DIR) -> list[Path]:
    """Scenario files by name glob (`azure-*`) or path; all of `directory` without patterns."""
    files = sorted(directory.glob("*.yaml"))
    if not patterns:
        return files
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.suffix in (".yaml", ".yml") and p.is_file():
            hits = [p]
        else:
            hits = [f for f in files if fnmatch.fnmatch(f.stem, pat)]
        if not hits:
            raise ScenarioError(f"scenario={pat!r}: no scenario file matches (in {directory})")
        out.extend(h for h in hits if h not in out)
    return out


def _resolve(p: Path, base: Path) -> Path:
    if p.is_absolute():
        return p
    for root in (base, REPO):
        if (root / p).exists():
            return root / p
    return REPO / p


_TRACE_CACHE: dict[tuple[str, str], Trace] = {}


def _load(path: Path, fmt: str) -> Trace:
    key = (str(path), fmt)
    if key not in _TRACE_CACHE:
        _TRACE_CACHE[key] = load_trace(path, fmt)
    return _TRACE_CACHE[key]


def _gamma_arrivals(rng: np.random.Generator, cv: float, horizon: float) -> np.ndarray:
    """Unit-rate renewal process with Gamma(k = 1/cv^2, scale = cv^2) gaps, on [0, horizon)."""
    k = 1.0 / (cv * cv)
    n = int(horizon * 1.2 + 10 * math.sqrt(horizon) * max(cv, 1.0) + 100)
    t = np.cumsum(rng.gamma(k, 1.0 / k, size=n))
    while t[-1] < horizon:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.gamma(k, 1.0 / k, size=n))])
    # a random phase, so the process is stationary from t = 0 (not renewed exactly at 0)
    return t[t < horizon]


def generate(seg: GeneratorSegment, lengths: Trace, rng: np.random.Generator) -> Trace:
    """Arrivals of the generator; (input, output) pairs drawn with replacement from `lengths`."""
    d = seg.duration_s
    if seg.generator is GeneratorKind.GAMMA:
        arr = _gamma_arrivals(rng, seg.cv, seg.rate_rps * d) / seg.rate_rps
    else:
        # triangle rate r(t): base -> peak at d/2 -> base; Lambda(t) = integral of r; invert piecewise
        assert seg.peak_rps is not None
        r0, r1, h = seg.rate_rps, seg.peak_rps, d / 2.0
        lam_half = h * (r0 + r1) / 2.0
        u = _gamma_arrivals(rng, seg.cv, 2.0 * lam_half)
        a = (r1 - r0) / h  # slope of the rise
        first = u <= lam_half
        # rise: r0 t + a t^2 / 2 = u  ->  t = (-r0 + sqrt(r0^2 + 2 a u)) / a
        t1 = (-r0 + np.sqrt(r0 * r0 + 2 * a * u[first])) / a if a != 0 else u[first] / r0
        # fall (mirror): time from the end s with r0 s + a s^2 / 2 = 2 lam_half - u
        rest = 2.0 * lam_half - u[~first]
        s = (-r0 + np.sqrt(r0 * r0 + 2 * a * rest)) / a if a != 0 else rest / r0
        arr = np.sort(np.concatenate([t1, d - s]))
    if arr.size == 0:
        raise ScenarioError(f"generator {seg.generator.value}: rate_rps={seg.rate_rps} over {d:g} s gives no request")
    pick = rng.integers(0, len(lengths), size=arr.size)
    name = f"{seg.generator.value}-cv{seg.cv:g}({lengths.name})"
    # cached tokens: the source's if known (Azure: 0); Mooncake's hash-decided hits cannot be resampled
    cached = np.maximum(lengths.cached_tokens[pick], 0)
    return Trace(name, arr.astype(np.float64), lengths.input_tokens[pick], lengths.output_tokens[pick], cached)


def truncate_inputs(tr: Trace, cap: int) -> Trace:
    """Prompts longer than `cap` tokens keep their first `cap` (and the prefix blocks covering them)."""
    inp = np.minimum(tr.input_tokens, cap)
    cached = np.where(tr.cached_tokens >= 0, np.minimum(tr.cached_tokens, np.maximum(inp - 1, 0)), tr.cached_tokens)
    hashes = None
    if tr.hash_ids is not None:
        nb = -(-cap // MOONCAKE_BLOCK_TOKENS)
        hashes = tuple(h[:nb] for h in tr.hash_ids)
    return Trace(tr.name, tr.arrival_s, inp, tr.output_tokens, cached, hashes)


def _bound(sc: Scenario, k: int, n: float) -> None:
    if n > MAX_REQUESTS:
        raise ScenarioError(f"{sc.name}: traffic.{k}: {n:.3g} requests: above the matrix bound of {MAX_REQUESTS}")


def build_trace(sc: Scenario, base: Path = REPO) -> Trace:
    rng = np.random.default_rng(sc.seed)
    parts: list[Trace] = []
    for k, seg in enumerate(sc.traffic):
        if isinstance(seg, TraceSegment):
            tr = _load(_resolve(seg.trace, base), seg.format)
            if seg.start_s > 0 or seg.end_s is not None:
                tr = tr.window(seg.start_s, seg.end_s if seg.end_s is not None else math.inf)
                if len(tr) == 0:
                    raise ScenarioError(f"{sc.name}: traffic.{k}: start_s={seg.start_s}, end_s={seg.end_s}: no request")
            if seg.max_input_tokens is not None:
                tr = truncate_inputs(tr, seg.max_input_tokens)
            if seg.time_scale != 1.0:
                tr = tr.time_scaled(seg.time_scale)
            if seg.rate_scale != 1.0:
                _bound(sc, k, len(tr) * seg.rate_scale)  # before building the copies, not after
                tr = tr.rate_scaled(seg.rate_scale, seed=sc.seed + k)
        else:
            mean = seg.rate_rps if seg.peak_rps is None else (seg.rate_rps + seg.peak_rps) / 2.0
            _bound(sc, k, mean * seg.duration_s)
            tr = generate(seg, _load(_resolve(seg.lengths_from, base), seg.format), rng)
        parts.append(tr)
    tr = splice(parts)
    if len(tr) > MAX_REQUESTS:
        raise ScenarioError(f"{sc.name}: traffic: {len(tr)} requests: above the matrix bound of {MAX_REQUESTS}")
    return Trace(sc.name, tr.arrival_s, tr.input_tokens, tr.output_tokens, tr.cached_tokens, tr.hash_ids)


def build(sc: Scenario, base: Path = REPO, params: dict[str, Any] | None = None) -> tuple[SimContext, SimConfig]:
    """The simulator context of a scenario (the controller's default parameters unless `params`)."""
    try:
        prof = load_profile(sc.profile)
    except PdControllerError as e:
        raise ScenarioError(f"{sc.name}: profile={sc.profile!r}: {e}") from None
    try:
        tr = build_trace(sc, base)
    except TraceError as e:
        raise ScenarioError(f"{sc.name}: traffic: {e}") from None
    gpi = max(prof.prefill_gpus_per_instance, prof.decode_gpus_per_instance)
    if sc.mode is Mode.FIXED and sc.gpus is not None and sc.gpus < 2 * gpi:
        raise ScenarioError(f"{sc.name}: gpus={sc.gpus}: need at least {2 * gpi} (one {gpi}-GPU instance per pool)")
    kw: dict[str, Any] = dict(
        mode=sc.mode, gpus=sc.gpus, flip_time_s=sc.flip_time_s, cold_start_s=sc.cold_start_s,
        max_prefill=sc.max_per_pool, max_decode=sc.max_per_pool,
    )
    kw.update(params or {})
    o = sc.objectives
    try:
        cp = ControlParams(**kw)
        obj = Objectives(o.ttft_s, o.tpot_ms, o.ttft_quantile, prof.overhead_s)
        spec = ControlSpec(obj, Hardware(prof, QueueModel.MG1), cp)
    except PdControllerError as e:
        raise ScenarioError(f"{sc.name}: {e}") from None
    ctx = SimContext(tr, spec, sc.mode, spec.budget_instances() if sc.mode is Mode.FIXED else None)
    sim = SimConfig(flip_time_s=sc.flip_time_s, cold_start_s=sc.cold_start_s, router=sc.router,
                    decode_max_running=sc.decode_max_running)
    return ctx, sim
