"""Adapter from the core's actions to an actuator (controller.actuators.base.Actuator).

The core says "flip 1 instance to prefill" or "scale decode by +2"; an
actuator flips one named worker at a time. The adapter picks the workers:
the least-loaded healthy serving workers of the pool that gives one up.

It also says honestly what happened, so the loop can idle when nothing can
change (issue 13 item 4): `apply_detailed` returns one `Applied` per action
with the actuator's outcome (done, refused, advised, rolled_back, failed), a
short `why`, and `started`, the flips/scales observed to start (what the core
counts against its flip budget, never the proposals). After each apply,
`last_changed` is False when every action was refused, advised (dry-run) or
could not start: the fleet is as it was, so the loop must not wake itself to
decide again at once; the next tick comes at the period.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from controller.core.control.types import Action, ActionKind, Role

# outcomes after which the fleet is as it was: waking the loop would only re-derive the same action
UNCHANGED = ("refused", "advised")


@dataclass(frozen=True)
class Applied:
    """One core action as carried out (or not) by the actuator."""

    action: Action
    ok: bool  # carried out in full
    detail: str  # what happened, one line
    outcome: str  # done | refused | advised | rolled_back | failed (the worst over the action's workers)
    why: str = ""  # short label of a refusal or failure (dry_run, last_instance_of_pool, no_donor, ...)
    started: int = 0  # workers the action touched (flips observed to start, scale steps begun)

    @property
    def changed(self) -> bool:
        """The fleet may differ from before this action (re-read it, decide again)."""
        return self.outcome not in UNCHANGED

    @property
    def refused(self) -> bool:
        """Nothing was touched and repeating it unchanged will not help (refused, dry-run advice)."""
        return self.outcome in UNCHANGED


# how bad an outcome is, to summarise an action that flipped several workers
_SEVERITY = {"done": 0, "advised": 1, "refused": 2, "rolled_back": 3, "failed": 4}


def _outcome_of(r: Any) -> str:
    o = getattr(r, "outcome", None)
    if o is not None:
        return str(o)
    return "done" if r.ok else ("refused" if str(r.detail).startswith("refused") else "failed")


class ActuatorSink:
    def __init__(self, actuator: Any) -> None:
        self.actuator = actuator
        self.last: tuple[Applied, ...] = ()

    @property
    def last_changed(self) -> bool:
        """False when the last apply changed nothing (all refused/advised): do not wake the loop for it."""
        return any(a.changed for a in self.last)

    async def apply_detailed(self, actions: Sequence[Action]) -> list[Applied]:
        out: list[Applied] = []
        for a in actions:
            if a.kind in (ActionKind.FLIP_TO_PREFILL, ActionKind.FLIP_TO_DECODE):
                out.append(await self._flip(a))
            else:
                pool = Role.PREFILL if a.kind is ActionKind.SCALE_PREFILL else Role.DECODE
                r = await self.actuator.scale(pool, a.count, a.reason.value)
                o = _outcome_of(r)
                out.append(Applied(a, bool(r.ok), r.detail, o, getattr(r, "why", ""),
                                   started=0 if o in UNCHANGED else 1))
        self.last = tuple(out)
        return out

    async def _flip(self, a: Action) -> Applied:
        src, dst = (Role.DECODE, Role.PREFILL) if a.kind is ActionKind.FLIP_TO_PREFILL else (Role.PREFILL, Role.DECODE)
        fleet = await self.actuator.fleet()
        donors = sorted(fleet.pool(src), key=lambda w: w.load)[: a.count]
        if len(donors) < a.count:
            return Applied(a, False, f"refused: only {len(donors)} {src} workers to flip, wanted {a.count}",
                           "refused", "no_donor")
        results = [await self.actuator.flip(w.url, dst, a.reason.value) for w in donors]
        worst = max(results, key=lambda r: _SEVERITY.get(_outcome_of(r), 4))
        started = sum(1 for r in results if _outcome_of(r) not in UNCHANGED)
        detail = "; ".join(f"{r.target}: {r.detail}" for r in results) if len(results) > 1 else results[0].detail
        return Applied(a, all(r.ok for r in results), detail, _outcome_of(worst), getattr(worst, "why", ""),
                       started=started)

    async def apply(self, actions: Sequence[Action]) -> list[tuple[Action, bool, str]]:
        """The loop's ActionSink protocol: (action, ok, detail) per action (see apply_detailed for the rest)."""
        return [(x.action, x.ok, x.detail) for x in await self.apply_detailed(actions)]
