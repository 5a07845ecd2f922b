"""Simulator additions: smg's decode admission gate, flip-reversal tracking, early stop, bounded fleets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.cli.main import main
from controller.core.control import Action, ActionKind, Reason, Role, WorkerStats
from controller.profiles import load_profile
from controller.sim.fleet import MAX_INSTANCES, Fleet, SimConfig, SimError
from controller.sim.traces import Trace


def _trace(n: int, gap_s: float, inp: int = 512, out: int = 400) -> Trace:
    return Trace("t", np.arange(n) * gap_s, np.full(n, inp, np.int64), np.full(n, out, np.int64),
                 np.zeros(n, np.int64))


PROF = load_profile("llama2-70b-h100-tp8")


def test_gate_caps_running_per_decode_worker_and_queues_in_the_router():
    tr = _trace(40, 0.01)
    f = Fleet(tr, PROF, SimConfig(decode_max_running=4, gate_timeout_s=1e9), 2, 2, PROF.overhead_s)
    peak_wait = 0
    t = 0.0
    nxt = 0
    while t < 200:
        t += 0.5
        nxt = f.run_until(t, nxt)
        dec = f.serving(Role.DECODE)
        assert all(i.dispatched <= 4 for i in dec)
        assert all(len(i.running) <= 4 for i in dec)
        peak_wait = max(peak_wait, f.gate_waiting)
    f.run_until(math.inf, nxt)
    # 40 arrive at once, 8 slots: 32 waited in the router
    assert peak_wait == 32
    assert np.all(~np.isnan(f.done_s)) and f.shed == 0 and f.gate_waiting == 0
    st = f.stats(t, {}, 5.0)
    if "decode_gate_waiting" in WorkerStats.__dataclass_fields__:
        assert st.decode_gate_waiting == 0  # type: ignore[attr-defined]


def test_gate_sheds_after_its_timeout():
    # one decode worker with two slots; each request decodes ~400 tokens (> 10 s): later ones time out
    tr = _trace(10, 0.0)
    f = Fleet(tr, PROF, SimConfig(decode_max_running=2, gate_timeout_s=5.0), 1, 1, PROF.overhead_s)
    f.set_objectives(2.0, 0.05)
    f.run_until(math.inf, 0)
    assert f.shed == 8 and f.gate_waiting == 0
    assert int(np.sum(~np.isnan(f.done_s))) == 2
    assert f.misses >= 8 and f.in_flight == 0


def test_without_gate_decode_is_chosen_at_prefill_completion():
    tr = _trace(40, 0.01)
    f = Fleet(tr, PROF, SimConfig(), 2, 2, PROF.overhead_s)
    f.run_until(math.inf, 0)
    assert f.gate_waiting == 0 and np.all(f.dec_of < 0) and np.all(~np.isnan(f.done_s))


def test_flip_back_within_the_window_is_a_reversal():
    tr = _trace(1, 1.0)
    f = Fleet(tr, PROF, SimConfig(flip_time_s=0.0, reversal_window_s=300.0), 3, 0, PROF.overhead_s)
    f.apply([Action(ActionKind.FLIP_TO_DECODE, 2, Reason.REBALANCE)], 10.0)  # instances 2 then 1 -> decode
    assert [i.role for i in f.instances] == [Role.PREFILL, Role.DECODE, Role.DECODE]
    f.apply([Action(ActionKind.FLIP_TO_PREFILL, 1, Reason.REBALANCE)], 100.0)  # back, 90 s later
    assert len(f.reversals) == 1
    t, iid, role, dt = f.reversals[0]
    assert (t, role, dt) == (100.0, Role.PREFILL, 90.0) and f.instances[iid].role is Role.PREFILL
    # once the window has passed, moving back is not a reversal
    f.apply([Action(ActionKind.FLIP_TO_DECODE, 1, Reason.REBALANCE)], 1000.0)
    assert len(f.reversals) == 1
    assert [x[1:] for x in f.flip_log][:2] == [(2, Role.PREFILL, Role.DECODE), (1, Role.PREFILL, Role.DECODE)]


def test_early_stop_once_the_miss_budget_is_spent():
    tr = _trace(400, 0.01, inp=4096)  # a burst no 1P1D fleet serves within 1 s
    f = Fleet(tr, PROF, SimConfig(), 1, 1, PROF.overhead_s)
    f.set_objectives(1.0, 0.05, miss_budget=10)
    f.run_until(math.inf, 0)
    assert f.exhausted and f.misses == 11
    assert np.isnan(f.done_s).sum() > 300  # it stopped long before the trace was served


def test_fleet_size_is_bounded():
    f = Fleet(_trace(1, 1.0), PROF, SimConfig(cold_start_s=0.0), 1, 1, PROF.overhead_s)
    with pytest.raises(SimError, match="beyond the simulator's bound"):
        f.apply([Action(ActionKind.SCALE_PREFILL, MAX_INSTANCES, Reason.REBALANCE)], 0.0)


def test_one_request_trace_does_not_blow_up(tmp_path, capsys):
    # a zero-duration trace once sized a static fleet for 1e9 req/s (62 million instances, 20 GB)
    p = tmp_path / "one.csv"
    p.write_text("timestamp_s,input_tokens,output_tokens\n0,100,10\n")
    for pol in ("static", "static-peak", "threshold", "throughput", "oracle"):
        assert main(["simulate", "--trace", str(p), "--elastic", "--policy", pol, "--json"]) == 0
    out = capsys.readouterr().out
    assert "1000000000" not in out
    # identical timestamps: a degenerate burst, same bound
    q = tmp_path / "same.csv"
    q.write_text("timestamp_s,input_tokens,output_tokens\n" + "5,100,10\n" * 50)
    assert main(["simulate", "--trace", str(q), "--elastic", "--policy", "static", "--json"]) == 0


def test_degenerate_spans_and_scales_are_one_line_errors(tmp_path, capsys):
    far = tmp_path / "far.csv"  # a millisecond timestamp read as seconds: 95 years of ticks
    far.write_text("timestamp_s,input_tokens,output_tokens\n0,100,10\n3e9,100,10\n")
    assert main(["simulate", "--trace", str(far), "--policy", "slo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ticks, above the bound" in err
    assert main(["simulate", "--trace", str(far), "--rate-scale", "1e7"]) == 2
    assert "rate_scale=10000000.0" in capsys.readouterr().err
