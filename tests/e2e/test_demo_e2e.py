"""`pd-controller demo` end to end, as a user runs it: real processes, the real router, the real trace.

A short run must replay requests with zero failures, flip at least one worker when the traffic mix moves the
P:D need (code -> conversation), report the summary fields, write the plot, and leave no process behind; an
interrupted run (SIGINT, as Ctrl-C sends) must stop every process it started too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def processes_mentioning(needles: list[str]) -> list[str]:
    """Command lines of live processes that contain any of `needles`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(cmd)
    return found


def started_by(workdir: Path) -> list[str]:
    """What identifies the demo's processes: its workdir (agents, their configs) and its workers' ports."""
    needles = [str(workdir)]
    for cfg in workdir.glob("agent*.yaml"):
        url = yaml.safe_load(cfg.read_text())["worker_url"]
        needles.append(f"--port {url.rsplit(':', 1)[1]} ")
    return needles


def wait_gone(needles: list[str], timeout_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    left = processes_mentioning(needles)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = processes_mentioning(needles)
    return left


def test_demo_flips_with_zero_failures_and_cleans_up(tmp_path):
    plot = tmp_path / "demo.png"
    work = tmp_path / "work"
    r = subprocess.run(
        [sys.executable, "-m", "controller", "demo", "--duration-s", "100", "--json", "--plot", str(plot),
         "--workdir", str(work)],
        capture_output=True, text=True, timeout=540,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    for key in ("requests", "failed_requests", "slo_attainment", "flips", "final_prefill", "final_decode"):
        assert key in s
    assert s["requests"] > 50
    assert s["failed_requests"] == 0, s["errors"]
    assert sum(ph["requests"] for ph in s["phases"].values()) == s["requests"]
    assert sum(ph["failed"] for ph in s["phases"].values()) == s["failed_requests"]
    assert s["flips"] >= 1, (s["flip_log"], r.stderr[-2000:])
    assert s["final_prefill"] + s["final_decode"] == 4
    # the router's /workers shows the split the controller reports
    roles = list(s["router_workers"].values())
    assert (roles.count("prefill"), roles.count("decode")) == (s["final_prefill"], s["final_decode"])
    assert 0.0 <= s["slo_attainment"] <= 1.0
    assert plot.stat().st_size > 10_000
    assert "decision" in r.stderr and "fleet 3P1D" in r.stderr  # the live view (from the initial split) on stderr
    assert wait_gone(started_by(work)) == []


def test_demo_interrupted_stops_everything(tmp_path):
    work = tmp_path / "work"
    p = subprocess.Popen(
        [sys.executable, "-m", "controller", "demo", "--duration-s", "120", "--workdir", str(work),
         "--plot", str(tmp_path / "x.png")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # Ctrl-C at a terminal: the demo starts with SIGINT at its default. A suite started as a background
        # job of a non-interactive shell inherits SIGINT ignored (POSIX), and an ignored SIGINT is never seen
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 240
        for line in p.stdout:  # wait until the replay runs (every component is up)
            if line.startswith("t=") or time.monotonic() > deadline:
                break
        needles = started_by(work)
        assert processes_mentioning(needles), "the demo's processes should be running now"
        p.send_signal(signal.SIGINT)
        # keep reading while it shuts down: the demo and its children write to this pipe, and a full
        # pipe nobody reads would block them mid-shutdown
        p.communicate(timeout=120)
        rc = p.returncode
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert rc == 130
    assert wait_gone(needles) == []
