"""References found by simulation, not by the model: `static-best` and the hindsight oracle.

- `static-best`, elastic: the cheapest static fleet (P, D) whose simulated SLO
  attainment reaches the target over the whole trace. Attainment is monotone
  in each pool's size (more instances never queue a request longer), so:
  grow a square fleet (1,1), (2,2), (4,4), ... until one passes; bisect the
  smallest P with that D, and the smallest D with that P (no passing fleet has
  fewer of either); then try fleets of increasing GPU cost above that corner
  until one passes, skipping any dominated by a known failure.
- `static-best`, fixed budget: the split with the most goodput (requests that
  meet both objectives per second), by branch and bound: splits are visited
  outward from the model's split, each with the best miss count so far as its
  budget, so a worse split is abandoned early.
- `oracle`: per window (`oracle_window_s`, 5 min), that window's requests are
  simulated on their own, with hindsight and zero reconfiguration cost, and the
  window gets the smallest fleet meeting the target (elastic: the same search
  as static-best on the window; fixed: the window's best split). Each window
  meets the target, so the whole does, by construction; GPU-hours (or goodput)
  are summed over windows. Requests still running at a window's end finish on
  that window's fleet; the prefix cache starts cold in each window.

Failing candidates stop as soon as they have missed more requests than the
target allows (`simulate(miss_budget=...)`), which makes a search cost a few
full simulations, not one per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from controller.core.control import Mode
from controller.core.control.model import model_target
from controller.core.errors import PdControllerError
from controller.sim.fleet import SimConfig
from controller.sim.policies import FixedSplitPolicy, SimContext, _fixed_split, _trace_shape
from controller.sim.runner import Result, simulate
from controller.sim.traces import Trace


@dataclass
class Candidate:
    p: int
    d: int
    attainment: float  # an upper bound when aborted
    gpu_hours: float
    goodput_rps: float
    aborted: bool

    def as_dict(self) -> dict[str, object]:
        return {"p": self.p, "d": self.d, "attainment": self.attainment, "gpu_hours": self.gpu_hours,
                "goodput_rps": self.goodput_rps, "aborted": self.aborted}


@dataclass
class Search:
    """One search's answer and every fleet it simulated."""

    best: tuple[int, int] | None
    result: Result | None
    candidates: list[Candidate] = field(default_factory=list)
    reached: bool = False


def _gpus(ctx: SimContext, p: int, d: int) -> int:
    prof = ctx.profile
    return p * prof.prefill_gpus_per_instance + d * prof.decode_gpus_per_instance


class _Evaluator:
    def __init__(self, ctx: SimContext, sim: SimConfig, target: float) -> None:
        self.ctx, self.sim, self.target = ctx, sim, target
        self.n = len(ctx.trace)
        # the most misses a passing fleet may have
        self.allowed = math.floor((1.0 - target) * self.n + 1e-9)
        self.memo: dict[tuple[int, int], Result] = {}
        self.cands: list[Candidate] = []

    def run(self, p: int, d: int, budget: float | None) -> Result:
        key = (p, d)
        if key in self.memo:
            return self.memo[key]
        r = simulate(FixedSplitPolicy(self.ctx, p, d), self.ctx, self.sim, miss_budget=budget)
        self.memo[key] = r
        self.cands.append(Candidate(p, d, r.slo_attainment, r.gpu_hours, r.goodput_rps, r.aborted))
        return r

    def passes(self, p: int, d: int) -> bool:
        r = self.run(p, d, self.allowed)
        return not r.aborted and r.slo_attainment >= self.target - 1e-12


def _smallest(f: Callable[[int], bool], hi: int, guess: int | None = None) -> int:
    """Smallest x in [1, hi] with f(x), given f(hi) and f monotone; probes around `guess` first
    (the previous window's answer is usually within one of this window's)."""
    lo = 0  # f(lo) false by convention
    if guess is not None and 1 <= guess < hi:
        if f(guess):
            hi = guess
            if guess - 1 >= 1 and not f(guess - 1):
                return hi
            if guess - 1 >= 1:
                hi = guess - 1
        else:
            lo = guess
            if f(guess + 1):
                return guess + 1
            lo = guess + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid):
            hi = mid
        else:
            lo = mid
    return hi


def cheapest_static(ctx: SimContext, sim: SimConfig, target: float, max_per_pool: int,
                    hint: tuple[int, int] | None = None) -> Search:
    """The cheapest (P, D) reaching `target` attainment on ctx.trace, by simulation (see module doc)."""
    ev = _Evaluator(ctx, sim, target)
    if ev.n == 0:
        return Search((1, 1), None, [], True)
    top = max_per_pool
    # 1. a passing corner (cp, cd): a margin above the hint (the previous window's answer), or a square
    #    grown by doubling from (1, 1)
    if hint is not None:
        cp, cd = (min(top, max(1, h + 1 + h // 4)) for h in hint)
    else:
        cp = cd = 1
    while not ev.passes(cp, cd):
        if cp >= top and cd >= top:
            best_fail = max(ev.memo.items(), key=lambda kv: kv[1].slo_attainment)
            return Search(best_fail[0], best_fail[1], ev.cands, False)
        cp, cd = min(2 * cp, top), min(2 * cd, top)
    if hint is None:
        # shrink the square while it still passes
        while cp > 1 and cd > 1 and ev.passes(cp // 2, cd // 2):
            cp, cd = cp // 2, cd // 2
    # 2. no passing fleet has fewer prefill instances than pm (even with cd decode), nor fewer decode than dm
    pm = _smallest(lambda p: ev.passes(p, cd), cp, hint[0] if hint else None)
    dm = _smallest(lambda d: ev.passes(cp, d), cd, hint[1] if hint else None)
    # 3. fleets above the corner (pm, dm) in order of GPU cost; the first that passes is the cheapest
    cands = sorted(((p, d) for p in range(pm, cp + 1) for d in range(dm, cd + 1)),
                   key=lambda pd: (_gpus(ctx, *pd), pd))
    failed: list[tuple[int, int]] = [k for k, r in ev.memo.items() if r.aborted or r.slo_attainment < target]
    for p, d in cands:
        if any(p <= fp and d <= fd for fp, fd in failed):
            continue  # dominated by a known failure (monotonicity)
        if ev.passes(p, d):
            return Search((p, d), ev.memo[(p, d)], ev.cands, True)
        failed.append((p, d))
    return Search((cp, cd), ev.memo[(cp, cd)], ev.cands, True)


def best_split(ctx: SimContext, sim: SimConfig, budget: int, hint: int | None = None) -> Search:
    """Fixed budget: the static split with the most goodput (fewest misses), by branch and bound.

    Splits are visited from the start split (the hint, else the model's) outward, one direction at a
    time; each runs with the best miss count so far as its budget, so a worse split stops early, and a
    direction ends after two splits in a row that are no better (goodput is unimodal in the split:
    more prefill helps TTFT until decode becomes the bottleneck)."""
    ev = _Evaluator(ctx, sim, 0.0)
    if ev.n == 0 or budget < 2:
        return Search((1, max(budget - 1, 1)), None, [], False)
    p0 = budget // 2
    if hint is not None:
        p0 = min(max(hint, 1), budget - 1)
    else:
        rate, lin, lout, hit, samples = _trace_shape(ctx.trace)
        if rate > 0:
            try:
                t = model_target(ctx.spec, rate, lin, lout, hit, samples)
                p0, _ = _fixed_split(ctx, max(t.n_prefill_exact, 1e-6), max(t.n_decode_exact, 1e-6), 1)
            except PdControllerError:
                pass  # the model finds the objectives infeasible: start the search from the middle
    best: tuple[int, Result] | None = None

    def visit(p: int) -> bool:
        nonlocal best
        # a split that misses more than the best so far cannot be the best: abandon it early
        bound = None if best is None or best[1].met is None else float(best[1].requests - int(best[1].met.sum()))
        r = ev.run(p, budget - p, bound)
        if r.aborted or (best is not None and r.goodput_rps <= best[1].goodput_rps):
            return False
        best = (p, r)
        return True

    visit(p0)
    for step in (-1, 1):
        p, worse = p0 + step, 0
        while 1 <= p <= budget - 1 and worse < 2:
            worse = 0 if visit(p) else worse + 1
            p += step
    assert best is not None
    p, r = best
    return Search((p, budget - p), r, ev.cands, r.slo_attainment >= 0.99)


@dataclass
class OracleWindow:
    start_s: float
    end_s: float
    requests: int
    p: int
    d: int
    met: int
    reached: bool
    sims: int
    gpus: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"start_s": self.start_s, "end_s": self.end_s, "requests": self.requests, "p": self.p, "d": self.d,
                "gpus": self.gpus, "met": self.met, "reached": self.reached, "sims": self.sims}


@dataclass
class OracleResult:
    attainment: float
    gpu_hours: float
    goodput_rps: float
    windows: list[OracleWindow]
    unreached_windows: int

    def as_dict(self) -> dict[str, object]:
        return {"attainment": self.attainment, "gpu_hours": self.gpu_hours, "goodput_rps": self.goodput_rps,
                "unreached_windows": self.unreached_windows, "windows": [w.as_dict() for w in self.windows]}


def _window_ctx(ctx: SimContext, tr: Trace) -> SimContext:
    return replace(ctx, trace=tr)


def oracle(ctx: SimContext, sim: SimConfig, target: float, max_per_pool: int, window_s: float) -> OracleResult:
    """Per window, the smallest fleet (elastic) or best split (fixed) meeting the target, by simulation."""
    # zero reconfiguration cost: a window's fleet serves from its first second
    zsim = replace(sim, flip_time_s=0.0, cold_start_s=0.0)
    tr = ctx.trace
    end = max(tr.duration_s, 1e-9)
    nwin = max(1, math.ceil(end / window_s))
    windows: list[OracleWindow] = []
    gpu_s = 0.0
    met_total = 0
    hint: tuple[int, int] | None = None
    for w in range(nwin):
        lo, hi = w * window_s, min((w + 1) * window_s, end)
        sub = tr.window(lo, math.inf) if w == nwin - 1 else tr.window(lo, hi)
        span = max(hi - lo, 0.0)
        if len(sub) == 0:
            p, d = (1, 1) if ctx.mode is Mode.ELASTIC else (1, (ctx.instances_budget or 2) - 1)
            windows.append(OracleWindow(lo, hi, 0, p, d, 0, True, 0, _gpus(ctx, p, d)))
            gpu_s += span * _gpus(ctx, p, d)
            continue
        # the window's own trace needs a duration that covers the window (its last arrival may be early)
        wctx = _window_ctx(ctx, sub)
        if ctx.mode is Mode.FIXED:
            assert ctx.instances_budget is not None
            s = best_split(wctx, zsim, ctx.instances_budget, hint[0] if hint else None)
            reached = s.result is not None and s.result.slo_attainment >= target
        else:
            s = cheapest_static(wctx, zsim, target, max_per_pool, hint)
            reached = s.reached
        assert s.best is not None
        p, d = s.best
        hint = (p, d)
        met = int(np.sum(s.result.met)) if s.result is not None and s.result.met is not None else 0
        windows.append(OracleWindow(lo, hi, len(sub), p, d, met, reached, len(s.candidates), _gpus(ctx, p, d)))
        gpu_s += span * _gpus(ctx, p, d)
        met_total += met
    n = len(tr)
    return OracleResult(
        attainment=met_total / n if n else math.nan,
        gpu_hours=gpu_s / 3600.0,
        goodput_rps=met_total / end,
        windows=windows,
        unreached_windows=sum(1 for x in windows if not x.reached),
    )
