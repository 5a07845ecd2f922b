"""The reduced fault suite CI runs (the full one is `python -m bench.faults`): one live stack (node agents over
emulated workers, the real router, the tap, the assembled sidecar as its own process, client load), two faults
in the middle of flips the controller makes:

- the worker being flipped is killed -9 during its switch: before, the rollback waited for the dead worker to
  go idle, failed in ~3 s and was never retried, leaving a healthy fleet one worker short for good;
- the router is killed -9 during a flip and restarted 10 s later with its start-up arguments (it then lists the
  flipped worker in its start-up role): before, a worker was listed as decode while serving prefill for 26 s
  and the flip reported "rolled back" when it was not.

Both must end consistent (every worker listed in the pool it serves, its agent agreeing, the journal empty),
checked from outside the controller, and the flip's own report must match what the worker serves.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.faults import Load, Stack, router_down_10s_during_flip, worker_killed_mid_flip

pytestmark = [pytest.mark.e2e, pytest.mark.router_compat]


def flip_outcomes(stack: Stack) -> list[tuple[str, str, str]]:
    """(worker, last step, note) per flip, from the controller's own log lines."""
    last: dict[str, tuple[str, str]] = {}
    order: list[str] = []
    for line in (stack.work / "controller.log").read_text(errors="replace").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("event") == "flip_step":
            if d["step"] == "planned":
                order.append(d["worker"])
            last[d["worker"]] = (d["step"], d.get("note", ""))
    return [(w, *last[w]) for w in order]


async def serves(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{url}/server_info") as r:
        return str((await r.json())["disaggregation_mode"])


async def test_fleet_heals_after_faults_mid_flip(tmp_path):
    stack = Stack(tmp_path, switch_s=2.0, reconcile_interval_s=1.0)
    try:
        await stack.start()
        ok, state = await stack.check()
        assert ok, state
        async with Load(stack.tap_url, rate_rps=3.0) as load:
            await asyncio.sleep(1.0)
            ended, _ = await worker_killed_mid_flip(stack)  # a decode worker on its way to prefill
            took, state = await stack.time_to_consistency(ended, timeout_s=90)
            assert took is not None, state
            assert state.startswith("2P2D"), state  # the killed worker was restarted in its old role
        assert load.failed == 0, (load.outcomes, load.errors[:3])
        (w, step, note) = flip_outcomes(stack)[-1]
        # rolled back by restarting it through its agent, or failed and then repaired by the reconciler
        assert step in ("rolled_back", "failed"), (step, note)
        assert await serves(w) == "decode"

        async with Load(stack.tap_url, rate_rps=3.0):
            ended, _ = await router_down_10s_during_flip(stack)
            took, state = await stack.time_to_consistency(ended, timeout_s=90)
            assert took is not None, state
        await stack.wait_no_flip()
        ok, state = await stack.check()
        assert ok, state
        (w, step, note) = flip_outcomes(stack)[-1]
        # the report matches the worker: done means it serves prefill now, rolled back means decode
        assert step in ("done", "rolled_back"), (step, note)
        assert await serves(w) == ("prefill" if step == "done" else "decode"), (step, note)
    finally:
        await stack.stop()
