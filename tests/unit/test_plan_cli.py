"""`pd-controller plan`: the source's worked example, flags vs config, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from controller.cli.main import main
from tests.conftest import REPO

EXAMPLE = str(REPO / "configs" / "examples" / "deepseek-v31-h200.yaml")
FLAGS = [
    "--throughput-tpm", "5000000", "--input-len", "6144", "--output-len", "512",
    "--ttft-s", "2", "--tpot-ms", "20", "--overhead-s", "0.1",
    "--prefill-max-tps", "28300", "--decode-tps", "1700",
]


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_worked_example_from_flags(capsys: pytest.CaptureFixture[str]) -> None:
    r = plan_json(capsys, *FLAGS)
    assert r["prefill_tps_effective"] == pytest.approx(25_066, abs=1)
    assert r["decode_tps_effective"] == pytest.approx(1700)
    assert r["n_prefill_exact"] == pytest.approx(3.07, abs=0.005)
    assert r["n_decode_exact"] == pytest.approx(3.77, abs=0.005)
    assert r["ratio_pd"] == pytest.approx(0.81, abs=0.01)
    assert (r["n_prefill"], r["n_decode"]) == (4, 4)  # ceil is the default
    assert r["decode_batch"] is None  # a fixed measured point has no batch


def test_worked_example_nearest_is_3p4d(capsys: pytest.CaptureFixture[str]) -> None:
    r = plan_json(capsys, *FLAGS, "--rounding", "nearest")
    assert (r["n_prefill"], r["n_decode"]) == (3, 4)


@pytest.mark.parametrize(("dep", "tpm", "binding"), [("3P4D", 4.89e6, "prefill"), ("3P3D", 3.98e6, "decode")])
def test_evaluate(capsys: pytest.CaptureFixture[str], dep: str, tpm: float, binding: str) -> None:
    r = plan_json(capsys, *FLAGS, "--evaluate", dep)
    assert r["capacity_tpm"] == pytest.approx(tpm, rel=0.002)
    assert r["binding"] == binding


def test_config_file_and_flags_win(capsys: pytest.CaptureFixture[str]) -> None:
    r = plan_json(capsys, "--config", EXAMPLE)
    assert (r["n_prefill"], r["n_decode"]) == (3, 4)  # the example config rounds nearest
    r = plan_json(capsys, "--config", EXAMPLE, "--rounding", "ceil", "--rate-rps", "1")
    assert (r["n_prefill"], r["n_decode"]) == (1, 1)
    assert r["rate_rps"] == 1


def test_gpu_budget_split(capsys: pytest.CaptureFixture[str]) -> None:
    r = plan_json(capsys, "--config", EXAMPLE, "--gpus", "56")
    assert r["split"]["deployment"] == "3P4D"
    assert r["split"]["gpus_used"] == 56


def test_measured_profile_with_tail_objective(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--profile", "llama2-70b-h100-tp8", "--rate-rps", "5", "--input-len", "2048",
            "--output-len", "256", "--ttft-s", "1", "--tpot-ms", "40"]
    mean = plan_json(capsys, *base)
    p90 = plan_json(capsys, *base, "--ttft-quantile", "0.9")
    assert p90["prefill_tps_effective"] < mean["prefill_tps_effective"]
    assert mean["decode_batch"] >= 1 and mean["decode_tpot_ms_at_batch"] <= 40
    mg1 = plan_json(capsys, *base, "--prefill-model", "mg1", "--input-len-cv", "1.5")
    md1 = plan_json(capsys, *base, "--prefill-model", "md1")
    # more length variance -> longer queues -> less effective throughput
    assert mg1["prefill_tps_effective"] < md1["prefill_tps_effective"]


def test_human_output_names_binding(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *FLAGS, "--evaluate", "3P3D"]) == 0
    out = capsys.readouterr().out
    assert "evaluate 3P3D" in out and "decode binds" in out
    assert re.search(r"P:D ratio\s+0\.814", out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--overhead-s", "2.5"], "ttft_s=2.0: must exceed the fixed overhead overhead_s=2.5"),
        (["--input-len", "-5"], "input_len=-5.0: Input should be greater than 0"),
        (["--output-len", "0"], "output_len=0.0: Input should be greater than 0"),
        (["--tpot-ms", "10", "--decode-tps", "1700", "--profile", "llama2-70b-h100-tp8"], None),
        (["--ttft-quantile", "1.5"], "ttft_quantile=1.5"),
        (["--evaluate", "3X4"], "evaluate='3X4': expected a deployment like 3P4D"),
        (["--profile", "no-such-profile"], "profile='no-such-profile': no such file"),
        (["--ttft-s", "0.15"], "ttft_budget_s=0.05"),
    ],
)
def test_bad_input_one_line_error(capsys: pytest.CaptureFixture[str], args: list[str], message: str | None) -> None:
    code = main(["plan", *FLAGS, *args])
    err = capsys.readouterr().err
    if message is None:  # a TPOT below the fastest step only matters when the curve is used
        assert code == 0
        return
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_tpot_below_profile_minimum(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--profile", "llama2-70b-h100-tp8", "--rate-rps", "1", "--input-len", "1000",
                 "--output-len", "100", "--tpot-ms", "10"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tpot_ms=10: below the profile's smallest TPOT" in err


def test_malformed_yaml_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("slo:\n  ttft_s: [1, 2\n")
    assert main(["plan", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "malformed YAML" in err and str(bad) in err


def test_unknown_config_field_named(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("slo:\n  ttft_ms: 2\n")
    assert main(["plan", "--config", str(bad)]) == 2
    assert "slo.ttft_ms=2: Extra inputs are not permitted" in capsys.readouterr().err


def test_cli_process_exits_nonzero_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "controller", "plan", *FLAGS, "--overhead-s", "3"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "overhead_s=3" in proc.stderr
