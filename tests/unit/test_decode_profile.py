"""Decode TPOT(batch, context) surface: interpolation, B*, KV bound, Little's-law fixed point."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.core.decode import DecodeProfile, decode_operating_point
from controller.core.errors import InfeasibleError, ProfileError
from controller.profiles import load_profile

GRID = DecodeProfile(
    batch=(1.0, 8.0, 32.0, 64.0),
    context=(1000.0, 4000.0),
    tpot_ms=((10.0, 12.0, 16.0, 24.0), (11.0, 14.0, 20.0, 32.0)),
)


def test_bilinear_interpolation() -> None:
    assert GRID.tpot_ms_at(8, 1000) == pytest.approx(12.0)
    assert GRID.tpot_ms_at(20, 1000) == pytest.approx(14.0)
    assert GRID.tpot_ms_at(8, 2500) == pytest.approx(13.0)
    assert GRID.tpot_ms_at(8, 100) == pytest.approx(12.0)  # context clamps
    assert GRID.tpot_ms_at(80, 1000) == pytest.approx(28.0)  # last-segment extrapolation


@given(b=st.floats(0.1, 200.0), c=st.floats(0.0, 300_000.0), name=st.sampled_from(
    ["llama2-70b-h100-tp8", "llama2-70b-a100-tp8", "llama2-70b-a100-tp4"]))
def test_two_row_interpolation_equals_interpolating_every_row(b: float, c: float, name: str) -> None:
    """tpot_ms_at reads the two context rows around `c`: bit for bit what every row, then across, gives."""
    import numpy as np

    dc = load_profile(name).decode_curve
    assert dc is not None
    bs, cs = np.asarray(dc.batch), np.asarray(dc.context)
    rows = [DecodeProfile._along_batch(bs, np.asarray(r), b) for r in dc.tpot_ms]
    assert dc.tpot_ms_at(b, c) == float(np.interp(c, cs, rows))


def test_best_batch_is_largest_meeting_target() -> None:
    b = GRID.best_batch(16.0, 1000)
    assert b == 32
    assert GRID.tpot_ms_at(b, 1000) <= 16.0 < GRID.tpot_ms_at(b + 1, 1000)
    assert GRID.best_batch(100.0, 1000) == 64  # never beyond the measured grid


def test_kv_capacity_bounds_batch() -> None:
    kv = DecodeProfile(GRID.batch, GRID.context, GRID.tpot_ms, kv_capacity_tokens=40_000)
    assert kv.best_batch(100.0, 1000, kv_tokens_per_request=2000) == 20


def test_throughput_is_batch_over_tpot() -> None:
    op = decode_operating_point(GRID, 16.0, input_len=900, output_len=200)
    assert op.batch == 32
    assert op.tps == pytest.approx(1000 * 32 / GRID.tpot_ms_at(32, 1000))


def test_littles_law_fixed_point() -> None:
    ctx = 1000.0
    for b in (1.0, 8.0, 20.0, 50.0):
        rate = GRID.tps_at(b, ctx)
        assert GRID.batch_at_token_rate(rate, ctx) == pytest.approx(b, rel=1e-6)
        assert GRID.tpot_ms_at_token_rate(rate, ctx) == pytest.approx(GRID.tpot_ms_at(b, ctx), rel=1e-6)
    assert GRID.tpot_ms_at_token_rate(GRID.tps_at(64, ctx) * 1.01, ctx) == float("inf")


def test_target_below_fastest_step_is_named() -> None:
    with pytest.raises(InfeasibleError, match=r"tpot_ms=5: below the profile's smallest TPOT 10 ms"):
        GRID.best_batch(5.0, 1000)


def test_non_monotone_and_empty_profiles_rejected() -> None:
    with pytest.raises(ProfileError, match="not monotone in batch at context=1000"):
        DecodeProfile((1.0, 2.0), (1000.0,), ((10.0, 9.0),))
    with pytest.raises(ProfileError, match=r"decode.batch=\[\]"):
        DecodeProfile((), (1000.0,), ((),))
    with pytest.raises(ProfileError, match="strictly increasing"):
        DecodeProfile((2.0, 1.0), (1000.0,), ((10.0, 11.0),))


@given(
    b1=st.floats(0.5, 128), b2=st.floats(0.5, 128), c1=st.floats(100, 10_000), c2=st.floats(100, 10_000)
)
def test_interpolation_monotone(b1: float, b2: float, c1: float, c2: float) -> None:
    prof = load_profile("llama2-70b-h100-tp8").decode_curve
    assert prof is not None
    lo_b, hi_b = sorted((b1, b2))
    lo_c, hi_c = sorted((c1, c2))
    assert prof.tpot_ms_at(lo_b, lo_c) <= prof.tpot_ms_at(hi_b, lo_c) + 1e-9
    assert prof.tpot_ms_at(lo_b, lo_c) <= prof.tpot_ms_at(lo_b, hi_c) + 1e-9
