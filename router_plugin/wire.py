"""Wire format of per-request events, tap -> controller (ZeroMQ PUB/SUB).

One ZeroMQ message = one frame = a 32-byte header followed by `count`
fixed-width 36-byte records, all little-endian, so the controller decodes a
whole frame with one `numpy.frombuffer` (see controller.core.events.EVENT_DTYPE,
which must match RECORD exactly; a test checks it).

Header  <2sBBHH16sQ : magic b"PD", schema version, flags (reserved, 0),
                      record size, record count, source id (UTF-8, NUL-padded),
                      frame sequence number (per source; gaps = dropped frames)
Record  <dIIIfffHBB : arrival time (unix s), input tokens, cached tokens,
                      output tokens, TTFT s, mean TPOT s, end-to-end s,
                      HTTP status, endpoint code, flags (bit 0: streamed;
                      bit 1: synthesized by the controller from worker counters, never on the wire)
Unknown float fields (no first token on a failure, TPOT of a 1-token answer) are NaN.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"PD"
SCHEMA_VERSION = 1
HEADER = struct.Struct("<2sBBHH16sQ")
RECORD = struct.Struct("<dIIIfffHBB")
MAX_RECORDS_PER_FRAME = 4096

ENDPOINTS = {"/generate": 1, "/v1/completions": 2, "/v1/chat/completions": 3}
ENDPOINT_NAMES = {v: k for k, v in ENDPOINTS.items()} | {0: "other"}
FLAG_STREAMED = 1
FLAG_SYNTHETIC = 2


@dataclass(frozen=True, slots=True)
class RequestEvent:
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

    def pack(self) -> bytes:
        return RECORD.pack(
            self.arrival_s,
            self.input_tokens,
            self.cached_tokens,
            self.output_tokens,
            self.ttft_s,
            self.tpot_s,
            self.e2e_s,
            self.status,
            self.endpoint,
            self.flags,
        )


def encode_frame(source_id: str, seq: int, records: list[bytes]) -> bytes:
    """Header + packed records. `records` are RequestEvent.pack() outputs."""
    if len(records) > MAX_RECORDS_PER_FRAME:
        raise ValueError(f"records={len(records)}: at most {MAX_RECORDS_PER_FRAME} per frame")
    sid = source_id.encode()[:16]
    head = HEADER.pack(MAGIC, SCHEMA_VERSION, 0, RECORD.size, len(records), sid, seq & 0xFFFFFFFFFFFFFFFF)
    return head + b"".join(records)


def decode_header(frame: bytes) -> tuple[int, int, int, str, int]:
    """(version, record_size, count, source_id, seq); ValueError on a bad header."""
    if len(frame) < HEADER.size:
        raise ValueError("short_frame")
    magic, version, _flags, rsize, count, sid, seq = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ValueError("bad_magic")
    return version, rsize, count, sid.rstrip(b"\0").decode(errors="replace"), seq
