"""Decode under a TPOT objective: a measured TPOT(batch, context) surface.

Continuous batching runs B requests per step; each step emits one token per
request and takes TPOT(B, context). So one decode instance produces
B / TPOT(B) tokens/s. Under a TPOT objective the best operating point is the
largest batch B* with TPOT(B*) <= target (and whose KV cache fits), giving
TP_decode = B* / TPOT(B*).

At a given output-token rate r the batch is set by Little's law: B requests
are in flight, each emitting 1/TPOT tokens/s, so r = B / TPOT(B): a fixed
point solved by bisection (B / TPOT(B) increases with B on any real profile).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from controller.core.errors import InfeasibleError, ModelInputError, ProfileError


def _strictly_increasing(name: str, xs: Sequence[float]) -> None:
    if len(xs) == 0:
        raise ProfileError(f"{name}=[]: empty axis")
    arr = np.asarray(xs, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or arr[0] <= 0 or np.any(np.diff(arr) <= 0):
        raise ProfileError(f"{name}={list(xs)!r}: must be positive and strictly increasing")


@dataclass(frozen=True)
class DecodeProfile:
    """Measured TPOT in ms on a grid: `tpot_ms[i][j]` at context[i], batch[j].

    Interpolation is bilinear, which is monotone in each axis when the grid is
    (checked at construction). Outside the grid: context is clamped (flat),
    batch below the first point is clamped, above the last it is extrapolated
    along the last segment (used only for predictions, never for B*).
    """

    batch: tuple[float, ...]
    context: tuple[float, ...]
    tpot_ms: tuple[tuple[float, ...], ...]
    kv_capacity_tokens: float | None = None

    def __post_init__(self) -> None:
        _strictly_increasing("decode.batch", self.batch)
        _strictly_increasing("decode.context", self.context)
        grid = np.asarray(self.tpot_ms, dtype=np.float64)
        if grid.shape != (len(self.context), len(self.batch)):
            raise ProfileError(
                f"decode.tpot_ms shape={grid.shape}: expected (len(context), len(batch)) = "
                f"({len(self.context)}, {len(self.batch)})"
            )
        if not np.all(np.isfinite(grid)) or np.any(grid <= 0):
            raise ProfileError(f"decode.tpot_ms={grid.tolist()!r}: values must be positive and finite")
        if np.any(np.diff(grid, axis=1) < 0):
            i, j = map(int, np.argwhere(np.diff(grid, axis=1) < 0)[0])
            raise ProfileError(
                f"decode.tpot_ms not monotone in batch at context={self.context[i]:g}: "
                f"batch {self.batch[j]:g} -> {grid[i, j]:g} ms, batch {self.batch[j + 1]:g} -> {grid[i, j + 1]:g} ms"
            )
        if np.any(np.diff(grid, axis=0) < 0):
            i, j = map(int, np.argwhere(np.diff(grid, axis=0) < 0)[0])
            raise ProfileError(
                f"decode.tpot_ms not monotone in context at batch={self.batch[j]:g}: "
                f"context {self.context[i]:g} -> {grid[i, j]:g} ms, context {self.context[i + 1]:g} -> {grid[i + 1, j]:g} ms"
            )
        if self.kv_capacity_tokens is not None and not (self.kv_capacity_tokens > 0):
            raise ProfileError(f"decode.kv_capacity_tokens={self.kv_capacity_tokens!r}: must be positive")

    @property
    def max_batch(self) -> float:
        return self.batch[-1]

    @property
    def fastest_tpot_ms(self) -> float:
        """The fastest step the profile knows, at any context: its first cell (monotone in both axes)."""
        return self.tpot_ms[0][0]

    @cached_property
    def _axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.asarray(self.batch, dtype=np.float64), np.asarray(self.context, dtype=np.float64),
                np.asarray(self.tpot_ms, dtype=np.float64))

    def tpot_ms_at(self, batch: float, context: float) -> float:
        bs, cs, grid = self._axes
        # interpolate along batch in the (at most two) context rows around `context`, then across them:
        # what interpolating every row and then across context gives, at a fraction of the cost
        j = int(np.searchsorted(cs, context, side="left"))
        lo, hi = max(j - 1, 0), min(j, cs.size - 1)
        rows = [self._along_batch(bs, grid[i], batch) for i in range(lo, hi + 1)]
        return float(np.interp(context, cs[lo:hi + 1], rows))

    @staticmethod
    def _along_batch(bs: np.ndarray, row: np.ndarray, b: float) -> float:
        if b <= bs[-1] or bs.size < 2:
            return float(np.interp(b, bs, row))
        slope = (row[-1] - row[-2]) / (bs[-1] - bs[-2])
        return float(row[-1] + slope * (b - bs[-1]))

    def tps_at(self, batch: float, context: float) -> float:
        """Output tokens/s of one instance at this batch: B / TPOT(B)."""
        return 1000.0 * batch / self.tpot_ms_at(max(batch, 1.0), context)

    def kv_batch_limit(self, kv_tokens_per_request: float) -> float:
        if self.kv_capacity_tokens is None:
            return math.inf
        return self.kv_capacity_tokens / kv_tokens_per_request

    def best_batch(self, tpot_target_ms: float, context: float, kv_tokens_per_request: float | None = None) -> int:
        """B*: the largest integer batch with TPOT <= target that fits the KV cache (<= max measured)."""
        if not (tpot_target_ms > 0 and math.isfinite(tpot_target_ms)):
            raise ModelInputError("tpot_ms", tpot_target_ms, "must be a positive finite number")
        if not (context > 0):
            raise ModelInputError("context_tokens", context, "must be positive")
        fastest = self.tpot_ms_at(self.batch[0], context)
        if tpot_target_ms < fastest:
            raise InfeasibleError(
                f"tpot_ms={tpot_target_ms:g}: below the profile's smallest TPOT {fastest:.4g} ms "
                f"(batch {self.batch[0]:g}, context {context:g}); no batch meets it"
            )
        limit = min(self.max_batch, self.kv_batch_limit(kv_tokens_per_request or context))
        if limit < 1:
            raise InfeasibleError(
                f"kv_capacity_tokens={self.kv_capacity_tokens:g}: one request of {kv_tokens_per_request:g} tokens does not fit"
            )
        lo, hi = 1, math.floor(limit)
        # TPOT is monotone in batch: binary search the last batch meeting the target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.tpot_ms_at(mid, context) <= tpot_target_ms:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def batch_at_token_rate(self, tokens_per_s: float, context: float) -> float:
        """Little's law fixed point: the batch B with B / TPOT(B) = tokens_per_s, or inf if unreachable."""
        if tokens_per_s < 0 or not math.isfinite(tokens_per_s):
            raise ModelInputError("output_tokens_per_s", tokens_per_s, "must be a non-negative finite number")
        if tokens_per_s == 0:
            return 0.0
        ceiling = self.max_batch
        if self.tps_at(ceiling, context) < tokens_per_s:
            return math.inf
        lo, hi = 0.0, ceiling
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if self.tps_at(mid, context) < tokens_per_s:
                lo = mid
            else:
                hi = mid
        return hi

    def tpot_ms_at_token_rate(self, tokens_per_s: float, context: float) -> float:
        """TPOT expected when one instance must emit `tokens_per_s` (inf if beyond capacity)."""
        b = self.batch_at_token_rate(tokens_per_s, context)
        return math.inf if math.isinf(b) else self.tpot_ms_at(max(b, 1.0), context)


@dataclass(frozen=True)
class DecodeOperatingPoint:
    """What one decode instance sustains under the TPOT objective."""

    tps: float
    batch: int | None
    tpot_ms: float | None


def decode_operating_point(
    profile: DecodeProfile | None,
    tpot_target_ms: float,
    input_len: float,
    output_len: float,
    fixed_tps: float | None = None,
) -> DecodeOperatingPoint:
    """TP_decode for a workload: from a measured `fixed_tps` (the source's single point) or the curve.

    Mean context during decode is L_in + L_out/2 (the KV grows from L_in to
    L_in + L_out); the KV bound uses the worst case L_in + L_out per request.
    """
    if fixed_tps is not None:
        if not (fixed_tps > 0 and math.isfinite(fixed_tps)):
            raise ModelInputError("decode_tps", fixed_tps, "must be a positive finite number")
        return DecodeOperatingPoint(tps=fixed_tps, batch=None, tpot_ms=None)
    if profile is None:
        raise ModelInputError("decode", None, "need a decode profile curve or a measured decode_tps")
    context = input_len + output_len / 2.0
    b = profile.best_batch(tpot_target_ms, context, kv_tokens_per_request=input_len + output_len)
    return DecodeOperatingPoint(tps=profile.tps_at(b, context), batch=b, tpot_ms=profile.tpot_ms_at(b, context))
