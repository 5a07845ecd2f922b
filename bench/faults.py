"""Fault suite against the live stack: faults at every step of a flip, and a soak, with what users would run.

The stack, all real processes on loopback (the demo's harness: harness.agentfleet,
harness.demo.start_tap):

    load -> pd-router-tap -> sglang-router (PD) -> 4 emulated SGLang workers (2P2D), each under a node agent
                 | events (ZeroMQ)
                 v
         the controller: the assembled sidecar (telemetry, tick loop, actuation task, API, the router actuator
         with its journal and reconciler), as its own process so it can be killed -9 and restarted

Flip faults need a flip in progress at a known step. For those cases the controller's decision function is
scripted (`--scripted`): it asks for one flip when the suite writes a cue file, and the rest of the sidecar is
the product's (the same `build_actuator`, `Sidecar`, journal and reconciler as `pd-controller run`). The suite
follows the flip through the controller's journal and injects the fault when the flip reaches the step. The
soak and idle cases run the real core.

Per case it prints: requests, failed, time to consistency after the fault ended, the final state, and the
controller's RSS and CPU before/after. Consistent means, checked from outside the controller: every worker
answers, the router lists it in the pool it serves (its own /server_info), its agent reports the same, and the
journal holds no record.

    python -m bench.faults                      # every case (about 6 minutes) and a 10-minute soak
    python -m bench.faults --soak-s 60 --cases router_down_10s_during_flip,worker_killed_mid_flip
    python -m bench.faults --json               # one JSON object per case on stdout

Targets (issue 13 item 7): 0 failed requests in every case except a router outage; consistency within 60 s
of every fault; RSS growth < 10 % over the soak; controller CPU < 5 % of a core at idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = "llama2-70b-h100-tp8"
CONSISTENCY_TARGET_S = 60.0
# argv prefix of a server start that takes argv[1] seconds: sleep, then become the real command
DELAYED_EXEC = "import os, sys, time; time.sleep(float(sys.argv[1])); os.execv(sys.argv[2], sys.argv[2:])"
HZ = os.sysconf("SC_CLK_TCK")


# ---- process measurements ---------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Anonymous resident memory plus swap (MB): the heap, what a leak grows. File-backed pages (shared
    libraries, mapped files) are left out: on a shared machine the kernel drops them under pressure, which
    reads as a fall of total RSS (seen here: 77 -> 61 MB in one sample)."""
    kb = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "VmSwap:")):
                kb += int(line.split()[1])
    return kb / 1000.0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime + stime


def argv_of(proc: subprocess.Popen[bytes]) -> list[str]:
    """The command line a process was started with (not /proc's: the router renames itself)."""
    return [str(a) for a in proc.args] if isinstance(proc.args, list | tuple) else [str(proc.args)]


@dataclass
class Usage:
    """A process's RSS (MB) and CPU (% of one core, averaged since the previous sample)."""

    pid: int
    t: float = field(default_factory=time.monotonic)
    cpu: float = 0.0

    def __post_init__(self) -> None:
        self.cpu = cpu_s(self.pid)

    def sample(self) -> tuple[float, float]:
        now, c = time.monotonic(), cpu_s(self.pid)
        pct = 100.0 * (c - self.cpu) / max(now - self.t, 1e-6)
        self.t, self.cpu = now, c
        return rss_mb(self.pid), pct


# ---- load -------------------------------------------------------------------------------------------------


class Load:
    """Open-loop requests at `rate_rps` through the tap (/generate, short prompt, `tokens` new tokens)."""

    def __init__(self, url: str, rate_rps: float, tokens: int = 16) -> None:
        self.url, self.rate, self.tokens = url, rate_rps, tokens
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def failed(self) -> int:
        return self.requests - self.outcomes["ok"]

    async def _one(self, s: aiohttp.ClientSession, k: int) -> None:
        body = {"text": f"request {k}: " + "the quick brown fox jumps over the lazy dog " * 8,
                "sampling_params": {"max_new_tokens": self.tokens, "ignore_eos": True}}
        try:
            async with s.post(f"{self.url}/generate", json=body) as r:
                text = await r.text()
                key = "ok" if r.status == 200 else f"http_{r.status}"
                if r.status != 200:
                    self.errors.append(text[:160])
        except (TimeoutError, aiohttp.ClientError) as e:
            key = type(e).__name__
            self.errors.append(str(e)[:160])
        self.outcomes[key] += 1

    async def _run(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            k = 0
            while not self._stop.is_set():
                k += 1
                t = asyncio.create_task(self._one(s, k))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0 / self.rate)
            if tasks:
                await asyncio.wait(tasks, timeout=60)

    async def __aenter__(self) -> Load:
        if self.rate > 0:
            self._task = asyncio.create_task(self._run(), name="load")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


# ---- the stack --------------------------------------------------------------------------------------------


class Stack:
    def __init__(self, work: Path, *, time_scale: float = 1.0, switch_s: float = 20.0, scripted: bool = True,
                 reconcile_interval_s: float = 2.0) -> None:
        self.work = work
        self.time_scale = time_scale
        self.switch_s = switch_s
        self.scripted = scripted
        self.reconcile_interval_s = reconcile_interval_s
        self.fleet: Any = None
        self.tap: subprocess.Popen[bytes] | None = None
        self.tap_url = ""
        self.controller: subprocess.Popen[bytes] | None = None
        self.cue = work / "cue.json"
        self.journal = work / "flips.json"
        self.config_path = work / "controller.yaml"
        self._cue_id = 0

    async def start(self) -> Stack:
        from controller.profiles import resolve_profile_path
        from harness.agentfleet import AgentFleet
        from harness.demo import controller_config, scaled_profile, start_tap

        s = self.time_scale
        delay = self.switch_s

        class SlowStartFleet(AgentFleet):
            """Agents whose server takes `switch_s` to start: a flip by restart then takes that long, as a
            real SGLang server loading weights does (the emulator itself starts in about a second)."""

            def agent_config(self, i: int, role: str) -> Path:
                path = super().agent_config(i, role)
                cfg = yaml.safe_load(path.read_text())
                cfg["start"] = [sys.executable, "-c", DELAYED_EXEC, repr(delay), *cfg["start"]]
                cfg["start_timeout_s"] = delay + 60.0
                path.write_text(yaml.safe_dump(cfg))
                return path

        self.fleet = SlowStartFleet(self.work, ["prefill", "prefill", "decode", "decode"], profile=PROFILE,
                                    time_scale=s, startup_timeout_s=delay + 90.0)
        await self.fleet.start()
        self.tap, self.tap_url, pub = await asyncio.to_thread(start_tap, self.fleet.router_url, self.work)
        profile = scaled_profile(resolve_profile_path(PROFILE), s, self.work / "profile.yaml")
        cfg = controller_config(profile, self.fleet, pub, s, self.journal)
        cfg["actuation"].update({
            "switch": "agent",  # a flip restarts the server in the other mode (switch_s), as in the demo
            "drain_timeout_s": 30.0, "switch_timeout_s": self.switch_s + 30.0, "register_timeout_s": 20.0,
            "verify_timeout_s": 5.0, "poll_interval_s": 0.2, "http_timeout_s": 2.0,
            "reconcile_interval_s": self.reconcile_interval_s,
        })
        self.config_path.write_text(yaml.safe_dump(cfg))
        await self.start_controller()
        return self

    async def start_controller(self) -> None:
        argv = [sys.executable, "-m", "bench.faults", "controller", "--config", str(self.config_path),
                "--cue", str(self.cue)]
        if self.scripted:
            argv.append("--scripted")
        log = open(self.work / "controller.log", "ab")  # noqa: SIM115 - the child owns it
        self.controller = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.controller.poll() is not None:
                raise RuntimeError(f"controller exited with {self.controller.returncode}: "
                                   f"{(self.work / 'controller.log').read_text()[-2000:]}")
            if "api_listening" in (self.work / "controller.log").read_text(errors="replace"):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("controller did not start in 60 s")

    def kill_controller(self) -> None:
        assert self.controller is not None
        self.controller.send_signal(signal.SIGKILL)
        self.controller.wait()

    async def stop(self) -> None:
        from harness.fleet import terminate

        if self.controller is not None:
            await asyncio.to_thread(terminate, self.controller, 10.0)
        if self.tap is not None:
            await asyncio.to_thread(terminate, self.tap)
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.stop)

    # ---- cues and the journal ----------------------------------------------------------------------------

    def cue_flip(self, to_role: str) -> None:
        self._cue_id += 1
        tmp = self.cue.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": self._cue_id, "to": to_role}))
        os.replace(tmp, self.cue)

    def journal_records(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.journal.read_text() or "{}"))
        except (OSError, ValueError):
            return {}

    async def wait_step(self, step: str | None, timeout_s: float = 60.0) -> tuple[str, dict[str, Any]]:
        """Wait until a journaled flip reaches `step` (None: any step); the cue is withdrawn once it started."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            recs = self.journal_records()
            if recs:
                with contextlib.suppress(FileNotFoundError):
                    self.cue.unlink()
            for url, r in recs.items():
                if step is None or r.get("step") == step:
                    return url, r
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no flip reached {step} in {timeout_s:g}s (journal: {self.journal_records()})")

    async def wait_no_flip(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.journal_records() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    # ---- restarts of the other processes -----------------------------------------------------------------

    async def restart_router(self, down_s: float) -> None:
        """kill -9 the router; `down_s` later start it again with the same command line (same port)."""
        proc = self.fleet.router
        argv = argv_of(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await asyncio.sleep(down_s)
        with open(self.work / "router.log", "ab") as log:
            self.fleet.router = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        await self._wait_http(f"{self.fleet.router_url}/workers", 30.0)

    async def restart_tap(self, down_s: float) -> None:
        assert self.tap is not None
        argv = argv_of(self.tap)
        self.tap.send_signal(signal.SIGKILL)
        self.tap.wait()
        await asyncio.sleep(down_s)
        with open(self.work / "tap.log", "ab") as log:
            self.tap = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        await self._wait_http(f"{self.tap_url}/tap/healthz", 30.0)

    async def kill_worker(self, url: str) -> None:
        r = await self.fleet.client().send(self.fleet.endpoints[url], "status")
        assert r.pid is not None, r
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.pid, signal.SIGKILL)

    async def restart_agent(self, url: str, down_s: float) -> None:
        i = self.fleet.urls.index(url)
        with contextlib.suppress(Exception):
            r = await self.fleet.client().send(self.fleet.endpoints[url], "status")
            if r.pid is not None:
                self.fleet.orphans.append(r.pid)  # its server may outlive it; stopped at the end
        proc = self.fleet.agents[i]
        argv = argv_of(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await asyncio.sleep(down_s)
        with open(self.work / f"agent{i}.log", "ab") as log:
            self.fleet.agents[i] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, start_new_session=True)

    @staticmethod
    async def _wait_http(url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with s.get(url) as r:
                        if r.status < 500:
                            return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{url} did not answer in {timeout_s:g}s")

    # ---- consistency, from outside the controller ---------------------------------------------------------

    async def check(self) -> tuple[bool, str]:
        problems: list[str] = []
        listed: dict[str, str] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            try:
                async with s.get(f"{self.fleet.router_url}/workers") as r:
                    for w in (await r.json())["workers"]:
                        listed[w["url"].rstrip("/")] = w["worker_type"]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
                return False, f"router unreadable ({type(e).__name__})"
            serves: dict[str, str | None] = {}
            for url in self.fleet.urls:
                mode = None
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with s.get(f"{url}/health") as h:
                        if h.status == 200:
                            async with s.get(f"{url}/server_info") as i:
                                mode = (await i.json()).get("disaggregation_mode")
                serves[url] = mode
        client = self.fleet.client(timeout_s=1.0)
        for k, url in enumerate(self.fleet.urls):
            name = f"w{k}"
            if serves[url] is None:
                problems.append(f"{name} down")
            elif url not in listed:
                problems.append(f"{name} unlisted (serves {serves[url]})")
            elif listed[url] != serves[url]:
                problems.append(f"{name} listed {listed[url]}, serves {serves[url]}")
            try:
                a = await client.send(self.fleet.endpoints[url], "status")
                if serves[url] is not None and (a.state != "running" or a.role != serves[url]):
                    problems.append(f"{name} agent reports {a.state}/{a.role}")
            except Exception as e:
                problems.append(f"{name} agent unreachable ({type(e).__name__})")
        if self.journal_records():
            problems.append(f"journal {sorted(r['step'] for r in self.journal_records().values())}")
        ok = [u for u in self.fleet.urls if serves[u] is not None and listed.get(u) == serves[u]]
        split = f"{sum(1 for u in ok if serves[u] == 'prefill')}P{sum(1 for u in ok if serves[u] == 'decode')}D"
        return not problems, f"{split} " + ("consistent" if not problems else "; ".join(problems))

    async def time_to_consistency(self, since: float, timeout_s: float = 90.0) -> tuple[float | None, str]:
        deadline = since + timeout_s
        state = ""
        while time.monotonic() < deadline:
            ok, state = await self.check()
            if ok:
                return time.monotonic() - since, state
            await asyncio.sleep(0.5)
        return None, state


# ---- cases ------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    requests: int
    failed: int
    consistency_s: float | None
    final_state: str
    rss_before_mb: float
    rss_after_mb: float
    cpu_before_pct: float
    cpu_after_pct: float
    notes: str = ""
    failures: dict[str, int] = field(default_factory=dict)

    def met(self) -> bool:
        fails_ok = self.failed == 0 or ("router" in self.case and "outage" in self.notes)
        return fails_ok and self.consistency_s is not None and self.consistency_s <= CONSISTENCY_TARGET_S


Fault = Callable[[Stack], Awaitable[tuple[float, str]]]  # returns (monotonic time the fault ended, note)


async def _flip_fault(stack: Stack, step: str, inject: Callable[[Stack, str], Awaitable[str]],
                      to_role: str = "prefill") -> tuple[float, str]:
    stack.cue_flip(to_role)
    url, _ = await stack.wait_step(step)
    note = await inject(stack, url)
    return time.monotonic(), note


async def controller_killed_during_switch(stack: Stack) -> tuple[float, str]:
    async def inject(st: Stack, url: str) -> str:
        await asyncio.sleep(min(2.0, st.switch_s / 4))  # well inside the switch
        st.kill_controller()
        await asyncio.sleep(1.0)
        await st.start_controller()
        return f"killed -9 during the {st.switch_s:g}s switch of {url.rsplit(':', 1)[1]}; restarted after 1 s"

    return await _flip_fault(stack, "switch", inject)


async def worker_killed_mid_flip(stack: Stack) -> tuple[float, str]:
    async def inject(st: Stack, url: str) -> str:
        await asyncio.sleep(0.5)
        await st.kill_worker(url)
        return f"worker :{url.rsplit(':', 1)[1]} killed -9 during its switch"

    return await _flip_fault(stack, "switch", inject)


async def agent_killed_mid_switch(stack: Stack) -> tuple[float, str]:
    async def inject(st: Stack, url: str) -> str:
        await asyncio.sleep(0.5)
        await st.restart_agent(url, down_s=2.0)
        return f"agent of :{url.rsplit(':', 1)[1]} killed -9 during the switch, restarted after 2 s"

    return await _flip_fault(stack, "switch", inject)


async def router_down_10s_during_flip(stack: Stack) -> tuple[float, str]:
    async def inject(st: Stack, url: str) -> str:
        await st.restart_router(down_s=10.0)
        return "router outage: killed -9 during the switch, restarted 10 s later with its start-up arguments"

    return await _flip_fault(stack, "switch", inject)


async def router_restart(stack: Stack) -> tuple[float, str]:
    await stack.restart_router(down_s=1.0)
    return time.monotonic(), "router outage: killed -9 and restarted after 1 s, no flip in progress"


async def tap_restart(stack: Stack) -> tuple[float, str]:
    await stack.restart_tap(down_s=1.0)
    return time.monotonic(), "tap killed -9 and restarted after 1 s (clients connect to the tap: refused meanwhile)"


CASES: dict[str, Fault] = {
    "controller_killed_during_switch": controller_killed_during_switch,
    "worker_killed_mid_flip": worker_killed_mid_flip,
    "agent_killed_mid_switch": agent_killed_mid_switch,
    "router_down_10s_during_flip": router_down_10s_during_flip,
    "router_restart": router_restart,
    "tap_restart": tap_restart,
}
# the switch (server restart) takes this long in a case; others use --switch-s
SWITCH_S = {"controller_killed_during_switch": 20.0}


async def run_case(stack: Stack, name: str, fault: Fault, rate_rps: float) -> CaseResult:
    assert stack.controller is not None
    u = Usage(stack.controller.pid)
    await asyncio.sleep(3.0)
    rss0, cpu0 = u.sample()
    async with Load(stack.tap_url, rate_rps) as load:
        await asyncio.sleep(2.0)
        ended, note = await fault(stack)
        took, state = await stack.time_to_consistency(ended)
        await stack.wait_no_flip()
        await asyncio.sleep(2.0)
    u2 = Usage(stack.controller.pid) if stack.controller.pid != u.pid else u
    await asyncio.sleep(2.0)
    rss1, cpu1 = u2.sample()
    fails = {k: v for k, v in load.outcomes.items() if k != "ok"}
    return CaseResult(name, load.requests, load.failed, took, state, rss0, rss1, cpu0, cpu1, note, fails)


async def light_load_flips(stack: Stack, n: int = 4, rate_rps: float = 0.3) -> CaseResult:
    """Flips under light load: how many are rolled back for want of traffic (was 8 of 9)."""
    assert stack.controller is not None
    u = Usage(stack.controller.pid)
    await asyncio.sleep(3.0)
    rss0, cpu0 = u.sample()
    results: Counter[str] = Counter()
    took: float | None = 0.0
    state = ""
    async with Load(stack.tap_url, rate_rps) as load:
        for k in range(n):
            stack.cue_flip("prefill" if k % 2 == 0 else "decode")
            await stack.wait_step(None)
            await stack.wait_no_flip()
            t0 = time.monotonic()
            dt, state = await stack.time_to_consistency(t0)
            took = None if dt is None or took is None else max(took, dt)
    log = (stack.work / "controller.log").read_text(errors="replace")
    for line in log.splitlines():
        if '"flip_step"' in line or "flip_step" in line:
            for step in ("rolled_back", "done", "failed"):
                if f'"step": "{step}"' in line or f"step={step}" in line or f'"step":"{step}"' in line:
                    results[step] += 1
    rss1, cpu1 = u.sample()
    fails = {k: v for k, v in load.outcomes.items() if k != "ok"}
    note = f"{n} flips at {rate_rps:g} req/s: outcomes in the controller log {dict(results)}"
    return CaseResult("flips_under_light_load", load.requests, load.failed, took, state, rss0, rss1, cpu0, cpu1,
                      note, fails)


async def soak(stack: Stack, soak_s: float, rate_rps: float, out: Any) -> CaseResult:
    """Steady load for soak_s with RSS/CPU sampled every 10 s, then 30 s idle for the idle CPU."""
    assert stack.controller is not None
    u = Usage(stack.controller.pid)
    samples: list[tuple[float, float, float]] = []
    t0 = time.monotonic()
    async with Load(stack.tap_url, rate_rps) as load:
        while time.monotonic() - t0 < soak_s:
            await asyncio.sleep(min(10.0, max(0.1, soak_s - (time.monotonic() - t0))))
            rss, cpu = u.sample()
            samples.append((time.monotonic() - t0, rss, cpu))
            print(f"  soak t={samples[-1][0]:5.0f}s  controller RSS {rss:6.1f} MB  CPU {cpu:5.1f} %", file=out,
                  flush=True)
    await asyncio.sleep(5.0)
    u.sample()
    await asyncio.sleep(30.0)
    _, idle_cpu = u.sample()
    # growth from the first sample after warm-up (imports, first allocations) to the last
    warm = [s for s in samples if s[0] >= min(30.0, soak_s / 3)] or samples
    rss_first, rss_last = warm[0][1], samples[-1][1]
    growth = 100.0 * (rss_last - rss_first) / rss_first
    ok, state = await stack.check()
    note = (f"RSS {rss_first:.1f} -> {rss_last:.1f} MB ({growth:+.1f} %), peak {max(s[1] for s in samples):.1f}; "
            f"CPU under load mean {sum(s[2] for s in samples) / len(samples):.1f} %, idle {idle_cpu:.2f} % of a core")
    fails = {k: v for k, v in load.outcomes.items() if k != "ok"}
    res = CaseResult(f"soak_{soak_s:g}s", load.requests, load.failed, 0.0 if ok else None, state, rss_first,
                     rss_last, samples[0][2], idle_cpu, note, fails)
    res.rss_growth_pct = growth  # type: ignore[attr-defined]
    res.idle_cpu_pct = idle_cpu  # type: ignore[attr-defined]
    return res


# ---- the controller process (scripted decisions, the product's sidecar) -----------------------------------


def controller_main(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from controller.actuators import build_actuator
    from controller.config import load_config
    from controller.core.control.types import (
        Action,
        ActionKind,
        CalibrationView,
        Decision,
        Diagnostics,
        Reason,
    )
    from controller.logging import configure_logging
    from controller.runtime.sidecar import Sidecar

    configure_logging(json=True, level="info")
    cfg = load_config(args.config)
    registry = CollectorRegistry()
    actuator = build_actuator(cfg.actuation, registry)
    decide = None
    if args.scripted:
        cue: Path = args.cue
        calib = CalibrationView(1.0, 1.0, None, None, None, 0, 0)

        class Result:
            def __init__(self, actions: tuple[Action, ...], state: Any, diagnostics: Diagnostics) -> None:
                self.actions, self.state, self.diagnostics = actions, state, diagnostics

        def scripted(state: Any, obs: Any, now: float) -> Result:
            # one flip while the cue file exists (the suite withdraws it once the journal shows the flip)
            actions: tuple[Action, ...] = ()
            with contextlib.suppress(OSError, ValueError):
                c = json.loads(cue.read_text())
                kind = ActionKind.FLIP_TO_PREFILL if c["to"] == "prefill" else ActionKind.FLIP_TO_DECODE
                actions = (Action(kind, 1, Reason.REBALANCE),)
            diag = Diagnostics(now, None, None, None, calib, None, None,
                               (Decision("fleet", Reason.REBALANCE if actions else Reason.STEADY, "bench cue"),))
            return Result(actions, state, diag)

        decide = scripted
    sidecar = Sidecar(cfg, registry=registry, advisory=False, actuator=actuator, decide=decide,
                      listen=("127.0.0.1", 0))

    async def main() -> int:
        out = await sidecar.run()
        return 0 if out.ok else 1

    return asyncio.run(main())


# ---- main -------------------------------------------------------------------------------------------------


def table(results: list[CaseResult]) -> str:
    head = ("| case | requests | failed | consistent after | final state | RSS MB before → after "
            "| CPU % before → after | met |\n|---|---:|---:|---:|---|---|---|---|\n")
    rows = []
    for r in results:
        took = f"{r.consistency_s:.1f} s" if r.consistency_s is not None else "**not in 90 s**"
        rows.append(f"| {r.case} | {r.requests} | {r.failed} | {took} | {r.final_state} | "
                    f"{r.rss_before_mb:.0f} → {r.rss_after_mb:.0f} | {r.cpu_before_pct:.1f} → {r.cpu_after_pct:.1f} "
                    f"| {'yes' if r.met() else 'no'} |")
    return head + "\n".join(rows)


async def suite(args: argparse.Namespace, out: Any) -> list[CaseResult]:
    names = [c for c in args.cases.split(",") if c and c != "soak"] if args.cases else \
        [*CASES, "flips_under_light_load"]
    unknown = [n for n in names if n not in CASES and n != "flips_under_light_load"]
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; known: {[*CASES, 'flips_under_light_load']}")
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="pd-faults-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            case_dir = work / name
            case_dir.mkdir(exist_ok=True)
            stack = Stack(case_dir, time_scale=args.time_scale, switch_s=SWITCH_S.get(name, args.switch_s))
            try:
                await stack.start()
                if name == "flips_under_light_load":
                    r = await light_load_flips(stack)
                else:
                    r = await run_case(stack, name, CASES[name], args.rate)
            except Exception as e:
                r = CaseResult(name, 0, 0, None, f"case error: {type(e).__name__}: {e}"[:200], 0, 0, 0, 0)
            finally:
                await stack.stop()
            results.append(r)
            took = f"{r.consistency_s:.1f} s" if r.consistency_s is not None else "NO"
            print(json.dumps(asdict(r)) if args.json else
                  f"{r.case:<34} requests {r.requests:5d}  failed {r.failed:3d}  consistent "
                  f"{took:>8}  {r.final_state}  "
                  f"RSS {r.rss_before_mb:.0f}->{r.rss_after_mb:.0f} MB  CPU {r.cpu_before_pct:.1f}->"
                  f"{r.cpu_after_pct:.1f} %  ({r.notes}) {r.failures or ''}", file=out, flush=True)
        if args.soak_s > 0:
            case_dir = work / "soak"
            case_dir.mkdir(exist_ok=True)
            stack = Stack(case_dir, time_scale=args.time_scale, switch_s=args.switch_s, scripted=False)
            try:
                await stack.start()
                r = await soak(stack, args.soak_s, args.rate, out)
            finally:
                await stack.stop()
            results.append(r)
            print(json.dumps(asdict(r)) if args.json else f"{r.case}: {r.notes}; requests {r.requests} failed "
                  f"{r.failed}; {r.final_state}", file=out, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("controller", help="(internal) the controller process the suite kills and restarts")
    c.add_argument("--config", type=Path, required=True)
    c.add_argument("--cue", type=Path, required=True)
    c.add_argument("--scripted", action="store_true")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all; 'soak': the soak only)")
    p.add_argument("--soak-s", type=float, default=600.0, help="soak length (0 = no soak)")
    p.add_argument("--rate", type=float, default=4.0, help="load, requests/s through the tap")
    p.add_argument("--switch-s", type=float, default=3.0,
                   help="wall time of a server (re)start, i.e. of one flip's switch (controller case: 20 s)")
    p.add_argument("--time-scale", type=float, default=1.0, help="emulated GPU durations x this")
    p.add_argument("--workdir", type=Path, default=None, help="keep configs and logs here (default: temp)")
    p.add_argument("--json", action="store_true", help="one JSON object per case")
    args = p.parse_args(argv)
    if args.cmd == "controller":
        return controller_main(args)
    results = asyncio.run(suite(args, sys.stdout))
    if not args.json:
        print("\n" + table(results))
    return 0 if all(r.met() for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
