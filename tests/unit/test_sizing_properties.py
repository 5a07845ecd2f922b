"""Invariants of sizing (hypothesis): monotone in load and objectives; budget splits use the budget."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from controller.core.errors import InfeasibleError
from controller.core.prefill import QueueModel
from controller.core.sizing import (
    Hardware,
    Objectives,
    Rounding,
    Workload,
    best_split,
    instance_capacity,
    plan,
)
from controller.profiles import load_profile

LLAMA = load_profile("llama2-70b-h100-tp8")
BLOOM = load_profile("bloom-176b-h100-tp8")

workloads = st.builds(
    Workload,
    rate_rps=st.floats(0.01, 200),
    input_len=st.floats(64, 16_000),
    output_len=st.floats(16, 2_000),
    cache_hit_rate=st.floats(0, 0.9),
)
models = st.sampled_from(list(QueueModel))
quantiles = st.sampled_from([None, 0.5, 0.9, 0.99])


def _plan(w: Workload, o: Objectives, model: QueueModel, rounding: Rounding = Rounding.CEIL):
    try:
        return plan(w, o, Hardware(LLAMA, model), rounding)
    except InfeasibleError:
        assume(False)
        raise


@settings(max_examples=60, deadline=None)
@given(w=workloads, factor=st.floats(1.0, 10.0), model=models, q=quantiles, rounding=st.sampled_from(list(Rounding)))
def test_counts_never_decrease_as_load_rises(w, factor, model, q, rounding) -> None:
    o = Objectives(ttft_s=3.0, tpot_ms=45.0, ttft_quantile=q, overhead_s=0.05)
    a = _plan(w, o, model, rounding)
    b = _plan(w.scaled(factor), o, model, rounding)
    assert b.n_prefill_exact >= a.n_prefill_exact * (1 - 1e-9)
    assert b.n_decode_exact >= a.n_decode_exact * (1 - 1e-9)
    assert b.deployment.n_prefill >= a.deployment.n_prefill
    assert b.deployment.n_decode >= a.deployment.n_decode


@settings(max_examples=60, deadline=None)
@given(w=workloads, tighten=st.floats(0.3, 1.0), model=models, q=quantiles)
def test_counts_never_decrease_as_objectives_tighten(w, tighten, model, q) -> None:
    loose = Objectives(ttft_s=4.0, tpot_ms=50.0, ttft_quantile=q, overhead_s=0.05)
    tight = Objectives(ttft_s=0.05 + 3.95 * tighten, tpot_ms=35.0 + 15.0 * tighten, ttft_quantile=q, overhead_s=0.05)
    a = _plan(w, loose, model)
    b = _plan(w, tight, model)
    assert b.n_prefill_exact >= a.n_prefill_exact * (1 - 1e-9)
    assert b.n_decode_exact >= a.n_decode_exact * (1 - 1e-9)


@settings(max_examples=80, deadline=None)
@given(
    gpus=st.integers(2, 400),
    gp=st.sampled_from([1, 2, 4, 8]),
    gd=st.sampled_from([1, 2, 4, 8]),
    w=workloads,
)
def test_budget_split_uses_the_budget(gpus, gp, gd, w) -> None:
    assume(gpus >= gp + gd)
    prof = LLAMA.__class__(**{**LLAMA.__dict__, "prefill_gpus_per_instance": gp, "decode_gpus_per_instance": gd})
    hw = Hardware(prof)
    o = Objectives(ttft_s=3.0, tpot_ms=45.0, overhead_s=0.05)
    try:
        cap = instance_capacity(w, o, hw)
    except InfeasibleError:
        assume(False)
        raise
    split = best_split(gpus, cap, w, hw)
    used = split.deployment.n_prefill * gp + split.deployment.n_decode * gd
    assert used == split.gpus_used <= gpus
    assert gpus - used < min(gp, gd) or (gp == gd == 1 and used == gpus)
    if gp == gd == 1:
        assert used == gpus
    assert split.deployment.n_prefill >= 1 and split.deployment.n_decode >= 1


@settings(max_examples=40, deadline=None)
@given(gpus=st.integers(2, 200), w=workloads)
def test_budget_split_is_optimal(gpus, w) -> None:
    prof = BLOOM.__class__(**{**BLOOM.__dict__, "prefill_gpus_per_instance": 1, "decode_gpus_per_instance": 1})
    hw = Hardware(prof)
    o = Objectives(ttft_s=5.0, tpot_ms=80.0, overhead_s=0.05)
    try:
        cap = instance_capacity(w, o, hw)
    except InfeasibleError:
        assume(False)
        raise
    split = best_split(gpus, cap, w, hw)
    best = max(min(m * cap.prefill_rate_rps, (gpus - m) * cap.decode_rate_rps) for m in range(1, gpus))
    assert split.capacity.rate_rps >= best * (1 - 1e-12)
