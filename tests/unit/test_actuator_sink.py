"""The runtime's adapter over an actuator: honest outcomes and `last_changed`, so the loop idles when nothing
can change (issue 13 item 4: the dry-run actuator and refused actions made the loop wake itself, 140-356
ticks/s). These fail on the old adapter, which had neither outcome nor last_changed and reported dry-run
advice as ok."""

from __future__ import annotations

from controller.actuators.base import FleetView, WorkerView
from controller.actuators.dryrun import DryRunActuator
from controller.actuators.fake import FakeActuator
from controller.actuators.metrics import ActuatorMetrics
from controller.core.control.types import Action, ActionKind, Reason
from controller.runtime.actuation import ActuatorSink

TO_PREFILL = Action(ActionKind.FLIP_TO_PREFILL, 1, Reason.SLO_PREFILL_SHORT)
TO_DECODE = Action(ActionKind.FLIP_TO_DECODE, 1, Reason.SLO_DECODE_SHORT)
SCALE_UP = Action(ActionKind.SCALE_DECODE, 1, Reason.SLO_DECODE_SHORT)


async def test_dry_run_changes_nothing_so_no_wake(registry):
    fleet = FleetView((WorkerView("http://a", "prefill"), WorkerView("http://b", "decode"),
                       WorkerView("http://c", "decode")))
    sink = ActuatorSink(DryRunActuator(ActuatorMetrics(registry), initial=fleet))
    (x,) = await sink.apply_detailed([TO_PREFILL])
    assert (x.ok, x.outcome, x.why, x.started, x.changed, x.refused) == (False, "advised", "dry_run", 0, False, True)
    assert sink.last_changed is False
    assert x.detail == "dry-run: would drain http://b and flip it to prefill"


async def test_refusals_change_nothing_a_started_flip_does():
    fake = FakeActuator(prefill=1, decode=3)
    sink = ActuatorSink(fake)
    # the last prefill worker: refused by the actuator's hard rule
    (x,) = await sink.apply_detailed([TO_DECODE])
    assert (x.outcome, x.why, x.started) == ("refused", "last_instance_of_pool", 0) and not sink.last_changed
    # no spare to scale up with
    (y,) = await sink.apply_detailed([SCALE_UP])
    assert (y.outcome, y.why, y.started) == ("refused", "no_spare_workers", 0) and not sink.last_changed
    # more donors asked than the pool has: refused before the actuator is called
    (z,) = await sink.apply_detailed([Action(ActionKind.FLIP_TO_PREFILL, 5, Reason.SLO_PREFILL_SHORT)])
    assert (z.outcome, z.why) == ("refused", "no_donor") and not sink.last_changed
    assert [c[0] for c in fake.calls] == ["flip", "scale"]
    # a flip that starts and completes changes the fleet: wake and re-read
    (ok,) = await sink.apply_detailed([TO_PREFILL])
    assert (ok.ok, ok.outcome, ok.started) == (True, "done", 1) and sink.last_changed
    # a flip that starts and rolls back touched the fleet too (it was out of its pool meanwhile)
    fake.fail_next.append("not idle")
    (rb,) = await sink.apply_detailed([TO_PREFILL])
    assert (rb.ok, rb.outcome, rb.started) == (False, "rolled_back", 1) and sink.last_changed


async def test_tuple_protocol_kept_for_the_loop():
    sink = ActuatorSink(FakeActuator(prefill=2, decode=2))
    ((action, ok, detail),) = await sink.apply([TO_DECODE])
    assert action is TO_DECODE and ok and detail == "done"
    assert sink.last and sink.last[0].outcome == "done"
