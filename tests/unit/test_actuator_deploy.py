"""Deployment files: docker-compose.yml, the Prometheus scrape config, the Grafana provisioning and dashboard,
the agent and controller configs they mount.

Docker cannot run in this project's environment, so the compose file is checked structurally with PyYAML (every
service has an image or build and a command in exec form, every mounted file exists, every config it names
validates with the real config models); it has not been brought up here.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from controller.agent.compose_keys import ensure_keys
from controller.agent.config import load_agent_config
from controller.config import load_config

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_the_whole_stack():
    services = compose()["services"]
    assert {"router", "tap", "controller", "prometheus", "grafana", "keys"} <= set(services)
    workers = [s for s in services if s.startswith("worker-")]
    assert len(workers) == 4
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for key in ("command", "entrypoint"):
            if key in svc:
                assert isinstance(svc[key], list), f"{name}.{key} must be exec form (a list), not a shell string"
    # the router runs PD mode over the four workers
    cmd = services["router"]["command"]
    assert "--pd-disaggregation" in cmd
    assert sum(1 for a in cmd if a.startswith("http://worker-")) == 4
    # the real GPU worker stanza is there, commented, beside the emulated ones
    text = (REPO / "docker-compose.yml").read_text()
    assert "# sglang-worker-gpu-0:" in text and "--enable-pd-role-switch" in text


def test_compose_mounts_exist_and_configs_validate():
    services = compose()["services"]
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), f"{name} mounts missing {src}"
    for i in range(4):
        cfg = load_agent_config(REPO / "configs" / "agent" / f"compose-worker-{i}.yaml")
        assert cfg.worker_url == f"http://worker-{i}:8000"
        assert "{role}" in cfg.start
        assert f"compose-worker-{i}.yaml" in services[f"worker-{i}"]["command"][-1]
    ctl = load_config(REPO / "configs" / "agent" / "compose-controller.yaml")
    assert ctl.actuation.kind == "router" and ctl.actuation.switch == "agent"
    assert set(ctl.actuation.agents) == {f"http://worker-{i}:8000" for i in range(4)}
    assert ctl.telemetry.zmq_endpoints == ["tcp://tap:5557"]


def test_prometheus_scrapes_controller_router_workers():
    prom = yaml.safe_load((REPO / "configs" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {"controller:9109", "router:29000"} <= targets
    assert {f"worker-{i}:8000" for i in range(4)} <= targets


def test_grafana_provisioning_and_dashboard():
    prov = REPO / "configs" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dash_prov = yaml.safe_load((prov / "dashboards" / "pd.yml").read_text())
    assert dash_prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads((REPO / "configs" / "grafana" / "dashboards" / "pd-controller.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("pdc_flips_total", "pdc_actuator_retries_total", "pdctl_current_instances", "smg_router_requests_total",
                   "sglang:time_to_first_token_seconds_bucket"):
        assert metric in exprs
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_compose_key_bootstrap(tmp_path):
    ensure_keys(tmp_path)
    ensure_keys(tmp_path)  # idempotent: a restarted stack keeps its keys
    assert (tmp_path / "authorized" / "controller.key").read_text() == (tmp_path / "controller.key").read_text()
    assert (tmp_path / "agent.key_secret").exists()
