"""Shared fixtures: a fresh Prometheus registry per test, and a check that no asyncio task leaks."""

from __future__ import annotations

import asyncio
import inspect
import os
from pathlib import Path

import pytest
from hypothesis import settings
from prometheus_client import CollectorRegistry

# CI (a clean checkout, `CI` set): property tests draw the same examples on every run, so a run is
# reproducible and a red CI is a regression, not a new random draw; locally they explore afresh and
# keep failing examples in .hypothesis/.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "configs" / "profiles"
DATA = REPO / "data"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def _no_leaked_tasks():
    before = set(asyncio.all_tasks())
    yield
    # give cancelled tasks one turn to finish their cleanup
    for _ in range(3):
        await asyncio.sleep(0)
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    for t in leaked:
        t.cancel()
    assert not leaked, f"test leaked asyncio tasks: {[t.get_name() for t in leaked]}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        if fn is not None and inspect.iscoroutinefunction(fn):
            item.fixturenames.insert(0, "_no_leaked_tasks")
