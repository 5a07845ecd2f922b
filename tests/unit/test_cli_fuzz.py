"""Issue 13, item 6: every malformed flag and file given to `plan`, `run`, `agent`, `emulate-worker` (and the
profile and config loading they share) is one line on stderr and exit 2: no traceback, no hang.

Each case runs `pd-controller` in-process (controller.cli.main.main) in a daemon thread with a deadline, so a
hang (a YAML alias bomb, a FIFO, /dev/zero) fails the case instead of the suite.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
from pathlib import Path

import pytest

from controller.cli.main import main
from tests.conftest import PROFILES

DEADLINE_S = 30.0
PROFILE = str(PROFILES / "llama2-70b-h100-tp8.yaml")
LOAD = ["--rate-rps", "1", "--input-len", "1000", "--output-len", "100", "--tpot-ms", "50"]

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]) + "\n"

# malformed YAML, whatever the file is for
YAML = {
    "alias_bomb": BOMB,
    "recursive_alias": "a: &a [*a]\n",
    "deep": "[" * 20_000 + "]" * 20_000 + "\n",
    "deep_map": "a: " + "{b: " * 5_000 + "1" + "}" * 5_000 + "\n",
    "tab": "slo:\n\tttft_s: 1\n",
    "python_tag": "a: !!python/object/apply:os.system [echo pwned]\n",
    "unclosed": "a: [1, 2\n",
    "top_list": "- 1\n- 2\n",
    "top_scalar": "just a string\n",
    "big_int": "a: " + "9" * 6000 + "\n",
    "bad_date": "a: 2026-13-45\n",
    "unhashable": "? [1, 2]\n: 3\n",
    "bad_anchor": "a: *nothing\n",
    "two_docs": "a: 1\n---\nb: 2\n",
}
BINARY = {"not_utf8": b"slo: \xff\xfe\n", "nul": b"slo:\x00\n", "huge": b"a: " + b"x" * (5 * 1024 * 1024) + b"\n"}

CONFIG = {  # well-formed YAML, wrong configs
    "slo_scalar": "slo: 5\n",
    "ttft_str": "slo: {ttft_s: fast}\n",
    "ttft_inf": "slo: {ttft_s: .inf}\nhardware: {profile: " + PROFILE + "}\n",
    "ttft_nan": "slo: {ttft_s: .nan}\nhardware: {profile: " + PROFILE + "}\n",
    "profile_dev_zero": "hardware: {profile: /dev/zero}\n",
    "profile_list": "hardware: {profile: [1, 2]}\n",
    "profile_dir": "hardware: {profile: /tmp}\n",
    "unknown_section": "slo: {}\nbogus: 1\n",
    "long_key": "slo: {" + "k" * 100_000 + ": 1}\n",
    "long_value": "slo: {ttft_s: " + "x" * 100_000 + "}\n",
    "port_high": "api: {port: 70000}\n",
    "endpoints_str": "telemetry: {zmq_endpoints: tcp://127.0.0.1:5557}\n",
    "tick_negative": "control: {tick_period_s: -1}\n",
    "flip_budget_moved": "actuation: {max_flips_in_flight: 2}\n",
}

PROFILE_FILES = {  # well-formed YAML, wrong profiles
    "empty_map": "{}\n",
    "prefill_str": "name: x\nprefill: fast\ndecode: {tps: 1}\n",
    "numbers_as_text": "name: x\nprefill: {max_tps: lots}\ndecode: {tps: many}\n",
    "negative": "name: x\nprefill: {max_tps: -5}\ndecode: {tps: 1}\n",
    "nested_junk": "name: [1]\nprefill: {input_len: [[1]], tps: {a: 1}}\ndecode: [1, 2]\n",
    "inf": "name: x\nprefill: {max_tps: .inf}\ndecode: {tps: .nan}\n",
    "ragged_grid": "name: x\nprefill: {max_tps: 10}\ndecode: {batch: [1, 2], context: [10], tpot_ms: [[1, 2], [3]]}\n",
    "kv_scalar": "name: x\nprefill: {max_tps: 10}\ndecode: {tps: 1}\nkv_transfer: 5\n",
}

AGENT = {  # well-formed YAML, wrong agent configs
    "start_str": "endpoint: tcp://127.0.0.1:1\nworker_url: http://127.0.0.1:2\nstart: srv\ninsecure: true\n",
    "start_empty": "endpoint: tcp://127.0.0.1:1\nworker_url: http://127.0.0.1:2\nstart: []\ninsecure: true\n",
    "shell": "endpoint: tcp://127.0.0.1:1\nworker_url: http://x\nstart: [sh, -c, 'echo {role}']\ninsecure: true\n",
    "no_keys": "endpoint: tcp://127.0.0.1:1\nworker_url: http://x\nstart: [srv]\n",
    "insecure_public": "endpoint: tcp://0.0.0.0:1\nworker_url: http://x\nstart: [srv]\ninsecure: true\n",
    "endpoint_int": "endpoint: 5\nworker_url: http://x\nstart: [srv]\ninsecure: true\n",
    "endpoint_garbage": "endpoint: 'ipc://'\nworker_url: http://127.0.0.1:2\nstart: [srv]\ninsecure: true\n"
                        "start_on_launch: false\n",
    "secret_dev_zero": "endpoint: tcp://127.0.0.1:*\nworker_url: http://127.0.0.1:2\nstart: [srv]\n"
                       "server_secret_key: /dev/zero\nauthorized_keys_dir: /tmp\nstart_on_launch: false\n",
    "authorized_file": "endpoint: tcp://127.0.0.1:*\nworker_url: http://127.0.0.1:2\nstart: [srv]\n"
                       "server_secret_key: KEYS/agent.key_secret\nauthorized_keys_dir: /dev/null\n"
                       "start_on_launch: false\n",
    "public_as_secret": "endpoint: tcp://127.0.0.1:*\nworker_url: http://127.0.0.1:2\nstart: [srv]\n"
                        "server_secret_key: KEYS/agent.key\nauthorized_keys_dir: KEYS\nstart_on_launch: false\n",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from controller.agent.keys import generate

    d = tmp_path_factory.mktemp("fuzz")
    keys = d / "keys"
    generate(keys, "agent")
    out: dict[str, Path] = {}
    for group in (YAML, CONFIG, PROFILE_FILES, AGENT):
        for name, text in group.items():
            out[name] = d / f"{name}.yaml"
            out[name].write_text(text.replace("KEYS", str(keys)))
    for name, raw in BINARY.items():
        out[name] = d / f"{name}.yaml"
        out[name].write_bytes(raw)
    fifo = d / "fifo.yaml"
    os.mkfifo(fifo)
    out["fifo"] = fifo
    out["dir"] = d
    out["missing"] = d / "no-such-file.yaml"
    out["dev_zero"] = Path("/dev/zero")
    out["shadow"] = Path("/etc/shadow")
    return out


BAD_FILES = [*YAML, *BINARY, "fifo", "dir", "missing", "dev_zero", "shadow"]


def run_cli(argv: list[str]) -> tuple[int, str]:
    """rc and stderr of `pd-controller ARGV`, in a thread with a deadline (a hang fails, it does not block)."""
    result: dict[str, object] = {}
    err = io.StringIO()

    def target() -> None:
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                result["rc"] = main(argv)
        except SystemExit as e:  # argparse
            result["rc"] = e.code
        except BaseException as e:  # a traceback would have reached the user
            result["exc"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(DEADLINE_S)
    assert not t.is_alive(), f"pd-controller {' '.join(argv)[:200]}: still running after {DEADLINE_S:g}s (hang)"
    assert "exc" not in result, f"traceback: {result.get('exc')!r}"
    return int(result["rc"]), err.getvalue()  # type: ignore[call-overload]


def assert_one_line_exit_2(argv: list[str]) -> str:
    rc, err = run_cli(argv)
    lines = err.strip().splitlines()
    assert rc == 2, (argv[:6], rc, err[-500:])
    assert len(lines) == 1 and "Traceback" not in err, (argv[:6], err[-1000:])
    assert len(lines[0]) < 1500, lines[0][:200]
    return lines[0]


# ---- files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*BAD_FILES, *CONFIG])
def test_plan_config(files, name):
    line = assert_one_line_exit_2(["plan", "--config", str(files[name]), *LOAD])
    assert "pd-controller plan: error:" in line


@pytest.mark.parametrize("name", [*BAD_FILES, *PROFILE_FILES])
def test_plan_profile(files, name):
    assert_one_line_exit_2(["plan", "--profile", str(files[name]), *LOAD])


@pytest.mark.parametrize("name", [*BAD_FILES, *CONFIG])
def test_run_config(files, name):
    assert_one_line_exit_2(["run", "--config", str(files[name]), "--router", "http://127.0.0.1:1"])


@pytest.mark.parametrize("name", [*BAD_FILES, *PROFILE_FILES])
def test_run_profile(files, name):
    assert_one_line_exit_2(["run", "--profile", str(files[name]), "--router", "http://127.0.0.1:1"])


@pytest.mark.parametrize("name", [*BAD_FILES, *AGENT])
def test_agent_config(files, name):
    assert_one_line_exit_2(["agent", "--config", str(files[name])])


@pytest.mark.parametrize("name", [*BAD_FILES, *PROFILE_FILES])
def test_emulate_worker_profile(files, name):
    assert_one_line_exit_2(["emulate-worker", "--role", "prefill", "--profile", str(files[name]), "--port", "0"])


# ---- flags -----------------------------------------------------------------------------------------

PLAN_FLAGS = [
    ["--gpus", "x"], ["--gpus", "1e9"], ["--gpus", "100000000000"], ["--gpus", "1"], ["--rate-rps", "nan"],
    ["--rate-rps", "inf"], ["--rate-rps", "-1"], ["--input-len", "1e308"], ["--input-len", "0"],
    ["--evaluate", "3X"], ["--evaluate", "99999999999P1D"], ["--evaluate", "P"], ["--ttft-quantile", "1"],
    ["--ttft-quantile", "0"], ["--ttft-quantile", "nan"], ["--profile", ""], ["--profile", "../../etc/passwd"],
    ["--prefill-model", "x"], ["--unknown-flag"], ["--dp-groups", "0"], ["--dp-groups", "99999999"],
    ["--cache-hit-rate", "1"], ["--tpot-ms", "0"], ["--tpot-ms", "1e-300"], ["--ttft-s", "1e-300"],
    ["--overhead-s", "5"], ["--input-len-cv", "1e308"], ["--throughput-tpm", "1"],
]


@pytest.mark.parametrize("flags", PLAN_FLAGS, ids=lambda f: " ".join(f))
def test_plan_flags(flags):
    base = ["--profile", PROFILE, *LOAD]
    if flags[0] == "--throughput-tpm":  # both loads given
        base = ["--profile", PROFILE, *LOAD]
    assert_one_line_exit_2(["plan", *base, *flags])


def test_plan_without_inputs():
    assert_one_line_exit_2(["plan"])


RUN_FLAGS = [
    ["--listen", "x"], ["--listen", ":99999"], ["--listen", "h:-1"], ["--router", "ftp://x"],
    ["--router", "http://[::1"], ["--router", "http://h:99999"], ["--router", "http://"], ["--telemetry", "foo"],
    ["--telemetry", "tcp://h:0"], ["--telemetry", "tcp://:5"], ["--telemetry"], ["--router-metrics", "x"],
    ["--log-level", "x"], ["--log-format", "xml"], ["--profile", "no-such-profile"], ["--profile", ""],
    ["--config", "/no/such.yaml"],
]


@pytest.mark.parametrize("flags", RUN_FLAGS, ids=lambda f: " ".join(f))
def test_run_flags(flags):
    assert_one_line_exit_2(["run", "--profile", PROFILE, "--router", "http://127.0.0.1:1", *flags])


def test_run_without_a_telemetry_source():
    assert "no source" in assert_one_line_exit_2(["run", "--profile", PROFILE])


def test_run_on_a_taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = assert_one_line_exit_2(["run", "--profile", PROFILE, "--tpot-ms", "50", "--router", "http://127.0.0.1:1",
                                       "--advisory", "--listen", f"127.0.0.1:{port}", "--log-level", "error"])
    assert f"cannot listen on 127.0.0.1:{port}" in line


@pytest.mark.parametrize("flags", [
    [], ["--config", "a", "--keygen", "b"], ["--keygen", "/dev/null/sub"], ["--keygen", "/dev/null"],
    ["--keygen", "KEYS", "--name", "../x"], ["--keygen", "KEYS", "--name", "/abs"], ["--keygen", "KEYS", "--name", ""],
    ["--bogus"],
], ids=lambda f: " ".join(f) or "(none)")
def test_agent_flags(tmp_path, flags):
    assert_one_line_exit_2(["agent", *[str(tmp_path) if f == "KEYS" else f for f in flags]])


EMU_FLAGS = [
    ["--port", "99999"], ["--port", "-1"], ["--port", "x"], ["--time-scale", "0"], ["--time-scale", "nan"],
    ["--time-scale", "-1"], ["--time-scale", "inf"], ["--bootstrap-port", "70000"], ["--role", "x"],
    ["--max-running-requests", "0"], ["--kv-capacity-tokens", "-5"], ["--context-length", "0"],
    ["--chunked-prefill-size", "-1"], ["--natural-output-len", "0"], ["--role-switch-s", "-1"],
    ["--profile", "no-such-profile"], ["--log-level", "loud"],
]


@pytest.mark.parametrize("flags", EMU_FLAGS, ids=lambda f: " ".join(f))
def test_emulate_worker_flags(flags):
    argv = {"--role": "prefill", "--profile": PROFILE, "--port": "0"}
    argv.update({flags[0]: flags[1]} if len(flags) > 1 else {})
    assert_one_line_exit_2(["emulate-worker", *[x for kv in argv.items() for x in kv]])


def test_every_case_counted():
    """The issue counted 103 malformed inputs; this suite feeds more than that."""
    n = (2 * len(BAD_FILES) + len(CONFIG)) * 2 + len(PROFILE_FILES) * 3 + len(BAD_FILES) * 2 + len(AGENT) \
        + len(PLAN_FLAGS) + len(RUN_FLAGS) + len(EMU_FLAGS) + 8 + 3
    assert n > 200
