"""The telemetry hub: one place where every source's events and drops are counted and buffered.

Sources (ZeroMQ taps, the Prometheus scraper) push into the hub; the tick loop
drains it once per tick and hands the events to the core, which keeps its own
time window. Two streams come out:

- ``drain()`` -> EVENT_DTYPE: completed requests since the last drain (what the
  simulator emits too). ``drain_completions()`` returns the same array and, next to
  it, each record's request id (uint64; 0 when the source sent none: wire v1, the
  scraper). Either call empties the same buffer.
- ``drain_arrivals()`` -> ARRIVAL_DTYPE: requests that *arrived* since the last
  drain (wire v2 taps only), with exact or estimated input tokens (flags bit 2),
  ``max_tokens`` and the model. The request id in an arrival is the id its
  completion will carry.

``in_flight(now)`` counts requests that arrived and have not completed: the hub
joins arrivals with completions by request id. An arrival whose completion never
comes (a frame dropped on the way, a tap killed) leaves the count after
``in_flight_ttl_s``; a tap that restarts (its frame sequence starts again) takes
its open requests with it. The table holds at most ``max_in_flight`` ids (oldest
forgotten first).

Bounds: between two drains at most ``max_pending`` completion events (beyond,
dropped as ``backlog_full``) and ``max_pending_arrivals`` arrivals (beyond, the
oldest are discarded and counted in ``arrivals_discarded``: nobody drained them).
Source ids label metrics and per-source counters; only the first ``max_sources``
distinct ids get their own label, every later one is counted as ``"other"`` (a
flood of made-up source ids cannot grow /metrics or memory).
"""

from __future__ import annotations

from collections import Counter, deque

import numpy as np
import structlog

from controller.core.events import ARRIVAL_DTYPE, EVENT_DTYPE, empty_arrivals, empty_events
from controller.metrics import ControllerMetrics
from controller.telemetry.frames import DEFAULT_PLAUSIBILITY, FrameError, Plausibility, decode_frame
from router_plugin.wire import KIND_ARRIVAL

log = structlog.get_logger("pd.telemetry")

OTHER_SOURCE = "other"


class TelemetryHub:
    def __init__(
        self,
        *,
        max_pending: int = 1_000_000,
        metrics: ControllerMetrics | None = None,
        max_pending_arrivals: int = 1_000_000,
        max_sources: int = 32,
        max_in_flight: int = 1_000_000,
        in_flight_ttl_s: float = 600.0,
        plausibility: Plausibility = DEFAULT_PLAUSIBILITY,
    ) -> None:
        for name, v in (("max_pending", max_pending), ("max_pending_arrivals", max_pending_arrivals),
                        ("max_sources", max_sources), ("max_in_flight", max_in_flight)):
            if v < 1:
                raise ValueError(f"{name}={v}: must be >= 1")
        if not in_flight_ttl_s > 0:
            raise ValueError(f"in_flight_ttl_s={in_flight_ttl_s}: must be > 0")
        self.max_pending = max_pending
        self.max_pending_arrivals = max_pending_arrivals
        self.max_sources = max_sources
        self.max_in_flight = max_in_flight
        self.in_flight_ttl_s = in_flight_ttl_s
        self.plausibility = plausibility
        self.metrics = metrics
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_n = 0
        self._arrivals: deque[np.ndarray] = deque()
        self._arrivals_n = 0
        self.events_total: Counter[str] = Counter()
        self.arrivals_total: Counter[str] = Counter()
        self.arrivals_discarded = 0
        self.dropped_total: Counter[str] = Counter()
        self.frames_lost: Counter[str] = Counter()
        self._labels: dict[str, str] = {}
        self._last_seq: dict[str, int] = {}
        self._open: dict[int, tuple[float, str]] = {}  # request id -> (arrival_s, source label)
        self._versions_warned: set[str] = set()
        self.last_event_s: float | None = None  # controller clock when the last valid event arrived

    # -- sources -----------------------------------------------------------------------------

    def source_label(self, source: str) -> str:
        """The label a source is counted under: its own id for the first `max_sources`, else "other"."""
        label = self._labels.get(source)
        if label is None:
            label = source if len(self._labels) < self.max_sources and source != OTHER_SOURCE else OTHER_SOURCE
            if label != OTHER_SOURCE:
                self._labels[source] = label
        return label

    # -- input -------------------------------------------------------------------------------

    def ingest_frame(self, frame: bytes | memoryview, now: float) -> int:
        """Decode one tap frame; returns the number of records kept. Never raises on bad data."""
        try:
            f = decode_frame(frame, now, self.plausibility)
        except FrameError as e:
            self.drop(e.reason)
            # one clear line per distinct version problem (at most 16), not one per frame
            warned = self._versions_warned
            if e.reason in ("bad_version", "bad_kind") and e.detail not in warned and len(warned) < 16:
                warned.add(e.detail)
                log.warning("telemetry_frame_refused", reason=e.reason, detail=e.detail,
                            hint="tap and controller disagree on the wire format; pd-router-tap --wire-version")
            return 0
        except Exception:  # whatever else a hostile frame can provoke: dropped, counted, never raised
            self.drop("internal_error")
            return 0
        label = self.source_label(f.source)
        if label != OTHER_SOURCE:
            self._track_seq(label, f.seq)
        for reason, n in f.dropped.items():
            self.drop(reason, n)
        if f.kind == KIND_ARRIVAL:
            return self.add_arrivals(f.arrivals, label, now)
        return self.add_events(f.events, label, now, request_ids=f.request_ids)

    def add_events(self, events: np.ndarray, source: str, now: float,
                   request_ids: np.ndarray | None = None) -> int:
        """Completed-request events (EVENT_DTYPE) from `source`; `request_ids` (uint64) join them to arrivals."""
        if events.dtype != EVENT_DTYPE:
            raise TypeError(f"events dtype={events.dtype}: expected EVENT_DTYPE")
        if request_ids is not None and request_ids.shape != events.shape:
            raise ValueError(f"request_ids shape={request_ids.shape}: expected {events.shape}")
        n = int(events.size)
        if n == 0:
            return 0
        room = self.max_pending - self._pending_n
        if n > room:
            self.drop("backlog_full", n - max(room, 0))
            events = events[: max(room, 0)]
            request_ids = request_ids[: max(room, 0)] if request_ids is not None else None
            n = int(events.size)
            if n == 0:
                return 0
        self._pending.append((events, request_ids))
        self._pending_n += n
        label = self.source_label(source)
        self.events_total[label] += n
        self.last_event_s = now
        if request_ids is not None and self._open:
            for rid in request_ids[request_ids != 0].tolist():
                self._open.pop(rid, None)
        if self.metrics is not None:
            self.metrics.telemetry_events.labels(source=label).inc(n)
        return n

    def add_arrivals(self, arrivals: np.ndarray, source: str, now: float) -> int:
        """Arrival events (ARRIVAL_DTYPE) from `source`: buffered for drain_arrivals and opened in flight."""
        if arrivals.dtype != ARRIVAL_DTYPE:
            raise TypeError(f"arrivals dtype={arrivals.dtype}: expected ARRIVAL_DTYPE")
        n = int(arrivals.size)
        if n == 0:
            return 0
        label = self.source_label(source)
        self._arrivals.append(arrivals)
        self._arrivals_n += n
        while self._arrivals_n > self.max_pending_arrivals:  # nobody drains: forget the oldest
            extra = self._arrivals_n - self.max_pending_arrivals
            head = self._arrivals[0]
            if head.size <= extra:
                self._arrivals.popleft()
                self._arrivals_n -= head.size
                self.arrivals_discarded += int(head.size)
            else:
                self._arrivals[0] = head[extra:]
                self._arrivals_n -= extra
                self.arrivals_discarded += extra
        self.arrivals_total[label] += n
        self.last_event_s = now
        for rid, t in zip(arrivals["request_id"].tolist(), arrivals["arrival_s"].tolist(), strict=True):
            if rid:
                self._open[rid] = (t, label)
        while len(self._open) > self.max_in_flight:
            del self._open[next(iter(self._open))]
        return n

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped_total[reason] += n
        if self.metrics is not None:
            self.metrics.telemetry_dropped.labels(reason=reason).inc(n)

    def _track_seq(self, label: str, seq: int) -> None:
        """Frame sequence numbers per source: a gap is frames the PUB socket dropped on the way."""
        last = self._last_seq.get(label)
        self._last_seq[label] = seq
        if last is not None and seq <= last:  # the tap restarted: its requests in flight died with it
            self._forget_source(label)
            return
        if last is None:
            return
        lost = seq - last - 1
        if lost:
            self.frames_lost[label] += lost
            if self.metrics is not None:
                self.metrics.telemetry_frames_lost.labels(source=label).inc(lost)

    def _forget_source(self, label: str) -> None:
        for rid in [r for r, (_t, s) in self._open.items() if s == label]:
            del self._open[rid]

    # -- output ------------------------------------------------------------------------------

    def drain_completions(self) -> tuple[np.ndarray, np.ndarray]:
        """(EVENT_DTYPE events, uint64 request ids) received since the last drain, both copies."""
        if not self._pending:
            return empty_events(), np.zeros(0, dtype=np.uint64)
        evs = [e for e, _ in self._pending]
        ids = [i if i is not None else np.zeros(e.size, dtype=np.uint64) for e, i in self._pending]
        out = evs[0].copy() if len(evs) == 1 else np.concatenate(evs)
        out_ids = ids[0].astype(np.uint64, copy=True) if len(ids) == 1 else np.concatenate(ids).astype(np.uint64)
        self._pending.clear()
        self._pending_n = 0
        return out, out_ids

    def drain(self) -> np.ndarray:
        """All completion events received since the last drain, as one EVENT_DTYPE array (a copy)."""
        return self.drain_completions()[0]

    def drain_arrivals(self) -> np.ndarray:
        """All arrivals received since the last drain, as one ARRIVAL_DTYPE array (a copy), oldest first."""
        if not self._arrivals:
            return empty_arrivals()
        out = self._arrivals[0].copy() if len(self._arrivals) == 1 else np.concatenate(list(self._arrivals))
        self._arrivals.clear()
        self._arrivals_n = 0
        return out

    def in_flight(self, now: float) -> int:
        """Requests that arrived (per an arrival event) and have not completed, as of `now`."""
        self._expire(now)
        return len(self._open)

    def in_flight_by_source(self, now: float) -> dict[str, int]:
        self._expire(now)
        return dict(Counter(s for _t, s in self._open.values()))

    def _expire(self, now: float) -> None:
        # ids sit in the order their arrivals came in, which is arrival order up to the taps'
        # flush interval: expiring from the front is O(expired), not O(open)
        cutoff = now - self.in_flight_ttl_s
        while self._open:
            rid, (t, _s) = next(iter(self._open.items()))
            if t >= cutoff:
                break
            del self._open[rid]

    @property
    def pending(self) -> int:
        return self._pending_n

    @property
    def pending_arrivals(self) -> int:
        return self._arrivals_n

    def fresh(self, now: float, max_age_s: float) -> bool:
        return self.last_event_s is not None and now - self.last_event_s <= max_age_s

    def snapshot(self) -> dict[str, object]:
        return {
            "events_total": dict(self.events_total),
            "arrivals_total": dict(self.arrivals_total),
            "dropped_total": dict(self.dropped_total),
            "frames_lost": dict(self.frames_lost),
            "pending": self._pending_n,
            "pending_arrivals": self._arrivals_n,
            "arrivals_discarded": self.arrivals_discarded,
            "in_flight": len(self._open),
            "last_event_s": self.last_event_s,
        }
