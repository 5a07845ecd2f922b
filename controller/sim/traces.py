"""Request traces: Azure LLM inference 2023 CSV, Mooncake FAST'25 JSONL, a generic CSV/JSONL.

A `Trace` is columns of numpy arrays sorted by arrival. Mooncake rows carry
`hash_ids` (512-token prefix blocks): the simulator turns them into prefix-
cache hits on the prefill instance that serves the request, so `cached` is
-1 there (decided at service). Malformed rows fail with the file and line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from controller.core.errors import PdControllerError

MOONCAKE_BLOCK_TOKENS = 512


class TraceError(PdControllerError, ValueError):
    """A trace file is missing or has a malformed row; the message names file and line."""


@dataclass(frozen=True)
class Trace:
    name: str
    arrival_s: np.ndarray  # float64, from 0, sorted
    input_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    cached_tokens: np.ndarray  # int64; -1 = decided by the simulated prefix cache (hash_ids)
    hash_ids: tuple[np.ndarray, ...] | None = None

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def _take(self, idx: np.ndarray, arrival: np.ndarray, name: str) -> Trace:
        hashes = None if self.hash_ids is None else tuple(self.hash_ids[i] for i in idx)
        return Trace(name, arrival, self.input_tokens[idx], self.output_tokens[idx], self.cached_tokens[idx], hashes)

    def sorted(self) -> Trace:
        order = np.argsort(self.arrival_s, kind="stable")
        return self._take(order, self.arrival_s[order], self.name)

    def time_scaled(self, factor: float) -> Trace:
        """Stretch (factor > 1) or compress time: rate scales by 1/factor, shape kept."""
        if not (factor > 0 and math.isfinite(factor)):
            raise TraceError(f"time_scale={factor!r}: must be a positive number")
        return Trace(self.name, self.arrival_s * factor, self.input_tokens, self.output_tokens, self.cached_tokens, self.hash_ids)

    def rate_scaled(self, factor: float, seed: int = 0) -> Trace:
        """Scale the request rate by `factor` keeping the duration.

        Whole copies are superposed, copy c circularly shifted by c/k of the
        duration (so bursts do not stack on themselves); a fractional part
        keeps a random subset of one more copy.
        """
        if not (factor > 0 and math.isfinite(factor)):
            raise TraceError(f"rate_scale={factor!r}: must be a positive number")
        if factor == 1.0 or len(self) == 0:
            return self
        rng = np.random.default_rng(seed)
        span = max(self.duration_s, 1e-9)
        whole, frac = math.floor(factor), factor - math.floor(factor)
        copies = whole + (1 if frac > 1e-9 else 0)
        parts_idx, parts_t = [], []
        n = len(self)
        for c in range(copies):
            idx = np.arange(n)
            if c == whole:  # fractional copy
                idx = idx[rng.random(n) < frac]
            t = (self.arrival_s[idx] + c * span / max(copies, 1)) % span
            parts_idx.append(idx)
            parts_t.append(t)
        idx = np.concatenate(parts_idx)
        t = np.concatenate(parts_t)
        return self._take(idx, t, f"{self.name}x{factor:g}").sorted()

    def window(self, start_s: float, end_s: float) -> Trace:
        m = (self.arrival_s >= start_s) & (self.arrival_s < end_s)
        idx = np.flatnonzero(m)
        return self._take(idx, self.arrival_s[idx] - start_s, self.name)


def splice(traces: list[Trace], gap_s: float = 0.0) -> Trace:
    """Play traces one after another (each shifted to start when the previous ends)."""
    if not traces:
        raise TraceError("no traces to splice")
    if len(traces) == 1:
        return traces[0]
    off = 0.0
    arr, inp, out, cac, hashes = [], [], [], [], []
    with_hashes = any(t.hash_ids is not None for t in traces)
    for t in traces:
        arr.append(t.arrival_s + off)
        inp.append(t.input_tokens)
        out.append(t.output_tokens)
        cac.append(t.cached_tokens)
        if with_hashes:
            hashes.extend(t.hash_ids if t.hash_ids is not None else [np.zeros(0, np.int64)] * len(t))
        off += t.duration_s + gap_s
    return Trace(
        "+".join(t.name for t in traces), np.concatenate(arr), np.concatenate(inp), np.concatenate(out),
        np.concatenate(cac), tuple(hashes) if with_hashes else None,
    )


def _pos_int(v: object, field: str, where: str, allow_zero: bool = False) -> int:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {field}={v!r}: not a number") from None
    if not math.isfinite(x) or x != int(x) or x < 0 or (x == 0 and not allow_zero):
        raise TraceError(f"{where}: {field}={v!r}: must be a {'non-negative' if allow_zero else 'positive'} integer")
    return int(x)


def _finite(v: object, field: str, where: str) -> float:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {field}={v!r}: not a number") from None
    if not math.isfinite(x) or x < 0:
        raise TraceError(f"{where}: {field}={v!r}: must be a finite non-negative number")
    return x


def _azure_ts(s: str, where: str) -> float:
    # "2023-11-16 18:17:03.9799600": 7 fractional digits, which datetime will not parse
    try:
        head, _, frac = s.strip().partition(".")
        base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
        return base + (float("0." + frac) if frac else 0.0)
    except ValueError:
        raise TraceError(f"{where}: TIMESTAMP={s!r}: expected 'YYYY-MM-DD HH:MM:SS.fffffff'") from None


def _finish(name: str, t: list[float], i: list[int], o: list[int], c: list[int],
            hashes: list[np.ndarray] | None, path: Path) -> Trace:
    if not t:
        raise TraceError(f"{path}: no requests")
    arr = np.asarray(t, dtype=np.float64)
    tr = Trace(name, arr - arr.min(), np.asarray(i, np.int64), np.asarray(o, np.int64), np.asarray(c, np.int64),
               tuple(hashes) if hashes is not None else None)
    return tr.sorted()


def load_azure(path: Path) -> Trace:
    t, i, o, c = [], [], [], []
    with _open(path) as f:
        r = csv.reader(f)
        header = next(r, None)
        want = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
        if header is None or [h.strip() for h in header[:3]] != want:
            raise TraceError(f"{path}:1: header={header!r}: expected {','.join(want)}")
        for ln, row in enumerate(r, start=2):
            where = f"{path}:{ln}"
            if len(row) < 3:
                raise TraceError(f"{where}: expected 3 fields, got {len(row)}")
            t.append(_azure_ts(row[0], where))
            i.append(_pos_int(row[1], "ContextTokens", where))
            o.append(_pos_int(row[2], "GeneratedTokens", where))
            c.append(0)
    return _finish(path.stem, t, i, o, c, None, path)


def load_mooncake(path: Path, spread_ticks: bool = True) -> Trace:
    """Mooncake JSONL; its timestamps (ms) come in ~3 s ticks, so arrivals inside a tick are
    spread evenly over the tick (else every tick would be an artificial burst)."""
    t, i, o, c, hashes = [], [], [], [], []
    with _open(path) as f:
        for ln, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: malformed JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise TraceError(f"{where}: expected an object")
            for k in ("timestamp", "input_length", "output_length"):
                if k not in row:
                    raise TraceError(f"{where}: {k}: missing")
            t.append(_finite(row["timestamp"], "timestamp", where) / 1000.0)
            i.append(_pos_int(row["input_length"], "input_length", where))
            o.append(_pos_int(row["output_length"], "output_length", where))
            h = row.get("hash_ids", [])
            if not isinstance(h, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in h):
                raise TraceError(f"{where}: hash_ids={str(h)[:60]!r}: must be a list of integers")
            hashes.append(np.asarray(h, dtype=np.int64))
            c.append(-1)
    tr = _finish(path.stem, t, i, o, c, hashes, path)
    if spread_ticks:
        tr = _spread(tr)
    return tr


def _spread(tr: Trace) -> Trace:
    arr = tr.arrival_s.copy()
    uniq, start, counts = np.unique(arr, return_index=True, return_counts=True)
    if uniq.size < 2:
        return tr
    nxt = np.append(uniq[1:], uniq[-1] + np.median(np.diff(uniq)))
    for u, s, n, nx in zip(uniq, start, counts, nxt, strict=True):
        if n > 1:
            arr[s:s + n] = u + (nx - u) * np.arange(n) / n
    return Trace(tr.name, arr, tr.input_tokens, tr.output_tokens, tr.cached_tokens, tr.hash_ids)


def load_generic(path: Path) -> Trace:
    """`timestamp_s, input_tokens, output_tokens[, cached_tokens]` as CSV (with header) or JSONL."""
    t, i, o, c = [], [], [], []
    fields = ("timestamp_s", "input_tokens", "output_tokens")

    def add(row: dict[str, object], where: str) -> None:
        for k in fields:
            if k not in row or row[k] in (None, ""):
                raise TraceError(f"{where}: {k}: missing")
        t.append(_finite(row["timestamp_s"], "timestamp_s", where))
        inp = _pos_int(row["input_tokens"], "input_tokens", where)
        i.append(inp)
        o.append(_pos_int(row["output_tokens"], "output_tokens", where))
        cached = row.get("cached_tokens")
        cv = 0 if cached in (None, "") else _pos_int(cached, "cached_tokens", where, allow_zero=True)
        if cv > inp:
            raise TraceError(f"{where}: cached_tokens={cv}: more than input_tokens={inp}")
        c.append(cv)

    with _open(path) as f:
        if path.suffix == ".jsonl":
            for ln, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TraceError(f"{path}:{ln}: malformed JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise TraceError(f"{path}:{ln}: expected an object")
                add(row, f"{path}:{ln}")
        else:
            r = csv.DictReader(f)
            if r.fieldnames is None or not set(fields) <= {x.strip() for x in r.fieldnames}:
                raise TraceError(f"{path}:1: header={r.fieldnames!r}: expected {', '.join(fields)}[, cached_tokens]")
            for ln, row in enumerate(r, start=2):
                add({k.strip(): v for k, v in row.items() if k is not None}, f"{path}:{ln}")
    return _finish(path.stem, t, i, o, c, None, path)


def _open(path: Path):  # type: ignore[no-untyped-def]
    try:
        return path.open(newline="")
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror}") from None


def load_trace(path: str | Path, fmt: str = "auto") -> Trace:
    """Load by format ('azure', 'mooncake', 'generic') or sniff it from the header / first row."""
    p = Path(path)
    if fmt == "auto":
        with _open(p) as f:
            first = f.readline()
        if first.startswith("TIMESTAMP"):
            fmt = "azure"
        elif first.lstrip().startswith("{") and '"input_length"' in first:
            fmt = "mooncake"
        else:
            fmt = "generic"
    if fmt == "azure":
        return load_azure(p)
    if fmt == "mooncake":
        return load_mooncake(p)
    if fmt == "generic":
        return load_generic(p)
    raise TraceError(f"format={fmt!r}: expected azure, mooncake, generic or auto")
