"""Runtime: supervised tasks, the tick loop on a manual clock, advisory vs acting, the real core driven by events."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal

import numpy as np
import pytest

from controller.actuators.fake import FakeActuator
from controller.config import config_from_dict
from controller.core.control import Action, ActionKind, Decision, Observations, Reason
from controller.core.control.types import CalibrationView, Diagnostics
from controller.core.events import empty_events
from controller.metrics import ControllerMetrics
from controller.runtime.actuation import ActuatorSink
from controller.runtime.clock import ManualClock, SystemClock, Waker
from controller.runtime.loop import TickLoop, observed_latencies
from controller.runtime.sidecar import Sidecar, build_spec
from controller.runtime.supervisor import Supervisor
from tests.conftest import PROFILES

CALIB = CalibrationView(1.0, 1.0, None, None, None, 0, 0)


class Result:
    def __init__(self, actions, state, diagnostics):
        self.actions, self.state, self.diagnostics = actions, state, diagnostics


def flip_every_tick(state, obs, now):
    """A decision function that wants one flip to prefill each tick (to test the shell, not the policy)."""
    diag = Diagnostics(now, None, None, None, CALIB, 2, 1, (Decision("prefill", Reason.SLO_PREFILL_SHORT, "test"),))
    return Result((Action(ActionKind.FLIP_TO_PREFILL, 1, Reason.SLO_PREFILL_SHORT),), (state or 0) + 1, diag)


def fleet_obs(_now):
    return Observations()


async def test_supervisor_first_crash_stops_the_rest():
    stopped = []

    async def forever():
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append("forever")

    async def crash():
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    sup = Supervisor(grace_s=1.0)
    sup.add("a", forever)
    sup.add("b", crash)
    out = await sup.run()
    assert out.first == "b" and isinstance(out.error, RuntimeError) and not out.stuck
    assert stopped == ["forever"]


async def test_supervisor_stops_on_sigterm():
    sup = Supervisor(grace_s=1.0)
    sup.add("a", lambda: asyncio.Event().wait())
    sup.install_signal_handlers()
    try:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
        out = await asyncio.wait_for(sup.run(), 5)
    finally:
        sup.remove_signal_handlers()
    assert out.first is None and out.ok


def test_supervisor_rejects_duplicate_names():
    sup = Supervisor()
    sup.add("a", lambda: asyncio.sleep(0))
    with pytest.raises(ValueError, match="name='a'"):
        sup.add("a", lambda: asyncio.sleep(0))


async def test_waker_interrupts_sleep():
    w = Waker()
    asyncio.get_running_loop().call_soon(w.wake)
    assert await SystemClock().sleep(30.0, w) is True
    assert await SystemClock().sleep(0.0, w) is False


async def test_advisory_loop_decides_but_never_acts(registry):
    fake = FakeActuator(2, 2)
    clock = ManualClock()
    loop = TickLoop(decide=flip_every_tick, observe=fleet_obs, state=None, clock=clock, period_s=5.0,
                    metrics=ControllerMetrics(registry), sink=ActuatorSink(fake), advisory=True)
    t0 = clock.now()
    for _ in range(10):
        await loop.tick_once()
        await clock.sleep(loop.period_s, loop.waker)
    assert loop.ticks == 10 and loop.state == 10 and clock.now() == t0 + 50
    assert fake.calls == []
    assert registry.get_sample_value("pdctl_actuations_total", {"result": "skipped_advisory"}) == 10
    assert registry.get_sample_value("pdctl_decisions_total", {"pool": "prefill", "reason": "slo_prefill_short"}) == 10
    assert registry.get_sample_value("pdctl_advisory") == 1
    assert loop.history[-1].applied == "advisory"


async def test_acting_loop_applies_until_paused(registry):
    fake = FakeActuator(2, 2)
    loop = TickLoop(decide=flip_every_tick, observe=fleet_obs, state=None, clock=ManualClock(), period_s=1.0,
                    metrics=ControllerMetrics(registry), sink=ActuatorSink(fake), advisory=False)
    await loop.tick_once()
    assert [c[0] for c in fake.calls] == ["flip"] and loop.history[-1].applied in ("ok", "failed")
    loop.set_paused(True)
    await loop.tick_once()
    assert len(fake.calls) == 1 and loop.mode == "advisory"
    loop.guard = lambda: "fleet_unknown"
    loop.set_paused(False)
    await loop.tick_once()
    assert len(fake.calls) == 1 and loop.history[-1].applied == "blocked:fleet_unknown"


async def test_a_failing_tick_is_counted_and_the_loop_goes_on(registry):
    calls = []

    def decide(state, obs, now):
        calls.append(now)
        if len(calls) == 1:
            raise ZeroDivisionError("bad tick")
        return flip_every_tick(state, obs, now)

    loop = TickLoop(decide=decide, observe=fleet_obs, state=None, clock=ManualClock(), period_s=1.0,
                    metrics=ControllerMetrics(registry))
    assert await loop.tick_once() is None
    assert await loop.tick_once() is not None
    assert registry.get_sample_value("pdctl_ticks_total", {"result": "error"}) == 1
    assert registry.get_sample_value("pdctl_ticks_total", {"result": "ok"}) == 1


def test_bad_period_rejected():
    with pytest.raises(ValueError, match="period_s=0"):
        TickLoop(decide=flip_every_tick, observe=fleet_obs, state=None, clock=ManualClock(), period_s=0)


def test_observed_latencies_ignore_failures_and_nan():
    ev = empty_events(3)
    ev["status"] = [200, 200, 500]
    ev["ttft_s"] = [0.1, np.nan, 9.0]
    ev["tpot_s"] = [0.01, 0.03, 9.0]
    ttft, tpot = observed_latencies(ev)
    assert ttft == pytest.approx(0.1) and tpot == pytest.approx(0.02)
    assert observed_latencies(empty_events()) == (None, None)


def _cfg(**tel):
    return config_from_dict({
        "hardware": {"profile": str(PROFILES / "llama2-70b-h100-tp8.yaml")},
        "slo": {"tpot_ms": 50.0},  # reachable on this profile (batch 1 decodes at ~30 ms)
        "control": {"tick_period_s": 5.0, "window_s": 60.0, "min_samples": 20},
        "telemetry": {"zmq_endpoints": ["tcp://127.0.0.1:1"], **tel},
    })


def test_build_spec_needs_hardware():
    from controller.config import Config, ConfigError

    with pytest.raises(ConfigError, match="hardware"):
        build_spec(Config())


async def test_sidecar_drives_the_real_core_on_virtual_time(registry):
    """200 s of 20 req/s through the hub into the real core: estimates converge, metrics and state follow."""
    clock = ManualClock()
    sc = Sidecar(_cfg(), registry=registry, clock=clock)
    rng = np.random.default_rng(1)
    for _ in range(40):
        now = clock.now()
        ev = empty_events(100)  # 100 completions in 5 s = 20 req/s
        ev["arrival_s"] = now - rng.uniform(0, 5, 100)
        ev["input_tokens"] = 2000
        ev["cached_tokens"] = 500
        ev["output_tokens"] = 200
        ev["ttft_s"], ev["tpot_s"], ev["e2e_s"], ev["status"] = 0.3, 0.02, 0.0, 200
        sc.hub.add_events(ev, "tap", now)
        await sc.loop.tick_once()
        clock.advance(5.0)
    st = sc.state()
    est = st["estimates"]
    assert est["arrival_rate_rps"] == pytest.approx(20.0, rel=0.1)
    assert 1.0 <= est["arrival_scv"] < 1.6  # uniform arrivals: Poisson-like, the GI/G/c factor at ~1
    assert est["input_len_mean"] == 2000 and est["output_len_mean"] == 200 and est["cache_hit_rate"] == 0.25
    assert st["telemetry"]["events_total"] == 4000 and st["fleet"]["known"] is False
    assert st["target"]["prefill"] >= 1 and st["decisions"]
    assert registry.get_sample_value("pdctl_observed_arrival_rate_rps") == pytest.approx(20.0, rel=0.1)
    assert registry.get_sample_value("pdctl_tick_duration_seconds_count") == 40
    assert registry.get_sample_value("pdctl_observed_ttft_seconds") == pytest.approx(0.3)
    assert not math.isnan(registry.get_sample_value("pdctl_forecast_max_rps"))


async def test_the_plan_and_the_burst_bound_are_exported(registry):
    """Completions only (no arrival events): the prefill burst bound is read from the completed requests."""
    clock = ManualClock()
    cfg = config_from_dict({
        "hardware": {"profile": str(PROFILES / "llama2-70b-h100-tp8.yaml")},
        "slo": {"ttft_s": 2.0, "ttft_quantile": 0.99, "tpot_ms": 50.0},
        "control": {"tick_period_s": 5.0, "window_s": 60.0, "min_samples": 20},
        "telemetry": {"zmq_endpoints": ["tcp://127.0.0.1:1"]},
    })
    sc = Sidecar(cfg, registry=registry, clock=clock)
    rng = np.random.default_rng(2)
    for _ in range(30):
        now = clock.now()
        ev = empty_events(100)
        ev["arrival_s"] = now - rng.uniform(0, 5, 100)
        ev["input_tokens"], ev["output_tokens"] = 2000, 200
        ev["ttft_s"], ev["tpot_s"], ev["e2e_s"], ev["status"] = 0.3, 0.03, 0.0, 200
        sc.hub.add_events(ev, "tap", now)
        await sc.loop.tick_once()
        clock.advance(5.0)
    model = sc.state()["target"]["model"]
    assert model is not None
    need = registry.get_sample_value("pdctl_needed_instances", {"role": "prefill", "source": "plan"})
    assert need == pytest.approx(model["n_prefill_exact"])
    burst = registry.get_sample_value("pdctl_needed_instances", {"role": "prefill", "source": "arrival_burst"})
    assert burst == pytest.approx(model["prefill_backlog_need"]) and 0 < burst <= need + 1e-9
    decode = registry.get_sample_value("pdctl_needed_instances", {"role": "decode", "source": "plan"})
    assert decode == pytest.approx(model["n_decode_exact"])
    flood = registry.get_sample_value("pdctl_needed_instances", {"role": "decode", "source": "arrival_burst"})
    assert flood == pytest.approx(model["decode_backlog_need"]) and 0 < flood <= decode + 1e-9
    # the tail is met (P99 TTFT 0.3 s of 2 s, TPOT 30 of 50 ms): no headroom on prefill; decode's is
    # at most 1 (it relaxes only once a regrow time has been observed)
    assert registry.get_sample_value("pdctl_feedback_headroom", {"role": "prefill"}) == 1.0
    assert 0 < registry.get_sample_value("pdctl_feedback_headroom", {"role": "decode"}) <= 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--telemetry", "udp://x"], "'udp://x'"),
        (["run", "--router", "127.0.0.1:30000"], "'127.0.0.1:30000'"),
        (["run"], "telemetry: no source"),
        (["run", "--telemetry", "tcp://127.0.0.1:1"], "hardware: missing"),
        (["run", "--config", "/no/such.yaml", "--telemetry", "tcp://127.0.0.1:1"], "no such file"),
    ],
)
def test_run_cli_bad_input_is_one_line(argv, message, capsys):
    from controller.cli.main import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects a malformed flag itself, with the same one-line contract
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_run_cli_listen_must_be_host_port(capsys):
    from controller.cli.main import main

    with pytest.raises(SystemExit):
        main(["run", "--listen", "nope"])
    assert "--listen='nope': expected HOST:PORT" in capsys.readouterr().err


async def test_canonical_tick_line_is_one_json_object(registry):
    import io
    import json

    import structlog

    from controller.logging import configure_logging

    buf = io.StringIO()
    configure_logging(json=None, stream=buf)  # a StringIO is not a TTY: JSON
    try:
        loop = TickLoop(decide=flip_every_tick, observe=fleet_obs, state=None, clock=ManualClock(), period_s=1.0,
                        metrics=ControllerMetrics(registry), log=structlog.get_logger("t"))
        await loop.tick_once()
        await loop.tick_once()
    finally:
        structlog.reset_defaults()
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["tick", "tick"]
    line = lines[-1]
    assert line["tick"] == 2 and line["reasons"] == ["slo_prefill_short"] and line["applied"] == "advisory"
    assert line["actions"] == ["flip_to_prefill:1"] and line["target"] == "2P1D" and line["fleet"] == "1P1D"


def test_console_rendering_on_a_tty():
    import io

    import structlog

    from controller.logging import configure_logging

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    buf = Tty()
    configure_logging(stream=buf)
    try:
        structlog.get_logger("t").info("tick", tick=1)
    finally:
        structlog.reset_defaults()
    out = buf.getvalue()
    assert "tick" in out and not out.lstrip().startswith("{")


class SlowSink:
    """An action sink whose flips take until released: a drained flip waiting for the longest stream."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.applied: list = []

    async def apply(self, actions):
        await self.release.wait()
        self.applied.append(actions)
        return [(a, True, "flipped") for a in actions]


async def test_ticks_go_on_while_an_actuation_runs(registry):
    sink = SlowSink()
    refreshed = []

    async def after_apply():
        refreshed.append(True)

    loop = TickLoop(decide=flip_every_tick, observe=fleet_obs, state=None, clock=ManualClock(), period_s=1.0,
                    metrics=ControllerMetrics(registry), sink=sink, advisory=False, after_apply=after_apply)
    task = asyncio.create_task(loop.run_actuation(), name="test-actuation")
    try:
        await asyncio.sleep(0)
        await loop.tick_once()
        assert loop.history[-1].applied == "submitted"
        await asyncio.sleep(0)  # the actuation task picks it up and blocks in the slow flip
        for _ in range(3):  # the loop keeps deciding and reporting; nothing piles up behind the flip
            await loop.tick_once()
            assert loop.history[-1].applied == "blocked:actuation_busy"
        assert loop.ticks == 4 and not sink.applied
        sink.release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(sink.applied) == 1 and refreshed == [True]
        assert registry.get_sample_value("pdctl_actuations_total", {"result": "ok"}) == 1
        assert registry.get_sample_value("pdctl_actuations_total", {"result": "blocked"}) == 3
        await loop.tick_once()
        assert loop.history[-1].applied == "submitted"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_fleet_read_failure_does_not_stop_the_sidecar(registry):
    class DownRouter:
        name = "down"

        async def fleet(self):
            raise ConnectionError("router restarting")

    sc = Sidecar(_cfg(), registry=registry, clock=ManualClock(), actuator=DownRouter())
    await sc.refresh_actuator_fleet()
    await sc.refresh_actuator_fleet()
    assert sc.current_fleet() is None
    assert registry.get_sample_value("pdctl_fleet_errors_total") == 2


async def test_dry_run_actuation_ticks_at_the_period_and_advises_once(registry):
    """Issue 13: with an actuator that changes nothing the loop must idle, not spin (140-356 ticks/s before)."""
    from controller.actuators.base import FleetView as ActFleet
    from controller.actuators.base import WorkerView
    from controller.actuators.dryrun import DryRunActuator
    from controller.actuators.metrics import ActuatorMetrics

    clock = ManualClock()
    fleet = ActFleet((WorkerView("http://p0", "prefill"), WorkerView("http://d0", "decode"),
                      WorkerView("http://d1", "decode")))
    act = DryRunActuator(ActuatorMetrics(registry), initial=fleet)
    reads = []

    async def after_apply():
        reads.append(clock.now())

    loop = TickLoop(decide=flip_every_tick, observe=fleet_obs, state=0, clock=clock, period_s=5.0,
                    sink=ActuatorSink(act), advisory=False, after_apply=after_apply)
    t0 = clock.now()
    tick_task = asyncio.create_task(loop.run(), name="tick")
    act_task = asyncio.create_task(loop.run_actuation(), name="actuation")
    try:
        for _ in range(2000):
            await asyncio.sleep(0)
            if clock.now() - t0 >= 600.0:
                break
    finally:
        for t in (tick_task, act_task):
            t.cancel()
        for t in (tick_task, act_task):
            with contextlib.suppress(asyncio.CancelledError):
                await t
    elapsed = clock.now() - t0
    assert elapsed >= 600.0
    # never faster than one tick per period
    assert loop.ticks <= elapsed / 5.0 + 1
    # the same advice on the same fleet is given once per backoff, not every tick
    assert 1 <= len(act.would) <= 6, len(act.would)
    assert reads == []  # nothing changed: the fleet is not re-read after an advised action
    applied = {r.applied.split(":")[0] for r in loop.history}
    assert "suppressed" in applied


async def test_a_wake_up_never_makes_ticks_faster_than_the_period():
    clock = ManualClock()
    loop = TickLoop(decide=flip_every_tick, observe=fleet_obs, state=0, clock=clock, period_s=5.0)
    t0 = clock.now()
    task = asyncio.create_task(loop.run(), name="tick")
    try:
        for _ in range(400):
            loop.waker.wake()  # a hostile stream of pause/resume calls
            await asyncio.sleep(0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert loop.ticks <= (clock.now() - t0) / 5.0 + 1
