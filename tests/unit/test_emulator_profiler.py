"""Pure parts of `pd-controller profile`: reading SGLang metrics and turning timings into figures."""

from __future__ import annotations

import pytest

from controller.profiler.measure import (
    MeasureSpec,
    PointStats,
    ProfileMeasureError,
    Result,
    decode_batch,
    decode_tpot_ms,
    parse_engine_sample,
    prefill_tpmax,
)

WORKER = """# TYPE sglang:inter_token_latency_seconds histogram
sglang:inter_token_latency_seconds_bucket{le="+Inf",model_name="m"} 10.0
sglang:inter_token_latency_seconds_sum{model_name="m"} 0.5
sglang:inter_token_latency_seconds_count{model_name="m"} 10.0
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 7.0
"""

ROUTER = """# TYPE sglang_inter_token_latency_seconds histogram
sglang_inter_token_latency_seconds_bucket{le="+Inf",model_name="m",worker_addr="http://d:1"} 4
sglang_inter_token_latency_seconds_sum{model_name="m",worker_addr="http://d:1"} 0.2
sglang_inter_token_latency_seconds_count{model_name="m",worker_addr="http://d:1"} 4
# TYPE sglang_num_running_reqs gauge
sglang_num_running_reqs{model_name="m",worker_addr="http://d:1"} 3
sglang_num_running_reqs{model_name="m",worker_addr="http://p:1"} 5
"""


def test_engine_sample_from_a_worker_and_through_the_router():
    w = parse_engine_sample(WORKER, None)
    assert w is not None and (w.itl_sum_s, w.itl_count, w.running) == (0.5, 10.0, 7.0)
    r = parse_engine_sample(ROUTER, {"http://d:1"})
    assert r is not None and (r.itl_sum_s, r.itl_count, r.running) == (0.2, 4.0, 3.0)  # prefill gauge ignored
    assert parse_engine_sample("# nothing here\n", None) is None
    assert parse_engine_sample("garbage{", None) is None


def _r(t_start, t_first, t_last, tokens):
    return Result(ok=True, t_start=t_start, t_first=t_first, t_last=t_last, tokens=tokens)


def test_tpmax_from_completions_in_the_window():
    st = PointStats(done=[_r(0, t, t, 1) for t in (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 9.0)])
    # completions at 1..5 inside [1, 5]: 4 intervals in 4 s -> 1 req/s; 2 prefill instances share it
    assert prefill_tpmax(st, 1000, 2, 1.0, 5.0) == pytest.approx(500.0)
    with pytest.raises(ProfileMeasureError, match="input_len=1000"):
        prefill_tpmax(st, 1000, 1, 8.0, 10.0)


def test_tpot_and_little_law_batch():
    st = PointStats(done=[_r(1.0, 1.1, 2.1, 11), _r(1.0, 1.0, 3.0, 21), _r(0.0, 0.1, 1.1, 11)])
    ms, n = decode_tpot_ms(st, 10, warm_until=0.5)
    assert n == 2 and ms == pytest.approx(100.0)
    # decoding time inside [1, 3]: 1.0 + 2.0 + 0.1 = 3.1 over 2 s, one instance
    assert decode_batch(st, 1, 1.0, 3.0) == pytest.approx(1.55)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"input_lens": []}, "--input-len"),
        ({"output_len": 1}, "--output-len=1"),
        ({"max_concurrency": 0}, "--max-concurrency=0"),
        ({"duration_s": 0}, "--duration-s=0"),
        ({"batches": [0]}, "--batch"),
    ],
)
def test_spec_limits(kw, needle):
    base = {"input_lens": [512], "output_len": 64, "batches": [1], "max_concurrency": 8, "duration_s": 10}
    with pytest.raises(ProfileMeasureError, match=needle.replace("-", r"\-")):
        MeasureSpec(**(base | kw)).validate()
