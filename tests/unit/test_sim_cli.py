"""`pd-controller simulate` end to end on a slice of a real trace."""

from __future__ import annotations

import json

import pytest

from controller.cli.main import main
from tests.conftest import DATA

CONV = str(DATA / "traces" / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv")


@pytest.fixture
def short_trace(tmp_path):
    # the first 15 minutes of the conversation trace, as a generic CSV
    from controller.sim.traces import load_trace

    tr = load_trace(CONV).window(0.0, 900.0)
    p = tmp_path / "conv15.csv"
    lines = ["timestamp_s,input_tokens,output_tokens"]
    lines += [f"{t:.4f},{i},{o}" for t, i, o in zip(tr.arrival_s, tr.input_tokens, tr.output_tokens, strict=True)]
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_all_policies_json(short_trace, capsys):
    rc = main(["simulate", "--trace", short_trace, "--policy", "all", "--json", "--cold-start-s", "60"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    pols = out["policies"]
    assert set(pols) == {"slo", "static", "static-peak", "threshold", "throughput", "oracle"}
    for v in pols.values():
        for k in ("requests", "slo_attainment", "ttft_p90_s", "tpot_p90_ms", "gpu_hours", "flips", "scale_events",
                  "goodput_rps"):
            assert k in v
        assert 0.0 <= v["slo_attainment"] <= 1.0 and v["gpu_hours"] > 0
    assert pols["oracle"]["gpu_hours_vs_oracle"] == pytest.approx(1.0)
    # a static fleet never scales or flips
    assert pols["static"]["scale_events"] == 0 and pols["static"]["flips"] == 0


def test_fixed_budget_table_and_plot(short_trace, tmp_path, capsys):
    png = tmp_path / "p.png"
    rc = main(["simulate", "--trace", short_trace, "--policy", "slo", "--gpus", "32", "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fixed budget 32 GPUs" in text and "SLO attainment" in text
    assert png.stat().st_size > 10_000


def test_bad_input_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp_s,input_tokens,output_tokens\n1,2,zero\n")
    assert main(["simulate", "--trace", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2" in err and "output_tokens='zero'" in err
    assert main(["simulate", "--trace", CONV, "--gpus", "8"]) == 2
    assert "gpus=8" in capsys.readouterr().err
    assert main(["simulate", "--trace", CONV, "--tpot-ms", "10"]) == 2
    assert "tpot_ms=10" in capsys.readouterr().err
