"""The router setting: one place resolves smg / sglang-router / a command template and builds its command line."""

from __future__ import annotations

import sys

import pytest

from harness.routers import RouterSpecError, resolve, router_command

ARGS = dict(host="127.0.0.1", port=30000, prometheus_port=29000, prefill=[("http://p:1", 8998), ("http://q:1", None)],
            decode=["http://d:1"])


def test_default_is_smg_started_as_a_module(monkeypatch):
    monkeypatch.delenv("PD_ROUTER", raising=False)
    k = resolve(None)
    assert (k.name, k.dialect) == ("smg", "smg")
    cmd = router_command(k, model_aliases=[("gpt-x", "emulated")], **ARGS)
    # never the `smg` script: sglang-router 0.3 installs one of the same name
    assert cmd[:4] == [sys.executable, "-m", "smg", "launch"]
    assert cmd[cmd.index("--prefill") + 1: cmd.index("--prefill") + 3] == ["http://p:1", "8998"]
    assert cmd[cmd.index("--decode") + 1] == "http://d:1" and "--pd-disaggregation" in cmd
    assert cmd[cmd.index("--model-alias") + 1] == "gpt-x=emulated" and "--load-monitor-interval" in cmd


def test_env_picks_the_old_router_and_smg_only_flags_stay_out(monkeypatch):
    monkeypatch.setenv("PD_ROUTER", "sglang-router")
    k = resolve(None)
    assert (k.name, k.dialect) == ("sglang-router", "legacy")
    cmd = router_command(k, model_aliases=[("a", "b")], extra=["--disable-retries"], **ARGS)
    assert cmd[:3] == [sys.executable, "-m", "sglang_router.launch_router"]
    assert "--model-alias" not in cmd and "--load-monitor-interval" not in cmd and cmd[-1] == "--disable-retries"
    assert resolve("smg").name == "smg"  # an explicit setting wins over the environment


def test_custom_template_and_bad_settings():
    k = resolve("my-router --mode pd {args} --verbose")
    cmd = router_command(k, **ARGS)
    assert cmd[:3] == ["my-router", "--mode", "pd"] and cmd[-1] == "--verbose" and "--pd-disaggregation" in cmd
    assert router_command(resolve("other-router"), **ARGS)[:2] == ["other-router", "--pd-disaggregation"]
    with pytest.raises(RouterSpecError, match="router="):
        resolve("   '   ")
