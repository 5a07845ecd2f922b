"""Trace loaders: real files parse; malformed rows fail naming file and line; scaling and splicing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from controller.sim.traces import TraceError, load_trace, splice
from tests.conftest import DATA

AZURE = DATA / "traces" / "azure-llm-2023"
MOONCAKE = DATA / "traces" / "mooncake-fast25"


def test_real_traces_load_with_their_published_shape():
    conv = load_trace(AZURE / "AzureLLMInferenceTrace_conv.csv")
    assert len(conv) == 19366 and 0.9 * 3600 < conv.duration_s < 3600
    assert conv.input_tokens.mean() == pytest.approx(1155, rel=0.01)
    assert np.all(np.diff(conv.arrival_s) >= 0) and conv.arrival_s[0] == 0
    moon = load_trace(MOONCAKE / "conversation_trace.jsonl")
    assert len(moon) == 12031 and moon.hash_ids is not None and np.all(moon.cached_tokens == -1)
    # the ~3 s ticks are spread: no two requests share an arrival time
    assert np.unique(moon.arrival_s).size == len(moon)


@pytest.mark.parametrize(
    ("name", "body", "where", "what"),
    [
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47.1,x,3\n",
         ":3:", "ContextTokens='x'"),
        ("b.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,374,44\n", ":2:", "TIMESTAMP='yesterday'"),
        ("c.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374\n", ":2:", "expected 3 fields"),
        ("d.jsonl", '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n{"timestamp": 5\n',
         ":2:", "malformed JSON"),
        ("e.jsonl", '{"timestamp": 0, "input_length": -4, "output_length": 2, "hash_ids": []}\n', ":1:", "input_length=-4"),
        ("f.csv", "timestamp_s,input_tokens,output_tokens\n0.5,100,10\n1.0,100,\n", ":3:", "output_tokens: missing"),
        ("g.csv", "timestamp_s,input_tokens,output_tokens,cached_tokens\n0.5,100,10,200\n", ":2:", "cached_tokens=200"),
        ("h.jsonl", '{"timestamp_s": 1, "input_tokens": 5, "output_tokens": 1}\n{"timestamp_s": "soon", "input_tokens": 5, "output_tokens": 1}\n',
         ":2:", "timestamp_s='soon'"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, name, body, where, what):
    p = tmp_path / name
    p.write_text(body)
    with pytest.raises(TraceError) as e:
        load_trace(p)
    msg = str(e.value)
    assert str(p) + where in msg and what in msg


def test_generic_trace_and_missing_file(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text("\n".join(json.dumps({"timestamp_s": t, "input_tokens": 100, "output_tokens": 5, "cached_tokens": 20})
                           for t in (3.0, 1.0, 2.0)))
    tr = load_trace(p)
    assert list(tr.arrival_s) == [0.0, 1.0, 2.0] and list(tr.cached_tokens) == [20, 20, 20]
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "nope.csv")


def test_rate_scale_keeps_duration_and_splice_plays_in_sequence():
    code = load_trace(AZURE / "AzureLLMInferenceTrace_code.csv")
    x3 = code.rate_scaled(3.0)
    assert len(x3) == 3 * len(code) and x3.duration_s <= code.duration_s + 1e-9
    x15 = code.rate_scaled(1.5, seed=1)
    assert abs(len(x15) - 1.5 * len(code)) < 0.05 * len(code)
    conv = load_trace(AZURE / "AzureLLMInferenceTrace_conv.csv")
    both = splice([code, conv])
    assert len(both) == len(code) + len(conv)
    assert both.arrival_s[len(code)] == pytest.approx(code.duration_s)
    assert both.input_tokens[: len(code)].mean() == pytest.approx(code.input_tokens.mean())
    half = code.time_scaled(0.5)
    assert half.duration_s == pytest.approx(code.duration_s / 2)
