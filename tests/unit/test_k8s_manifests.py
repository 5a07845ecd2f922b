"""The reference Kubernetes manifests (configs/k8s/) validate offline against the 1.37 API schemas
(kubernetes-validate, strict); the LeaderWorkerSet's pod templates are validated as PodTemplateSpecs since
the CRD's own schema is not bundled; the embedded controller config validates with the real config model.
These checks are offline: nothing here was applied to a live cluster."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from controller.config import config_from_dict

K8S = Path(__file__).resolve().parents[2] / "configs" / "k8s"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.mark.parametrize("doc", docs("sglang-pd.yaml"), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_reference_manifest_is_valid(doc):
    kubernetes_validate.validate(doc, "1.37", strict=True)


def test_reference_fleet_shape():
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs("sglang-pd.yaml")}
    for pool in ("prefill", "decode"):
        dep = by[("Deployment", f"sglang-{pool}")]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        # the role label (what the router selects and the controller patches) is not part of the selector,
        # so a flipped pod stays owned by its Deployment
        assert labels["pd.sglang.io/role"] == pool
        assert "pd.sglang.io/role" not in dep["spec"]["selector"]["matchLabels"]
        assert "--enable-pd-role-switch" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    rules = by[("Role", "pd-controller")]["rules"]
    assert {"deployments/scale", "statefulsets/scale"} <= set(rules[1]["resources"])
    cfg = config_from_dict(yaml.safe_load(by[("ConfigMap", "pd-controller")]["data"]["controller.yaml"]))
    assert cfg.actuation.kind == "kubernetes"
    assert cfg.actuation.k8s_prefill_workload == "Deployment/sglang-prefill"


def test_leaderworkerset_pod_templates_are_valid():
    (lws,) = docs("lws-decode.yaml")
    t = lws["spec"]["leaderWorkerTemplate"]
    for tmpl in (t["leaderTemplate"], t["workerTemplate"]):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": tmpl}
        kubernetes_validate.validate(doc, "1.37", strict=True)


def test_validator_catches_a_broken_manifest():
    bad = docs("sglang-pd.yaml")[4]
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.37", strict=True)
