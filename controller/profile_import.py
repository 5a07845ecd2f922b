"""Build profiles from splitwise-sim's measured perf model (Mutinifni/splitwise-sim, MIT).

The CSV holds repeated measurements of `prompt_time` (ms, prefill) and
`token_time` (ms per output token, decode) for (model, hardware, TP) at:
- prompt sizes 128..8192 at batch 1 (the prefill curve),
- batch 1..64 at prompt 512 with 128 output tokens (TPOT vs batch),
- 128..8192 output tokens at prompt 512, batch 1 (TPOT vs context).

We take the median of the repeats (robust to the odd outlier), then enforce
monotonicity with isotonic regression (pool-adjacent-violators): measured
noise makes e.g. a 128-token prefill slower than a 256-token one, which no
real kernel does.

Context. Splitwise measured context only at batch 1: a sweep of output
lengths at prompt 512 and a sweep of prompt lengths at 128 output tokens
(context during a run of T output tokens from prompt P averages P + T/2).
At batch 1 a 70B model's step is dominated by reading the weights, so TPOT
grows only ~5 % from 576 to 8 256 tokens of context and the per-point
medians are within noise of each other; isotonic pooling of those medians
made every row above the first identical (no context dependence at all).
Instead we fit one line TPOT(1, c) = a + k c by least squares over every
batch-1 run (75 for each model/GPU/TP), k being the cost of reading one
token's KV in one step. A decode step reads the KV of every running
sequence, so that cost adds per sequence:

    TPOT(b, c) = TPOT(b, c_ref) + b * k * (c - c_ref)

with TPOT(b, c_ref) the measured batch curve (prompt 512, 128 output tokens,
c_ref = 576). The earlier multiplicative form TPOT(b, c_ref) * TPOT(1, c) /
TPOT(1, c_ref) applied a batch-1 factor of ~1.0 to every batch and so lost
the growth with context exactly where it matters (large batches). Beyond the
batch-1 runs the per-sequence scaling is an extrapolation (the CSV has no
batch > 1 run off c_ref); the profile's notes say so and give k.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controller.core.errors import ProfileError

SOURCE = (
    "splitwise-sim perf_model.csv (Mutinifni/splitwise-sim, MIT licence): measured prompt_time and "
    "token_time medians over repeats"
)


def isotonic_non_decreasing(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Pool-adjacent-violators: the closest (weighted L2) non-decreasing sequence."""
    w = list(weights) if weights is not None else [1.0] * len(values)
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, wi in zip(values, w, strict=True):
        blocks.append([float(v), float(wi), 1])
        while len(blocks) >= 2 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out: list[float] = []
    for m, _, c in blocks:
        out.extend([m] * int(c))
    return out


def _rows(csv_path: Path, model: str, hardware: str, tp: int) -> list[dict[str, str]]:
    try:
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            need = {"model", "hardware", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time", "tensor_parallel"}
            missing = need - set(reader.fieldnames or [])
            if missing:
                raise ProfileError(f"{csv_path}: not a splitwise perf_model CSV (missing columns {sorted(missing)})")
            rows = [r for r in reader if r["model"] == model and r["hardware"] == hardware and int(r["tensor_parallel"]) == tp]
    except OSError as e:
        raise ProfileError(f"{csv_path}: cannot read: {e.strerror}") from None
    if not rows:
        raise ProfileError(f"{csv_path}: no rows for model={model!r} hardware={hardware!r} tp={tp}")
    return rows


def _median_by(rows: list[dict[str, str]], key: str, value: str) -> tuple[list[float], list[float], list[int]]:
    groups: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        groups[float(r[key])].append(float(r[value]))
    xs = sorted(groups)
    return xs, [statistics.median(groups[x]) for x in xs], [len(groups[x]) for x in xs]


def import_splitwise(
    csv_path: Path,
    model: str,
    hardware: str,
    tp: int,
    kv_capacity_tokens: float | None = None,
    overhead_s: float = 0.0,
    kv_transfer_per_token_s: float = 0.0,
    kv_bytes_per_token: float | None = None,
) -> dict[str, Any]:
    rows = _rows(csv_path, model, hardware, tp)
    # prefill: batch 1, output 128 (one row per prompt size; 512 has extra token_size variants, all prefill the same)
    pre = [r for r in rows if int(r["batch_size"]) == 1]
    p_len, p_ms, p_n = _median_by(pre, "prompt_size", "prompt_time")
    p_ms = isotonic_non_decreasing(p_ms, p_n)
    # decode vs batch at prompt 512, 128 output tokens
    dec_b = [r for r in rows if int(r["prompt_size"]) == 512 and int(r["token_size"]) == 128]
    b, b_ms, b_n = _median_by(dec_b, "batch_size", "token_time")
    b_ms = isotonic_non_decreasing(b_ms, b_n)
    # decode vs context: one least-squares line over every batch-1 run (both sweeps)
    one = [r for r in rows if int(r["batch_size"]) == 1]
    c1 = [int(r["prompt_size"]) + int(r["token_size"]) / 2.0 for r in one]
    y1 = [float(r["token_time"]) for r in one]
    k_ms, k_se = _slope(c1, y1)
    k_ms = max(k_ms, 0.0)  # a step never gets faster with more context; noise alone could say so
    if 1.0 not in b:
        raise ProfileError(f"{csv_path}: rows for {model}/{hardware}/tp{tp} lack the batch-1 reference point")
    c_ref = 512 + 128 / 2.0
    dec_c = [r for r in rows if int(r["prompt_size"]) == 512 and int(r["batch_size"]) == 1]
    t = sorted({float(r["token_size"]) for r in dec_c})
    contexts = [512 + tok / 2.0 for tok in t]
    grid = [[round(bm + bb * k_ms * (c - c_ref), 4) for bb, bm in zip(b, b_ms, strict=True)] for c in contexts]
    name = f"{model}-{hardware}-tp{tp}"
    prof: dict[str, Any] = {
        "schema": "pd-controller/profile/v1",
        "name": name,
        "model": model,
        "hardware": hardware,
        "tensor_parallel": tp,
        "source": SOURCE,
        "license": "MIT (data: Mutinifni/splitwise-sim); see configs/profiles/LICENSES.md",
        "notes": (
            "Prefill: batch-1 prompt_time vs prompt size, median of repeats, isotonic. "
            "Decode: token_time vs batch at prompt 512 / 128 output tokens (context 576); context cost from a "
            f"least-squares line over all {len(one)} batch-1 runs (context = prompt + output/2): k = {k_ms * 1000:.3f} "
            f"+/- {k_se * 1000:.3f} us per token of context per sequence; grid TPOT(b, c) = TPOT(b, 576) + b*k*(c - 576) "
            "(a step reads every sequence's KV; the per-sequence scaling beyond batch 1 is extrapolated, not measured). "
            + ("kv_capacity_tokens and kv_transfer are computed from model shape and link speed, not measured." if kv_capacity_tokens else "")
        ),
        "overhead_s": overhead_s,
        "kv_transfer": {"base_s": 0.0, "per_token_s": kv_transfer_per_token_s},
        "prefill": {
            "input_len": [int(x) for x in p_len],
            "time_ms": [round(x, 3) for x in p_ms],
            "gpus_per_instance": tp,
        },
        "decode": {
            "batch": [int(x) for x in b],
            "context": [round(c, 1) for c in contexts],
            "tpot_ms": grid,
            "gpus_per_instance": tp,
        },
    }
    if kv_capacity_tokens is not None:
        prof["decode"]["kv_capacity_tokens"] = kv_capacity_tokens
    if kv_bytes_per_token is not None:
        prof["decode"]["kv_bytes_per_token"] = kv_bytes_per_token
    return prof


def _slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of y on x and its standard error."""
    n = len(xs)
    if n < 3:
        return 0.0, 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return 0.0, 0.0
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    resid = sum((y - my - k * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return k, (resid / (n - 2) / sxx) ** 0.5
