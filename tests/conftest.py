"""Shared fixtures: a fresh Prometheus registry per test, and a check that no asyncio task leaks."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

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
