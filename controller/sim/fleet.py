"""Discrete-event model of a P/D fleet on virtual time.

- Router: at arrival, a prefill instance is chosen (round-robin or least
  load); at prefill completion the KV goes to a decode instance (least load).
- Prefill instance: one FIFO queue, one request at a time, service time from
  the profile's measured prefill curve at the request's uncached tokens
  (prefix-cache hits from Mooncake hash_ids are looked up in that instance's
  LRU block cache).
- KV transfer: profile.kv_transfer (base + per token).
- Decode instance: continuous batching. Between membership changes every
  running request advances one token per step of TPOT(batch, context) from the
  profile, so the instance is simulated in closed form ("fluid" steps): a
  shared token clock G advances by dt / TPOT; steps end at integer G. A
  request admitted at G0 while a step runs gets its first token (from
  prefill) at the next boundary, as SGLang's prebuilt batch between forward
  passes sends it, and with n tokens left finishes when G = floor(G0) + 1 + n
  (an idle instance starts a step at once). Admission is limited by the KV
  cache (input + output tokens reserved per request); others wait FIFO.
- Instances flip (drain: no new work, finish what they hold; then switch for
  flip_time_s) and scale (cold start for cold_start_s; scale-down drains then
  releases). GPU-seconds count every allocated instance, busy or not.
- Flip reversals: each instance keeps the time of its last role change and the
  role it left; a flip back to that role within `reversal_window_s` is logged
  (an instance moved back to the role it just left).
- Decode admission gate (smg): with `decode_max_running` > 0 the router picks
  the decode worker at dispatch, as smg does; once every serving decode worker
  holds that many requests (dispatched, not finished) the request waits in a
  router-side FIFO, and is shed (503, a miss) after `gate_timeout_s`.
- Early stop: with `set_objectives(..., miss_budget=k)` the fleet counts
  misses as they become certain (TTFT at decode admission, TPOT at finish, a
  shed request), so a search can abandon a candidate once it has missed more
  than k requests: its attainment is then known to be below the target.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from controller.core.control.types import Action, ActionKind, FleetView, Role, Transition, WorkerStats
from controller.core.errors import PdControllerError
from controller.core.events import EVENT_DTYPE
from controller.core.profile import Profile
from controller.sim.traces import MOONCAKE_BLOCK_TOKENS, Trace

# a sanity bound: a policy asking for more instances than this has been fed a degenerate input
# (a zero-length trace once sized a static fleet for 1e9 req/s and grew memory without bound)
MAX_INSTANCES = 4096


class SimError(PdControllerError, ValueError):
    """The simulated fleet was asked for something it cannot model (the message says what)."""


class St(IntEnum):
    STARTING = 0
    SERVING = 1
    DRAINING = 2  # flip: finishing held work before switching
    SWITCHING = 3
    STOPPING = 4  # scale-down: finishing held work before release
    GONE = 5


@dataclass
class Instance:
    iid: int
    role: Role
    state: St
    gpus: int
    alloc_s: float
    ready_s: float = 0.0
    target_role: Role | None = None
    release_s: float | None = None
    version: int = 0
    # prefill
    queue: deque[int] = field(default_factory=deque)
    busy_rid: int = -1
    busy_s: float = 0.0  # accumulated busy time (prefill), for utilisation
    busy_since: float = 0.0
    cache: OrderedDict[int, None] | None = None
    # role history, for flip reversals
    last_flip_s: float | None = None
    prev_role: Role | None = None
    dispatched: int = 0  # decode gate: requests routed here (at dispatch) and not yet finished
    pending: int = 0  # decode gate: dispatched here, still in prefill (not yet in `waiting`)
    # decode
    running: dict[int, float] = field(default_factory=dict)  # rid -> finishing token clock
    heap: list[tuple[float, int]] = field(default_factory=list)
    waiting: deque[int] = field(default_factory=deque)
    g: float = 0.0
    g_t: float = 0.0
    step_s: float = 0.0
    kv_used: float = 0.0
    ctx_sum: float = 0.0
    dversion: int = 0

    def load(self) -> int:
        if self.role is Role.PREFILL:
            return len(self.queue) + (1 if self.busy_rid >= 0 else 0)
        return len(self.running) + len(self.waiting) + self.pending

    def idle(self) -> bool:
        return self.load() == 0


class Ev(IntEnum):
    PREFILL_DONE = 0
    DECODE_JOIN = 1
    DECODE_NEXT = 2
    READY = 3
    GATE_TIMEOUT = 4


@dataclass
class SimConfig:
    flip_time_s: float = 30.0
    cold_start_s: float = 300.0
    router: str = "least-load"  # or "round-robin"
    prefix_cache_blocks: int = 0  # per prefill instance; 0 = derive from the profile's KV capacity
    decode_max_running: int = 0  # smg decode admission gate: per decode worker cap; 0 = no gate
    gate_timeout_s: float = 30.0  # smg sheds a request held this long at the gate (503)
    reversal_window_s: float = 300.0  # a flip back to the role just left within this is a reversal
    # the clients send max_tokens = the request's real output length (the demo's client does, with
    # ignore_eos); False: no max_tokens on arrival events, as most clients set none or a blanket cap
    arrivals_max_tokens: bool = False


class TpotTable:
    """TPOT(batch, context) in seconds from the profile, tabulated per integer batch for speed."""

    def __init__(self, profile: Profile, max_batch: int = 4096) -> None:
        curve = profile.decode_curve
        if curve is None:
            # a measured single point: constant step time at the point's batch is unknown, so
            # model tps as fixed: step = batch / tps
            tps = float(profile.decode_fixed_tps or 1.0)
            self.ctx = [1.0]
            self.rows = [[b / tps for b in range(max_batch + 1)]]
            return
        self.ctx = list(curve.context)
        self.rows = []
        for c in curve.context:
            self.rows.append([curve.tpot_ms_at(max(b, 1), c) / 1000.0 for b in range(max_batch + 1)])
        self.max_batch = max_batch

    def step_s(self, batch: int, context: float) -> float:
        b = min(batch, len(self.rows[0]) - 1)
        cs = self.ctx
        if context <= cs[0] or len(cs) == 1:
            return self.rows[0][b]
        if context >= cs[-1]:
            return self.rows[-1][b]
        j = bisect.bisect_right(cs, context)
        w = (context - cs[j - 1]) / (cs[j] - cs[j - 1])
        return self.rows[j - 1][b] * (1 - w) + self.rows[j][b] * w


_TPOT_TABLES: dict[int, tuple[Profile, TpotTable]] = {}


def _tpot_table(profile: Profile) -> TpotTable:
    """One table per profile object (building it takes ~0.2 s; a reference search builds hundreds of fleets)."""
    hit = _TPOT_TABLES.get(id(profile))
    if hit is None or hit[0] is not profile:
        hit = (profile, TpotTable(profile))
        _TPOT_TABLES[id(profile)] = hit
    return hit[1]


def prefix_cache_blocks(profile: Profile, override: int = 0) -> int:
    """Prefix-cache blocks per prefill instance: `override`, else what the profile's KV capacity holds."""
    kv = profile.decode_curve.kv_capacity_tokens if profile.decode_curve is not None else None
    return override or (int(float(kv) / MOONCAKE_BLOCK_TOKENS) if kv else 1 << 20)


def lru_prefix_hit(cache: OrderedDict[int, None], hashes: list[int], blocks: int) -> int:
    """Blocks of `hashes` found as a prefix in an LRU block cache, which then holds all of them.

    A prefix hits up to its first missing block (SGLang's radix cache matches prefixes); the hits are
    refreshed, the rest inserted, and the least recently used blocks evicted beyond `blocks`.
    """
    hit = 0
    for h in hashes:
        if h not in cache:
            break
        cache.move_to_end(h)
        hit += 1
    for h in hashes[hit:]:
        cache[h] = None
    while len(cache) > blocks:
        cache.popitem(last=False)
    return hit


class Fleet:
    def __init__(self, trace: Trace, profile: Profile, cfg: SimConfig, n_prefill: int, n_decode: int, overhead_s: float) -> None:
        self.trace = trace
        self.profile = profile
        self.cfg = cfg
        self.overhead_s = overhead_s
        n = len(trace)
        self.n = n
        self.inp = trace.input_tokens.astype(np.float64)
        self.out = trace.output_tokens.astype(np.int64)
        self.arr = trace.arrival_s
        self.cached = trace.cached_tokens.astype(np.int64).copy()
        # service time of the uncached part; for hash-driven requests, computed at service
        known = self.cached >= 0
        self.svc = np.zeros(n)
        self.svc[known] = profile.prefill.time_s(np.maximum(self.inp[known] - self.cached[known], 1.0))
        self.kvx = profile.kv_transfer.base_s + profile.kv_transfer.per_token_s * self.inp
        self.join_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.pdone_s = np.full(n, np.nan)
        self.tpot = _tpot_table(profile)
        kv = profile.decode_curve.kv_capacity_tokens if profile.decode_curve is not None else None
        self.kv_cap = float(kv) if kv else math.inf
        self.cache_blocks = prefix_cache_blocks(profile, cfg.prefix_cache_blocks)
        self.instances: list[Instance] = []
        self.heap: list[tuple[float, int, int, int, int]] = []  # (t, seq, kind, a, b)
        self.seq = 0
        self.rr = {Role.PREFILL: 0, Role.DECODE: 0}
        self.completed: list[int] = []
        self.in_flight = 0
        self.flips = 0
        self.scale_events = 0
        # flip log: (time, instance, from, to); reversals: (time, instance, to, seconds since it left `to`)
        self.flip_log: list[tuple[float, int, Role, Role]] = []
        self.reversals: list[tuple[float, int, Role, float]] = []
        # decode admission gate (router side)
        self.dec_of = np.full(n, -1, dtype=np.int64)
        self.gate_q: deque[int] = deque()
        self.gate_shed: set[int] = set()  # ids shed while in gate_q (skipped lazily)
        self.gate_waiting = 0
        self.shed = 0
        # early stop
        self.ttft_lim = math.inf
        self.tpot_lim = math.inf
        self.miss_budget = math.inf
        self.missed = np.zeros(n, dtype=bool)
        self.misses = 0
        for _ in range(n_prefill):
            self._new(Role.PREFILL, 0.0, ready=True)
        for _ in range(n_decode):
            self._new(Role.DECODE, 0.0, ready=True)

    def set_objectives(self, ttft_s: float, tpot_s: float, miss_budget: float = math.inf) -> None:
        """Count misses as they happen; `exhausted` once more than `miss_budget` requests missed."""
        self.ttft_lim, self.tpot_lim, self.miss_budget = ttft_s, tpot_s, miss_budget

    @property
    def exhausted(self) -> bool:
        return self.misses > self.miss_budget

    def _miss(self, rid: int) -> None:
        if not self.missed[rid]:
            self.missed[rid] = True
            self.misses += 1

    # --- bookkeeping --------------------------------------------------------------------------
    def _push(self, t: float, kind: Ev, a: int, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, int(kind), a, b))

    def _new(self, role: Role, now: float, ready: bool) -> Instance:
        if len(self.instances) >= MAX_INSTANCES:
            raise SimError(f"fleet size={len(self.instances) + 1}: beyond the simulator's bound of {MAX_INSTANCES} "
                           "instances (a degenerate trace or objective asked for it)")
        gp = self.profile.prefill_gpus_per_instance if role is Role.PREFILL else self.profile.decode_gpus_per_instance
        inst = Instance(len(self.instances), role, St.SERVING if ready else St.STARTING, gp, now)
        if role is Role.PREFILL:
            inst.cache = OrderedDict()
        if not ready:
            inst.ready_s = now + self.cfg.cold_start_s
            inst.target_role = role
            self._push(inst.ready_s, Ev.READY, inst.iid, inst.version)
        self.instances.append(inst)
        return inst

    def serving(self, role: Role) -> list[Instance]:
        return [i for i in self.instances if i.role is role and i.state is St.SERVING]

    def view(self) -> FleetView:
        sp = sd = 0
        trans: list[Transition] = []
        for i in self.instances:
            if i.state is St.SERVING:
                if i.role is Role.PREFILL:
                    sp += 1
                else:
                    sd += 1
            elif i.state is St.STARTING:
                trans.append(Transition(i.target_role, i.ready_s, "start"))
            elif i.state in (St.DRAINING, St.SWITCHING):
                trans.append(Transition(i.target_role, i.ready_s if i.state is St.SWITCHING else None, "flip"))
            elif i.state is St.STOPPING:
                trans.append(Transition(None, None, "stop"))
        return FleetView(sp, sd, tuple(trans))

    def gpu_seconds(self, until: float) -> float:
        tot = 0.0
        for i in self.instances:
            end = until if i.release_s is None else min(i.release_s, until)
            if end > i.alloc_s:
                tot += (end - i.alloc_s) * i.gpus
        return tot

    # --- routing ------------------------------------------------------------------------------
    def _pick(self, role: Role) -> Instance:
        pool = self.serving(role)
        if not pool:
            # every instance of this role is in transition: use any not-gone instance of the role
            pool = [i for i in self.instances if i.role is role and i.state in (St.DRAINING, St.STOPPING)] or [
                i for i in self.instances if i.state is not St.GONE
            ]
        if self.cfg.router == "round-robin":
            k = self.rr[role] % len(pool)
            self.rr[role] += 1
            return pool[k]
        return min(pool, key=lambda i: (i.load(), i.iid))

    # --- prefill ------------------------------------------------------------------------------
    def arrive(self, rid: int, now: float) -> None:
        self.in_flight += 1
        if self.cfg.decode_max_running > 0:
            dec = self._gate_pick()
            if dec is None:
                self.gate_q.append(rid)
                self.gate_waiting += 1
                self._push(now + self.cfg.gate_timeout_s, Ev.GATE_TIMEOUT, rid)
                return
            self._dispatch(rid, dec, now)
            return
        self._to_prefill(rid, now)

    def _gate_pick(self) -> Instance | None:
        """smg: the least-loaded serving decode worker with a free slot, else None (hold at the gate)."""
        cap = self.cfg.decode_max_running
        free = [i for i in self.serving(Role.DECODE) if i.dispatched < cap]
        if not free:
            if not self.serving(Role.DECODE):
                # no decode worker serving at all (all in transition): smg has none to gate on either
                pool = [i for i in self.instances if i.role is Role.DECODE and i.state is not St.GONE]
                free = [i for i in pool if i.dispatched < cap]
            if not free:
                return None
        return min(free, key=lambda i: (i.dispatched, i.iid))

    def _dispatch(self, rid: int, dec: Instance, now: float) -> None:
        dec.dispatched += 1
        dec.pending += 1
        self.dec_of[rid] = dec.iid
        self._to_prefill(rid, now)

    def _gate_release(self, iid: int, now: float) -> None:
        self.instances[iid].dispatched -= 1
        while self.gate_q:
            rid = self.gate_q[0]
            if rid in self.gate_shed:
                self.gate_q.popleft()
                self.gate_shed.discard(rid)
                continue
            dec = self._gate_pick()
            if dec is None:
                return
            self.gate_q.popleft()
            self.gate_waiting -= 1
            self._dispatch(rid, dec, now)

    def _gate_timeout(self, rid: int, now: float) -> None:
        if self.dec_of[rid] >= 0 or rid in self.gate_shed or not np.isnan(self.done_s[rid]):
            return
        # still held at the gate: smg answers 503
        self.gate_shed.add(rid)
        self.gate_waiting -= 1
        self.shed += 1
        self.in_flight -= 1
        self._miss(rid)

    def _to_prefill(self, rid: int, now: float) -> None:
        inst = self._pick(Role.PREFILL)
        inst.queue.append(rid)
        if inst.busy_rid < 0:
            self._start_prefill(inst, now)

    def _start_prefill(self, inst: Instance, now: float) -> None:
        if not inst.queue:
            return
        rid = inst.queue.popleft()
        inst.busy_rid = rid
        inst.busy_since = now
        if self.cached[rid] < 0:
            self._lookup_cache(inst, rid)
        self._push(now + float(self.svc[rid]), Ev.PREFILL_DONE, inst.iid, rid)

    def _lookup_cache(self, inst: Instance, rid: int) -> None:
        hashes = self.trace.hash_ids[rid] if self.trace.hash_ids is not None else np.zeros(0, np.int64)
        assert inst.cache is not None
        hit = lru_prefix_hit(inst.cache, hashes.tolist(), self.cache_blocks)
        cached = min(hit * MOONCAKE_BLOCK_TOKENS, int(self.inp[rid]) - 1)
        self.cached[rid] = max(cached, 0)
        self.svc[rid] = float(self.profile.prefill.time_s(max(self.inp[rid] - self.cached[rid], 1.0)))

    def _prefill_done(self, iid: int, rid: int, now: float) -> None:
        inst = self.instances[iid]
        inst.busy_s += now - inst.busy_since
        inst.busy_rid = -1
        self.pdone_s[rid] = now
        if self.dec_of[rid] >= 0:
            dec = self.instances[int(self.dec_of[rid])]
            dec.pending -= 1
        else:
            dec = self._pick(Role.DECODE)
        self._push(now + float(self.kvx[rid]), Ev.DECODE_JOIN, dec.iid, rid)
        dec.waiting.append(-1 - rid)  # placeholder: reserved slot in FIFO order (arrives after KV transfer)
        if inst.queue:
            self._start_prefill(inst, now)
        else:
            self._maybe_drained(inst, now)

    # --- decode -------------------------------------------------------------------------------
    def _advance(self, inst: Instance, now: float) -> None:
        if inst.running and inst.step_s > 0:
            inst.g += (now - inst.g_t) / inst.step_s
        inst.g_t = now

    def _reschedule(self, inst: Instance, now: float) -> None:
        inst.dversion += 1
        b = len(inst.running)
        if b == 0:
            inst.step_s = 0.0
            return
        inst.step_s = self.tpot.step_s(b, inst.ctx_sum / b)
        while inst.heap and inst.heap[0][1] not in inst.running:
            heapq.heappop(inst.heap)
        g_next = inst.heap[0][0]
        self._push(now + max(g_next - inst.g, 0.0) * inst.step_s, Ev.DECODE_NEXT, inst.iid, inst.dversion)

    def _decode_join(self, iid: int, rid: int, now: float) -> None:
        inst = self.instances[iid]
        # the placeholder becomes the real request id
        for k, v in enumerate(inst.waiting):
            if v == -1 - rid:
                inst.waiting[k] = rid
                break
        self._advance(inst, now)
        self._admit(inst, now)
        self._reschedule(inst, now)

    def _admit(self, inst: Instance, now: float) -> None:
        while inst.waiting and inst.waiting[0] >= 0:
            rid = inst.waiting[0]
            need = self.inp[rid] + self.out[rid]
            if inst.running and inst.kv_used + need > self.kv_cap:
                break
            inst.waiting.popleft()
            # SGLang streams a joiner's first token (computed by prefill, sent with the KV) from a "prebuilt"
            # batch it runs between forward passes, then merges it into the running batch: while a step
            # runs, the first token waits for that step to end (in TTFT), and the rest come one per step
            g_join = float(math.ceil(inst.g - 1e-9))  # the next step boundary (now, if G sits on one)
            if inst.running and inst.step_s > 0:
                join = now + (g_join - inst.g) * inst.step_s
            else:
                inst.g, join = g_join, now  # an idle instance starts a step at once, with all who join now
            self.join_s[rid] = join
            if join - self.arr[rid] + self.overhead_s > self.ttft_lim:
                self._miss(rid)
            ntok = int(self.out[rid]) - 1  # the first token came from prefill
            if ntok <= 0:
                self._finish(rid, now)
                continue
            fin = g_join + ntok
            inst.running[rid] = fin
            heapq.heappush(inst.heap, (fin, rid))
            inst.kv_used += need
            inst.ctx_sum += self.inp[rid] + self.out[rid] / 2.0

    def _decode_next(self, iid: int, version: int, now: float) -> None:
        inst = self.instances[iid]
        if version != inst.dversion:
            return
        self._advance(inst, now)
        # due within a nanosecond (or a millionth of a token): float time cannot resolve less
        eps = max(1e-6, 1e-9 / inst.step_s) if inst.step_s > 0 else 1e-6
        while inst.heap and inst.heap[0][0] <= inst.g + eps:
            _fin, rid = heapq.heappop(inst.heap)
            if inst.running.pop(rid, None) is None:
                continue
            inst.kv_used -= self.inp[rid] + self.out[rid]
            inst.ctx_sum -= self.inp[rid] + self.out[rid] / 2.0
            self._finish(rid, now)
        if not inst.running:
            inst.kv_used, inst.ctx_sum = 0.0, 0.0
        self._admit(inst, now)
        self._reschedule(inst, now)
        self._maybe_drained(inst, now)

    def _finish(self, rid: int, now: float) -> None:
        self.done_s[rid] = now
        self.in_flight -= 1
        self.completed.append(rid)
        n = int(self.out[rid]) - 1
        if n > 0 and (now - self.join_s[rid]) / n > self.tpot_lim:
            self._miss(rid)
        if self.dec_of[rid] >= 0:
            self._gate_release(int(self.dec_of[rid]), now)

    # --- lifecycle ----------------------------------------------------------------------------
    def _maybe_drained(self, inst: Instance, now: float) -> None:
        if not inst.idle():
            return
        if inst.state is St.DRAINING:
            inst.state = St.SWITCHING
            inst.ready_s = now + self.cfg.flip_time_s
            inst.version += 1
            self._push(inst.ready_s, Ev.READY, inst.iid, inst.version)
        elif inst.state is St.STOPPING:
            inst.state = St.GONE
            inst.release_s = now

    def _ready(self, iid: int, version: int, now: float) -> None:
        inst = self.instances[iid]
        if version != inst.version or inst.state not in (St.STARTING, St.SWITCHING):
            return
        assert inst.target_role is not None
        inst.role = inst.target_role
        inst.target_role = None
        inst.state = St.SERVING
        inst.g, inst.g_t = 0.0, now
        inst.cache = OrderedDict() if inst.role is Role.PREFILL else None  # a switch drops the prefix cache

    def apply(self, actions: list[Action] | tuple[Action, ...], now: float) -> None:
        for a in actions:
            if a.kind in (ActionKind.FLIP_TO_PREFILL, ActionKind.FLIP_TO_DECODE):
                src = Role.DECODE if a.kind is ActionKind.FLIP_TO_PREFILL else Role.PREFILL
                for _ in range(max(a.count, 0)):
                    self._flip(src, now)
            else:
                role = Role.PREFILL if a.kind is ActionKind.SCALE_PREFILL else Role.DECODE
                if a.count > 0:
                    for _ in range(a.count):
                        self._new(role, now, ready=self.cfg.cold_start_s <= 0)
                        self.scale_events += 1
                else:
                    for _ in range(-a.count):
                        self._remove(role, now)

    def _flip(self, src: Role, now: float) -> None:
        pool = self.serving(src)
        if len(pool) <= 1:
            return  # never empty a pool
        inst = min(pool, key=lambda i: (i.load(), -i.iid))
        dst = Role.DECODE if src is Role.PREFILL else Role.PREFILL
        inst.state = St.DRAINING
        inst.target_role = dst
        self.flips += 1
        self.flip_log.append((now, inst.iid, src, dst))
        if inst.prev_role is dst and inst.last_flip_s is not None and now - inst.last_flip_s < self.cfg.reversal_window_s:
            self.reversals.append((now, inst.iid, dst, now - inst.last_flip_s))
        inst.prev_role, inst.last_flip_s = src, now
        if self.cfg.flip_time_s <= 0 and inst.idle():
            inst.role, inst.target_role, inst.state = dst, None, St.SERVING
            inst.g, inst.g_t = 0.0, now
            return
        self._maybe_drained(inst, now)

    def _remove(self, role: Role, now: float) -> None:
        # cancel a cold start first: it serves nobody yet
        starting = [i for i in self.instances if i.state is St.STARTING and i.target_role is role]
        if starting:
            inst = starting[-1]
            inst.state, inst.release_s = St.GONE, now
            inst.version += 1
            self.scale_events += 1
            return
        pool = self.serving(role)
        if len(pool) <= 1:
            return
        inst = min(pool, key=lambda i: (i.load(), -i.iid))
        inst.state = St.STOPPING
        self.scale_events += 1
        self._maybe_drained(inst, now)

    # --- the loop -----------------------------------------------------------------------------
    def run_until(self, t_end: float, next_arrival: int) -> int:
        """Process arrivals and internal events with time <= t_end; returns the next arrival index."""
        arr = self.arr
        n = self.n
        heap = self.heap
        i = next_arrival
        while True:
            if self.misses > self.miss_budget:
                return i  # early stop: this candidate is already below the target
            ta = arr[i] if i < n else math.inf
            te = heap[0][0] if heap else math.inf
            if i >= n and not heap:
                return i
            if ta <= te:
                if ta > t_end:
                    return i
                self.arrive(i, float(ta))
                i += 1
                continue
            if te > t_end:
                return i
            t, _, kind, a, b = heapq.heappop(heap)
            if kind == Ev.DECODE_NEXT:
                self._decode_next(a, b, t)
            elif kind == Ev.PREFILL_DONE:
                self._prefill_done(a, b, t)
            elif kind == Ev.DECODE_JOIN:
                self._decode_join(a, b, t)
            elif kind == Ev.GATE_TIMEOUT:
                self._gate_timeout(a, t)
            else:
                self._ready(a, b, t)

    def drain_events(self, since: int) -> np.ndarray:
        """EVENT_DTYPE records of requests completed since index `since` of self.completed."""
        ids = np.asarray(self.completed[since:], dtype=np.int64)
        ev = np.zeros(ids.size, dtype=EVENT_DTYPE)
        if ids.size == 0:
            return ev
        ev["arrival_s"] = self.arr[ids]
        ev["input_tokens"] = self.inp[ids]
        ev["cached_tokens"] = np.maximum(self.cached[ids], 0)
        ev["output_tokens"] = self.out[ids]
        ttft = self.join_s[ids] - self.arr[ids] + self.overhead_s
        ev["ttft_s"] = ttft
        ev["tpot_s"] = self.tpot_of(ids)
        ev["e2e_s"] = self.done_s[ids] - self.arr[ids]
        ev["status"] = 200
        return ev

    def tpot_of(self, ids: np.ndarray) -> np.ndarray:
        n = self.out[ids] - 1
        dt = self.done_s[ids] - self.join_s[ids]
        return np.where(n > 0, dt / np.maximum(n, 1), 0.0)

    def stats(self, now: float, last_busy: dict[int, float], dt: float) -> WorkerStats:
        pre = self.serving(Role.PREFILL)
        dec = self.serving(Role.DECODE)
        busy = 0.0
        for i in pre:
            b = i.busy_s + (now - i.busy_since if i.busy_rid >= 0 else 0.0)
            busy += b - last_busy.get(i.iid, b)
            last_busy[i.iid] = b
        running = [len(i.running) for i in dec]
        steps = [i.step_s for i in dec if i.running]
        extra: dict[str, int] = {}
        if "decode_gate_waiting" in WorkerStats.__dataclass_fields__:  # helper SMG's field, once it lands
            extra["decode_gate_waiting"] = self.gate_waiting
        return WorkerStats(
            in_flight=self.in_flight,
            prefill_queued=sum(len(i.queue) for i in pre),
            decode_queued=sum(len(i.waiting) for i in dec),
            decode_running_mean=float(np.mean(running)) if running else None,
            decode_tpot_ms_mean=float(np.mean(steps)) * 1000.0 if steps else None,
            prefill_busy_fraction=min(1.0, busy / (dt * len(pre))) if pre and dt > 0 else None,
            **extra,  # type: ignore[arg-type]
        )
