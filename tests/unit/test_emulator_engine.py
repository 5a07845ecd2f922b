"""The emulated GPU's schedules: chunked prefill batching, continuous batching, KV-capacity queueing.

Assertions are on the engines' virtual schedule (the times they report), which does not depend
on how fast this machine runs the event loop.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from controller.emulator.engine import DecodeEngine, DecodeSeq, PrefillEngine, decode_curve_of
from controller.profiles import load_profile

PROFILE = load_profile("llama2-70b-h100-tp8")
SCALE = 0.01


async def test_prefill_fifo_back_to_back_and_chunked_batches():
    eng = PrefillEngine(PROFILE, SCALE, chunk_tokens=2500)
    eng.start()
    try:
        futs = [eng.submit(n) for n in (1024, 1024, 1024)]
        d1, d2, d3 = await asyncio.gather(*futs)
    finally:
        await eng.stop()
    # the first two fit one 2500-token batch: they finish together, after prefilling 2048 tokens
    assert d1 == d2
    # the third runs right after, alone
    assert d3 - d2 == pytest.approx(float(PROFILE.prefill.time_s(1024)) * SCALE)


async def test_prefill_one_at_a_time_without_chunking():
    eng = PrefillEngine(PROFILE, SCALE)
    eng.start()
    try:
        d = await asyncio.gather(*(eng.submit(2048) for _ in range(3)))
    finally:
        await eng.stop()
    s = float(PROFILE.prefill.time_s(2048)) * SCALE
    assert d[1] - d[0] == pytest.approx(s) and d[2] - d[1] == pytest.approx(s)


async def _run_decode(eng: DecodeEngine, seqs: list[tuple[int, int]]) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in seqs]
    done = [asyncio.Event() for _ in seqs]

    def emitter(k: int, n: int):
        def emit(i: int, t: float) -> None:
            times[k].append(t)
            if len(times[k]) == n:
                done[k].set()
        return emit

    for k, (n_in, n_out) in enumerate(seqs):
        eng.submit(DecodeSeq(n_in, n_out, emit=emitter(k, n_out)))
    await asyncio.gather(*(e.wait() for e in done))
    return times


async def test_decode_steps_take_tpot_of_the_batch():
    eng = DecodeEngine(PROFILE, SCALE, max_running=64)
    eng.start()
    try:
        a, b = await _run_decode(eng, [(1000, 5), (1000, 5)])
    finally:
        await eng.stop()
    assert a[1:] == b[1:]  # one batch: after the first token (at admission) both advance at every step
    curve = decode_curve_of(PROFILE)
    gaps = [y - x for x, y in itertools.pairwise(a[1:])]
    for i, g in enumerate(gaps):
        ctx = 1000 + 2 + i  # mean context of the batch at that step (input + tokens generated so far)
        assert g == pytest.approx(curve.tpot_ms_at(2, ctx) / 1000 * SCALE, rel=1e-6)


async def test_kv_capacity_queues_the_request_that_does_not_fit():
    eng = DecodeEngine(PROFILE, SCALE, max_running=64, kv_capacity_tokens=1000)
    eng.start()
    try:
        first, second = await _run_decode(eng, [(500, 4), (500, 4)])  # 504 + 504 > 1000
    finally:
        await eng.stop()
    assert second[0] >= first[-1]
    assert eng.kv_used == 0


async def test_batch_limit_queues_beyond_max_running():
    eng = DecodeEngine(PROFILE, SCALE, max_running=1)
    eng.start()
    try:
        first, second = await _run_decode(eng, [(100, 3), (100, 3)])
    finally:
        await eng.stop()
    assert second[0] >= first[-1]


def test_fixed_point_profile_gets_a_flat_curve_up_to_its_batch():
    prof = load_profile("deepseek-v31-h200")  # decode: 1700 tok/s at 20 ms
    curve = decode_curve_of(prof)
    assert curve.tpot_ms_at(1, 7000) == pytest.approx(20.0)
    assert curve.tpot_ms_at(34, 7000) == pytest.approx(20.0)
    assert curve.best_batch(20.0, 7000) == 34


async def test_prefill_keeps_an_exact_schedule_for_late_submissions():
    """With intended arrival times, the queue is the Lindley recursion start = max(previous end, arrival)."""
    eng = PrefillEngine(PROFILE, SCALE)
    eng.start()
    s = float(PROFILE.prefill.time_s(1024)) * SCALE
    try:
        now = asyncio.get_running_loop().time()
        # three requests meant to arrive 0, 0.1 s and 5 s apart, all submitted (late) right now
        arrivals = [now - 10.0, now - 10.0 + s / 10, now - 5.0]
        done = await asyncio.gather(*(eng.submit(1024, arrival=a) for a in arrivals))
    finally:
        await eng.stop()
    assert done[0] == pytest.approx(arrivals[0] + s)
    assert done[1] == pytest.approx(done[0] + s)  # waited for the first
    assert done[2] == pytest.approx(arrivals[2] + s)  # the server was idle again by then
