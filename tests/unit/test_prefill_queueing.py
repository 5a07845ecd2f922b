"""Prefill queueing formulas against an independent simulation (Lindley recursion, Poisson arrivals)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.core.errors import InfeasibleError, ModelInputError
from controller.core.prefill import (
    PrefillCurve,
    PrefillQueueing,
    QueueModel,
    ServiceTime,
    max_rate_rps,
    service_time,
    sojourn_s,
)


def lindley_sojourn(rate_rps: float, service: np.ndarray, seed: int) -> np.ndarray:
    """Sojourn times of a FIFO single server: W_{k+1} = max(0, W_k + S_k - A_{k+1}).

    Vectorised with the random-walk identity W_k = C_k - min_{j<=k} C_j, where C
    is the cumulative sum of S_k - A_{k+1}. The first 10% is warm-up.
    """
    n = service.size
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_rps, n)
    c = np.concatenate([[0.0], np.cumsum(service[:-1] - gaps[1:])])
    wait = c - np.minimum.accumulate(c)
    return (wait + service)[n // 10 :]


N = 300_000
S_MEAN = 0.2


def draw_service(kind: str, seed: int) -> tuple[np.ndarray, ServiceTime]:
    rng = np.random.default_rng(seed)
    if kind == "mm1":
        return rng.exponential(S_MEAN, N), ServiceTime.deterministic(S_MEAN)
    if kind == "md1":
        return np.full(N, S_MEAN), ServiceTime.deterministic(S_MEAN)
    # M/G/1: lognormal input lengths (CV 1) through a linear prefill curve
    lengths = np.maximum(rng.lognormal(math.log(2000) - 0.5 * math.log(2), math.sqrt(math.log(2)), N), 1.0)
    curve = PrefillCurve(max_tps=10_000.0)
    return lengths / 10_000.0, service_time(curve, lengths)


@pytest.mark.parametrize("kind", ["mm1", "md1", "mg1"])
@pytest.mark.parametrize("rho", [0.5, 0.7])
def test_mean_and_p90_match_simulation(kind: str, rho: float) -> None:
    service, svc = draw_service(kind, seed=11)
    rate = rho / svc.mean_s
    sim = lindley_sojourn(rate, service, seed=7)
    model = QueueModel(kind)
    assert sojourn_s(model, rate, svc) == pytest.approx(sim.mean(), rel=0.04)
    assert sojourn_s(model, rate, svc, 0.9) == pytest.approx(np.quantile(sim, 0.9), rel=0.06)


def test_mm1_is_the_source_equation_12_and_13() -> None:
    # mu = TPmax / L_in (eq. 9); TTFT - overhead = 1/(mu - lambda) (eq. 12)
    svc = service_time(PrefillCurve(max_tps=28_300.0), 6144.0)
    mu = 28_300.0 / 6144.0
    assert svc.rate_rps == pytest.approx(mu)
    assert sojourn_s(QueueModel.MM1, 2.0, svc) == pytest.approx(1.0 / (mu - 2.0))
    # eq. 13: TP_prefill = TPmax - L_in / (TTFT - overhead)
    lam = max_rate_rps(QueueModel.MM1, svc, 1.9)
    assert lam * 6144 == pytest.approx(28_300 - 6144 / 1.9)
    assert lam * 6144 == pytest.approx(25_066.3, abs=0.1)


@pytest.mark.parametrize("model", list(QueueModel))
@pytest.mark.parametrize("q", [None, 0.5, 0.9, 0.99])
def test_max_rate_inverts_prediction(model: QueueModel, q: float | None) -> None:
    lengths = np.random.default_rng(3).integers(500, 8000, 2000).astype(float)
    svc = service_time(PrefillCurve(max_tps=20_000.0), lengths)
    lam = max_rate_rps(model, svc, 2.0, q)
    assert 0 < lam < svc.rate_rps
    assert sojourn_s(model, lam, svc, q) == pytest.approx(2.0, rel=1e-6)


def test_quantile_objective_is_stricter_than_mean() -> None:
    svc = ServiceTime.deterministic(0.2)
    assert max_rate_rps(QueueModel.MM1, svc, 1.0, 0.9) < max_rate_rps(QueueModel.MM1, svc, 1.0)


def test_dp_groups_each_their_own_queue() -> None:
    svc = ServiceTime.deterministic(0.1)
    one = PrefillQueueing(QueueModel.MM1, 1).max_rate_rps(svc, 1.0, None)
    four = PrefillQueueing(QueueModel.MM1, 4).max_rate_rps(svc, 1.0, None)
    # each group: mu/4 - 1/T, times 4 groups = mu - 4/T < mu - 1/T
    assert four == pytest.approx(10.0 - 4.0)
    assert one == pytest.approx(10.0 - 1.0)


def test_cache_hits_shrink_prefill_work() -> None:
    curve = PrefillCurve(max_tps=10_000.0)
    assert service_time(curve, 4000.0, 0.5).mean_s == pytest.approx(0.2)


def test_measured_curve_interpolates_and_extrapolates() -> None:
    curve = PrefillCurve(input_len=(512.0, 1024.0), time_ms=(50.0, 80.0))
    assert float(curve.time_s(768.0)) == pytest.approx(0.065)
    assert float(curve.time_s(100.0)) == pytest.approx(0.050)  # floor below the first point
    assert float(curve.time_s(2048.0)) == pytest.approx(0.140)  # last segment's slope


def test_unstable_rate_is_a_clear_error() -> None:
    svc = ServiceTime.deterministic(0.5)
    with pytest.raises(ModelInputError, match=r"rate_rps=2\.0.*service rate mu=2"):
        sojourn_s(QueueModel.MM1, 2.0, svc)


def test_ttft_at_or_below_overhead_is_infeasible() -> None:
    svc = ServiceTime.deterministic(0.5)
    with pytest.raises(ModelInputError, match="ttft_budget_s=0"):
        max_rate_rps(QueueModel.MM1, svc, 0.0)
    with pytest.raises(InfeasibleError, match="idle prefill instance misses"):
        max_rate_rps(QueueModel.MD1, svc, 0.4)


@pytest.mark.parametrize("bad", [0.0, -5.0, math.nan])
def test_bad_lengths_named(bad: float) -> None:
    with pytest.raises(ModelInputError, match="input_len"):
        service_time(PrefillCurve(max_tps=1000.0), bad)


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.7])
def test_md1_tail_follows_cramer_lundberg(rho: float) -> None:
    # fixed-length benchmarks: the P99 must be right too, not only the P90
    service, svc = draw_service("md1", seed=1)
    rate = rho / svc.mean_s
    sim = lindley_sojourn(rate, np.tile(service, 3), seed=5)
    assert sojourn_s(QueueModel.MD1, rate, svc, 0.99) == pytest.approx(np.quantile(sim, 0.99), rel=0.05)
