"""The `kubernetes` actuator (optional extra: kubernetes_asyncio).

Pools are workloads (Deployment, StatefulSet or LeaderWorkerSet); workers are
pods carrying a role label that the router's service discovery selects on
(`--prefill-selector pd.sglang.io/role=prefill --decode-selector ...=decode`).

- scale(pool, delta): read and patch the workload's `scale` subresource
  (LeaderWorkerSet through the custom-objects scale endpoint).
- flip(pod, role): the same drained sequence as the router actuator, with the
  label as the registry: label `draining` (both selectors drop the pod) ->
  wait idle (/get_load) -> SGLang /pd_role_switch -> healthy -> label the new
  role -> the router's discovery adds it to the other pool. On failure the
  label goes back to the old role (if the pod is healthy in it).

A real API server cannot run in this project's test environment: tests
(tests/unit/test_k8s_actuator.py) drive this code against a small aiohttp
server that answers with JSON documents written from the Kubernetes API
reference (Pod, PodList, autoscaling/v1 Scale; the Pod documents are checked
with kubernetes-validate), and check the requests it makes (paths, verbs,
patch bodies and content types). It has not been run against a live cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from controller.actuators.base import ActionResult, FleetView, Outcome, Role, WorkerView, other_role, refused
from controller.actuators.errors import ActuationError, KubernetesError, TransientError
from controller.actuators.flip import FlipGuard, FlipRecord
from controller.actuators.http import Http
from controller.actuators.metrics import ActuatorMetrics
from controller.actuators.retry import Retrier
from controller.actuators.router import RouterClient
from controller.actuators.switch import RoleSwitchEndpoint
from controller.actuators.worker import WorkerClient
from controller.config import ActuationConfig

log = structlog.get_logger("pd.actuation")

URL_ANNOTATION = "pd.sglang.io/url"
DRAINING = "draining"
LWS = ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")


def _workload(spec: str | None, field: str) -> tuple[str, str] | None:
    if spec is None:
        return None
    kind, _, name = spec.partition("/")
    if kind not in ("Deployment", "StatefulSet", "LeaderWorkerSet") or not name:
        raise KubernetesError("config", field, f"{spec!r}: expected Deployment/NAME, StatefulSet/NAME or "
                              "LeaderWorkerSet/NAME")
    return kind, name


class KubernetesActuator:
    name = "kubernetes"

    def __init__(
        self,
        api_client: Any,
        cfg: ActuationConfig,
        metrics: ActuatorMetrics,
        *,
        worker_port: int = 30000,
        clock: Callable[[], float] = time.monotonic,
        router: RouterClient | None = None,
    ) -> None:
        from kubernetes_asyncio import client as k8s

        self._k8s = k8s
        self.api_client = api_client
        self.apps = k8s.AppsV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        self.cfg = cfg
        self.ns = cfg.k8s_namespace
        self.label = cfg.k8s_role_label
        self.workloads = {
            "prefill": _workload(cfg.k8s_prefill_workload, "k8s_prefill_workload"),
            "decode": _workload(cfg.k8s_decode_workload, "k8s_decode_workload"),
        }
        self.metrics = metrics
        self.worker_port = worker_port
        self.clock = clock
        self.retrier = Retrier("kubernetes", metrics, retries=cfg.retries, initial_s=cfg.backoff_initial_s,
                               max_s=cfg.backoff_max_s)
        self.http = Http(cfg.http_timeout_s)
        self.workers = WorkerClient(self.http, Retrier("worker", metrics, retries=cfg.retries,
                                                       initial_s=cfg.backoff_initial_s, max_s=cfg.backoff_max_s))
        self.switcher = RoleSwitchEndpoint(self.workers, self.http, poll_interval_s=cfg.poll_interval_s, clock=clock)
        self.guard = FlipGuard(min_pool_size=cfg.min_pool_size)
        self.in_flight: dict[str, FlipRecord] = {}
        self.router = router
        self._kubeconfig_pending = False

    @classmethod
    def from_config(cls, cfg: ActuationConfig, metrics: ActuatorMetrics, router: RouterClient | None = None,
                    ) -> KubernetesActuator:
        try:
            from kubernetes_asyncio import client, config
        except ImportError:  # pragma: no cover - depends on the install
            raise KubernetesError(
                "config", "kubernetes", "needs the k8s extra: pip install 'pd-controller[k8s]'"
            ) from None
        conf = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=conf)
            in_cluster = True
        except config.ConfigException:
            in_cluster = False
        act = cls(client.ApiClient(conf), cfg, metrics, router=router)
        # outside a cluster the kubeconfig is loaded on first use (loading it is async)
        act._kubeconfig_pending = not in_cluster
        return act

    # ---- calls -----------------------------------------------------------------------------------
    async def _call(self, op: str, target: str, fn: Callable[[], Any]) -> Any:
        ApiException = self._k8s.exceptions.ApiException
        if self._kubeconfig_pending:
            from kubernetes_asyncio import config

            self._kubeconfig_pending = False
            try:
                await config.load_kube_config(client_configuration=self.api_client.configuration)
            except (config.ConfigException, OSError) as e:
                raise KubernetesError("config", "kubeconfig", f"no in-cluster config and no kubeconfig: {e}") from None

        async def attempt() -> Any:
            try:
                return await fn()
            except ApiException as e:
                status = int(e.status or 0)
                err = TransientError if status >= 500 or status in (0, 429) else KubernetesError
                raise err(op, target, str(e.reason), status=status) from None
            except (TimeoutError, OSError) as e:
                raise TransientError(op, target, f"{type(e).__name__}: {e}") from None

        return await self.retrier.call(op, target, attempt)

    # ---- the Protocol ----------------------------------------------------------------------------
    async def fleet(self) -> FleetView:
        pods = await self._call("list_pods", self.ns, lambda: self.core.list_namespaced_pod(
            self.ns, label_selector=self.label))
        out = []
        for p in pods.items:
            role = (p.metadata.labels or {}).get(self.label)
            ready = any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
            url = self._url(p)
            if role in ("prefill", "decode"):
                state = "flipping" if url in self.in_flight else "serving"
                out.append(WorkerView(url, role, healthy=ready, state=state))
            elif role == DRAINING and url in self.in_flight:
                out.append(WorkerView(url, self.in_flight[url].from_role, healthy=False, state="flipping"))
        return FleetView(tuple(out), tuple(self.in_flight))

    def _url(self, pod: Any) -> str:
        ann = (pod.metadata.annotations or {}).get(URL_ANNOTATION)
        return ann.rstrip("/") if ann else f"http://{pod.status.pod_ip}:{self.worker_port}"

    async def _pod_for(self, url: str) -> str:
        pods = await self._call("list_pods", self.ns, lambda: self.core.list_namespaced_pod(
            self.ns, label_selector=self.label))
        for p in pods.items:
            if self._url(p) == url.rstrip("/"):
                return str(p.metadata.name)
        raise KubernetesError("find_pod", url, f"no pod with label {self.label} serves this URL")

    async def _label(self, pod: str, value: str) -> None:
        body = {"metadata": {"labels": {self.label: value}}}
        await self._call("patch_pod", pod, lambda: self.core.patch_namespaced_pod(pod, self.ns, body))

    async def flip(self, worker: str, to_role: Role, reason: str) -> ActionResult:
        url = worker.rstrip("/")
        now = self.clock()
        why = self.guard.refusal(await self.fleet(), url, to_role, self.in_flight)
        if why is not None:
            self.metrics.flips.labels("refused", to_role).inc()
            return refused("flip", url, reason, why)
        from_role = other_role(to_role)
        rec = FlipRecord(url, from_role, to_role, reason, now)
        self.in_flight[url] = rec
        steps: list[str] = []
        try:
            pod = await self._pod_for(url)
            steps.append("label_draining")
            await self._label(pod, DRAINING)
            steps.append("drain")
            deadline = self.clock() + self.cfg.drain_timeout_s
            while (n := await self.workers.load(url)) > 0:
                if self.clock() >= deadline:
                    raise ActuationError("drain", url, f"still {n} requests after {self.cfg.drain_timeout_s:g}s")
                await asyncio.sleep(self.cfg.poll_interval_s)
            steps.append("switch")
            await self.switcher.switch(url, to_role, self.cfg.switch_timeout_s)
            steps.append(f"label_{to_role}")
            await self._label(pod, to_role)
            self.metrics.flips.labels("ok", to_role).inc()
            return ActionResult("flip", url, ok=True, reason=reason, detail="done", steps=tuple(steps))
        except ActuationError as e:
            # back to the last good state when the pod still serves its old role; else leave it unselected
            role = await self.switcher.current_role(url)
            if role == from_role:
                try:
                    await self._label(await self._pod_for(url), from_role)
                except ActuationError as e2:
                    self.metrics.flips.labels("failed", to_role).inc()
                    return ActionResult("flip", url, ok=False, reason=reason, steps=tuple(steps),
                                        detail=f"{e}; rollback failed: {e2}", outcome=Outcome.FAILED)
                self.metrics.flips.labels("rolled_back", to_role).inc()
                return ActionResult("flip", url, ok=False, reason=reason, steps=tuple(steps),
                                    detail=f"{e}; rolled back to {from_role}", outcome=Outcome.ROLLED_BACK)
            self.metrics.flips.labels("failed", to_role).inc()
            return ActionResult("flip", url, ok=False, reason=reason, steps=tuple(steps),
                                detail=f"{e}; pod left labelled {DRAINING} (serves {role})", outcome=Outcome.FAILED)
        finally:
            self.in_flight.pop(url, None)

    async def scale(self, pool: Role, delta: int, reason: str) -> ActionResult:
        wl = self.workloads[pool]
        if wl is None:
            return refused("scale", pool, reason, "no_workload", f"refused: no k8s_{pool}_workload configured")
        kind, name = wl
        try:
            current = await self._get_replicas(kind, name)
            want = max(self.cfg.min_pool_size, current + delta)
            if want == current:
                res = refused("scale", pool, reason, "last_instance_of_pool",
                              f"refused: last_instance_of_pool ({kind}/{name} at {current})")
            else:
                await self._set_replicas(kind, name, want)
                res = ActionResult("scale", pool, ok=True, reason=reason,
                                   detail=f"{kind}/{name} replicas {current} -> {want}")
        except ActuationError as e:
            res = ActionResult("scale", pool, ok=False, reason=reason, detail=str(e))
        self.metrics.scales.labels("ok" if res.ok else "failed", pool).inc()
        return res

    async def _get_replicas(self, kind: str, name: str) -> int:
        if kind == "Deployment":
            s = await self._call("read_scale", name, lambda: self.apps.read_namespaced_deployment_scale(name, self.ns))
        elif kind == "StatefulSet":
            s = await self._call("read_scale", name,
                                 lambda: self.apps.read_namespaced_stateful_set_scale(name, self.ns))
        else:
            d = await self._call("read_scale", name, lambda: self.custom.get_namespaced_custom_object_scale(
                LWS[0], LWS[1], self.ns, LWS[2], name))
            return int((d.get("spec") or {}).get("replicas", 0))
        return int(s.spec.replicas or 0)

    async def _set_replicas(self, kind: str, name: str, n: int) -> None:
        body = {"spec": {"replicas": n}}
        if kind == "Deployment":
            await self._call("patch_scale", name,
                             lambda: self.apps.patch_namespaced_deployment_scale(name, self.ns, body))
        elif kind == "StatefulSet":
            await self._call("patch_scale", name,
                             lambda: self.apps.patch_namespaced_stateful_set_scale(name, self.ns, body))
        else:
            await self._call("patch_scale", name, lambda: self.custom.patch_namespaced_custom_object_scale(
                LWS[0], LWS[1], self.ns, LWS[2], name, body))
        log.info("k8s_scaled", kind=kind, name=name, replicas=n)

    async def close(self) -> None:
        await self.http.close()
        await self.api_client.close()
