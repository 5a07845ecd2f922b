"""The policy stages, each a small pure function (after Kubernetes HPA's staged normalization).

model target -> tolerance band -> stabilization windows -> bounds -> rate limits -> choice of action.
"""

from __future__ import annotations

import math

from controller.core.control.types import Reason

Recs = tuple[tuple[float, int], ...]


def tolerance_band(current: int, exact: float, tolerance: float, tolerance_up: float | None = None) -> tuple[int, Reason | None]:
    """Keep `current` while cur(1 - tolerance) <= exact <= cur(1 + tolerance_up); else the ceiling of the need
    (of need x (1 + tolerance) on the way down: the count shrunk to sits well inside its own band).

    HPA's band is symmetric. Above the current count the exact need is a predicted breach, not noise
    around a utilisation target (a decode pool past B* misses TPOT on every request), so the band
    above may be narrower (`tolerance_up`, default: symmetric); the up-stabilization window keeps a
    brief excursion from growing the pool.
    """
    up = tolerance if tolerance_up is None else tolerance_up
    want = max(1, math.ceil(exact - 1e-9))
    if current > 0 and -tolerance <= exact / current - 1.0 <= up:
        return current, (Reason.WITHIN_TOLERANCE if want != current else None)
    if current > 0 and want < current:
        # hysteresis: shrink only to a count the need sits below by the band's width (HPA's 10 %), or
        # the next excursion of a noisy estimate past n(1 + up) grows it straight back (n -> n+1 -> n)
        held = min(current, max(1, math.ceil(exact * (1.0 + tolerance) - 1e-9)))
        return held, (Reason.WITHIN_TOLERANCE if held > want else None)
    return want, None


def record(recs: Recs, now: float, n: int, keep_s: float, current: int | None = None) -> Recs:
    """Append a timestamped recommendation and drop those older than keep_s.

    The first recommendation is preceded by one for `current` (as HPA seeds its
    history with the current count), so a fresh controller cannot scale down
    before a full down window of its own recommendations agrees.
    """
    if not recs and current is not None and current != n:
        recs = ((now, current),)
    return (*tuple(r for r in recs if r[0] >= now - keep_s), (now, n))


def _lower_quantile(xs: list[int], q: float) -> int:
    s = sorted(xs)
    return s[int(q * (len(s) - 1))]


def stabilize(recs: Recs, now: float, current: int, up_s: float, down_s: float,
              up_quantile: float = 0.0) -> tuple[int, Reason | None]:
    """Stabilization on time: up to the window's `up_quantile` (HPA: 0, the minimum), down to its maximum.

    With `up_quantile` 0 a rise happens only when every recommendation within
    `up_s` asks for more; with 0.5, when at least half of them do: a need that
    climbs slowly across an instance boundary hovers there, and one tick back
    inside the tolerance band would restart HPA's window each time (a cold start
    of minutes ordered minutes late), while an excursion shorter than half the
    window still adds nothing. A fall goes only as far as the largest
    recommendation within `down_s` (slow down: `down_s` is long).
    `recs` must include the latest recommendation.
    """
    if not recs:
        return current, None
    latest = recs[-1][1]
    ups = [n for t, n in recs if t >= now - up_s] or [latest]
    downs = [n for t, n in recs if t >= now - down_s] or [latest]
    out = current
    # the quantile needs a whole window of history (the first recommendation, seeded with the current
    # count, older than the window): until then HPA's minimum, so a fresh history does not rise at once
    covered = recs[0][0] < now - up_s
    up_rec = _lower_quantile(ups, up_quantile) if up_quantile > 0 and up_s > 0 and covered else min(ups)
    down_rec = max(downs)
    if out < up_rec:
        out = up_rec
    if out > down_rec:
        out = down_rec
    return out, (Reason.STABILIZING if out != latest else None)


def bounds(n: int, lo: int, hi: int) -> tuple[int, Reason | None]:
    """Clamp to [lo, hi]; never below one instance per pool."""
    lo = max(1, lo)
    if n < lo:
        return lo, Reason.AT_BOUND
    if n > hi:
        return hi, Reason.AT_BOUND
    return n, None


def flips_allowed(
    in_flight: int, flip_times: tuple[float, ...], now: float, max_in_flight: int, max_per_hour: int
) -> int:
    """How many flips may start now: in-flight cap and a sliding one-hour budget."""
    recent = sum(1 for t in flip_times if t > now - 3600.0)
    return max(0, min(max_in_flight - in_flight, max_per_hour - recent))


def best_split(p_exact: float, d_exact: float, total: int, p_lo: int, p_hi: int, d_lo: int, d_hi: int, current_p: int) -> int:
    """Fixed budget: the prefill count p (decode = total - p) maximizing min(p/P*, d/D*).

    Ties prefer the split closest to the current one (no flip for nothing).
    """
    lo = max(max(1, p_lo), total - d_hi)
    hi = min(p_hi, total - max(1, d_lo))
    if hi < lo:
        return min(max(current_p, 1), max(total - 1, 1))
    best, best_key = lo, (-math.inf, 0.0)
    for p in range(lo, hi + 1):
        d = total - p
        cover = min(p / p_exact if p_exact > 0 else math.inf, d / d_exact if d_exact > 0 else math.inf)
        key = (round(cover, 9), -abs(p - current_p))
        if key > best_key:
            best, best_key = p, key
    return best
