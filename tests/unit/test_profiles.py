"""Shipped profiles load, and the importer regenerates them from the shipped measurements."""

from __future__ import annotations

import itertools

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
    ("name", "model", "hw", "tp", "kv", "kvt", "kvb"),
    [
        # KV bytes per token from the model shape: 2 (K, V) x layers x KV heads x head dim x 2 bytes
        ("llama2-70b-h100-tp8", "llama2-70b", "h100-80gb", 8, "1330000", "6.55e-6", "327680"),  # 80 x 8 x 128 (GQA)
        ("llama2-70b-a100-tp8", "llama2-70b", "a100-80gb", 8, "1330000", "6.55e-6", "327680"),
        ("llama2-70b-a100-tp4", "llama2-70b", "a100-80gb", 4, "451000", "6.55e-6", "327680"),
        ("bloom-176b-h100-tp8", "bloom-176b", "h100-80gb", 8, "55800", "8.0e-5", "4014080"),  # 70 x 14336 (MHA)
    ],
)
def test_importer_regenerates_shipped_profile(tmp_path, name, model, hw, tp, kv, kvt, kvb) -> None:
    out = tmp_path / "p.yaml"
    code = main(["profile", "import-splitwise", "--csv", str(DATA / "perf/splitwise-sim/perf_model.csv"),
                 "--model", model, "--hardware", hw, "--tp", str(tp), "--kv-capacity-tokens", kv,
                 "--overhead-s", "0.05", "--kv-transfer-per-token-s", kvt, "--kv-bytes-per-token", kvb,
                 "--out", str(out)])
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


def _batch1_medians(model: str, hw: str, tp: int) -> dict[float, float]:
    """Median token_time of each batch-1 run group, keyed by its mean context (prompt + output/2)."""
    import csv
    import statistics
    from collections import defaultdict

    groups: dict[float, list[float]] = defaultdict(list)
    with (DATA / "perf/splitwise-sim/perf_model.csv").open() as f:
        for r in csv.DictReader(f):
            if (r["model"], r["hardware"], int(r["tensor_parallel"]), int(r["batch_size"])) == (model, hw, tp, 1):
                groups[int(r["prompt_size"]) + int(r["token_size"]) / 2].append(float(r["token_time"]))
    return {c: statistics.median(v) for c, v in groups.items()}


@pytest.mark.parametrize(("name", "model", "hw", "tp"), [
    ("llama2-70b-h100-tp8", "llama2-70b", "h100-80gb", 8),
    ("llama2-70b-a100-tp4", "llama2-70b", "a100-80gb", 4),
    ("bloom-176b-h100-tp8", "bloom-176b", "h100-80gb", 8),
])
def test_splitwise_grid_reproduces_its_csv_and_grows_with_context(name, model, hw, tp) -> None:
    prof = load_profile(name)
    d = prof.decode_curve
    assert d is not None
    # batch 1: each measured context (both sweeps) within the data's own scatter (the medians of
    # neighbouring contexts differ by up to ~6 %) of the line the grid holds, and unbiased on average
    errs = [d.tpot_ms_at(1, c) / ms - 1 for c, ms in _batch1_medians(model, hw, tp).items()
            if d.context[0] <= c <= d.context[-1]]
    assert len(errs) >= 7
    assert max(abs(e) for e in errs) < 0.07
    assert abs(sum(errs) / len(errs)) < 0.03
    # the rows differ: at the largest batch TPOT grows strictly from each context to the next
    col = [row[-1] for row in d.tpot_ms]
    assert all(b > a for a, b in itertools.pairwise(col))
    # and the growth is per sequence: b * k * dc, with the same k at every batch
    k1 = d.tpot_ms[-1][0] - d.tpot_ms[0][0]
    kb = d.tpot_ms[-1][-1] - d.tpot_ms[0][-1]
    assert kb == pytest.approx(k1 * d.batch[-1], rel=1e-3)


def test_profile_check_passes_shipped_profiles(capsys) -> None:
    assert main(["profile", "check", *[str(p) for p in SHIPPED]]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == len(SHIPPED)


def _write(tmp_path, raw):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_profile_check_flags_identical_context_rows(tmp_path, capsys) -> None:
    raw = yaml.safe_load((PROFILES / "llama2-70b-h100-tp8.yaml").read_text())
    raw["decode"]["tpot_ms"] = [raw["decode"]["tpot_ms"][0]] * len(raw["decode"]["context"])
    assert main(["profile", "check", str(_write(tmp_path, raw))]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    bad = [x for x in lines if "no context dependence" in x]
    assert len(bad) == len(raw["decode"]["context"]) - 1
    assert all(x.count("\n") == 0 and "decode.tpot_ms" in x for x in bad)


def test_profile_check_flags_kv_larger_than_memory(tmp_path, capsys) -> None:
    raw = yaml.safe_load((PROFILES / "llama2-70b-h100-tp8.yaml").read_text())
    raw["decode"]["kv_capacity_tokens"] = 3.0e6  # x 320 KiB = 916 GiB > 8 x 80 GiB
    assert main(["profile", "check", str(_write(tmp_path, raw))]) == 1
    out = capsys.readouterr().out
    assert "decode.kv_capacity_tokens=3e+06: needs 916 GiB of KV" in out and "8 x 80 GiB" in out


def test_profile_check_flags_kv_below_one_sequence(tmp_path, capsys) -> None:
    raw = yaml.safe_load((PROFILES / "llama2-70b-h100-tp8.yaml").read_text())
    raw["decode"]["kv_capacity_tokens"] = 100
    assert main(["profile", "check", str(_write(tmp_path, raw))]) == 1
    assert "below the smallest grid context 576" in capsys.readouterr().out


def test_profile_check_reports_load_errors_in_one_line(tmp_path, capsys) -> None:
    raw = yaml.safe_load((PROFILES / "llama2-70b-h100-tp8.yaml").read_text())
    raw["decode"]["tpot_ms"][2][3] = 1.0  # below its neighbours: not monotone
    assert main(["profile", "check", str(_write(tmp_path, raw))]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "not monotone" in out[0]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_profile_loads_in_plan_simulator_and_emulator(path, capsys) -> None:
    import json

    from controller.emulator.engine import _MIN_DURATION_S, DecodeEngine, decode_curve_of
    from controller.sim.fleet import TpotTable

    # plan: a small load with loose objectives sizes a fleet from this profile
    assert main(["plan", "--profile", str(path), "--rate-rps", "1", "--input-len", "1024", "--output-len", "128",
                 "--ttft-s", "5", "--tpot-ms", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_prefill"] >= 1 and out["n_decode"] >= 1
    prof = load_profile(path)
    # simulator: the per-batch TPOT table builds and is positive
    tab = TpotTable(prof, max_batch=64)
    assert all(r[1] > 0 for r in tab.rows)
    # emulator: the decode engine's curve and step time come from the profile
    curve = decode_curve_of(prof)
    eng = DecodeEngine(prof, 0.01, max_running=8)
    assert eng.step_s(4, 1024.0) == pytest.approx(max(_MIN_DURATION_S, curve.tpot_ms_at(4, 1024.0) / 1000 * 0.01))
