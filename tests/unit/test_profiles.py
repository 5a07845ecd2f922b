"""Shipped profiles load, and the importer regenerates them from the shipped measurements."""

from __future__ import annotations

import pytest
import yaml

from controller.cli.main import main
from controller.core.errors import ProfileError
from controller.core.profile import profile_from_dict
from controller.profile_import import isotonic_non_decreasing
from controller.profiles import load_profile
from tests.conftest import DATA, PROFILES

SHIPPED = sorted(PROFILES.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_profile_loads_and_names_its_source(path) -> None:
    prof = load_profile(path)
    raw = yaml.safe_load(path.read_text())
    assert raw["source"] and raw["license"]
    assert prof.prefill.max_tps_at(2048) > 0


@pytest.mark.parametrize(
    ("name", "model", "hw", "tp", "kv", "kvt"),
    [
        ("llama2-70b-h100-tp8", "llama2-70b", "h100-80gb", 8, "1330000", "6.55e-6"),
        ("llama2-70b-a100-tp8", "llama2-70b", "a100-80gb", 8, "1330000", "6.55e-6"),
        ("llama2-70b-a100-tp4", "llama2-70b", "a100-80gb", 4, "451000", "6.55e-6"),
        ("bloom-176b-h100-tp8", "bloom-176b", "h100-80gb", 8, "55800", "8.0e-5"),
    ],
)
def test_importer_regenerates_shipped_profile(tmp_path, name, model, hw, tp, kv, kvt) -> None:
    out = tmp_path / "p.yaml"
    code = main(["profile", "import-splitwise", "--csv", str(DATA / "perf/splitwise-sim/perf_model.csv"),
                 "--model", model, "--hardware", hw, "--tp", str(tp), "--kv-capacity-tokens", kv,
                 "--overhead-s", "0.05", "--kv-transfer-per-token-s", kvt, "--out", str(out)])
    assert code == 0
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((PROFILES / f"{name}.yaml").read_text())


def test_llama_h100_matches_the_measurements() -> None:
    prof = load_profile("llama2-70b-h100-tp8")
    assert prof.decode_curve is not None
    # data README: 57 ms at 512 (our median 53-54 after isotonic pooling), 848 at 8192; decode 29.7 -> 50.0 ms
    assert float(prof.prefill.time_s(8192)) * 1000 == pytest.approx(845, abs=5)
    assert prof.decode_curve.tpot_ms_at(1, 576) == pytest.approx(29.76, abs=0.1)
    assert prof.decode_curve.tpot_ms_at(64, 576) == pytest.approx(50.16, abs=0.1)


def test_isotonic_regression() -> None:
    assert isotonic_non_decreasing([3, 1, 2, 5]) == [2, 2, 2, 5]
    assert isotonic_non_decreasing([1, 2, 3]) == [1, 2, 3]


def test_importer_unknown_model(tmp_path, capsys) -> None:
    code = main(["profile", "import-splitwise", "--csv", str(DATA / "perf/splitwise-sim/perf_model.csv"),
                 "--model", "gpt-9", "--hardware", "h100-80gb", "--tp", "8", "--out", str(tmp_path / "x.yaml")])
    assert code == 2
    assert "no rows for model='gpt-9'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "expected a mapping"),
        ({"prefill": {"max_tps": 1000}}, "decode=None: missing"),
        ({"prefill": {"max_tps": -1}, "decode": {"tps": 5}}, "prefill.max_tps=-1: must be positive"),
        ({"prefill": {"input_len": [], "time_ms": []}, "decode": {"tps": 5}}, "prefill.input_len=[]"),
        ({"prefill": {"input_len": [1, 2], "time_ms": [5, 4]}, "decode": {"tps": 5}}, "non-decreasing"),
        ({"prefill": {"max_tps": 1}, "decode": {"batch": [1, 2], "context": [10], "tpot_ms": [[5, 4]]}}, "not monotone in batch"),
        ({"prefill": {"max_tps": 1}, "decode": {"batch": [1], "context": [10], "tpot_ms": [["x"]]}}, "tpot_ms[0][0]='x'"),
        ({"schema": "v0", "prefill": {"max_tps": 1}, "decode": {"tps": 1}}, "schema='v0'"),
    ],
)
def test_bad_profiles_named(raw, message) -> None:
    with pytest.raises(ProfileError) as e:
        profile_from_dict(raw, origin="p")
    assert message in str(e.value)
