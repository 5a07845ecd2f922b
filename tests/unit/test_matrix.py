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
    # per minute of arrival, what the report's why reads: one why per worst minute
    ml = slo_res["minute_load"]
    assert sum(ml["requests"]) == slo_res["requests"] and len(e["slo_why"]) == len(m["worst_minutes"])
    assert sum(ml["missed_ttft"]) == slo_res["missed_ttft"] and sum(ml["missed_tpot"]) == slo_res["missed_tpot"]
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


def _slo_result(minutes: int, tokens: list[int], requests: list[int], ttft: list[int], tpot: list[int],
                prefill: int, decode: int) -> dict:
    t = [30.0 * (i + 1) for i in range(2 * minutes)]
    return {"minute_load": {"requests": requests, "input_tokens": tokens, "missed_ttft": ttft, "missed_tpot": tpot},
            "timeline": {"t": t, "prefill": [prefill] * len(t), "decode": [decode] * len(t), "gpus": [8.0] * len(t)}}


def test_why_a_minute_missed_names_the_objective_the_burst_and_the_fleet():
    from controller.sim.matrix import why_minute

    slo = _slo_result(4, tokens=[1000, 1200, 1100, 3000], requests=[10, 11, 10, 12], ttft=[0, 0, 0, 40],
                      tpot=[0, 0, 0, 2], prefill=3, decode=2)
    w = why_minute(slo, 3, 0.6, "a 300-s cold start", 60.0, (5, 2), [1.0, 1.0, 1.0, 0.97])
    assert w.startswith("min 3 60%; 40 TTFT / 2 TPOT misses of 12")
    # prefill misses are weighed in input tokens: 3000 against the largest earlier minute, 1200
    assert "input tokens 2.5x any earlier minute's (capacity ordered at its onset serves after a 300-s cold start)" in w
    assert "slo served 3P2D, fewer than static-best's 5 prefill (5P2D, 97% in this minute)" in w
    # a minute no larger than one before it is no burst; the start-up is named; decode misses count arrivals
    slo2 = _slo_result(4, tokens=[1000, 1200, 1100, 900], requests=[10, 30, 10, 12], ttft=[0, 0, 1, 0],
                       tpot=[0, 0, 9, 0], prefill=5, decode=2)
    w2 = why_minute(slo2, 2, 0.9, "a 60-s cold start", 180.0, (5, 2))
    assert "start-up" in w2 and "x any earlier" not in w2
    assert "slo served 5P2D, at least static-best's 2 decode (5P2D)" in w2
    # a report without per-minute data (reused from an older run) still names the minute
    assert why_minute({}, 1, 0.5, "x", 0.0, None) == "min 1 50%"


def test_a_goodput_target_above_the_offered_load_says_it_is_unreachable():
    from controller.sim.matrix import evaluate
    from controller.sim.scenarios import Scenario

    sc = Scenario.model_validate({"name": "f", "traffic": [{"trace": str(CONV), "end_s": 60}], "profile": "llama2-70b-h100-tp8",
                                  "objectives": {"ttft_s": 2, "tpot_ms": 50}, "mode": "fixed", "gpus": 32,
                                  "tags": ["mix-shift"]})
    base = {"slo_attainment": 0.995, "gpu_hours": 1.0, "flips": 0, "flip_reversals": 0,
            "flip_reversals_unjustified": 0, "requests": 600, "duration_s": 60.0}
    jobs = [{"label": "slo", "error": None, "result": {**base, "goodput_rps": 9.9}},
            {"label": "static-best", "error": None, "fleet": [2, 2], "reached": True,
             "result": {**base, "goodput_rps": 9.5}}]
    c = evaluate(sc, jobs)["checks"]["goodput_1.2x_static_best"]
    assert c["pass"] is False
    assert "unreachable here: 1.2x static-best is 11.40 rps, above the offered 10.00 rps" in c["detail"]
    c1 = evaluate(sc, jobs)["checks"]["goodput_1.1x_others"]
    assert c1["detail"] == "no other policy at target"
    jobs.append({"label": "threshold@0.5", "error": None, "result": {**base, "goodput_rps": 9.8}})
    c1 = evaluate(sc, jobs)["checks"]["goodput_1.1x_others"]
    assert c1["pass"] is False
    assert c1["detail"] == "1.01x; unreachable here: 1.1x the best other is 10.78 rps, above the offered 10.00 rps"
    jobs.pop()
    jobs[1]["result"]["goodput_rps"] = 5.0  # 1.2x of 5 is within the offered 10 rps: no bound to state
    c2 = evaluate(sc, jobs)["checks"]["goodput_1.2x_static_best"]
    assert c2["pass"] is True and "unreachable" not in c2["detail"]
