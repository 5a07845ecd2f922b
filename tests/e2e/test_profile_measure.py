"""`pd-controller profile` against an emulated deployment built from a known profile: it recovers the profile."""

from __future__ import annotations

import pytest
import yaml

from controller.cli.main import main
from controller.profiles import load_profile
from harness.fleet import EmulatedFleet, free_port

pytestmark = pytest.mark.e2e

KNOWN = "llama2-70b-h100-tp8"
SCALE = 0.2  # the emulated GPU runs 5x faster than the profile: expected figures scale with it


@pytest.mark.slow
def test_profile_round_trip_recovers_tpmax_and_tpot(tmp_path, capsys):
    truth = load_profile(KNOWN)
    out = tmp_path / "measured.yaml"
    with EmulatedFleet(KNOWN, n_prefill=1, n_decode=1, time_scale=SCALE) as fleet:
        rc = main(["profile", "--router", fleet.router_url, "--input-len", "512", "2048", "--output-len", "64",
                   "--batch", "1", "4", "16", "--duration-s", "24", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    measured = load_profile(out)  # a valid profile that plan/simulate/run read
    raw = yaml.safe_load(out.read_text())
    for n in (512, 2048):
        want = n / (float(truth.prefill.time_s(n)) * SCALE)
        got = measured.prefill.max_tps_at(n)
        assert got == pytest.approx(want, rel=0.10), (n, got, want)
    ctx = raw["decode"]["context"][0]
    assert len(raw["decode"]["batch"]) >= 2
    assert raw["decode"]["batch"][-1] > 8  # the decode side really ran a large batch
    for b in raw["decode"]["batch"]:
        want = truth.decode_curve.tpot_ms_at(b, ctx) * SCALE
        got = measured.decode_curve.tpot_ms_at(b, ctx)
        assert got == pytest.approx(want, rel=0.10), (b, got, want)
    assert raw["decode"]["kv_capacity_tokens"] == truth.decode_curve.kv_capacity_tokens


def test_profile_unreachable_is_a_clear_error(tmp_path, capsys):
    port = free_port()
    rc = main(["profile", "--router", f"http://127.0.0.1:{port}", "--duration-s", "5", "--out", str(tmp_path / "x.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach" in err and str(port) in err
    assert not (tmp_path / "x.yaml").exists()


def test_profile_needs_a_target_and_limits(tmp_path, capsys):
    assert main(["profile", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "need --router URL" in capsys.readouterr().err
    assert main(["profile", "--router", "http://127.0.0.1:1", "--max-concurrency", "5000",
                 "--out", str(tmp_path / "x.yaml")]) == 2
    assert "--max-concurrency=5000" in capsys.readouterr().err
    assert main(["profile", "--router", "http://127.0.0.1:1", "--duration-s", "99999",
                 "--out", str(tmp_path / "x.yaml")]) == 2
    assert "--duration-s=99999" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_direct_pair_and_error_answers(tmp_path, capsys):
    """--prefill/--decode addresses one pair directly (bootstrap fields added as the router would)."""
    out = tmp_path / "pair.yaml"
    with EmulatedFleet(KNOWN, n_prefill=1, n_decode=1, time_scale=SCALE) as fleet:
        p, d = fleet.prefill[0].url, fleet.decode[0].url
        rc = main(["profile", "--prefill", p, "--decode", d, "--input-len", "1024", "--output-len", "16",
                   "--batch", "1", "2", "--duration-s", "6", "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        assert load_profile(out).prefill.max_tps_at(1024) > 0
        # a deployment that answers errors (here: inputs beyond the context length) is reported, not profiled
        rc = main(["profile", "--router", fleet.router_url, "--input-len", "200000", "--duration-s", "5",
                   "--out", str(tmp_path / "bad.yaml")])
        err = capsys.readouterr().err
        assert rc == 2 and "answers errors" in err and "400" in err
        assert not (tmp_path / "bad.yaml").exists()
