"""Decode and validate tap frames (router_plugin.wire) into numpy arrays.

Both wire schema versions are read: version 1 (completion records only, no
request id) and version 2 (a kind byte in the header: completion records with a
request id, or arrival records). See router_plugin.wire for the layouts.

A frame is rejected whole when its header is wrong (short, bad magic, unknown
schema version or kind, record size or length that disagree with the header):
the reason is counted once per frame, since a corrupt header says nothing
reliable about how many events it held. A frame that decodes is then checked
record by record, vectorised, and implausible records are dropped and counted by
their first failing reason:

- ``non_finite``: arrival or end-to-end time is NaN/inf, or TTFT/TPOT is inf
  (NaN TTFT/TPOT is legal: unknown, e.g. a failed or non-streamed request);
- ``negative``: a negative time;
- ``reserved_flags``: a flag bit the wire does not define, or FLAG_SYNTHETIC (only
  the controller itself makes synthetic events), or a nonzero reserved field;
- ``too_long``: more input or output tokens than `max_context_tokens` (no model
  serves them: a forged or corrupt record);
- ``absurd``: cached > input, a latency longer than `max_latency_s`, or TTFT
  longer than the whole request;
- ``clock_skew``: an arrival more than `max_future_s` ahead of the controller's
  clock, or a request that ended (arrival + e2e; for an arrival record, arrived)
  more than `max_age_s` ago -- a broken clock, or a replay.

The bound on how fast the forecast may move is the control core's; this module
only refuses records that cannot be true.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller.core.events import ARRIVAL_DTYPE, EVENT_DTYPE, empty_arrivals, empty_events
from router_plugin.wire import (
    ARRIVAL,
    FLAG_SYNTHETIC,
    HEADER,
    KIND_ARRIVAL,
    KIND_COMPLETION,
    MAGIC,
    MAX_RECORDS_PER_FRAME,
    RECORD,
    RECORD_V2,
    WIRE_FLAGS,
)

MAX_TOKENS = 10_000_000  # default max_context_tokens: beyond any model's context
MAX_LATENCY_S = 86_400.0
MAX_FUTURE_S = 60.0
MAX_AGE_S = 600.0

FRAME_REASONS = ("short_frame", "bad_magic", "bad_version", "bad_kind", "bad_record_size", "bad_length")
RECORD_REASONS = ("non_finite", "negative", "reserved_flags", "too_long", "absurd", "clock_skew")

# wire v2 completion record: EVENT_DTYPE's fields, then the request id (mirrors wire.RECORD_V2)
COMPLETION_V2_DTYPE = np.dtype([*EVENT_DTYPE.descr, ("request_id", "<u8")])
_EVENT_FIELDS = EVENT_DTYPE.names or ()
assert COMPLETION_V2_DTYPE.itemsize == RECORD_V2.size and EVENT_DTYPE.itemsize == RECORD.size
assert ARRIVAL_DTYPE.itemsize == ARRIVAL.size

_BAD_FLAGS = np.uint8(~WIRE_FLAGS & 0xFF) | np.uint8(FLAG_SYNTHETIC)


@dataclass(frozen=True, slots=True)
class Plausibility:
    """What a record must satisfy to be believed (see the module docstring)."""

    max_context_tokens: int = MAX_TOKENS
    max_latency_s: float = MAX_LATENCY_S
    max_future_s: float = MAX_FUTURE_S
    max_age_s: float = MAX_AGE_S

    def __post_init__(self) -> None:
        for name in ("max_context_tokens", "max_latency_s", "max_future_s", "max_age_s"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"{name}={v}: must be > 0")


DEFAULT_PLAUSIBILITY = Plausibility()


class FrameError(ValueError):
    """The whole frame is unusable; `reason` is the drop label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Frame:
    source: str
    seq: int
    kind: int  # wire.KIND_COMPLETION or wire.KIND_ARRIVAL
    events: np.ndarray  # EVENT_DTYPE, valid completion records only (empty for an arrival frame)
    request_ids: np.ndarray  # uint64, one per event (0 = unknown: a version-1 frame)
    arrivals: np.ndarray  # ARRIVAL_DTYPE, valid arrival records only (empty for a completion frame)
    dropped: dict[str, int]  # record-level drops by reason (zeros omitted)


_NO_IDS = np.zeros(0, dtype=np.uint64)


def decode_frame(frame: bytes | memoryview, now: float, limits: Plausibility = DEFAULT_PLAUSIBILITY) -> Frame:
    """Header check, one numpy.frombuffer, vectorised validation. Raises FrameError."""
    n = len(frame)
    if n < HEADER.size:
        raise FrameError("short_frame")
    magic, version, kind, rsize, count, sid, seq = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise FrameError("bad_magic")
    if version == 1:
        if kind != 0:  # version 1 reserved the byte as flags, always 0
            raise FrameError("bad_kind", f"version 1 frame with flags={kind}")
        dtype = EVENT_DTYPE
    elif version == 2:
        if kind == KIND_COMPLETION:
            dtype = COMPLETION_V2_DTYPE
        elif kind == KIND_ARRIVAL:
            dtype = ARRIVAL_DTYPE
        else:
            raise FrameError("bad_kind", f"kind={kind}")
    else:
        raise FrameError("bad_version", f"schema version {version}; this controller reads 1 and 2")
    if rsize != dtype.itemsize:
        raise FrameError("bad_record_size")
    if count > MAX_RECORDS_PER_FRAME or n != HEADER.size + count * rsize:
        raise FrameError("bad_length")
    source = bytes(sid).rstrip(b"\0").decode("utf-8", errors="replace")
    raw = np.frombuffer(frame, dtype=dtype, count=count, offset=HEADER.size)
    if dtype is ARRIVAL_DTYPE:
        arr, dropped = validate_arrivals(raw, now, limits)
        return Frame(source, int(seq), KIND_ARRIVAL, empty_events(), _NO_IDS, arr, dropped)
    keep, dropped = _completion_mask(raw, now, limits)
    if dtype is EVENT_DTYPE:
        ev = raw if keep is None else raw[keep]
        return Frame(source, int(seq), KIND_COMPLETION, ev, np.zeros(ev.size, dtype=np.uint64), empty_arrivals(),
                     dropped)
    sel = raw if keep is None else raw[keep]
    ev = np.empty(sel.size, dtype=EVENT_DTYPE)
    for name in _EVENT_FIELDS:
        ev[name] = sel[name]
    return Frame(source, int(seq), KIND_COMPLETION, ev, sel["request_id"].astype(np.uint64), empty_arrivals(),
                 dropped)


def _first_reasons(masks: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, dict[str, int]]:
    """Union of the masks, and the count of each record under its first failing reason."""
    bad = np.zeros(masks[0][1].shape, dtype=bool)
    dropped: dict[str, int] = {}
    for name, mask in masks:
        m = mask & ~bad
        k = int(m.sum())
        if k:
            dropped[name] = k
        bad |= m
    return bad, dropped


def _completion_mask(ev: np.ndarray, now: float, lim: Plausibility) -> tuple[np.ndarray | None, dict[str, int]]:
    """None when every record is plausible (the common case: no copy), else the keep mask."""
    if ev.size == 0:
        return None, {}
    arr = ev["arrival_s"]
    e2e = ev["e2e_s"]
    ttft = ev["ttft_s"]
    tpot = ev["tpot_s"]
    with np.errstate(invalid="ignore", over="ignore"):
        non_finite = ~np.isfinite(arr) | ~np.isfinite(e2e) | np.isinf(ttft) | np.isinf(tpot)
        # NaN compares False, so unknown TTFT/TPOT never count as negative or absurd
        negative = (arr < 0) | (e2e < 0) | (ttft < 0) | (tpot < 0)
        flags = (ev["flags"] & _BAD_FLAGS) != 0
        too_long = (ev["input_tokens"] > lim.max_context_tokens) | (ev["output_tokens"] > lim.max_context_tokens)
        absurd = (
            (ev["cached_tokens"] > ev["input_tokens"])
            | (e2e > lim.max_latency_s)
            | (tpot > lim.max_latency_s)
            | (ttft > e2e + 1e-3)
        )
        skew = (arr > now + lim.max_future_s) | (arr + e2e < now - lim.max_age_s)
    masks = [("non_finite", non_finite), ("negative", negative), ("reserved_flags", flags),
             ("too_long", too_long), ("absurd", absurd), ("clock_skew", skew)]
    bad = non_finite | negative | flags | too_long | absurd | skew
    if not bad.any():
        return None, {}
    bad, dropped = _first_reasons(masks)
    return ~bad, dropped


def validate(ev: np.ndarray, now: float, limits: Plausibility = DEFAULT_PLAUSIBILITY) -> tuple[np.ndarray, dict[str, int]]:
    """Keep the plausible completion records (EVENT_DTYPE); count the others by their first failing reason."""
    keep, dropped = _completion_mask(ev, now, limits)
    return (ev if keep is None else ev[keep]), dropped


def validate_arrivals(ar: np.ndarray, now: float,
                      limits: Plausibility = DEFAULT_PLAUSIBILITY) -> tuple[np.ndarray, dict[str, int]]:
    """Keep the plausible arrival records (ARRIVAL_DTYPE), as a writable copy; `max_tokens` is
    clipped to the context (clients often ask for more than a model can give; that is not forgery)."""
    if ar.size == 0:
        return empty_arrivals(), {}
    t = ar["arrival_s"]
    with np.errstate(invalid="ignore"):
        masks = [
            ("non_finite", ~np.isfinite(t)),
            ("negative", t < 0),
            ("reserved_flags", ((ar["flags"] & _BAD_FLAGS) != 0) | (ar["reserved"] != 0)),
            ("too_long", ar["input_tokens"] > limits.max_context_tokens),
            ("clock_skew", (t > now + limits.max_future_s) | (t < now - limits.max_age_s)),
        ]
    bad, dropped = _first_reasons(masks)
    out = ar[~bad].copy()
    np.minimum(out["max_tokens"], min(limits.max_context_tokens, 0xFFFFFFFF), out=out["max_tokens"])
    return out, dropped
