"""Repository hygiene: CI runs the README's test command; lint, types and layering hold."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def _readme_command(label: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- {label} -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert m, f"README has no {label} block"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert _readme_command("test-command") in ci


def test_readme_main_command_is_the_demo_or_plan() -> None:
    cmd = _readme_command("main-command")
    assert "pip install" in cmd and "pd-controller" in cmd


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff() -> None:
    proc = _run(sys.executable, "-m", "ruff", "check", "controller", "router_plugin", "tests", "bench", "harness")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_on_core() -> None:
    proc = _run(sys.executable, "-m", "mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_core_imports_no_io() -> None:
    proc = _run("lint-imports")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_property_tests_are_reproducible_in_ci() -> None:
    """CI draws the same hypothesis examples every run (tests/conftest.py); locally they explore."""
    import os

    from hypothesis import settings

    assert settings.get_profile("ci").derandomize is True
    assert settings.default.derandomize is bool(os.environ.get("CI"))
