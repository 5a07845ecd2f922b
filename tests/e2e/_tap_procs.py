"""Helpers for the tap/sidecar end-to-end tests: start the tap as a real process, wait for HTTP."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.fleet import free_port


def wait_http(url: str, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None, ok=(200,)) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
            last = str(e)
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not answering after {timeout_s}s: {last}")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class TapProc:
    """`pd-router-tap` in its own process, in front of `router_url`."""

    def __init__(self, router_url: str, log_dir: Path, source_id: str = "tap-e2e",
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.pub_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.publish = f"tcp://127.0.0.1:{self.pub_port}"
        self.log = log_dir / f"tap-{self.port}.log"
        cmd = [sys.executable, "-m", "router_plugin.tap", "--listen", f"127.0.0.1:{self.port}",
               "--router", router_url, "--publish", self.publish, "--source-id", source_id,
               "--flush-interval-ms", "20", *extra_args]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_http(self.url + "/tap/healthz", proc=self.proc)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/tap/metrics", timeout=5) as r:
            return r.read().decode()

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the tap process, from /proc."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
        return out

    def stop(self) -> None:
        stop(self.proc)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace_s: float = 10.0) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)
    return int(proc.returncode)
