"""An emulated PD fleet: N prefill + M decode emulated workers behind a real PD router, as subprocesses.

Stable API (tests, the demo and benches use it)::

    from harness.fleet import EmulatedFleet

    async with EmulatedFleet("llama2-70b-h100-tp8", n_prefill=2, n_decode=2, time_scale=0.1) as fleet:
        fleet.router_url         # "http://127.0.0.1:PORT": /generate, /v1/*, /workers, /engine_metrics
        fleet.model              # the served model name clients must send (smg routes by it)
        fleet.router_kind        # which router runs (smg by default; see harness/routers.py)
        fleet.metrics_url        # "http://127.0.0.1:PROM/metrics": the router's own Prometheus metrics
        fleet.prometheus_port    # PROM
        fleet.prefill, fleet.decode   # lists of WorkerProc(role, url, port, bootstrap_port, pid)
        fleet.workers            # prefill + decode
        w = await fleet.start_worker("decode")   # an extra worker, NOT registered with the router
        await fleet.stop_worker(w)               # SIGTERM one worker (e.g. to test failures)

    with EmulatedFleet(...) as fleet:            # the same, synchronously
        ...

Every worker gets a bootstrap port (so any of them can be flipped with
/pd_role_switch and re-registered as prefill) and `--enable-pd-role-switch`
unless `enable_pd_role_switch=False`. Ports are free loopback ports chosen at
start; workers bind port 0 and report theirs. Entering waits until the router
lists every worker as healthy (`startup_timeout_s`, default 60 s); leaving
stops the router, then the workers (SIGTERM, then SIGKILL after 5 s).

`router` picks the router (`smg`, the default, or `sglang-router`, or a command
template; $PD_ROUTER when not given). Workers serve `model` (default
"emulated") and export SGLang's token histograms; `model_aliases` are extra
names smg accepts for it. `worker_args` are appended to every `pd-controller
emulate-worker` command line (e.g. ["--max-running-requests", "16"]);
`router_args` to the router's (e.g. ["--disable-retries"]). Process logs go to `log_dir` (a temporary
directory by default, kept in `fleet.log_dir` for post-mortems).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from controller.profiles import resolve_profile_path
from harness.routers import RouterKind, resolve, router_command

HOST = "127.0.0.1"


class FleetError(RuntimeError):
    """The fleet could not start (a process died or the router never registered the workers)."""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback TCP port, never one this process handed out before.

    The port is bound and released, so the kernel may offer the same one again to the next call before
    anything listens on it: two workers of one fleet then got the same port (seen in CI). Remembering
    what was handed out closes that within a process; across processes a tiny race remains.
    """
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no fresh loopback port after 64 tries")


@dataclass
class WorkerProc:
    role: str  # the role it was started with (a /pd_role_switch changes the worker, not this record)
    url: str
    port: int
    bootstrap_port: int | None
    pid: int
    proc: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path = field(repr=False)


def _read_ready_line(proc: subprocess.Popen[bytes], deadline: float, log_path: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    while time.monotonic() < deadline:
        if proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
            raise FleetError(f"emulated worker exited with {proc.returncode} before it was ready: {_tail(log_path)}")
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk and proc.poll() is not None:
                continue
            buf += chunk
            if b"\n" in buf:
                line = buf.split(b"\n", 1)[0]
                try:
                    return dict(json.loads(line))
                except json.JSONDecodeError:
                    raise FleetError(f"emulated worker printed {line[:200]!r}, expected its ready line") from None
    raise FleetError(f"emulated worker not ready in time: {_tail(log_path)}")


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class EmulatedFleet:
    def __init__(
        self,
        profile: str | Path,
        n_prefill: int = 1,
        n_decode: int = 1,
        *,
        time_scale: float = 1.0,
        enable_pd_role_switch: bool = True,
        worker_args: Sequence[str] = (),
        router_args: Sequence[str] = (),
        policy: str = "round_robin",
        health_check_interval_s: int = 1,
        startup_timeout_s: float = 60.0,
        log_dir: Path | None = None,
        router: str | None = None,
        model: str = "emulated",
        model_aliases: Sequence[str] = (),
        collect_tokens_histogram: bool = True,
    ) -> None:
        if n_prefill < 1 or n_decode < 1:
            raise ValueError(f"n_prefill={n_prefill}, n_decode={n_decode}: the router needs at least one of each")
        self.profile_path = resolve_profile_path(profile)
        self.router_kind: RouterKind = resolve(router)
        self.model = model
        self.model_aliases = list(model_aliases)
        self.collect_tokens_histogram = collect_tokens_histogram
        self.n_prefill = n_prefill
        self.n_decode = n_decode
        self.time_scale = time_scale
        self.enable_pd_role_switch = enable_pd_role_switch
        self.worker_args = list(worker_args)
        self.router_args = list(router_args)
        self.policy = policy
        self.health_check_interval_s = health_check_interval_s
        self.startup_timeout_s = startup_timeout_s
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.log_dir = log_dir
        self.prefill: list[WorkerProc] = []
        self.decode: list[WorkerProc] = []
        self.extra: list[WorkerProc] = []
        self.router_port = 0
        self.prometheus_port = 0
        self._router: subprocess.Popen[bytes] | None = None
        self._n = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._router_log = Path()

    # ---- addresses ------------------------------------------------------------------------------

    @property
    def router_url(self) -> str:
        return f"http://{HOST}:{self.router_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.prometheus_port}/metrics"

    @property
    def workers(self) -> list[WorkerProc]:
        return self.prefill + self.decode

    # ---- workers --------------------------------------------------------------------------------

    def _spawn_worker(self, role: str) -> tuple[subprocess.Popen[bytes], Path]:
        assert self.log_dir is not None
        self._n += 1
        log_path = self.log_dir / f"worker{self._n}-{role}.log"
        cmd = [
            sys.executable, "-m", "controller", "emulate-worker",
            "--role", role, "--profile", str(self.profile_path),
            "--host", HOST, "--port", "0", "--bootstrap-port", "0",
            "--time-scale", repr(self.time_scale), "--exit-with-parent", "--served-model-name", self.model,
        ]
        if self.collect_tokens_histogram:
            cmd.append("--collect-tokens-histogram")
        if self.enable_pd_role_switch:
            cmd.append("--enable-pd-role-switch")
        cmd += self.worker_args
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self._procs.append(proc)  # every process we started is stopped by stop_sync, ready or not
        return proc, log_path

    def _await_worker(self, role: str, proc: subprocess.Popen[bytes], log_path: Path, deadline: float) -> WorkerProc:
        info = _read_ready_line(proc, deadline, log_path)
        return WorkerProc(role=role, url=info["url"], port=int(info["port"]),
                          bootstrap_port=info.get("bootstrap_port"), pid=proc.pid, proc=proc, log_path=log_path)

    def start_worker_sync(self, role: str) -> WorkerProc:
        """Start one more emulated worker (not registered with the router); it is stopped with the fleet."""
        if role not in ("prefill", "decode"):
            raise ValueError(f"role={role!r}: must be 'prefill' or 'decode'")
        self._ensure_log_dir()
        proc, log_path = self._spawn_worker(role)
        try:
            w = self._await_worker(role, proc, log_path, time.monotonic() + self.startup_timeout_s)
        except BaseException:
            terminate(proc)
            raise
        self.extra.append(w)
        return w

    async def start_worker(self, role: str) -> WorkerProc:
        return await asyncio.to_thread(self.start_worker_sync, role)

    def stop_worker_sync(self, w: WorkerProc) -> None:
        terminate(w.proc)
        for pool in (self.prefill, self.decode, self.extra):
            if w in pool:
                pool.remove(w)

    async def stop_worker(self, w: WorkerProc) -> None:
        await asyncio.to_thread(self.stop_worker_sync, w)

    # ---- lifecycle ------------------------------------------------------------------------------

    def _ensure_log_dir(self) -> None:
        if self.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pd-fleet-")
            self.log_dir = Path(self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _start_workers(self, deadline: float) -> None:
        self._ensure_log_dir()
        spawned = [("prefill", *self._spawn_worker("prefill")) for _ in range(self.n_prefill)]
        spawned += [("decode", *self._spawn_worker("decode")) for _ in range(self.n_decode)]
        for role, proc, log_path in spawned:
            w = self._await_worker(role, proc, log_path, deadline)
            (self.prefill if role == "prefill" else self.decode).append(w)

    def start_sync(self) -> EmulatedFleet:
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            self._start_workers(deadline)
            self._spawn_router()
            self._wait_router(deadline)
        except BaseException:
            self.stop_sync()
            raise
        return self

    def _spawn_router(self) -> None:
        """Start the router from the calling thread (its death signal is tied to this thread, see below)."""
        assert self.log_dir is not None
        self.router_port = free_port()
        self.prometheus_port = free_port()
        cmd = router_command(
            self.router_kind, host=HOST, port=self.router_port, prometheus_port=self.prometheus_port,
            prefill=[(w.url, w.bootstrap_port) for w in self.prefill], decode=[w.url for w in self.decode],
            policy=self.policy, health_check_interval_s=self.health_check_interval_s,
            model_aliases=[(a, self.model) for a in self.model_aliases], extra=self.router_args,
        )
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        log_path = self.log_dir / "router.log"
        with open(log_path, "wb") as logf:
            self._router = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self._router_log = log_path

    def _wait_router(self, deadline: float) -> None:
        assert self._router is not None
        log_path = self._router_log
        want = {w.url for w in self.workers}
        last = ""
        while time.monotonic() < deadline:
            if self._router.poll() is not None:
                raise FleetError(f"{self.router_kind.label} exited with {self._router.returncode}: {_tail(log_path)}")
            try:
                body = _get_json(f"{self.router_url}/workers")
                healthy = {w["url"].rstrip("/") for w in body.get("workers", []) if w.get("is_healthy")}
                if want <= healthy:
                    return
                last = f"registered healthy: {sorted(healthy)}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.2)
        raise FleetError(f"{self.router_kind.label} did not register all {len(want)} workers in time ({last}): "
                         f"{_tail(log_path)}")

    def stop_sync(self) -> None:
        if self._router is not None:
            terminate(self._router)
            self._router = None
        for proc in self._procs:
            terminate(proc)
        self._procs = []
        self.prefill, self.decode, self.extra = [], [], []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.log_dir = None

    async def start(self) -> EmulatedFleet:
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            await asyncio.to_thread(self._start_workers, deadline)
            self._spawn_router()  # in the event loop's thread, which outlives the fleet
            await asyncio.to_thread(self._wait_router, deadline)
        except BaseException:
            await asyncio.to_thread(self.stop_sync)
            raise
        return self

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    def __enter__(self) -> EmulatedFleet:
        return self.start_sync()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_sync()

    async def __aenter__(self) -> EmulatedFleet:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the thread that started it exits (Linux PR_SET_PDEATHSIG).

    The router cannot watch its parent as the emulated workers do (--exit-with-parent), so a
    harness killed by SIGKILL would otherwise leave it running. Elsewhere this does nothing.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, wait up to grace_s, then SIGKILL; close its pipes. A process already gone is fine."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=grace_s)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
