"""Wire format of the tap's events: batched frames of fixed-size little-endian records.

A frame is one ZeroMQ message: a header and `count` records, all of one kind, so
the controller decodes a whole frame with one `numpy.frombuffer` (see
controller.core.events, whose dtypes must match these records exactly; a test checks it).

Header  <2sBBHH16sQ : magic b"PD", schema version, kind (v1: reserved, 0), record size,
                      record count, source id (UTF-8, NUL-padded), frame sequence number
                      (per source, over frames of every kind; gaps = dropped frames)

Schema version 1 (what taps before arrival events sent; still written with
`pd-router-tap --wire-version 1` for controllers that only know it):
  completion record <dIIIfffHBB (RECORD, 36 bytes): arrival time (unix s), input tokens,
      cached tokens, output tokens, TTFT s, mean TPOT s, end-to-end s, HTTP status,
      endpoint code, flags

Schema version 2 (the default): the header's kind byte says what the records are.
  KIND_COMPLETION  <dIIIfffHBBQ (RECORD_V2, 44 bytes): RECORD followed by the request id
  KIND_ARRIVAL     <dQIIBBH32s (ARRIVAL, 60 bytes): arrival time (unix s), request id,
      input tokens, max_tokens (0 = not given), endpoint code, flags, reserved (0),
      model (UTF-8, NUL-padded, cut at 32 bytes)
  The request id is unique per tap process (random high bits, a counter below) and the
  same in a request's arrival and completion records: (source, request id) joins them.

A consumer that knows only version 1 drops version-2 frames whole and counts them as
`bad_version` (the controller before arrival events did exactly that): it fails loudly
rather than misreading. Run the tap with `--wire-version 1` to keep such a consumer fed.

Flags (a bit set outside WIRE_FLAGS is dropped by the controller as `reserved_flags`):
  bit 0 FLAG_STREAMED   completion: the answer was a stream; arrival: the request asked for one
  bit 1 FLAG_SYNTHETIC  made by the controller from worker counters: never valid on the wire
  bit 2 FLAG_ESTIMATED  input tokens estimated (from text bytes), not counted
Unknown float fields (no first token on a failure, TPOT of a 1-token answer) are NaN.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"PD"
SCHEMA_VERSION = 2  # what this tap writes by default
SUPPORTED_VERSIONS = (1, 2)  # what the controller reads
HEADER = struct.Struct("<2sBBHH16sQ")
RECORD = struct.Struct("<dIIIfffHBB")  # v1 completion record
RECORD_V2 = struct.Struct("<dIIIfffHBBQ")  # v2 completion record: RECORD + request id
ARRIVAL = struct.Struct("<dQIIBBH32s")
MAX_RECORDS_PER_FRAME = 4096
MODEL_BYTES = 32

KIND_COMPLETION = 0
KIND_ARRIVAL = 1

ENDPOINTS = {"/generate": 1, "/v1/completions": 2, "/v1/chat/completions": 3}
ENDPOINT_NAMES = {v: k for k, v in ENDPOINTS.items()} | {0: "other"}
FLAG_STREAMED = 1
FLAG_SYNTHETIC = 2
FLAG_ESTIMATED = 4
WIRE_FLAGS = FLAG_STREAMED | FLAG_ESTIMATED


def cut_utf8(s: str, limit: int) -> bytes:
    """`s` as UTF-8, cut at `limit` bytes without splitting a character."""
    b = s.encode("utf-8", errors="replace")
    if len(b) <= limit:
        return b
    return b[:limit].decode("utf-8", errors="ignore").encode()


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """A completed request (the record both schema versions carry)."""

    arrival_s: float
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float
    status: int
    endpoint: int = 0
    flags: int = 0
    request_id: int = 0

    def _fields(self) -> tuple[float, int, int, int, float, float, float, int, int, int]:
        return (self.arrival_s, self.input_tokens, self.cached_tokens, self.output_tokens, self.ttft_s,
                self.tpot_s, self.e2e_s, self.status, self.endpoint, self.flags)

    def pack(self) -> bytes:
        """Schema version 1 record (no request id)."""
        return RECORD.pack(*self._fields())

    def pack_v2(self) -> bytes:
        return RECORD_V2.pack(*self._fields(), self.request_id)


@dataclass(frozen=True, slots=True)
class ArrivalEvent:
    """A request as it arrives at the tap (schema version 2 only)."""

    arrival_s: float
    request_id: int
    input_tokens: int
    max_tokens: int = 0
    endpoint: int = 0
    flags: int = 0
    model: str = ""

    def pack(self) -> bytes:
        return ARRIVAL.pack(self.arrival_s, self.request_id, self.input_tokens, self.max_tokens, self.endpoint,
                            self.flags, 0, cut_utf8(self.model, MODEL_BYTES))


def _header(version: int, kind: int, rsize: int, source_id: str, seq: int, count: int) -> bytes:
    if count > MAX_RECORDS_PER_FRAME:
        raise ValueError(f"records={count}: at most {MAX_RECORDS_PER_FRAME} per frame")
    return HEADER.pack(MAGIC, version, kind, rsize, count, cut_utf8(source_id, 16), seq & 0xFFFFFFFFFFFFFFFF)


def encode_frame(source_id: str, seq: int, records: list[bytes]) -> bytes:
    """A schema version 1 frame; `records` are RequestEvent.pack() outputs."""
    return _header(1, 0, RECORD.size, source_id, seq, len(records)) + b"".join(records)


def encode_frame_v2(source_id: str, seq: int, kind: int, records: list[bytes]) -> bytes:
    """A schema version 2 frame of one kind: RequestEvent.pack_v2() or ArrivalEvent.pack() outputs."""
    if kind == KIND_COMPLETION:
        rsize = RECORD_V2.size
    elif kind == KIND_ARRIVAL:
        rsize = ARRIVAL.size
    else:
        raise ValueError(f"kind={kind}: expected {KIND_COMPLETION} (completion) or {KIND_ARRIVAL} (arrival)")
    return _header(2, kind, rsize, source_id, seq, len(records)) + b"".join(records)


def decode_header(frame: bytes) -> tuple[int, int, int, str, int]:
    """(version, record_size, count, source_id, seq); ValueError on a bad header."""
    if len(frame) < HEADER.size:
        raise ValueError("short_frame")
    magic, version, _kind, rsize, count, sid, seq = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ValueError("bad_magic")
    return version, rsize, count, sid.rstrip(b"\0").decode(errors="replace"), seq


def frame_kind(frame: bytes) -> int:
    """The kind byte of a frame's header (0 for every version-1 frame)."""
    kind: int = HEADER.unpack_from(frame)[2]
    return kind
