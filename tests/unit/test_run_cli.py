"""`pd-controller run` as an operator uses it (issue 10, item 6): --profile NAME|FILE, repeated --telemetry,
the shipped example config beside a router, and --help ending with an example."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from controller.cli.main import build_parser, main
from controller.cli.run import effective_config
from controller.config import ConfigError
from controller.runtime.sidecar import build_spec
from tests.conftest import PROFILES, REPO

EXAMPLE = REPO / "configs" / "examples" / "run-beside-router.yaml"


def _args(*argv: str):
    parser, _ = build_parser()
    return parser.parse_args(["run", *argv])


def test_repeated_telemetry_flags_accumulate():
    cfg = effective_config(_args("--profile", "llama2-70b-h100-tp8", "--telemetry", "tcp://127.0.0.1:5557",
                                 "--telemetry", "tcp://127.0.0.1:5558", "tcp://127.0.0.1:5559",
                                 "--telemetry", "tcp://127.0.0.1:5557"))
    assert cfg.telemetry.zmq_endpoints == ["tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", "tcp://127.0.0.1:5559"]


def test_telemetry_flags_replace_the_configs_endpoints():
    cfg = effective_config(_args("--config", str(EXAMPLE), "--telemetry", "tcp://127.0.0.1:6000"))
    assert cfg.telemetry.zmq_endpoints == ["tcp://127.0.0.1:6000"]
    assert cfg.telemetry.router_url == "http://127.0.0.1:30000"  # the rest of the config stays


@pytest.mark.parametrize("ref", ["llama31-70b-h100-tp4", str(PROFILES / "llama31-70b-h100-tp4.yaml")])
def test_profile_by_name_or_file_overrides_the_config(ref):
    cfg = effective_config(_args("--config", str(EXAMPLE), "--profile", ref))
    assert Path(cfg.hardware.profile).resolve() == (PROFILES / "llama31-70b-h100-tp4.yaml").resolve()
    assert cfg.slo.ttft_quantile == 0.9  # the config's other sections are kept
    assert build_spec(cfg).hardware.profile.name == "llama31-70b-h100-tp4"


def test_profile_without_a_config():
    cfg = effective_config(_args("--profile", "llama2-70b-h100-tp8", "--router", "http://127.0.0.1:30000",
                                 "--tpot-ms", "50"))
    assert Path(cfg.hardware.profile).name == "llama2-70b-h100-tp8.yaml"
    assert cfg.slo.tpot_ms == 50.0 and cfg.slo.ttft_s == 2.0  # the flag sets one field, the default the other
    assert build_spec(cfg).hardware.profile.prefill is not None


def test_an_objective_the_profile_cannot_reach_fails_at_start_naming_field_and_floor():
    # the default 20 ms TPOT on a 70B model on H100 TP8 (batch 1 decodes at ~30 ms): before, every tick said
    # `infeasible` and the sidecar ran on, deciding nothing
    cfg = effective_config(_args("--profile", "llama2-70b-h100-tp8", "--router", "http://127.0.0.1:30000"))
    with pytest.raises(ConfigError, match=r"slo\.tpot_ms=20\.0: profile 'llama2-70b-h100\S*' decodes no faster "
                                          r"than 29\.8 ms per token \(batch 1, context 576\)"):
        build_spec(cfg)
    # at the floor's side of it, the same profile starts
    ok = effective_config(_args("--profile", "llama2-70b-h100-tp8", "--router", "http://127.0.0.1:30000",
                                "--tpot-ms", "31"))
    assert build_spec(ok).objectives.tpot_ms == 31.0


def test_run_refuses_an_unreachable_tpot_before_starting(capsys):
    rc = main(["run", "--profile", "llama2-70b-a100-tp4", "--router", "http://127.0.0.1:9", "--tpot-ms", "30"])
    err = capsys.readouterr().err
    assert rc != 0 and "slo.tpot_ms=30.0" in err and "45" in err


def test_help_ends_with_an_example():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["run", "--help"])
    tail = out.getvalue().rstrip().splitlines()[-6:]
    assert any(line.strip().startswith("pd-controller run --config configs/examples/run-beside-router.yaml")
               for line in tail), tail


def test_shipped_example_is_valid_and_its_commands_parse():
    text = EXAMPLE.read_text()
    cfg = effective_config(_args("--config", str(EXAMPLE)))
    spec = build_spec(cfg)
    assert spec.objectives.ttft_quantile == 0.9 and cfg.telemetry.router_url and cfg.telemetry.zmq_endpoints
    assert "smg launch --pd-disaggregation" in text
    # every `pd-controller run ...` line in the comments parses with today's flags
    runs = [m.group(1) for m in re.finditer(r"#\s{2,}(?:\S+=\S+ )?pd-controller run (.+)", text)]
    assert runs
    for r in runs:
        argv = [a for a in r.split() if a != "\\"]
        _args(*argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for t in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out |= {int(c) for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()}
    return out


@pytest.mark.e2e
def test_run_the_example_serves_plans_by_name_and_leaves_nothing_behind(tmp_path):
    """The example config as shipped (no router up: telemetry is unknown, the API still serves)."""
    port = _free_port()
    env = dict(os.environ, PDCTL_API_TOKEN="t0ken")
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "run", "--config", str(EXAMPLE), "--advisory",
             "--router", f"http://127.0.0.1:{_free_port()}", "--listen", f"127.0.0.1:{port}", "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
                    assert r.status == 200
                break
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
            time.sleep(0.1)
        body = json.dumps({"rate_rps": 5, "input_len": 2000, "output_len": 200, "profile": "llama31-70b-h100-tp8"})
        req = urllib.request.Request(base + "/v1/plan", data=body.encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            plan = json.loads(r.read())
        assert plan["profile"] == "llama31-70b-h100-tp8" and plan["n_prefill"] >= 1
        workers = _children(proc.pid)
        assert workers  # the plan worker process
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0, (tmp_path / "run.log").read_text()[-2000:]
    for pid in workers:  # the plan worker ended with the controller
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"plan worker {pid} outlived the controller")
