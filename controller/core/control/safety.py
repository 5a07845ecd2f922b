"""Safe scale-down and the history it reads: what was observed to happen, not what was proposed.

Giving up an instance saves a few GPU-minutes; being wrong costs a regrow —
a cold start (elastic) or a drained flip (fixed budget) — of misses. So a
pool shrinks only when two independent views agree that the smaller pool
holds:

1. **Peak hold over the regrow time.** The load the smaller pool must carry
   is the highest rate observed within the last `hold_s` (at least the
   down-stabilization window and `regrow_hold_factor` x the time it would take
   to grow back): if the load was there that recently, it can come back before
   a new instance would be ready. The smaller pool must carry it: the model's
   exact need at the held rate, times the feedback headroom.
2. **Consolidation (N -> n).** The load observed at the current size, spread
   over the smaller pool, must stay below what one instance sustains at the
   objective: prefill busy share x N/n <= the model's utilisation at the
   objective, and decode running batch x N/n <= the target batch (the check
   Dynamo's planner added after 2 <-> 1 flapping).

`FleetHistory` turns successive `FleetView`s into the flips observed to start
(their times and direction) and the last time pool membership changed; rate
limits and calibration read it, never the actions proposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from controller.core.control.types import FleetView, Role, Transition

RateHist = tuple[tuple[float, float, float], ...]  # (time, mean rate, short-bin peak rate), req/s


def record_rate(hist: RateHist, now: float, rate: float, peak: float, keep_s: float) -> RateHist:
    return (*tuple(h for h in hist if h[0] >= now - keep_s), (now, rate, peak))


def held_rate(hist: RateHist, now: float, hold_s: float, use_peak: bool) -> float:
    """The highest rate (mean, or the short-bin peak for decode) observed within the last hold_s."""
    vals = [max(r, pk) if use_peak else r for t, r, pk in hist if t >= now - hold_s]
    return max(vals) if vals else 0.0


def safe_down_floor(held_need: float, headroom: float) -> int:
    """Instances the held load needs (the model's exact need at the held rate) with the headroom (>= 1)."""
    if not math.isfinite(held_need):
        return 1
    return max(1, math.ceil(held_need * headroom - 1e-9))


def consolidation_ok(observed_util: float | None, current: int, proposed: int, util_target: float | None) -> bool:
    """Would the load observed at `current` fit `proposed` instances below `util_target` each?"""
    if proposed >= current or observed_util is None or util_target is None or current <= 0:
        return True
    return observed_util * current / max(proposed, 1) <= util_target


@dataclass(frozen=True)
class FleetHistory:
    """What the fleet was observed to do: flip starts (times, direction) and membership changes."""

    flip_times: tuple[float, ...] = ()
    last_flip_dir: int = 0  # +1 toward prefill, -1 toward decode (of the newest observed flip)
    last_flip_s: float = -math.inf
    last_change_s: float = -math.inf  # serving counts last changed (calibration waits after it)
    signature: tuple[int, int] | None = None
    flips_in_flight: int = 0
    last_s: float | None = None
    seen: frozenset[tuple[str, float | None]] = frozenset()  # identities of the flips in flight

    def observe(self, fleet: FleetView, now: float) -> FleetHistory:
        flips = [t for t in fleet.transitions if t.kind == "flip"]
        keyed = all(t.started_s is not None or t.worker for t in flips)
        keys = frozenset((t.worker, t.started_s) for t in flips) if keyed else frozenset()
        if self.last_s is None:
            started: list[Transition] = []  # flips under way when the controller started are not ours to count
        elif keyed:
            # a flip is new when its identity (worker, start time) was not in flight at the last look
            started = [t for t in flips if (t.worker, t.started_s) not in self.seen]
        else:
            # no identities from this source: count newly appeared flips, as started now
            k = max(0, len(flips) - self.flips_in_flight)
            started = flips[-k:] if k else []
        times = tuple(t for t in self.flip_times if t > now - 3600.0)
        last_dir, last_flip_s = self.last_flip_dir, self.last_flip_s
        for t in started:
            ts = min(t.started_s, now) if t.started_s is not None else now
            times = (*times, ts)
            if ts >= last_flip_s:
                last_flip_s = ts
                last_dir = 1 if t.target_role is Role.PREFILL else -1
        sig = (fleet.serving_prefill, fleet.serving_decode)
        changed = self.last_change_s
        if self.signature is not None and sig != self.signature:
            changed = now
        return FleetHistory(times, last_dir, last_flip_s, changed, sig, len(flips), now, keys)
