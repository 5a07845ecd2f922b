"""Wire v2 (arrivals + request ids), the hub's arrival/in-flight API, bounded sources, CURVE and loopback.

Real ZeroMQ sockets over loopback TCP for the CURVE cases: a tap publishing with its
keys, a controller subscribing with its own, and a rogue publisher on a port the
controller was told is the tap's.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio
import zmq.auth
from prometheus_client import generate_latest

from controller.core.events import ARRIVAL_DTYPE, EVENT_DTYPE
from controller.metrics import ControllerMetrics
from controller.telemetry.frames import COMPLETION_V2_DTYPE, FrameError, Plausibility, decode_frame
from controller.telemetry.hub import TelemetryHub
from controller.telemetry.zmq_source import ZmqSource, load_client_curve
from router_plugin.keys import CurveKeyError, load_server_curve
from router_plugin.tap import Publisher
from router_plugin.wire import (
    ARRIVAL,
    FLAG_ESTIMATED,
    FLAG_STREAMED,
    FLAG_SYNTHETIC,
    HEADER,
    KIND_ARRIVAL,
    KIND_COMPLETION,
    MAGIC,
    RECORD_V2,
    ArrivalEvent,
    RequestEvent,
    decode_header,
    encode_frame,
    encode_frame_v2,
)

NOW = 1_800_000_000.0


def comp(rid: int = 0, **kw) -> RequestEvent:
    base = dict(arrival_s=NOW - 1, input_tokens=100, cached_tokens=10, output_tokens=20, ttft_s=0.1,
                tpot_s=0.01, e2e_s=0.3, status=200, endpoint=2, flags=1, request_id=rid)
    return RequestEvent(**{**base, **kw})


def arr(rid: int, **kw) -> ArrivalEvent:
    base = dict(arrival_s=NOW - 1, request_id=rid, input_tokens=100, max_tokens=64, endpoint=3,
                flags=FLAG_ESTIMATED, model="llama")
    return ArrivalEvent(**{**base, **kw})


def test_dtypes_are_byte_identical_to_the_wire_records():
    a = arr(2**63 + 5, model="m" * 40, input_tokens=2**32 - 1, max_tokens=7)
    rec = np.frombuffer(a.pack(), dtype=ARRIVAL_DTYPE)[0]
    assert ARRIVAL_DTYPE.itemsize == ARRIVAL.size
    assert (rec["request_id"], rec["input_tokens"], rec["max_tokens"], rec["endpoint"]) == (2**63 + 5, 2**32 - 1, 7, 3)
    assert rec["model"] == b"m" * 32 and rec["flags"] == FLAG_ESTIMATED and rec["reserved"] == 0
    c = comp(rid=99)
    crec = np.frombuffer(c.pack_v2(), dtype=COMPLETION_V2_DTYPE)[0]
    assert COMPLETION_V2_DTYPE.itemsize == RECORD_V2.size and crec["request_id"] == 99
    assert np.frombuffer(c.pack(), dtype=EVENT_DTYPE)[0]["input_tokens"] == 100


def test_model_names_are_cut_on_a_character_boundary():
    rec = np.frombuffer(arr(1, model="é" * 20).pack(), dtype=ARRIVAL_DTYPE)[0]
    assert rec["model"].decode() == "é" * 16


def test_v2_frames_decode_by_kind():
    f = decode_frame(encode_frame_v2("tap", 4, KIND_COMPLETION, [comp(7).pack_v2(), comp(8).pack_v2()]), NOW)
    assert (f.kind, f.source, f.seq, f.events.dtype, f.request_ids.tolist()) == (KIND_COMPLETION, "tap", 4,
                                                                                  EVENT_DTYPE, [7, 8])
    assert f.events["input_tokens"].tolist() == [100, 100] and f.arrivals.size == 0
    g = decode_frame(encode_frame_v2("tap", 5, KIND_ARRIVAL, [arr(7).pack()]), NOW)
    assert g.kind == KIND_ARRIVAL and g.events.size == 0 and g.arrivals["request_id"].tolist() == [7]
    # a version-1 frame still decodes: no request ids
    h = decode_frame(encode_frame("old", 1, [comp().pack()]), NOW)
    assert h.request_ids.tolist() == [0] and h.events.size == 1


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (HEADER.pack(MAGIC, 2, 7, ARRIVAL.size, 0, b"s", 0), "bad_kind"),
        (HEADER.pack(MAGIC, 1, 1, 36, 0, b"s", 0), "bad_kind"),
        (HEADER.pack(MAGIC, 3, 0, 36, 0, b"s", 0), "bad_version"),
        (HEADER.pack(MAGIC, 2, KIND_ARRIVAL, RECORD_V2.size, 1, b"s", 0) + comp().pack_v2(), "bad_record_size"),
        (encode_frame_v2("s", 0, KIND_ARRIVAL, [arr(1).pack()])[:-1], "bad_length"),
    ],
)
def test_bad_v2_frames(frame, reason):
    with pytest.raises(FrameError) as e:
        decode_frame(frame, NOW)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (arr(1, arrival_s=math.nan), "non_finite"),
        (arr(1, arrival_s=-5.0), "negative"),
        (arr(1, flags=FLAG_SYNTHETIC), "reserved_flags"),
        (arr(1, flags=0x40), "reserved_flags"),
        (arr(1, input_tokens=200_000), "too_long"),
        (arr(1, arrival_s=NOW + 120), "clock_skew"),
        (arr(1, arrival_s=NOW - 3600), "clock_skew"),
    ],
)
def test_implausible_arrivals_dropped_by_reason(bad, reason, registry):
    hub = TelemetryHub(metrics=ControllerMetrics(registry), plausibility=Plausibility(max_context_tokens=131_072))
    kept = hub.ingest_frame(encode_frame_v2("s", 0, KIND_ARRIVAL, [arr(2).pack(), bad.pack()]), NOW)
    assert kept == 1 and dict(hub.dropped_total) == {reason: 1}
    assert registry.get_sample_value("pdctl_telemetry_dropped_total", {"reason": reason}) == 1


def test_reserved_field_and_max_tokens_clip():
    raw = bytearray(arr(3, max_tokens=10**9).pack())
    ok = bytes(raw)
    raw[26:28] = b"\x01\x00"  # the reserved u2 after flags
    hub = TelemetryHub(plausibility=Plausibility(max_context_tokens=32_768))
    assert hub.ingest_frame(encode_frame_v2("s", 0, KIND_ARRIVAL, [ok, bytes(raw)]), NOW) == 1
    assert hub.dropped_total == {"reserved_flags": 1}
    assert hub.drain_arrivals()["max_tokens"].tolist() == [32_768]  # asked for more than the model holds


def test_completion_lengths_beyond_the_context_are_dropped():
    hub = TelemetryHub(plausibility=Plausibility(max_context_tokens=8192))
    frame = encode_frame_v2("s", 0, KIND_COMPLETION, [comp(1).pack_v2(), comp(2, input_tokens=9000).pack_v2(),
                                                       comp(3, output_tokens=10_000).pack_v2()])
    assert hub.ingest_frame(frame, NOW) == 1 and hub.dropped_total == {"too_long": 2}


def test_hub_joins_arrivals_and_completions_into_in_flight():
    hub = TelemetryHub(in_flight_ttl_s=100.0)
    hub.ingest_frame(encode_frame_v2("tap", 0, KIND_ARRIVAL, [arr(i).pack() for i in (1, 2, 3)]), NOW)
    assert hub.in_flight(NOW) == 3 and hub.pending_arrivals == 3
    hub.ingest_frame(encode_frame_v2("tap", 1, KIND_COMPLETION, [comp(2).pack_v2()]), NOW)
    assert hub.in_flight(NOW) == 2 and hub.in_flight_by_source(NOW) == {"tap": 2}
    a = hub.drain_arrivals()
    assert a.dtype == ARRIVAL_DTYPE and a["request_id"].tolist() == [1, 2, 3] and hub.drain_arrivals().size == 0
    ev, ids = hub.drain_completions()
    assert ev.dtype == EVENT_DTYPE and ids.tolist() == [2] and hub.drain().size == 0
    # an arrival whose completion was lost leaves after the ttl
    assert hub.in_flight(NOW + 101) == 0
    assert hub.snapshot()["in_flight"] == 0 and hub.snapshot()["arrivals_total"] == {"tap": 3}


def test_a_restarted_tap_takes_its_open_requests_with_it():
    hub = TelemetryHub()
    hub.ingest_frame(encode_frame_v2("a", 10, KIND_ARRIVAL, [arr(1).pack()]), NOW)
    hub.ingest_frame(encode_frame_v2("b", 10, KIND_ARRIVAL, [arr(2).pack()]), NOW)
    hub.ingest_frame(encode_frame_v2("a", 0, KIND_ARRIVAL, [arr(3).pack()]), NOW)  # "a" restarted
    assert hub.in_flight_by_source(NOW) == {"a": 1, "b": 1}


def test_in_flight_and_undrained_arrivals_are_bounded():
    hub = TelemetryHub(max_in_flight=5, max_pending_arrivals=4)
    for seq in range(3):
        hub.ingest_frame(encode_frame_v2("s", seq, KIND_ARRIVAL, [arr(seq * 3 + i + 1).pack() for i in range(3)]), NOW)
    assert hub.in_flight(NOW) == 5 and hub.pending_arrivals == 4 and hub.arrivals_discarded == 5
    assert hub.drain_arrivals()["request_id"].tolist() == [6, 7, 8, 9]  # the newest kept


def test_fifty_thousand_source_ids_cannot_grow_metrics(registry):
    """Issue 13: one metric series per made-up source id (/metrics 9 KB -> 6.9 MB)."""
    hub = TelemetryHub(metrics=ControllerMetrics(registry), max_sources=8)
    before = len(generate_latest(registry))
    for i in range(50_000):
        hub.ingest_frame(encode_frame_v2(f"src{i}", 5, KIND_COMPLETION, [comp(i + 1).pack_v2()]), NOW)
        hub.ingest_frame(encode_frame_v2(f"src{i}", 9, KIND_COMPLETION, [comp(i + 1).pack_v2()]), NOW)
    text = generate_latest(registry).decode()
    assert text.count("pdctl_telemetry_events_total{") == 9  # 8 sources + "other"
    assert len(text) - before < 4000
    assert hub.events_total["other"] == 2 * (50_000 - 8) and len(hub.events_total) == 9
    assert len(hub.frames_lost) <= 8 and len(hub._last_seq) <= 8


def test_wire_version_1_publisher_feeds_an_old_controller():
    ctx = zmq.Context()
    pub = Publisher("inproc://v1", "old", ctx=ctx, wire_version=1)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect("inproc://v1")
    time.sleep(0.05)
    pub.add(comp().pack())
    pub.add_arrival(arr(1).pack())  # no arrivals on v1
    pub.flush()
    frame = sub.recv()
    assert decode_header(frame)[:3] == (1, 36, 1)
    assert sub.poll(100) == 0
    # and the default writes version 2, which a version-1 reader refuses as bad_version (its check: version != 1)
    pub2 = Publisher("inproc://v2", "new", ctx=ctx)
    assert pub2.wire_version == 2
    sub.close(linger=0)
    pub.close()
    pub2.close()
    ctx.term()


def test_no_keys_means_loopback_only():
    with pytest.raises(ValueError, match="not on this host"):
        ZmqSource(["tcp://127.0.0.1:1", "tcp://10.1.2.3:5557"], TelemetryHub(), time.time)
    ZmqSource(["tcp://10.1.2.3:5557"], TelemetryHub(), time.time, allow_insecure=True)
    ZmqSource(["tcp://localhost:1", "tcp://[::1]:2", "ipc:///tmp/x"], TelemetryHub(), time.time)
    with pytest.raises(ValueError, match="binds loopback only"):
        Publisher("tcp://0.0.0.0:0", "s")
    Publisher("tcp://0.0.0.0:0", "s", insecure=True).close()


@pytest.fixture
def keys(tmp_path):
    d = {}
    for who in ("tap", "ctl", "rogue"):
        (tmp_path / who).mkdir()
        pub, sec = zmq.auth.create_certificates(str(tmp_path / who), who)
        d[who] = (pub, sec)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ctl.key").write_bytes((tmp_path / "ctl" / "ctl.key").read_bytes())
    d["allowed"] = allowed
    return d


def test_key_files_are_checked(keys, tmp_path):
    with pytest.raises(CurveKeyError, match="holds no secret key"):
        load_server_curve(keys["tap"][0], keys["allowed"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurveKeyError, match=r"no \*\.key files"):
        load_server_curve(keys["tap"][1], tmp_path / "empty")
    with pytest.raises(CurveKeyError, match="not a directory"):
        load_server_curve(keys["tap"][1], tmp_path / "nothing")
    with pytest.raises(CurveKeyError, match="not a regular file"):
        load_client_curve("/dev/zero", [keys["tap"][0]], 1)
    with pytest.raises(CurveKeyError, match="2 given for 3 endpoints"):
        load_client_curve(keys["ctl"][1], [keys["tap"][0]] * 2, 3)


async def _ingested(hub: TelemetryHub, n: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(hub.events_total.values()) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_curve_admits_the_real_tap_and_nobody_else(keys):
    """Issue 13: forged, well-formed events were accepted. With CURVE a rogue publisher feeds nothing."""
    sctx = zmq.Context()
    actx = zmq.asyncio.Context()
    tap = Publisher("tcp://127.0.0.1:0", "tap", ctx=sctx, curve=load_server_curve(keys["tap"][1], keys["allowed"]))
    # the rogue binds where the controller expects a tap (port squatting), with its own CURVE identity
    rctx = zmq.Context()  # its own process in real life: one ZAP handler per context
    rogue = Publisher("tcp://127.0.0.1:0", "rogue", ctx=rctx,
                      curve=load_server_curve(keys["rogue"][1], keys["allowed"]))
    plain = sctx.socket(zmq.PUB)
    plain_port = plain.bind_to_random_port("tcp://127.0.0.1")
    eps = [tap.endpoint, rogue.endpoint, f"tcp://127.0.0.1:{plain_port}"]
    hub = TelemetryHub()
    curve = load_client_curve(keys["ctl"][1], [keys["tap"][0]], len(eps))  # the controller trusts the tap's key
    src = ZmqSource(eps, hub, time.time, ctx=actx, curve=curve)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.sleep(0.5)
        for _ in range(20):
            for p in (tap, rogue):
                p.add(comp(arrival_s=time.time()).pack_v2())
                p.flush()
            plain.send(encode_frame_v2("plain", 0, KIND_COMPLETION, [comp(arrival_s=time.time()).pack_v2()]))
            await asyncio.sleep(0.02)
        await _ingested(hub, 20)
        await asyncio.sleep(0.3)
        assert dict(hub.events_total) == {"tap": 20}
        assert not hub.dropped_total  # the others never got through the handshake at all
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for p in (tap, rogue):
            p.close()
        plain.close(linger=0)
        sctx.term()
        rctx.term()
        actx.term()


async def test_curve_tap_refuses_an_unauthorised_controller(keys):
    sctx = zmq.Context()
    actx = zmq.asyncio.Context()
    tap = Publisher("tcp://127.0.0.1:0", "tap", ctx=sctx, curve=load_server_curve(keys["tap"][1], keys["allowed"]))
    hub = TelemetryHub()
    # right server key, but the rogue's client key is not in the tap's authorised directory
    src = ZmqSource([tap.endpoint], hub, time.time, ctx=actx,
                    curve=load_client_curve(keys["rogue"][1], [keys["tap"][0]], 1))
    task = asyncio.create_task(src.run())
    try:
        await asyncio.sleep(0.5)
        for _ in range(10):
            tap.add(comp(arrival_s=time.time()).pack_v2())
            tap.flush()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert sum(hub.events_total.values()) == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        tap.close()
        sctx.term()
        actx.term()


def test_streamed_flag_survives_and_synthetic_flag_never_does():
    hub = TelemetryHub()
    frame = encode_frame_v2("s", 0, KIND_COMPLETION, [comp(1, flags=FLAG_STREAMED | FLAG_ESTIMATED).pack_v2(),
                                                       comp(2, flags=FLAG_SYNTHETIC).pack_v2()])
    assert hub.ingest_frame(frame, NOW) == 1
    assert hub.drain()["flags"].tolist() == [FLAG_STREAMED | FLAG_ESTIMATED]


def test_config_refuses_a_remote_tap_without_keys(keys):
    from controller.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"zmq_endpoints item 'tcp://10\.0\.0\.5:5557': not loopback"):
        config_from_dict({"telemetry": {"zmq_endpoints": ["tcp://10.0.0.5:5557"]}}, origin="t")
    with pytest.raises(ConfigError, match="go together"):
        config_from_dict({"telemetry": {"curve_secret_key": keys["ctl"][1]}}, origin="t")
    with pytest.raises(ConfigError, match="2 given for 3 zmq_endpoints"):
        config_from_dict({"telemetry": {"zmq_endpoints": ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "ipc:///x"],
                                        "curve_secret_key": keys["ctl"][1],
                                        "curve_server_keys": [keys["tap"][0]] * 2}}, origin="t")
    ok = config_from_dict({"telemetry": {"zmq_endpoints": ["tcp://10.0.0.5:5557"], "curve_secret_key": keys["ctl"][1],
                                         "curve_server_keys": [keys["tap"][0]]}}, origin="t")
    assert ok.telemetry.max_sources == 32
    config_from_dict({"telemetry": {"zmq_endpoints": ["tcp://10.0.0.5:5557"], "allow_insecure": True}}, origin="t")


def test_tap_cli_refuses_a_public_publish_without_keys(capsys):
    from router_plugin.tap import main

    assert main(["--router", "http://127.0.0.1:1", "--publish", "tcp://0.0.0.0:0"]) == 2
    assert "binds loopback only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--router", "http://127.0.0.1:1", "--curve-secret-key", "/x"])
