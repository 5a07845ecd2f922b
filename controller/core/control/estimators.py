"""Sliding-window estimators over completed-request events, each with its confidence.

The window is kept as plain arrays (copy-on-write: each tick builds new ones).
Arrival rate uses conservation of requests: arrivals in (t0, t1] equal
completions in (t0, t1] plus the change of requests in flight. Completions
alone lag by one request's latency and saturate under overload (a fleet that
can only complete mu req/s would never see a rate above mu); the in-flight
term restores the true arrival rate when the router exposes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np

from controller.core.control.types import Estimates, FloatArray
from controller.core.events import EVENT_DTYPE

STATUS_OK_MAX = 399  # HTTP-like status: 2xx/3xx count as served
# Quantiles are read from at most this many window samples (an even stride
# through the window): the rank error of a quantile from m samples is about
# sqrt(q (1 - q) / m), 0.3 % at P90 for m = 8192, while a full partition of a
# 100k-event window costs ~1 ms per call, several calls per tick.
QUANTILE_SAMPLES = 8192


def thinned(x: FloatArray, cap: int = QUANTILE_SAMPLES) -> FloatArray:
    """An even-stride subsample of at most about `cap` values (all of x when it is small)."""
    step = x.size // cap
    return x[::step] if step > 1 else x


_COLUMNS = ("done_s", "arrival_s", "input_tokens", "cached_tokens", "output_tokens", "ttft_s", "tpot_s")


class _Columns:
    """Append-only storage shared by successive windows (a persistent-vector trick).

    A window is a [start, stop) slice of the rows. Appending writes past `end`;
    windows that end at `end` may extend in place (amortised O(new events)
    instead of copying the whole window every tick). A window that ends
    earlier (an older state extended a second time: a branch) copies instead,
    so every EventWindow behaves as an immutable value.
    """

    __slots__ = ("data", "end")

    def __init__(self, capacity: int) -> None:
        self.data = np.empty((len(_COLUMNS), max(capacity, 1024)), dtype=np.float64)
        self.end = 0


@dataclass(frozen=True)
class EventWindow:
    """Completed requests inside the estimator window, ordered by completion time."""

    cols: _Columns
    start: int
    stop: int

    @classmethod
    def empty(cls) -> EventWindow:
        return cls(_Columns(0), 0, 0)

    def _col(self, k: int) -> FloatArray:
        return self.cols.data[k, self.start : self.stop]

    @property
    def done_s(self) -> FloatArray:
        return self._col(0)

    @property
    def arrival_s(self) -> FloatArray:
        return self._col(1)

    @property
    def input_tokens(self) -> FloatArray:
        return self._col(2)

    @property
    def cached_tokens(self) -> FloatArray:
        return self._col(3)

    @property
    def output_tokens(self) -> FloatArray:
        return self._col(4)

    @property
    def ttft_s(self) -> FloatArray:
        return self._col(5)

    @property
    def tpot_s(self) -> FloatArray:
        return self._col(6)

    def __len__(self) -> int:
        return self.stop - self.start

    def extended(self, events: np.ndarray, now: float, horizon_s: float) -> EventWindow:
        """Append new events (ok status only) and drop those completed before now - horizon_s."""
        if events.dtype != EVENT_DTYPE:
            raise TypeError(f"events dtype={events.dtype}: expected EVENT_DTYPE")
        ok = events[events["status"] <= STATUS_OK_MAX] if events.size else events
        arr = ok["arrival_s"].astype(np.float64)
        done = arr + np.maximum(ok["e2e_s"].astype(np.float64), 0.0)
        cut = now - horizon_s
        # sorted by completion time: expiring old events moves `start`, nothing is copied
        first = self.start + int(np.searchsorted(self.done_s, cut, side="right"))
        fresh = done > cut
        order = np.argsort(done[fresh], kind="stable")
        new = np.stack([
            done, arr, ok["input_tokens"].astype(np.float64), ok["cached_tokens"].astype(np.float64),
            ok["output_tokens"].astype(np.float64), ok["ttft_s"].astype(np.float64), ok["tpot_s"].astype(np.float64),
        ])[:, fresh][:, order]
        k = new.shape[1]
        if k == 0:
            return EventWindow(self.cols, first, self.stop)
        last_done = float(self.cols.data[0, self.stop - 1]) if self.stop > first else -math.inf
        c = self.cols
        in_order = new[0, 0] >= last_done
        if in_order and c.end == self.stop and self.stop + k <= c.data.shape[1]:
            c.data[:, self.stop : self.stop + k] = new  # the common case: append in place
            c.end = self.stop + k
            return EventWindow(c, first, self.stop + k)
        rows = np.concatenate((c.data[:, first : self.stop], new), axis=1)
        if not in_order:
            # late events from a slower source interleave with the window: full (stable) re-sort
            rows = rows[:, np.argsort(rows[0], kind="stable")]
        fresh_cols = _Columns(2 * rows.shape[1])
        fresh_cols.data[:, : rows.shape[1]] = rows
        fresh_cols.end = rows.shape[1]
        return EventWindow(fresh_cols, 0, rows.shape[1])

    def since(self, t0: float) -> EventWindow:
        i = int(np.searchsorted(self.done_s, t0, side="right"))
        return EventWindow(self.cols, self.start + i, self.stop)

    def arrays(self) -> tuple[FloatArray, ...]:
        return (
            self.done_s, self.arrival_s, self.input_tokens, self.cached_tokens,
            self.output_tokens, self.ttft_s, self.tpot_s,
        )


def in_flight_at(history: tuple[tuple[float, int], ...], t: float) -> int | None:
    """The in-flight count recorded at the latest sample at or before t (None if none)."""
    best: int | None = None
    for ts, n in history:
        if ts <= t + 1e-9:
            best = n
        else:
            break
    return best


def peak_rate(window: EventWindow, t0: float, t1: float, bin_s: float, q: float) -> float:
    """q-quantile of the arrival rate over bins of bin_s seconds in [t0, t1), by arrival time.

    Decode has no queue to absorb a burst (the batch, and with it every
    running request's TPOT, grows at once), so it is sized for short-term peaks.
    """
    nb = int((t1 - t0) // bin_s)
    if nb < 2 or len(window) == 0:
        return 0.0
    a = window.arrival_s
    a = a[(a >= t1 - nb * bin_s) & (a < t1)]
    counts = np.bincount(((a - (t1 - nb * bin_s)) // bin_s).astype(np.int64), minlength=nb)[:nb]
    return burst_rate(counts, q, bin_s)


def arrival_scv(arrival_s: FloatArray, t0: float, t1: float, bin_s: float) -> float | None:
    """Arrival variability c_a^2 for the queueing model: the index of dispersion of counts,
    Var(N) / E(N), over bins of bin_s seconds in [t0, t1).

    For a renewal process IDC(tau) tends to c_a^2 (the squared CV of inter-arrival times) as tau grows;
    Poisson arrivals give 1. Bins of the TTFT budget measure the variability at the time scale the
    objective sees (a burst the queue absorbs within the budget counts less than one it does not).
    None with fewer than 4 bins or no arrivals.
    """
    nb = int((t1 - t0) // bin_s)
    if nb < 4 or arrival_s.size == 0:
        return None
    lo = t1 - nb * bin_s
    a = arrival_s[(arrival_s >= lo) & (arrival_s < t1)]
    if a.size == 0:
        return None
    counts = np.bincount(((a - lo) // bin_s).astype(np.int64), minlength=nb)[:nb]
    mean = float(np.mean(counts))
    return float(np.var(counts)) / mean


def burst_rate(counts: np.ndarray, q: float, bin_s: float) -> float:
    """The q-quantile rate over bins, less the Poisson spread the decode margin already covers.

    Of Poisson arrivals at the mean rate, bins of bin_s hold mean +- sqrt(mean) requests, so the
    q-quantile bin sits ~z_q sqrt(mean) above the mean by chance alone; the decode pool's batch margin
    (B + z sqrt(B) <= B*) covers that. What is left is burstiness beyond Poisson (inter-arrival CV > 1).
    """
    if counts.size == 0:
        return 0.0
    mean = float(np.mean(counts))
    top = float(np.quantile(counts, q))
    z = NormalDist().inv_cdf(q) if 0.0 < q < 1.0 else 0.0
    return max(mean, top - z * math.sqrt(mean)) / bin_s


def estimate(
    window: EventWindow,
    now: float,
    start_s: float,
    window_s: float,
    in_flight_history: tuple[tuple[float, int], ...] = (),
    previous: Estimates | None = None,
    burst_bin_s: float = 10.0,
    burst_quantile: float = 0.9,
    lag_s: float = 0.0,
) -> Estimates:
    """Estimates over (now - window_s, now]; lengths fall back to `previous` when the window is empty."""
    t0 = max(now - window_s, start_s)
    covered = max(now - t0, 0.0)
    w = window.since(t0)
    n = len(w)
    inflight_now = in_flight_at(in_flight_history, now)
    inflight_then = in_flight_at(in_flight_history, t0)
    rate = n / covered if covered > 0 else 0.0
    if inflight_now is not None:
        # conservation over (t_a, now]: arrivals = completions + change of requests in flight.
        # Before a full window of in-flight samples exists, use the span since the first sample.
        t_a, then = (t0, inflight_then) if inflight_then is not None else in_flight_history[0]
        span = now - t_a
        if span > 0:
            done = len(window.since(t_a))
            rate = max(0.0, done + inflight_now - then) / span
    newest_age = now - float(w.done_s[-1]) if n else math.inf
    if n == 0:
        if previous is not None:
            # lengths carried over from the last well-sampled window; the rate and confidence are this window's
            return replace(previous, arrival_rate_rps=rate, samples=0, window_covered_s=covered,
                           newest_age_s=newest_age, lengths_from_history=True, peak_rate_rps=0.0)
        return Estimates(rate, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0.0, 0, covered, newest_age)
    inp = w.input_tokens
    # arrivals of the last lag_s have mostly not completed yet: leave them out of the burst bins
    peak = peak_rate(window, t0, now - lag_s, burst_bin_s, burst_quantile) if burst_quantile > 0 else 0.0
    total_in = float(inp.sum())
    hit = float(w.cached_tokens.sum()) / total_in if total_in > 0 else 0.0
    q50, q90 = np.quantile(thinned(inp), [0.5, 0.9])
    return Estimates(
        arrival_rate_rps=rate,
        input_len_mean=float(inp.mean()),
        input_len_m2=float(np.mean(inp * inp)),
        input_len_p50=float(q50),
        input_len_p90=float(q90),
        output_len_mean=float(w.output_tokens.mean()),
        output_len_p90=float(np.quantile(thinned(w.output_tokens), 0.9)),
        cache_hit_rate=min(max(hit, 0.0), 0.99),
        samples=n,
        window_covered_s=covered,
        newest_age_s=newest_age,
        peak_rate_rps=peak,
    )


def input_quantiles(window: EventWindow, t0: float, k: int = 32) -> tuple[float, ...]:
    """k mid-point quantiles of input lengths in the window, on a ~4% log grid (memo-friendly)."""
    w = window.since(t0)
    if len(w) == 0:
        return ()
    qs = np.quantile(thinned(w.input_tokens), (np.arange(k) + 0.5) / k)
    qs = np.maximum(qs, 1.0)
    # quantize: 16 steps per octave, so equal-shaped windows map to the same model inputs
    return tuple(float(2.0 ** (round(math.log2(x) * 16) / 16)) for x in qs)


FLAG_INPUT_ESTIMATED = 0x04  # ARRIVAL_DTYPE flags bit 2: input_tokens estimated from the text, not counted
ARRIVAL_HISTORY = 3  # arrival windows kept (rate and lengths read the last one; output shifts compare further back)


@dataclass(frozen=True)
class ArrivalWindow:
    """Requests that *arrived* within the window (the tap's arrival events), oldest first.

    Arrivals are the leading indicator: a change of rate or of the input-length
    mix shows here one request lifetime before completions show it. Kept as
    per-tick chunks (immutable arrays), so extending a window never copies it.
    """

    chunks: tuple[tuple[FloatArray, FloatArray, np.ndarray, FloatArray], ...] = ()  # (arrival_s, input, exact, max_tokens)
    first_s: float | None = None  # when arrival events were first received (coverage of the window)

    def extended(self, arrivals: np.ndarray, now: float, horizon_s: float) -> ArrivalWindow:
        cut = now - horizon_s
        kept = tuple(c for c in self.chunks if c[0].size and float(c[0][-1]) > cut)
        first = self.first_s
        if arrivals.size:
            a = np.sort(arrivals, order="arrival_s")
            t = a["arrival_s"].astype(np.float64)
            keep = t > cut
            if keep.any():
                exact = (a["flags"][keep] & FLAG_INPUT_ESTIMATED) == 0
                kept = (*kept, (t[keep], a["input_tokens"][keep].astype(np.float64), exact,
                                a["max_tokens"][keep].astype(np.float64)))
            if first is None:
                first = now
        return ArrivalWindow(kept, first)

    def count_since(self, t0: float) -> int:
        return sum(int(np.count_nonzero(c[0] > t0)) for c in self.chunks)

    def since(self, t0: float) -> tuple[FloatArray, FloatArray, np.ndarray, FloatArray]:
        if not self.chunks:
            e = np.empty(0)
            return e, e, np.empty(0, dtype=bool), e
        t = np.concatenate([c[0] for c in self.chunks])
        m = t > t0
        return (t[m], np.concatenate([c[1] for c in self.chunks])[m],
                np.concatenate([c[2] for c in self.chunks])[m], np.concatenate([c[3] for c in self.chunks])[m])


def output_shift(t: FloatArray, max_tokens: FloatArray, now: float, lag_s: float, cap: float,
                 min_samples: int) -> float:
    """How much longer (ratio) the outputs of requests still in flight are asked to be than those completed.

    Completed requests say what outputs were; `max_tokens` says what in-flight ones asked for. Their
    ratio — the mean of min(max_tokens, cap) over arrivals of the last `lag_s` (mostly still
    streaming) against the arrivals before (mostly completed) — scales the completed mean, so a shift
    to longer answers shows at arrival, not one request lifetime later. Capping at a few times the
    observed P90 keeps a client's blanket `max_tokens: 4096` from reading as 4096-token answers; equal
    caps everywhere give ratio 1 (no information, no effect). 1.0 with too few requests on either side.
    """
    known = max_tokens > 0
    recent = known & (t > now - lag_s)
    before = known & (t <= now - lag_s)
    enough = max(3, min_samples // 4)
    if recent.sum() < enough or before.sum() < enough or not (cap > 0):
        return 1.0
    a = float(np.mean(np.minimum(max_tokens[recent], cap)))
    b = float(np.mean(np.minimum(max_tokens[before], cap)))
    return min(8.0, max(0.125, a / b)) if b > 0 else 1.0


def from_arrivals(est: Estimates, win: ArrivalWindow, now: float, window_s: float, min_samples: int,
                  burst_bin_s: float, burst_quantile: float,
                  lag_s: float = 0.0, previous_p90: float = math.nan) -> tuple[Estimates, tuple[float, ...] | None]:
    """Rate, short-bin peak and (where counted exactly) input lengths from arrivals; None samples if too few.

    Only once arrival events have covered half a window (an old tap sends none,
    and a window half-filled with arrivals would read as half the rate).
    """
    if win.first_s is None or now - win.first_s < 0.5 * window_s:
        return est, None
    t0 = max(now - window_s, win.first_s)
    covered = now - t0
    t, inp, exact, _ = win.since(t0)
    rate = t.size / covered if covered > 0 else est.arrival_rate_rps
    if lag_s > 0 and math.isfinite(est.output_len_mean):
        cap = 4.0 * max(est.output_len_p90, previous_p90 if math.isfinite(previous_p90) else 0.0)
        # the reference asks reach back past the window (ARRIVAL_HISTORY windows): right after a lull
        # the window alone may hold too few older arrivals to compare with
        t_all, _, _, mt_all = win.since(now - ARRIVAL_HISTORY * window_s)
        k = output_shift(t_all, mt_all, now, lag_s, cap, min_samples)
        if k != 1.0:
            est = replace(est, output_len_mean=est.output_len_mean * k, output_len_p90=est.output_len_p90 * k)
    peak = est.peak_rate_rps
    nb = int(covered // burst_bin_s)
    if burst_quantile > 0 and nb >= 2:
        lo = now - nb * burst_bin_s
        counts = np.bincount(((t[t >= lo] - lo) // burst_bin_s).astype(np.int64), minlength=nb)[:nb]
        peak = burst_rate(counts, burst_quantile, burst_bin_s)
    est = replace(est, arrival_rate_rps=rate, peak_rate_rps=peak)
    x = inp[exact]
    if x.size < min_samples:
        return est, None
    q50, q90 = np.quantile(thinned(x), [0.5, 0.9])
    est = replace(est, input_len_mean=float(x.mean()), input_len_m2=float(np.mean(x * x)),
                  input_len_p50=float(q50), input_len_p90=float(q90))
    qs = np.maximum(np.quantile(thinned(x), (np.arange(32) + 0.5) / 32), 1.0)
    return est, tuple(float(2.0 ** (round(math.log2(v) * 16) / 16)) for v in qs)
