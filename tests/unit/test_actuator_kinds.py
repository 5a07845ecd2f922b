"""The other actuators behind the same Protocol: dry-run (advisory), the in-memory fake, the factory and its
config validation (one clear line naming field and value)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from controller.actuators import Actuator, build_actuator
from controller.actuators.base import FleetView, WorkerView
from controller.actuators.dryrun import DryRunActuator
from controller.actuators.fake import FakeActuator
from controller.actuators.fleet import RouterActuator
from controller.actuators.kubernetes import KubernetesActuator
from controller.actuators.metrics import ActuatorMetrics
from controller.config import ActuationConfig, ConfigError, config_from_dict


async def test_dry_run_changes_nothing_and_reports(registry):
    fleet = FleetView((WorkerView("http://a", "prefill"), WorkerView("http://b", "decode")))
    act = DryRunActuator(ActuatorMetrics(registry), initial=fleet)
    assert isinstance(act, Actuator)
    r1 = await act.flip("http://b", "prefill", "slo_prefill_short")
    r2 = await act.scale("decode", -1, "decode_surplus")
    assert r1.detail == "dry-run: would drain http://b and flip it to prefill"
    assert r2.detail == "dry-run: would drain and remove 1 decode worker(s)"
    # honest: nothing was carried out, nothing changed, nothing started (the core must not count it)
    for r in (r1, r2):
        assert (r.ok, r.outcome, r.why, r.refused, r.changed, r.started) == (
            False, "advised", "dry_run", True, False, False)
    assert await act.fleet() == fleet
    assert registry.get_sample_value("pdc_actuator_calls_total",
                                     {"actuator": "dry-run", "op": "flip", "result": "advised"}) == 1
    await act.close()


async def test_fake_applies_the_same_safety_rules():
    act = FakeActuator(prefill=1, decode=2, spares=1)
    assert isinstance(act, Actuator)
    refused = await act.flip("http://fake-p0", "decode", "r")
    assert refused.detail == "refused: last_instance_of_pool"
    ok = await act.flip("http://fake-d1", "prefill", "r")
    assert ok.ok and (await act.fleet()).count("prefill") == 2
    act.fail_next.append("not idle")
    failed = await act.flip("http://fake-p0", "decode", "r")
    assert not failed.ok and "rolled back" in failed.detail
    assert failed.outcome == "rolled_back" and failed.started and not failed.refused
    assert (await act.fleet()).count("prefill") == 2  # the failed flip changed nothing
    assert (await act.scale("decode", 1, "r")).ok
    assert (await act.fleet()).count("decode") == 2
    assert (await act.scale("decode", -5, "r")).detail == "removed 1"
    assert act.calls[0] == ("flip", "http://fake-p0", "decode", "r")


async def test_factory_builds_each_kind(registry, tmp_path):
    dry = build_actuator(ActuationConfig(), registry)
    assert isinstance(dry, DryRunActuator)
    router = build_actuator(ActuationConfig(kind="router", router_url="http://127.0.0.1:9"), CollectorRegistry())
    assert isinstance(router, RouterActuator)
    await router.close()
    k8s = build_actuator(ActuationConfig(kind="kubernetes", k8s_prefill_workload="Deployment/p"),
                         CollectorRegistry())
    assert isinstance(k8s, KubernetesActuator)
    await k8s.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kind": "router"}, "needs router_url"),
        ({"kind": "router", "router_url": "http://r", "switch": "agent"}, "needs agents"),
        ({"max_flips_in_flight": 1}, "actuation.max_flips_in_flight=1: flip limits live in control.max_flips_in_flight"),
        ({"flip_budget_per_hour": 6}, "actuation.flip_budget_per_hour=6: flip limits live in control.max_flips_per_hour"),
        ({"min_pool_size": 0}, "actuation.min_pool_size=0"),
        ({"kind": "magic"}, "actuation.kind='magic'"),
        ({"backoff_initial_s": 2.0, "backoff_max_s": 1.0}, "backoff_max_s=1.0 must be >= backoff_initial_s=2.0"),
        ({"drain_timeout_s": -1}, "actuation.drain_timeout_s=-1"),
    ],
)
def test_bad_actuation_config_names_field_and_value(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"actuation": raw}, origin="cfg.yaml")
