"""Decode and validate tap frames (router_plugin.wire) into EVENT_DTYPE arrays.

A frame is rejected whole when its header is wrong (short, bad magic, unknown
schema version, record size or length that disagree with the header): the
reason is counted once per frame, since a corrupt header says nothing reliable
about how many events it held. A frame that decodes is then checked record by
record, vectorised, and bad records are dropped and counted by reason:

- ``non_finite``: arrival or end-to-end time is NaN/inf, or TTFT/TPOT is inf
  (NaN TTFT/TPOT is legal: unknown, e.g. a failed or non-streamed request);
- ``negative``: a negative time;
- ``absurd``: more than MAX_TOKENS tokens, cached > input, a latency longer
  than MAX_LATENCY_S, or TTFT longer than the whole request;
- ``clock_skew``: arrival more than MAX_FUTURE_S in the future or MAX_AGE_S
  in the past of the controller's clock (a broken clock on the tap's host).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller.core.events import EVENT_DTYPE
from router_plugin.wire import HEADER, MAGIC, MAX_RECORDS_PER_FRAME, SCHEMA_VERSION

MAX_TOKENS = 10_000_000
MAX_LATENCY_S = 86_400.0
MAX_FUTURE_S = 60.0
MAX_AGE_S = 3_600.0

FRAME_REASONS = ("short_frame", "bad_magic", "bad_version", "bad_record_size", "bad_length")
RECORD_REASONS = ("non_finite", "negative", "absurd", "clock_skew")


class FrameError(ValueError):
    """The whole frame is unusable; `reason` is the drop label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Frame:
    source: str
    seq: int
    events: np.ndarray  # EVENT_DTYPE, valid records only
    dropped: dict[str, int]  # record-level drops by reason (zeros omitted)


def decode_frame(frame: bytes | memoryview, now: float) -> Frame:
    """Header check, one numpy.frombuffer, vectorised validation. Raises FrameError."""
    n = len(frame)
    if n < HEADER.size:
        raise FrameError("short_frame")
    magic, version, _flags, rsize, count, sid, seq = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise FrameError("bad_magic")
    if version != SCHEMA_VERSION:
        raise FrameError("bad_version")
    if rsize != EVENT_DTYPE.itemsize:
        raise FrameError("bad_record_size")
    if count > MAX_RECORDS_PER_FRAME or n != HEADER.size + count * rsize:
        raise FrameError("bad_length")
    source = bytes(sid).rstrip(b"\0").decode("utf-8", errors="replace")
    ev = np.frombuffer(frame, dtype=EVENT_DTYPE, count=count, offset=HEADER.size)
    ev, dropped = validate(ev, now)
    return Frame(source, int(seq), ev, dropped)


def validate(ev: np.ndarray, now: float) -> tuple[np.ndarray, dict[str, int]]:
    """Keep the plausible records; count the others by their first failing reason."""
    if ev.size == 0:
        return ev, {}
    arr = ev["arrival_s"]
    e2e = ev["e2e_s"]
    ttft = ev["ttft_s"]
    tpot = ev["tpot_s"]
    with np.errstate(invalid="ignore"):
        non_finite = ~np.isfinite(arr) | ~np.isfinite(e2e) | np.isinf(ttft) | np.isinf(tpot)
        # NaN compares False, so unknown TTFT/TPOT never count as negative or absurd
        negative = (arr < 0) | (e2e < 0) | (ttft < 0) | (tpot < 0)
        absurd = (
            (ev["input_tokens"] > MAX_TOKENS)
            | (ev["output_tokens"] > MAX_TOKENS)
            | (ev["cached_tokens"] > ev["input_tokens"])
            | (e2e > MAX_LATENCY_S)
            | (tpot > MAX_LATENCY_S)
            | (ttft > e2e + 1e-3)
        )
        skew = (arr > now + MAX_FUTURE_S) | (arr < now - MAX_AGE_S)
    bad = non_finite | negative | absurd | skew
    if not bad.any():
        return ev, {}
    dropped: dict[str, int] = {}
    taken = np.zeros(ev.size, dtype=bool)
    for name, mask in (("non_finite", non_finite), ("negative", negative), ("absurd", absurd), ("clock_skew", skew)):
        m = mask & ~taken
        k = int(m.sum())
        if k:
            dropped[name] = k
        taken |= m
    return ev[~bad], dropped
