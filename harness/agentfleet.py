"""A PD fleet on loopback where every emulated worker is managed by a node agent (real processes).

    agents (pd-controller agent, CURVE) -> emulated workers (pd-controller emulate-worker)
    the real PD router (smg by default; `router=` / $PD_ROUTER, see harness/routers.py) over them

Used by the demo and the end-to-end tests of flips by restart. Keys are
generated into `workdir/keys` (the agents' pair, the controller's pair, and
the authorized-keys directory holding the controller's public key).
Every process is started in its own session and stopped by `stop()` (SIGTERM,
then SIGKILL): agents stop the servers they manage; servers orphaned by a
killed agent are stopped through the pids the agents reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml

from controller.actuators.agent import AgentClient, CurveKeys
from controller.actuators.errors import TransientError
from controller.agent.keys import generate
from harness.fleet import free_port, terminate
from harness.routers import resolve, router_command

HOST = "127.0.0.1"


class LocalFleetError(RuntimeError):
    """An agent, its server or the router did not come up; the message names which and quotes its log."""


def _tail(path: Path, n: int = 1200) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


class AgentFleet:
    def __init__(
        self,
        workdir: Path,
        roles: Sequence[str],
        *,
        profile: str | Path,
        time_scale: float = 1.0,
        worker_args: Sequence[str] = (),
        router_args: Sequence[str] = (),
        startup_timeout_s: float = 90.0,
        router: str | None = None,
        model: str = "emulated",
        policy: str = "round_robin",
    ) -> None:
        self.router_kind = resolve(router)
        self.policy = policy  # the router's load-balancing policy (--policy)
        self.model = model  # the served model name clients send (smg routes by it)
        self.tmp = workdir
        self.roles = list(roles)
        self.profile = str(profile)
        self.time_scale = time_scale
        self.worker_args = list(worker_args)
        self.router_args = list(router_args)
        self.startup_timeout_s = startup_timeout_s
        self.agents: list[subprocess.Popen[bytes]] = []
        self.endpoints: dict[str, str] = {}
        self.urls: list[str] = []
        self.bootstrap: dict[str, int] = {}
        self.router: subprocess.Popen[bytes] | None = None
        self.router_url = ""
        self.router_metrics_url = ""
        self.orphans: list[int] = []  # server pids to stop ourselves (their agent may be gone)
        keys = workdir / "keys"
        self.server_pub, _ = generate(keys, "agent")
        cpub, self.client_sec = generate(keys, "controller")
        (keys / "authorized").mkdir(exist_ok=True)
        (keys / "authorized" / "controller.key").write_text(cpub.read_text())
        self.rogue_sec = generate(workdir / "rogue", "rogue")[1]  # a key no agent trusts (tests)

    def client(self, secret: Path | None = None, timeout_s: float = 2.0) -> AgentClient:
        return AgentClient(CurveKeys(secret or self.client_sec, self.server_pub), timeout_s=timeout_s)

    def agent_config(self, i: int, role: str) -> Path:
        port, bport, zport = free_port(), free_port(), free_port()
        url = f"http://{HOST}:{port}"
        cfg = {
            "endpoint": f"tcp://{HOST}:{zport}", "worker_url": url, "initial_role": role, "bootstrap_port": bport,
            "server_secret_key": str(self.tmp / "keys" / "agent.key_secret"),
            "authorized_keys_dir": str(self.tmp / "keys" / "authorized"), "poll_interval_s": 0.1,
            "start_timeout_s": self.startup_timeout_s,
            "start": [sys.executable, "-m", "controller", "emulate-worker", "--role", "{role}", "--profile",
                      self.profile, "--host", "{host}", "--port", "{port}", "--bootstrap-port", "{bootstrap_port}",
                      "--time-scale", repr(self.time_scale), "--enable-pd-role-switch",
                      "--served-model-name", self.model, "--collect-tokens-histogram", *self.worker_args],
        }
        path = self.tmp / f"agent{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.endpoints[url] = cfg["endpoint"]  # type: ignore[assignment]
        self.urls.append(url)
        self.bootstrap[url] = bport
        return path

    async def start(self) -> AgentFleet:
        try:
            for i, role in enumerate(self.roles):
                path = self.agent_config(i, role)
                with open(self.tmp / f"agent{i}.log", "wb") as log:
                    self.agents.append(subprocess.Popen(
                        [sys.executable, "-m", "controller", "agent", "--config", str(path)],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
            client = self.client()
            for i, url in enumerate(self.urls):
                await self._wait_running(client, i, url)
            self.router_url = await asyncio.to_thread(self._start_router)
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def _wait_running(self, client: AgentClient, i: int, url: str) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.agents[i].poll() is not None:
                raise LocalFleetError(f"agent {i} exited with {self.agents[i].returncode}: "
                                      f"{_tail(self.tmp / f'agent{i}.log')}")
            with contextlib.suppress(TransientError):
                r = await client.send(self.endpoints[url], "status")
                if r.pid is not None and r.pid not in self.orphans:
                    self.orphans.append(r.pid)
                if r.state == "running" and r.healthy:
                    return
                if r.state == "failed":
                    raise LocalFleetError(f"agent {i} could not start its server: {r.progress}")
            await asyncio.sleep(0.2)
        raise LocalFleetError(f"agent {i} never reported its server running: {_tail(self.tmp / f'agent{i}.log')}")

    def _start_router(self) -> str:
        port, mport = free_port(), free_port()
        pairs = list(zip(self.urls, self.roles, strict=True))
        cmd = router_command(self.router_kind, host=HOST, port=port, prometheus_port=mport,
                             prefill=[(u, self.bootstrap[u]) for u, r in pairs if r == "prefill"],
                             decode=[u for u, r in pairs if r != "prefill"], policy=self.policy,
                             extra=self.router_args)
        with open(self.tmp / "router.log", "wb") as log:
            self.router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
                                           start_new_session=True)
        url = f"http://{HOST}:{port}"
        self.router_metrics_url = f"http://{HOST}:{mport}/metrics"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.router.poll() is not None:
                raise LocalFleetError(f"{self.router_kind.label} exited with {self.router.returncode}: "
                                      f"{_tail(self.tmp / 'router.log')}")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(f"{url}/workers", timeout=2) as r:
                    body = json.loads(r.read())
                if sum(1 for w in body["workers"] if w["is_healthy"]) == len(self.urls):
                    return url
            time.sleep(0.2)
        raise LocalFleetError(f"the router did not register the agents' workers: {_tail(self.tmp / 'router.log')}")

    def stop(self) -> None:
        if self.router is not None:
            terminate(self.router)
        for p in self.agents:
            terminate(p)
        for pid in self.orphans:  # servers whose agent died or left them behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
