"""Telemetry: the wire format matches EVENT_DTYPE, frames decode and validate, bad data is counted and dropped."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.events import EVENT_DTYPE
from controller.metrics import ControllerMetrics
from controller.telemetry.frames import FrameError, decode_frame
from controller.telemetry.hub import TelemetryHub
from controller.telemetry.zmq_source import ZmqSource
from router_plugin.tap import Publisher
from router_plugin.wire import (
    FLAG_STREAMED,
    FLAG_SYNTHETIC,
    HEADER,
    MAGIC,
    RECORD,
    RequestEvent,
    encode_frame,
)

NOW = 1_800_000_000.0


def ev(**kw) -> RequestEvent:
    base = dict(arrival_s=NOW - 1, input_tokens=100, cached_tokens=10, output_tokens=20, ttft_s=0.1,
                tpot_s=0.01, e2e_s=0.3, status=200, endpoint=2, flags=1)
    return RequestEvent(**{**base, **kw})


def test_event_dtype_is_byte_identical_to_wire_record():
    assert EVENT_DTYPE.itemsize == RECORD.size
    e = ev(arrival_s=NOW + 0.123456789, input_tokens=2**32 - 1, ttft_s=math.nan)
    arr = np.frombuffer(e.pack(), dtype=EVENT_DTYPE)
    assert arr.tobytes() == e.pack()
    r = arr[0]
    assert r["arrival_s"] == NOW + 0.123456789 and r["input_tokens"] == 2**32 - 1
    assert (r["cached_tokens"], r["output_tokens"], r["status"], r["endpoint"], r["flags"]) == (10, 20, 200, 2, 1)
    assert math.isnan(r["ttft_s"]) and r["tpot_s"] == np.float32(0.01)
    # and the other way: a numpy record packs to the wire bytes
    back = RECORD.unpack(arr.tobytes())
    assert back[1:4] == (2**32 - 1, 10, 20)


@given(st.lists(st.tuples(st.floats(1e9, 2e9), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                          st.floats(allow_nan=True, width=32), st.integers(0, 2**16 - 1)), max_size=50))
@settings(max_examples=60, deadline=None)
def test_frame_roundtrip_property(rows):
    recs = [RequestEvent(a, i, c, i, t, t, t, s).pack() for a, i, c, t, s in rows]
    frame = encode_frame("src", 7, recs)
    arr = np.frombuffer(frame, dtype=EVENT_DTYPE, offset=HEADER.size)
    assert arr.tobytes() == b"".join(recs)


def test_decode_valid_frame():
    f = decode_frame(encode_frame("tap-a", 3, [ev().pack(), ev(ttft_s=math.nan, tpot_s=math.nan).pack()]), NOW)
    assert (f.source, f.seq, f.events.size, f.dropped) == ("tap-a", 3, 2, {})


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"PD\x01", "short_frame"),
        (b"XX" + encode_frame("s", 0, [ev().pack()])[2:], "bad_magic"),
        (HEADER.pack(MAGIC, 9, 0, RECORD.size, 0, b"s", 0), "bad_version"),
        (HEADER.pack(MAGIC, 1, 0, 40, 1, b"s", 0) + bytes(40), "bad_record_size"),
        (encode_frame("s", 0, [ev().pack()])[:-1], "bad_length"),
        (HEADER.pack(MAGIC, 1, 0, RECORD.size, 5000, b"s", 0) + bytes(RECORD.size * 5000), "bad_length"),
    ],
)
def test_bad_frames_rejected_by_reason(frame, reason):
    with pytest.raises(FrameError) as e:
        decode_frame(frame, NOW)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (ev(arrival_s=math.nan), "non_finite"),
        (ev(e2e_s=math.inf), "non_finite"),
        (ev(ttft_s=-0.5), "negative"),
        (ev(tpot_s=-1.0), "negative"),
        (ev(input_tokens=10, cached_tokens=11), "absurd"),
        (ev(output_tokens=2**31), "too_long"),
        (ev(flags=FLAG_SYNTHETIC), "reserved_flags"),
        (ev(flags=0x80 | FLAG_STREAMED), "reserved_flags"),
        (ev(arrival_s=NOW - 1000, e2e_s=1.0), "clock_skew"),
        (ev(e2e_s=1e6), "absurd"),
        (ev(ttft_s=5.0, e2e_s=1.0), "absurd"),
        (ev(arrival_s=NOW + 3600), "clock_skew"),
        (ev(arrival_s=1.0), "clock_skew"),
    ],
)
def test_bad_records_dropped_by_reason(bad, reason, registry):
    hub = TelemetryHub(metrics=ControllerMetrics(registry))
    kept = hub.ingest_frame(encode_frame("s", 0, [ev().pack(), bad.pack(), ev().pack()]), NOW)
    assert kept == 2
    assert dict(hub.dropped_total) == {reason: 1}
    assert registry.get_sample_value("pdctl_telemetry_dropped_total", {"reason": reason}) == 1
    assert registry.get_sample_value("pdctl_telemetry_events_total", {"source": "s"}) == 2
    assert hub.drain().size == 2 and hub.drain().size == 0


def test_hub_counts_garbage_and_seq_gaps_and_stays_bounded(registry):
    m = ControllerMetrics(registry)
    hub = TelemetryHub(max_pending=5, metrics=m)
    hub.ingest_frame(b"garbage that is long enough to hold a header......", NOW)
    hub.ingest_frame(b"", NOW)
    assert dict(hub.dropped_total) == {"bad_magic": 1, "short_frame": 1}
    hub.ingest_frame(encode_frame("a", 10, [ev().pack()] * 3), NOW)
    hub.ingest_frame(encode_frame("a", 13, [ev().pack()] * 3), NOW)  # frames 11 and 12 lost
    assert hub.frames_lost["a"] == 2
    assert registry.get_sample_value("pdctl_telemetry_frames_lost_total", {"source": "a"}) == 2
    # bounded: 5 pending at most, the sixth is dropped as backlog_full
    assert hub.pending == 5 and hub.dropped_total["backlog_full"] == 1
    hub.ingest_frame(encode_frame("a", 0, [ev().pack()]), NOW)  # tap restarted: new baseline, no loss
    assert hub.frames_lost["a"] == 2
    assert hub.drain().size == 5


def test_hub_rejects_wrong_dtype():
    with pytest.raises(TypeError, match="EVENT_DTYPE"):
        TelemetryHub().add_events(np.zeros(3), "x", NOW)


async def test_zmq_source_ingests_from_two_taps_and_survives_garbage(registry):
    ctx = zmq.asyncio.Context()
    sctx = zmq.Context()
    taps = [Publisher("tcp://127.0.0.1:0", f"tap{i}", ctx=sctx) for i in range(2)]
    rogue = sctx.socket(zmq.PUB)
    rogue_port = rogue.bind_to_random_port("tcp://127.0.0.1")
    hub = TelemetryHub(metrics=ControllerMetrics(registry))
    src = ZmqSource([t.endpoint for t in taps] + [f"tcp://127.0.0.1:{rogue_port}"], hub, time.time, ctx=ctx)
    task = asyncio.create_task(src.run(), name="zmq-test")
    try:
        await asyncio.sleep(0.3)
        for t in taps:
            for _ in range(10):
                t.add(ev(arrival_s=time.time()).pack_v2())
            t.flush()
        rogue.send(b"\x00" * 10)
        rogue.send(b"PD" + bytes(40))
        for _ in range(100):
            if sum(hub.events_total.values()) == 20 and sum(hub.dropped_total.values()) == 2:
                break
            await asyncio.sleep(0.02)
        assert dict(hub.events_total) == {"tap0": 10, "tap1": 10}
        assert dict(hub.dropped_total) == {"short_frame": 1, "bad_version": 1}
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for t in taps:
            t.close()
        rogue.close(linger=0)
        sctx.term()
        ctx.term()


def test_zmq_source_needs_endpoints():
    with pytest.raises(ValueError, match="endpoints"):
        ZmqSource([], TelemetryHub(), time.time)
