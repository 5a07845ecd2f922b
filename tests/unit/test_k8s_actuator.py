"""Kubernetes actuator against a recorded API contract.

No real API server can run here. A small aiohttp server stands in for it and answers with JSON documents
written from the Kubernetes API reference (Pod and PodList v1, autoscaling/v1 Scale, the LeaderWorkerSet
scale subresource); the Pod documents are validated with kubernetes-validate so they stay schema-true.
The tests check what the real client library (kubernetes_asyncio) sends: paths, verbs, patch bodies,
content types, retries on 5xx. Worker-side calls (/get_load, /pd_role_switch) go to the worker contract.
"""

from __future__ import annotations

import kubernetes_validate
import pytest
from aiohttp import web

from controller.actuators.kubernetes import KubernetesActuator
from controller.actuators.metrics import ActuatorMetrics
from controller.config import ActuationConfig
from tests.unit._fleet_contract import ContractFleet, W

NS = "sglang-pd"
LABEL = "pd.sglang.io/role"


def pod(name: str, role: str, url: str, ip: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": NS, "uid": f"uid-{name}", "resourceVersion": "1001",
            "labels": {"app.kubernetes.io/name": "sglang-worker", "pd.sglang.io/pool": role, LABEL: role},
            "annotations": {"pd.sglang.io/url": url},
        },
        "spec": {"containers": [{"name": "sglang", "image": "lmsysorg/sglang:latest"}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]},
    }


def scale_doc(kind_path: str, name: str, replicas: int) -> dict:
    return {
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "resourceVersion": "2002"},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": f"app.kubernetes.io/name=sglang-worker,pd.sglang.io/pool={name}"},
    }


class ApiServer:
    def __init__(self, fleet: ContractFleet) -> None:
        self.fleet = fleet
        self.pods: dict[str, dict] = {}
        self.scales = {("deployments", "sglang-prefill"): 2, ("statefulsets", "sglang-decode"): 2,
                       ("leaderworkersets", "sglang-decode-lws"): 3}
        self.requests: list[tuple[str, str, str, object]] = []
        self.fail_5xx = 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(f"/api/v1/namespaces/{NS}/pods", self.list_pods)
        app.router.add_patch(f"/api/v1/namespaces/{NS}/pods/{{name}}", self.patch_pod)
        for prefix in ("/apis/apps/v1", "/apis/leaderworkerset.x-k8s.io/v1"):
            app.router.add_get(f"{prefix}/namespaces/{NS}/{{res}}/{{name}}/scale", self.get_scale)
            app.router.add_patch(f"{prefix}/namespaces/{NS}/{{res}}/{{name}}/scale", self.patch_scale)

    async def _record(self, req: web.Request) -> object:
        body = await req.json() if req.can_read_body else None
        self.requests.append((req.method, req.path_qs, req.headers.get("Content-Type", ""), body))
        return body

    def _fault(self) -> web.Response | None:
        if self.fail_5xx:
            self.fail_5xx -= 1
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "message": "etcdserver: request timed out", "reason": "InternalError",
                                      "code": 500}, status=500)
        return None

    async def list_pods(self, req: web.Request) -> web.Response:
        await self._record(req)
        if (f := self._fault()) is not None:
            return f
        sel = req.query.get("labelSelector", "")
        items = [p for p in self.pods.values() if not sel or sel in p["metadata"]["labels"]]
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": "3003"}, "items": items})

    async def patch_pod(self, req: web.Request) -> web.Response:
        body = await self._record(req)
        p = self.pods.get(req.match_info["name"])
        if p is None:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        p["metadata"]["labels"].update(body["metadata"]["labels"])
        return web.json_response(p)

    async def get_scale(self, req: web.Request) -> web.Response:
        await self._record(req)
        if (f := self._fault()) is not None:
            return f
        key = (req.match_info["res"], req.match_info["name"])
        return web.json_response(scale_doc(key[0], key[1], self.scales[key]))

    async def patch_scale(self, req: web.Request) -> web.Response:
        body = await self._record(req)
        key = (req.match_info["res"], req.match_info["name"])
        self.scales[key] = body["spec"]["replicas"]
        return web.json_response(scale_doc(key[0], key[1], self.scales[key]))


@pytest.fixture
async def cluster(registry):
    fleet = ContractFleet()
    api = ApiServer(fleet)
    app = fleet.app()
    api.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fleet.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    for i, (key, role) in enumerate((("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode"))):
        fleet.workers[key] = W(role)
        api.pods[f"sglang-{key}"] = pod(f"sglang-{key}", role, fleet.url(key), f"10.0.0.{10 + i}")
    from kubernetes_asyncio import client

    conf = client.Configuration(host=fleet.base)
    cfg = ActuationConfig(
        kind="kubernetes", k8s_namespace=NS, k8s_prefill_workload="Deployment/sglang-prefill",
        k8s_decode_workload="StatefulSet/sglang-decode", poll_interval_s=0.01, drain_timeout_s=2,
        switch_timeout_s=2, backoff_initial_s=0.001, backoff_max_s=0.01,
    )
    act = KubernetesActuator(client.ApiClient(conf), cfg, ActuatorMetrics(registry))
    yield act, api, fleet
    await act.close()
    await runner.cleanup()


def test_pod_documents_are_schema_valid():
    kubernetes_validate.validate(pod("x", "prefill", "http://u", "10.0.0.1"), "1.37", strict=True)


async def test_fleet_view_from_pod_labels(cluster):
    act, api, fleet = cluster
    view = await act.fleet()
    assert view.count("prefill") == 2 and view.count("decode") == 2
    assert {w.url for w in view.workers} == {fleet.url(k) for k in ("p0", "p1", "d0", "d1")}
    method, path, _, _ = api.requests[0]
    assert method == "GET" and path == f"/api/v1/namespaces/{NS}/pods?labelSelector=pd.sglang.io/role"


async def test_flip_relabels_through_draining(cluster):
    act, api, fleet = cluster
    fleet.workers["d1"].load = 2
    res = await act.flip(fleet.url("d1"), "prefill", "ttft_violation")
    assert res.ok, res.detail
    patches = [(p, ct, b) for m, p, ct, b in api.requests if m == "PATCH"]
    assert [b["metadata"]["labels"][LABEL] for _, _, b in patches] == ["draining", "prefill"]
    assert all(p == f"/api/v1/namespaces/{NS}/pods/sglang-d1" for p, _, _ in patches)
    assert all(ct in ("application/strategic-merge-patch+json", "application/merge-patch+json")
               for _, ct, _ in patches)
    assert fleet.workers["d1"].role == "prefill"
    assert (await act.fleet()).count("prefill") == 3


async def test_flip_rolls_back_label_when_switch_refused(cluster):
    act, api, fleet = cluster
    fleet.workers["d1"].switch_refuses = True
    res = await act.flip(fleet.url("d1"), "prefill", "r")
    assert not res.ok and "rolled back to decode" in res.detail
    assert api.pods["sglang-d1"]["metadata"]["labels"][LABEL] == "decode"


async def test_flip_refuses_last_instance(cluster):
    act, api, fleet = cluster
    del api.pods["sglang-p1"]
    res = await act.flip(fleet.url("p0"), "decode", "r")
    assert res.detail == "refused: last_instance_of_pool"
    assert not [r for r in api.requests if r[0] == "PATCH"]


async def test_scale_deployment_and_statefulset(cluster, registry):
    act, api, _ = cluster
    up = await act.scale("prefill", 2, "ttft_violation")
    down = await act.scale("decode", -1, "over_provisioned")
    floor = await act.scale("decode", -1, "over_provisioned")
    assert up.ok and up.detail == "Deployment/sglang-prefill replicas 2 -> 4"
    assert down.ok and down.detail == "StatefulSet/sglang-decode replicas 2 -> 1"
    assert not floor.ok and "last_instance_of_pool" in floor.detail
    sent = [(p, b) for m, p, _, b in api.requests if m == "PATCH"]
    assert sent == [
        (f"/apis/apps/v1/namespaces/{NS}/deployments/sglang-prefill/scale", {"spec": {"replicas": 4}}),
        (f"/apis/apps/v1/namespaces/{NS}/statefulsets/sglang-decode/scale", {"spec": {"replicas": 1}}),
    ]
    assert registry.get_sample_value("pdc_scale_actions_total", {"result": "ok", "pool": "prefill"}) == 1


async def test_scale_leaderworkerset_via_custom_object_scale(cluster):
    act, api, _ = cluster
    act.workloads["decode"] = ("LeaderWorkerSet", "sglang-decode-lws")
    res = await act.scale("decode", 1, "tpot_violation")
    assert res.ok and res.detail == "LeaderWorkerSet/sglang-decode-lws replicas 3 -> 4"
    m, p, _ct, b = api.requests[-1]
    assert (m, p, b) == ("PATCH", f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{NS}/leaderworkersets/"
                                  "sglang-decode-lws/scale", {"spec": {"replicas": 4}})


async def test_api_server_5xx_is_retried_and_counted(cluster, registry):
    act, api, _ = cluster
    api.fail_5xx = 2
    res = await act.scale("prefill", 1, "r")
    assert res.ok
    assert registry.get_sample_value("pdc_actuator_retries_total", {"actuator": "kubernetes", "op": "read_scale"}) == 2


def test_bad_workload_spec_is_a_clear_error():
    from controller.actuators.errors import KubernetesError
    from controller.actuators.kubernetes import _workload

    with pytest.raises(KubernetesError, match="k8s_prefill_workload: 'Pod/x'"):
        _workload("Pod/x", "k8s_prefill_workload")

