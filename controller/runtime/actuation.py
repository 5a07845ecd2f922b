"""Adapter from the core's actions to an actuator (controller.actuators.base.Actuator).

The core says "flip 1 instance to prefill" or "scale decode by +2"; an
actuator flips one named worker at a time. The adapter picks the workers:
the least-loaded healthy serving workers of the pool that gives one up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from controller.core.control.types import Action, ActionKind


class ActuatorSink:
    def __init__(self, actuator: Any) -> None:
        self.actuator = actuator

    async def apply(self, actions: Sequence[Action]) -> list[tuple[Action, bool, str]]:
        out: list[tuple[Action, bool, str]] = []
        for a in actions:
            if a.kind in (ActionKind.FLIP_TO_PREFILL, ActionKind.FLIP_TO_DECODE):
                src, dst = ("decode", "prefill") if a.kind is ActionKind.FLIP_TO_PREFILL else ("prefill", "decode")
                fleet = await self.actuator.fleet()
                donors = sorted(fleet.pool(src), key=lambda w: w.load)[: a.count]
                if len(donors) < a.count:
                    out.append((a, False, f"only {len(donors)} {src} workers to flip, wanted {a.count}"))
                    continue
                for w in donors:
                    r = await self.actuator.flip(w.url, dst, a.reason.value)
                    out.append((a, bool(r.ok), r.detail))
            else:
                pool = "prefill" if a.kind is ActionKind.SCALE_PREFILL else "decode"
                r = await self.actuator.scale(pool, a.count, a.reason.value)
                out.append((a, bool(r.ok), r.detail))
        return out
