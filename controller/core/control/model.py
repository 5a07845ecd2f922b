"""The model target: fractional and integer pool sizes for a forecast load, from the pure models.

Uses `sizing.instance_capacity` (prefill queueing under the TTFT objective,
decode operating point B* under TPOT) and `sizing.predict_at`; nothing here
re-derives their math. Two additions:

- calibration scales: the profile's prefill curve and TPOT grid are scaled
  by the fitted factors before sizing;
- a decode margin: the batch on one decode instance fluctuates around its
  mean (requests in service form an M/G/inf-like population, roughly Poisson),
  so the pool is sized for a mean batch B with B + z*sqrt(B) <= B*: at the
  mean the TPOT objective then holds with z standard deviations to spare.

Instance capacity depends on the traffic's shape, not its rate, so it is
memoized on a quantized shape (input quantiles on a 4% grid, output length,
cache hit rate, calibration scales).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache

import numpy as np

from controller.core.control.params import ControlSpec
from controller.core.control.types import ModelTarget
from controller.core.decode import DecodeProfile
from controller.core.pooled import pooled_max_rate_rps, pooled_need, pooled_ttft_s
from controller.core.prefill import PrefillCurve, ServiceTime
from controller.core.sizing import (
    Deployment,
    Hardware,
    InstanceCapacity,
    Workload,
    instance_capacity,
    predict_at,
)


def _q(x: float, steps_per_octave: int = 16) -> float:
    return float(2.0 ** (round(math.log2(max(x, 1e-9)) * steps_per_octave) / steps_per_octave))


@lru_cache(maxsize=64)
def calibrated_hardware(hw: Hardware, prefill_scale: float, tpot_scale: float) -> Hardware:
    """The hardware with the prefill curve's time scaled by prefill_scale and TPOT by tpot_scale."""
    if prefill_scale == 1.0 and tpot_scale == 1.0:
        return hw
    prof = hw.profile
    pc = prof.prefill
    if pc.max_tps is not None:
        curve = PrefillCurve(max_tps=pc.max_tps / prefill_scale)
    else:
        curve = PrefillCurve(input_len=pc.input_len, time_ms=tuple(t * prefill_scale for t in pc.time_ms))
    dc = prof.decode_curve
    if dc is not None and tpot_scale != 1.0:
        dc = DecodeProfile(dc.batch, dc.context, tuple(tuple(v * tpot_scale for v in row) for row in dc.tpot_ms),
                           dc.kv_capacity_tokens)
    fixed = prof.decode_fixed_tps / tpot_scale if prof.decode_fixed_tps is not None else None
    return replace(hw, profile=replace(prof, prefill=curve, decode_curve=dc, decode_fixed_tps=fixed))


@lru_cache(maxsize=512)
def _capacity(spec: ControlSpec, shape: Shape, ks: tuple[float, float]) -> tuple[InstanceCapacity, float, float | None]:
    input_mean, output_len, hit, samples = shape
    hw = calibrated_hardware(spec.hardware, ks[0], ks[1])
    wl = Workload(1.0, input_mean, output_len, hit, samples)
    cap = instance_capacity(wl, spec.objectives, hw)
    decode_rate = cap.decode_rate_rps
    b_target: float | None = float(cap.decode.batch) if cap.decode.batch is not None else None
    curve = hw.profile.decode_curve
    z = spec.params.decode_margin_z
    if curve is not None and cap.decode.batch is not None and hw.decode_tps_override is None and z > 0:
        b_star = float(cap.decode.batch)
        # B + z sqrt(B) = B*  =>  sqrt(B) = (-z + sqrt(z^2 + 4 B*)) / 2
        root = (-z + math.sqrt(z * z + 4.0 * b_star)) / 2.0
        b_eff = max(root * root, 1.0)
        ctx = input_mean + output_len / 2.0
        decode_rate = min(decode_rate, curve.tps_at(b_eff, ctx) / output_len)
        b_target = b_eff
    return cap, decode_rate, b_target


Shape = tuple[float, float, float, tuple[float, ...]]


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def sticky_shape(previous: Shape | None, new: Shape, rel: float = 0.05) -> Shape:
    """Keep the previous shape while the new one is within `rel` of it (means, spread, hit rate).

    Capacity depends only on the shape, so a sticky shape lets the memo hit
    on almost every tick; the shape still follows any real change beyond 5%.
    """
    if previous is None:
        return new
    pm, po, ph, ps = previous
    nm, no, nh, ns = new
    if not (ps and ns) or len(ps) != len(ns):
        return new
    spread_p = float(np.std(ps)) / max(float(np.mean(ps)), 1e-9)
    spread_n = float(np.std(ns)) / max(float(np.mean(ns)), 1e-9)
    if (_close(pm, nm, rel) and _close(po, no, rel) and abs(ph - nh) <= 0.02
            and abs(spread_p - spread_n) <= 2 * rel and _close(ps[-1], ns[-1], 4 * rel)):
        return previous
    return new


def workload_shape(input_len_mean: float, output_len_mean: float, cache_hit_rate: float,
                   input_samples: tuple[float, ...]) -> Shape:
    return (_q(input_len_mean), _q(output_len_mean), round(cache_hit_rate, 2), input_samples)


def _with_arrival_scv(svc: ServiceTime, arrival_scv: float) -> ServiceTime:
    """The service time whose Allen-Cunneen factor (1 + SCV') / 2 equals (c_a^2 + SCV) / 2.

    The pooled model's wait tail has rate (c/E[S] - lambda) * 2 / (1 + SCV); raising the second moment by
    E[S]^2 (c_a^2 - 1) turns it into GI/G/c's without touching the mean or the samples the sojourn is
    convolved with. c_a^2 is put on a 1/8 grid so the memoized queueing answers repeat.
    """
    ca2 = round(arrival_scv * 8.0) / 8.0
    if ca2 <= 1.0:
        return svc
    return ServiceTime(svc.mean_s, svc.second_moment_s2 + svc.mean_s ** 2 * (ca2 - 1.0), svc.samples_s)


@lru_cache(maxsize=256)
def _predict(spec: ControlSpec, shape: Shape, ks: tuple[float, float], ip: int, idd: int,
             rate_q: float) -> tuple[float | None, float | None]:
    cap, _, _ = _capacity(spec, shape, ks)
    hw = calibrated_hardware(spec.hardware, ks[0], ks[1])
    wl = Workload(rate_q, shape[0], shape[1], shape[2], shape[3])
    return predict_at(Deployment(ip, idd), cap, wl, spec.objectives, hw)


def model_target(
    spec: ControlSpec,
    rate_rps: float,
    input_len_mean: float,
    output_len_mean: float,
    cache_hit_rate: float,
    input_samples: tuple[float, ...],
    prefill_scale: float = 1.0,
    tpot_scale: float = 1.0,
    decode_rate_rps: float | None = None,
    at: tuple[int, int] | None = None,
    arrival_scv: float = 1.0,
    utilization_rate_rps: float | None = None,
) -> ModelTarget:
    """Pool sizes for `rate_rps` of this shape. Raises InfeasibleError if no instance meets the objectives.

    `arrival_scv`: the arrivals' variability c_a^2 (1 = Poisson); the pooled prefill wait is scaled by
    (c_a^2 + c_s^2) / (1 + c_s^2), M/G/c -> GI/G/c (Allen-Cunneen).
    `utilization_rate_rps`: the rate the prefill busy-share cap applies to (default `rate_rps`). The cap
    is a margin for the queueing model's error near saturation at the load served; a forecast maximum
    already carries its own margin for growth, and the cap on top of it would count both (the pooled
    model alone must still hold the objective at `rate_rps`).
    """
    shape = workload_shape(input_len_mean, output_len_mean, cache_hit_rate, input_samples)
    ks = (_q(prefill_scale, 50), _q(tpot_scale, 50))  # ~1.4% grid: memo hits while calibration drifts
    cap, decode_rate, b_target = _capacity(spec, shape, ks)
    q = spec.hardware.queueing
    obj = spec.objectives
    svc = _with_arrival_scv(cap.prefill_service.for_model(q.model), arrival_scv)
    util_rate = rate_rps if utilization_rate_rps is None else min(utilization_rate_rps, rate_rps)
    cap_u = spec.params.max_prefill_utilization
    util_need = util_rate * svc.mean_s / cap_u
    if spec.params.prefill_pooled:
        n_p = max(pooled_need(rate_rps, svc, obj.ttft_budget_s, obj.ttft_quantile, q.dp_groups), util_need)
        k = max(1, math.ceil(n_p - 1e-9))
        group = svc.scaled(float(q.dp_groups)) if q.dp_groups > 1 else svc
        per_instance = pooled_max_rate_rps(k * q.dp_groups, group, obj.ttft_budget_s, obj.ttft_quantile) / k
    else:
        per_instance = min(cap.prefill_rate_rps, cap_u / svc.mean_s)
        n_p = max(rate_rps / cap.prefill_rate_rps, util_need)
    n_p_capped = max(n_p, rate_rps * svc.mean_s / cap_u)
    # decode may be sized for a higher (peak) rate than prefill: it has no queue to absorb bursts
    n_d = max(rate_rps, decode_rate_rps or 0.0) / decode_rate
    ip = max(1, math.ceil(n_p - 1e-9))
    idd = max(1, math.ceil(n_d - 1e-9))
    # predictions at the integer fleet, or at `at` (rate on a ~5% grid: diagnostics only, memoized)
    fp, fd = at if at is not None else (ip, idd)
    ttft, tpot = _predict(spec, shape, ks, fp, fd, _q(rate_rps, 14)) if rate_rps > 0 else (None, None)
    if spec.params.prefill_pooled and rate_rps > 0:
        t = pooled_ttft_s(fp, _q(rate_rps, 14), svc, obj.overhead_s, obj.ttft_quantile, q.dp_groups)
        ttft = t if math.isfinite(t) else None
    return ModelTarget(
        n_prefill_exact=n_p,
        n_decode_exact=n_d,
        n_prefill=ip,
        n_decode=idd,
        predicted_ttft_s=ttft,
        predicted_tpot_ms=tpot,
        prefill_rate_per_instance_rps=per_instance,
        decode_rate_per_instance_rps=decode_rate,
        decode_batch_target=b_target,
        decode_batch_max=float(cap.decode.batch) if cap.decode.batch is not None else None,
        n_prefill_capped_exact=n_p_capped,
    )
