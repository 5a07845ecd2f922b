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
