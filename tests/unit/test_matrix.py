"""`pd-controller bench` end to end on two tiny scenarios (elastic and fixed), in worker processes."""

from __future__ import annotations

import json

from controller.cli.main import main
from controller.sim.matrix import THRESHOLD_KNOBS, THROUGHPUT_KNOBS, _frontier_beats
from tests.conftest import DATA

CONV = DATA / "traces" / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"
CODE = DATA / "traces" / "azure-llm-2023" / "AzureLLMInferenceTrace_code.csv"


def test_bench_runs_the_matrix_and_writes_the_report(tmp_path, capsys):
    d = tmp_path / "sc"
    d.mkdir()
    (d / "tiny-elastic.yaml").write_text(f"""name: tiny-elastic
traffic:
  - generator: gamma
    lengths_from: {CONV}
    duration_s: 420
    rate_rps: 4
    cv: 2
profile: llama2-70b-h100-tp8
objectives: {{ttft_s: 2, tpot_ms: 50}}
cold_start_s: 60
flip_time_s: 2
max_per_pool: 8
oracle_window_s: 120
""")
    (d / "tiny-fixed.yaml").write_text(f"""name: tiny-fixed
traffic:
  - trace: {CODE}
    end_s: 240
  - trace: {CONV}
    end_s: 240
profile: llama2-70b-h100-tp8
objectives: {{ttft_s: 2, tpot_ms: 50}}
mode: fixed
gpus: 48
flip_time_s: 2
tags: [mix-shift]
oracle_window_s: 120
""")
    out = tmp_path / "out"
    rc = main(["bench", "--scenario-dir", str(d), "--jobs", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "2 scenarios, " in printed and "tiny-elastic" in printed
    rep = json.loads((out / "report.json").read_text())
    rows = {r["scenario"]: r for r in rep["rows"]}
    assert set(rows) == {"tiny-elastic", "tiny-fixed"}
    njobs = 2 * (5 + len(THRESHOLD_KNOBS) + len(THROUGHPUT_KNOBS))
    assert rep["meta"]["jobs"] == njobs and len(rep["jobs"]) == njobs
    assert not [j for j in rep["jobs"] if j["error"]]
    e = rows["tiny-elastic"]
    # static-best reaches the target whenever it reports one, and the oracle by construction
    if e["static_best_reached"]:
        assert e["static_best"]["slo_attainment"] >= 0.99
    assert e["oracle"]["slo_attainment"] >= 0.99
    assert e["best_baseline"].split("@")[0] in ("static", "static-peak", "threshold", "throughput")
    for k in ("attainment", "no_flip_reversal_5min", "beyond_frontier", "gpu_le_1.2x_oracle"):
        assert k in e["checks"] and e["checks"][k]["pass"] in (True, False, None)
    # where slo's misses are, and the share it serves after its start-up (window + one cold start)
    m = e["slo_misses"]
    assert m["startup_s"] == 60.0 + 60.0
    slo_res = e["slo"]
    assert slo_res["startup_s"] == 120.0 and 0.0 <= m["attainment_after_startup"] <= 1.0
    assert m["attainment_after_startup"] == slo_res["attainment_after_startup"]
    assert m["static_best_after_startup"] == e["static_best"]["attainment_after_startup"]
    f = rows["tiny-fixed"]
    assert f["slo_misses"]["startup_s"] == 60.0 + 10.0 + 2.0  # window + drain + flip
    assert "goodput_1.2x_static_best" in f["checks"] and "goodput_1.1x_others" in f["checks"]
    assert f["static_best_fleet"][0] + f["static_best_fleet"][1] == 6
    md = (out / "report.md").read_text()
    assert "| tiny-elastic | elastic |" in md and "| tiny-fixed | fixed 48 GPUs |" in md
    assert "after the start-up (window + one lead time, t >= 120 s): slo " in md
    compact = (out / "readme_table.md").read_text().splitlines()
    assert len(compact) == 2 + 2 and compact[2].startswith("| tiny-elastic |")
    for name in rows:
        assert (out / "plots" / f"{name}.png").stat().st_size > 10_000
    # the selection options: one scenario, two policies
    out2 = tmp_path / "out2"
    assert main(["bench", "--scenario-dir", str(d), "--scenario", "tiny-e*", "--policy", "static,static-best",
                 "-j", "1", "--out", str(out2), "--no-plots"]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert {j["label"] for j in rep2["jobs"]} == {"static", "static-best"}
    assert not (out2 / "plots").exists()
    # slo against static-best alone (how drawn scenarios are scored quickly): no baseline, no frontier check
    out5 = tmp_path / "out5"
    assert main(["bench", "--scenario-dir", str(d), "--scenario", "tiny-e*", "--policy", "slo,static-best",
                 "-j", "1", "--out", str(out5), "--no-plots"]) == 0
    e5 = json.loads((out5 / "report.json").read_text())["rows"][0]
    assert e5["checks"]["beyond_frontier"] == {"pass": None, "detail": "no baseline run"}
    assert e5["checks"]["attainment"]["pass"] in (True, False, None)
    # iterate on the controller alone: slo is rerun, every other result comes from the first report
    out3 = tmp_path / "out3"
    assert main(["bench", "--scenario-dir", str(d), "--policy", "slo", "--reuse", str(out / "report.json"), "-j", "1",
                 "--out", str(out3), "--no-plots"]) == 0
    rep3 = json.loads((out3 / "report.json").read_text())
    assert rep3["meta"]["jobs"] == 2 and rep3["meta"]["reused_jobs"] == njobs - 2
    rows3 = {r["scenario"]: r for r in rep3["rows"]}
    assert rows3["tiny-elastic"]["static_best"] == e["static_best"] and rows3["tiny-elastic"]["oracle"] == e["oracle"]
    assert set(rows3["tiny-elastic"]["checks"]) == set(e["checks"])
    # a changed scenario file is not matched: its references are not reused
    (d / "tiny-fixed.yaml").write_text((d / "tiny-fixed.yaml").read_text().replace("gpus: 48", "gpus: 56"))
    assert main(["bench", "--scenario-dir", str(d), "--policy", "slo", "--reuse", str(out / "report.json"), "-j", "1",
                 "--out", str(out3), "--no-plots"]) == 0
    rep4 = json.loads((out3 / "report.json").read_text())
    assert rep4["meta"]["reused_jobs"] == (njobs - 2) // 2
    assert main(["bench", "--scenario-dir", str(d), "--reuse", str(tmp_path / "nope.json"), "--list"]) == 0
    assert main(["bench", "--scenario-dir", str(d), "--policy", "slo", "--reuse", str(tmp_path / "nope.json")]) == 2


def test_frontier():
    pts = [(10.0, 0.90), (20.0, 0.99), (30.0, 1.0)]
    assert _frontier_beats((15.0, 0.97), pts)  # above the segment 0.90 -> 0.99 (0.945 at 15)
    assert not _frontier_beats((15.0, 0.94), pts)
    assert not _frontier_beats((25.0, 0.99), pts)  # the baseline has 0.99 at 20 GPU-h
    assert _frontier_beats((18.0, 0.99), pts)  # same attainment, fewer GPU-hours
    assert _frontier_beats((5.0, 0.5), pts)  # cheaper than every baseline point: not dominated
    assert not _frontier_beats((40.0, 0.995), pts)
