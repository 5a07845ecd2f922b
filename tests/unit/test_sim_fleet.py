"""The simulated fleet against closed forms: M/D/1 and M/M/1 prefill, decode at B / TPOT(B)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.core.control import Action, ActionKind, Reason, Role
from controller.core.decode import DecodeProfile
from controller.core.prefill import PrefillCurve
from controller.core.profile import Profile
from controller.profiles import load_profile
from controller.sim.fleet import Fleet, SimConfig
from controller.sim.traces import Trace

TPMAX = 10_000.0


def _profile(**kw) -> Profile:
    return Profile(name="t", prefill=PrefillCurve(max_tps=TPMAX), decode_fixed_tps=1e9, **kw)


def _trace(arrivals: np.ndarray, inp: np.ndarray, out: np.ndarray | int = 2) -> Trace:
    n = arrivals.size
    out_arr = np.full(n, out, dtype=np.int64) if np.isscalar(out) else np.asarray(out, np.int64)
    return Trace("t", arrivals, np.asarray(inp, np.int64), out_arr, np.zeros(n, np.int64))


def _poisson(rate: float, n: int, seed: int) -> np.ndarray:
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))


def _run(trace: Trace, profile: Profile, p: int = 1, d: int = 1) -> Fleet:
    f = Fleet(trace, profile, SimConfig(), p, d, overhead_s=0.0)
    f.run_until(math.inf, 0)
    return f


def test_single_prefill_fixed_lengths_matches_md1():
    lam, n = 6.0, 60_000
    tr = _trace(_poisson(lam, n, 1), np.full(n, 1000))
    f = _run(tr, _profile())
    s = 1000 / TPMAX
    rho = lam * s
    md1 = s + rho * s / (2 * (1 - rho))  # P-K with E[S^2] = s^2
    sojourn = f.pdone_s - f.arr
    assert np.mean(sojourn[n // 10:]) == pytest.approx(md1, rel=0.05)


def test_single_prefill_exponential_service_matches_mm1():
    lam, n = 6.0, 60_000
    rng = np.random.default_rng(2)
    inp = np.maximum(np.ceil(rng.exponential(1000.0, n)), 1)
    tr = _trace(_poisson(lam, n, 3), inp)
    f = _run(tr, _profile())
    mu = 1.0 / (np.mean(inp) / TPMAX)
    sojourn = f.pdone_s - f.arr
    assert np.mean(sojourn[n // 10:]) == pytest.approx(1.0 / (mu - lam), rel=0.05)


def test_decode_throughput_is_batch_over_tpot_at_steady_batch():
    prof = load_profile("llama2-70b-h100-tp8")
    curve = prof.decode_curve
    assert isinstance(curve, DecodeProfile)
    for batch in (1, 8, 32, 64):
        out = 2001  # 2000 decode steps each
        tr = _trace(np.zeros(batch), np.full(batch, 512), out)
        f = _run(tr, prof, p=batch)  # one prefill instance each: all join decode together
        span = np.max(f.done_s) - np.min(f.join_s)
        tokens = batch * (out - 1)
        context = 512 + out / 2.0
        assert tokens / span == pytest.approx(curve.tps_at(batch, context), rel=0.01)


def test_decode_open_system_obeys_littles_law_and_kv_limit_queues():
    prof = load_profile("llama2-70b-h100-tp8")
    n = 4000
    tr = _trace(_poisson(4.0, n, 4), np.full(n, 1000), np.full(n, 200))
    f = _run(tr, prof)
    dec_time = f.done_s - f.join_s
    span = f.done_s.max() - f.join_s.min()
    mean_batch = dec_time.sum() / span  # Little: L = sum of sojourns / T
    tpot_s = np.mean(f.tpot_of(np.arange(n)))
    assert tpot_s == pytest.approx(prof.decode_curve.tpot_ms_at(mean_batch, 1100) / 1000, rel=0.05)
    # a tiny KV cache admits one request at a time: they queue FIFO
    small = Profile(**{**prof.__dict__, "decode_curve": DecodeProfile(
        prof.decode_curve.batch, prof.decode_curve.context, prof.decode_curve.tpot_ms, kv_capacity_tokens=1300.0)})
    tr2 = _trace(np.zeros(3), np.full(3, 1000), np.full(3, 201))
    f2 = _run(tr2, small)
    joins = np.sort(f2.join_s)
    assert joins[1] >= np.sort(f2.done_s)[0] - 1e-9 and joins[2] >= np.sort(f2.done_s)[1] - 1e-9


def test_flip_drains_then_switches_and_gpu_time_counts_every_instance():
    prof = load_profile("llama2-70b-h100-tp8")
    tr = _trace(np.array([0.0, 100.0]), np.array([1000, 1000]), 50)
    f = Fleet(tr, prof, SimConfig(flip_time_s=30.0, cold_start_s=60.0), 2, 1, overhead_s=0.0)
    f.run_until(1.0, 0)
    f.apply([Action(ActionKind.FLIP_TO_DECODE, 1, Reason.SLO_DECODE_SHORT)], 1.0)
    v = f.view()
    assert v.serving_prefill == 1 and v.flips_in_flight == 1
    f.apply([Action(ActionKind.SCALE_DECODE, 1, Reason.SLO_DECODE_SHORT)], 1.0)
    nxt = f.run_until(40.0, 1)
    v = f.view()
    assert v.serving_decode == 2 and v.committed(Role.DECODE) == 3  # flipped; the new one still starting
    f.run_until(200.0, nxt)
    assert f.view().serving_decode == 3
    # 3 instances of 8 GPUs for 200 s, plus the started one from t=1
    assert f.gpu_seconds(200.0) == pytest.approx(8 * (3 * 200 + 199), rel=1e-6)
    assert f.flips == 1 and f.scale_events == 1


def test_never_empties_a_pool():
    prof = load_profile("llama2-70b-h100-tp8")
    tr = _trace(np.array([0.0]), np.array([100]), 2)
    f = Fleet(tr, prof, SimConfig(), 1, 1, overhead_s=0.0)
    f.apply([Action(ActionKind.FLIP_TO_DECODE, 1, Reason.REBALANCE),
             Action(ActionKind.SCALE_DECODE, -1, Reason.DECODE_SURPLUS)], 0.0)
    v = f.view()
    assert v.serving_prefill == 1 and v.serving_decode == 1


def test_mooncake_hashes_hit_the_prefix_cache_of_the_instance_that_served_them():
    prof = load_profile("llama2-70b-h100-tp8")
    hashes = (np.arange(8), np.arange(8), np.array([0, 1, 2, 99]))
    tr = Trace("m", np.array([0.0, 10.0, 20.0]), np.array([4096, 4096, 2048]), np.array([2, 2, 2]),
               np.full(3, -1), hashes)
    f = Fleet(tr, prof, SimConfig(), 1, 1, overhead_s=0.0)
    f.run_until(math.inf, 0)
    assert list(f.cached) == [0, 4095, 3 * 512]
    assert f.pdone_s[1] - f.arr[1] < f.pdone_s[0] - f.arr[0]


def test_a_joiner_gets_its_first_token_at_the_next_step_boundary():
    # SGLang sends a joiner's first token (computed by prefill) from a prebuilt batch run between forward
    # passes, then merges it into the running batch: one whose KV lands mid-step waits for that step to end
    # (in its TTFT) and then gets one token per step (its TPOT is the step time alone)
    prof = load_profile("llama2-70b-h100-tp8")
    step1 = prof.decode_curve.tpot_ms_at(1, 512 + 1000) / 1000
    # A decodes alone from its join; B's KV lands 5.3 steps later, 0.3 steps into one of A's steps
    tr = _trace(np.array([0.0, 0.0]), np.array([512, 512]), np.array([2001, 11]))
    f = Fleet(tr, prof, SimConfig(), 2, 1, overhead_s=0.0)
    f.kvx[:] = 0.0
    f.kvx[1] = 5.3 * step1
    f.run_until(math.inf, 0)
    a_join, b_join = f.join_s
    assert b_join - a_join == pytest.approx(6.0 * step1, rel=1e-4)  # the first token at the boundary
    step2 = prof.decode_curve.tpot_ms_at(2, 512 + 6) / 1000
    assert f.tpot_of(np.array([1]))[0] == pytest.approx(step2, rel=0.02)  # then one step per token
    # two requests reaching an idle instance together share their first step
    tr2 = _trace(np.array([0.0, 0.0]), np.array([512, 512]), np.array([11, 11]))
    f2 = Fleet(tr2, prof, SimConfig(), 2, 1, overhead_s=0.0)
    f2.run_until(math.inf, 0)
    assert f2.join_s[0] == pytest.approx(f2.join_s[1]) and f2.done_s[0] == pytest.approx(f2.done_s[1])
