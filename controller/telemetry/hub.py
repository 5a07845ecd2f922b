"""The telemetry hub: one place where every source's events and drops are counted and buffered.

Sources (ZeroMQ taps, the Prometheus scraper) push into the hub; the tick loop
drains it once per tick (`drain`) and hands the events to the core, which keeps
its own time window. Between two ticks the hub holds at most `max_pending`
events; beyond that new events are dropped as ``backlog_full`` (a stalled tick
loop must not grow memory without bound).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from controller.core.events import EVENT_DTYPE, empty_events
from controller.metrics import ControllerMetrics
from controller.telemetry.frames import FrameError, decode_frame


class TelemetryHub:
    def __init__(self, *, max_pending: int = 1_000_000, metrics: ControllerMetrics | None = None) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending}: must be >= 1")
        self.max_pending = max_pending
        self.metrics = metrics
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self.events_total: Counter[str] = Counter()
        self.dropped_total: Counter[str] = Counter()
        self.frames_lost: Counter[str] = Counter()
        self._last_seq: dict[str, int] = {}
        self.last_event_s: float | None = None  # controller clock when the last valid event arrived

    # -- input -------------------------------------------------------------------------------

    def ingest_frame(self, frame: bytes | memoryview, now: float) -> int:
        """Decode one tap frame; returns the number of events kept. Never raises on bad data."""
        try:
            f = decode_frame(frame, now)
        except FrameError as e:
            self.drop(e.reason)
            return 0
        except Exception:  # whatever else a hostile frame can provoke: dropped, counted, never raised
            self.drop("internal_error")
            return 0
        self._track_seq(f.source, f.seq)
        for reason, n in f.dropped.items():
            self.drop(reason, n)
        return self.add_events(f.events, f.source, now)

    def add_events(self, events: np.ndarray, source: str, now: float) -> int:
        if events.dtype != EVENT_DTYPE:
            raise TypeError(f"events dtype={events.dtype}: expected EVENT_DTYPE")
        n = int(events.size)
        if n == 0:
            return 0
        room = self.max_pending - self._pending_n
        if n > room:
            self.drop("backlog_full", n - max(room, 0))
            events = events[: max(room, 0)]
            n = int(events.size)
            if n == 0:
                return 0
        self._pending.append(events)
        self._pending_n += n
        self.events_total[source] += n
        self.last_event_s = now
        if self.metrics is not None:
            self.metrics.telemetry_events.labels(source=source).inc(n)
        return n

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped_total[reason] += n
        if self.metrics is not None:
            self.metrics.telemetry_dropped.labels(reason=reason).inc(n)

    def _track_seq(self, source: str, seq: int) -> None:
        """Frame sequence numbers per source: a gap is frames the PUB socket dropped on the way."""
        last = self._last_seq.get(source)
        self._last_seq[source] = seq
        if last is None or seq <= last:  # first frame seen, or the tap restarted: new baseline
            return
        lost = seq - last - 1
        if lost:
            self.frames_lost[source] += lost
            if self.metrics is not None:
                self.metrics.telemetry_frames_lost.labels(source=source).inc(lost)

    # -- output ------------------------------------------------------------------------------

    def drain(self) -> np.ndarray:
        """All events received since the last drain, as one EVENT_DTYPE array (a copy)."""
        if not self._pending:
            return empty_events()
        out = self._pending[0].copy() if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending.clear()
        self._pending_n = 0
        return out

    @property
    def pending(self) -> int:
        return self._pending_n

    def fresh(self, now: float, max_age_s: float) -> bool:
        return self.last_event_s is not None and now - self.last_event_s <= max_age_s

    def snapshot(self) -> dict[str, object]:
        return {
            "events_total": dict(self.events_total),
            "dropped_total": dict(self.dropped_total),
            "frames_lost": dict(self.frames_lost),
            "pending": self._pending_n,
            "last_event_s": self.last_event_s,
        }
