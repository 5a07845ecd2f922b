"""Per-request events as numpy records: the shape the tap publishes and the simulator emits.

EVENT_DTYPE mirrors router_plugin.wire.RECORD byte for byte, so a frame's
payload becomes an array with one numpy.frombuffer call.
"""

from __future__ import annotations

import numpy as np

EVENT_DTYPE = np.dtype(
    [
        ("arrival_s", "<f8"),
        ("input_tokens", "<u4"),
        ("cached_tokens", "<u4"),
        ("output_tokens", "<u4"),
        ("ttft_s", "<f4"),
        ("tpot_s", "<f4"),
        ("e2e_s", "<f4"),
        ("status", "<u2"),
        ("endpoint", "u1"),
        ("flags", "u1"),
    ]
)


def empty_events(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=EVENT_DTYPE)


# A request as it arrives at a tap, before any answer (wire schema version 2, kind
# "arrival"; mirrors router_plugin.wire.ARRIVAL byte for byte). (source, request_id) joins
# an arrival with its completion; a request is in flight between the two.
#   input_tokens  exact when the request carried token ids, else estimated from the text
#                 (flags bit 2, FLAG_ESTIMATED); the completion's count corrects it
#   max_tokens    the request's output cap; 0 when it gave none
#   flags         bit 0: the request asked for a stream; bit 2: input_tokens estimated
#   model         the model the request named, UTF-8, NUL-padded, cut at 32 bytes
ARRIVAL_DTYPE = np.dtype(
    [
        ("arrival_s", "<f8"),
        ("request_id", "<u8"),
        ("input_tokens", "<u4"),
        ("max_tokens", "<u4"),
        ("endpoint", "u1"),
        ("flags", "u1"),
        ("reserved", "<u2"),
        ("model", "S32"),
    ]
)


def empty_arrivals(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=ARRIVAL_DTYPE)
