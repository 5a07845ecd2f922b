"""Scenario files: every shipped one validates and builds; bad ones fail in one line naming file and field."""

from __future__ import annotations

import numpy as np
import pytest

from controller.cli.main import main
from controller.core.control import Mode
from controller.sim.scenarios import (
    SCENARIOS_DIR,
    GeneratorKind,
    GeneratorSegment,
    ScenarioError,
    build,
    find_scenarios,
    generate,
    load_scenario,
)
from controller.sim.traces import load_trace
from tests.conftest import DATA

CONV = DATA / "traces" / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"


def test_shipped_matrix_covers_issue_9():
    files = find_scenarios()
    assert len(files) >= 16
    scs = [load_scenario(f) for f in files]
    traces = {str(getattr(seg, "trace", "")) for sc in scs for seg in sc.traffic}
    for name in ("AzureLLMInferenceTrace_code.csv", "AzureLLMInferenceTrace_conv.csv", "conversation_trace.jsonl",
                 "synthetic_trace.jsonl"):
        assert any(t.endswith(name) for t in traces), name
    gens = [seg for sc in scs for seg in sc.traffic if isinstance(seg, GeneratorSegment)]
    assert any(g.generator is GeneratorKind.GAMMA and g.cv > 1 for g in gens)
    assert any(g.generator is GeneratorKind.RAMP and g.duration_s >= 3600 for g in gens)
    assert {sc.mode for sc in scs} == {Mode.ELASTIC, Mode.FIXED}
    assert {2.0, 60.0} <= {sc.flip_time_s for sc in scs}
    assert {60.0, 300.0, 600.0} <= {sc.cold_start_s for sc in scs}
    assert len({sc.profile for sc in scs}) >= 3
    ttfts = {sc.objectives.ttft_s for sc in scs}
    assert min(ttfts) == 1.0 and max(ttfts) == 5.0
    rates = {getattr(seg, "rate_scale", 1.0) for sc in scs for seg in sc.traffic}
    assert 1.0 in rates and 6.0 in rates
    assert all(30 <= sc.objectives.tpot_ms <= 60 for sc in scs)
    # mix shifts both ways: a code segment before a conversation one, and the reverse
    orders = [tuple("code" if "code" in str(getattr(s, "trace", "")) else "conv" for s in sc.traffic)
              for sc in scs if "mix-shift" in sc.tags]
    assert ("code", "conv") in orders and ("conv", "code") in orders


def test_every_shipped_scenario_builds_within_bounds():
    for f in find_scenarios():
        sc = load_scenario(f)
        ctx, sim = build(sc, f.parent)
        n = len(ctx.trace)
        assert 1000 < n < 150_000, (sc.name, n)
        assert 1500 <= ctx.trace.duration_s <= 3700, (sc.name, ctx.trace.duration_s)
        assert sim.flip_time_s == sc.flip_time_s and sim.cold_start_s == sc.cold_start_s
        if sc.mode is Mode.FIXED:
            assert ctx.instances_budget is not None and ctx.instances_budget >= 2


def _write(tmp_path, name, body):
    p = tmp_path / f"{name}.yaml"
    p.write_text(body)
    return p


BASE = f"""traffic:
  - trace: {CONV}
    end_s: 600
profile: llama2-70b-h100-tp8
objectives: {{ttft_s: 2, tpot_ms: 50}}
"""


@pytest.mark.parametrize(("body", "needle"), [
    (BASE.replace("ttft_s: 2", "ttft_s: -1"), "objectives.ttft_s=-1"),
    (BASE.replace("end_s: 600", "end_s: 600\n    rate_scale: 0"), "traffic.0.file.rate_scale=0"),
    (BASE.replace("end_s: 600", "end_s: 600\n    rate_sclae: 2"), "traffic.0.file.rate_sclae"),
    (BASE + "mode: fixed\n", "gpus"),
    (BASE + "flip_time_s: forever\n", "flip_time_s='forever'"),
    (BASE.replace("objectives: {ttft_s: 2, tpot_ms: 50}", "objectives: {ttft_s: 2}"), "objectives.tpot_ms: missing"),
    ("traffic:\n  - generator: gamma\n    lengths_from: x.csv\n    duration_s: 60\n    rate_rps: 1\n    peak_rps: 3\n"
     "profile: p\nobjectives: {ttft_s: 1, tpot_ms: 50}\n", "peak_rps"),
    ("- just a list\n", "expected a mapping"),
    ("traffic: [\n", "malformed YAML"),
])
def test_bad_scenario_names_file_and_field(tmp_path, body, needle):
    body = body if body.startswith(("- ", "traffic: [")) else f"name: bad\n{body}"
    p = _write(tmp_path, "bad", body)
    with pytest.raises(ScenarioError) as e:
        load_scenario(p)
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg


def test_name_must_match_file(tmp_path):
    p = _write(tmp_path, "one", "name: two\n" + BASE)
    with pytest.raises(ScenarioError, match="name='two': must match the file name 'one'"):
        load_scenario(p)


def test_bench_cli_bad_inputs_are_one_line_exit_2(tmp_path, capsys):
    p = _write(tmp_path, "bad", "name: bad\n" + BASE.replace("ttft_s: 2", "ttft_s: 0"))
    assert main(["bench", "--scenario", str(p), "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "objectives.ttft_s=0" in err and str(p) in err
    assert main(["bench", "--policy", "slo,magic", "--list"]) == 2
    assert "policy='slo,magic'" in capsys.readouterr().err
    assert main(["bench", "--jobs", "0", "--list"]) == 2
    assert "jobs=0" in capsys.readouterr().err
    assert main(["bench", "--scenario", "no-such-*", "--list"]) == 2
    assert "scenario='no-such-*'" in capsys.readouterr().err
    # a scenario whose trace file is malformed: one line naming the trace file and line
    bad = tmp_path / "t.csv"
    bad.write_text("timestamp_s,input_tokens,output_tokens\n0,10,5\n1,x,5\n")
    q = _write(tmp_path, "badtrace", f"name: badtrace\ntraffic:\n  - trace: {bad}\nprofile: llama2-70b-h100-tp8\n"
               "objectives: {ttft_s: 2, tpot_ms: 50}\n")
    assert main(["bench", "--scenario", str(q), "--policy", "static", "--out", str(tmp_path / "o"), "-j", "1",
                 "--no-plots"]) == 0  # a job error is reported in the report, the run goes on
    text = (tmp_path / "o" / "report.md").read_text()
    assert f"{bad}:3" in text and "input_tokens='x'" in text


def test_bench_list_shows_shipped(capsys):
    assert main(["bench", "--list", "--scenario", "azure-*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("azure-") for line in out)
    assert SCENARIOS_DIR.is_dir()


def test_gamma_generator_has_the_asked_cv_and_rate():
    lengths = load_trace(CONV)
    seg = GeneratorSegment(generator="gamma", lengths_from=CONV, duration_s=20_000, rate_rps=5.0, cv=3.0)
    tr = generate(seg, lengths, np.random.default_rng(0))
    gaps = np.diff(tr.arrival_s)
    assert len(tr) / 20_000 == pytest.approx(5.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)
    # lengths come from the real trace
    assert set(np.unique(tr.input_tokens)) <= set(np.unique(lengths.input_tokens))


def test_ramp_generator_rises_then_falls():
    lengths = load_trace(CONV)
    seg = GeneratorSegment(generator="ramp", lengths_from=CONV, duration_s=3600, rate_rps=2.0, peak_rps=20.0)
    tr = generate(seg, lengths, np.random.default_rng(1))
    per10 = np.bincount((tr.arrival_s // 600).astype(int), minlength=6) / 600.0
    assert per10[0] < per10[1] < per10[2] and per10[3] > per10[4] > per10[5]
    # triangle: mean rate (2 + 20) / 2
    assert len(tr) / 3600 == pytest.approx(11.0, rel=0.05)
    assert per10[2] == pytest.approx(17.0, rel=0.15)  # the mean of the rate over minutes 20-30


_BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]) + "\n"
_BAD_FILES = {
    "alias_bomb": _BOMB,
    "deep": "[" * 20_000 + "]" * 20_000 + "\n",
    "python_tag": "a: !!python/object/apply:os.system [echo pwned]\n",
    "top_scalar": "just a string\n",
    "binary": "\x00\x01\x02 not yaml",
    "traffic_not_list": "name: x\ntraffic: 3\nprofile: p\nobjectives: {ttft_s: 1, tpot_ms: 50}\n",
    "huge_rate": BASE.replace("end_s: 600", "end_s: 600\n    rate_scale: 1e6"),
}


def _run_with_deadline(argv, deadline_s=60.0):
    import contextlib
    import io
    import threading

    box: dict[str, object] = {}
    err = io.StringIO()

    def go() -> None:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            box["rc"] = main(argv)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(deadline_s)
    assert not th.is_alive(), f"hung: {argv}"
    return box.get("rc"), err.getvalue()


@pytest.mark.parametrize("case", sorted(_BAD_FILES))
def test_malformed_scenario_files_are_one_line(tmp_path, case):
    body = _BAD_FILES[case]
    p = tmp_path / "x.yaml"
    p.write_text(body if case != "huge_rate" else "name: x\n" + body)
    rc, err = _run_with_deadline(["bench", "--scenario", str(p), "--policy", "static", "-j", "1", "--no-plots",
                                  "--out", str(tmp_path / "o")])
    if case == "huge_rate":
        # validated, then refused when the traffic is built: the job reports it, the run goes on
        assert rc == 0 and "above the matrix bound" in (tmp_path / "o" / "report.md").read_text()
        return
    assert rc == 2 and err.strip().count("\n") == 0 and "Traceback" not in err and str(p) in err


@pytest.mark.parametrize("target", ["dir", "devnull", "missing"])
def test_unreadable_scenario_and_trace_paths_are_one_line(tmp_path, target):
    path = {"dir": str(tmp_path), "devnull": "/dev/null", "missing": str(tmp_path / "nope.yaml")}[target]
    rc, err = _run_with_deadline(["bench", "--scenario", path, "--list"])
    assert rc == 2 and err.strip().count("\n") == 0 and "Traceback" not in err
    rc, err = _run_with_deadline(["simulate", "--scenario", path])
    assert rc == 2 and err.strip().count("\n") == 0 and "Traceback" not in err
    rc, err = _run_with_deadline(["simulate", "--trace", path, "--policy", "static"])
    assert rc == 2 and err.strip().count("\n") == 0 and "Traceback" not in err


def test_simulate_runs_a_scenario_file(tmp_path, capsys):
    import json

    p = _write(tmp_path, "s", "name: s\n" + BASE.replace("end_s: 600", "end_s: 300") + "mode: fixed\ngpus: 32\n")
    assert main(["simulate", "--scenario", str(p), "--policy", "static", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "fixed" and out["gpus"] == 32 and out["policies"]["static"]["requests"] > 100
    assert main(["simulate", "--scenario", str(p), "--trace", str(CONV)]) == 2
    assert "drop --trace" in capsys.readouterr().err
