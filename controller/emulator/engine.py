"""The emulated GPU: prefill and decode timing taken from a profile, run on the asyncio clock.

Prefill (one FIFO queue per instance, like SGLang's scheduler without DP):
  a batch of requests takes curve.time_s(sum of uncached input tokens). By
  default a batch is one request (the source method's M/x/1 server); with
  `chunk_tokens` set, requests waiting at the start of a batch are packed up
  to that many tokens (chunked-prefill batching), which raises throughput at
  short inputs exactly as the profile's flat floor implies.

Decode (continuous batching): every step emits one token for each running
  request and takes TPOT(B, mean context) from the profile's grid. Requests
  join at the next step boundary; a request is admitted only if its KV
  (input + max output tokens) fits in the remaining KV capacity and the batch
  is below `max_running`, otherwise it waits in FIFO order.

Both loops keep *virtual* schedules: a batch or step that follows another
starts when the previous one ended, not when the event loop woke up, so a
late wake-up on a loaded machine does not lose capacity; only delivery of the
result is late. `time_scale` multiplies every duration (0.1 = ten times
faster than the profiled GPU); the whole emulator then behaves like a GPU
whose profile times are all scaled by that factor.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from controller.core.decode import DecodeProfile
from controller.core.profile import Profile

# a step or batch never takes less than this many (scaled) seconds; keeps the loops from spinning
_MIN_DURATION_S = 1e-4
# how far behind the wall clock a decode schedule may run before lost time is given up
_MAX_LAG_S = 0.25


def decode_curve_of(profile: Profile) -> DecodeProfile:
    """The profile's TPOT grid, or a flat one built from a single measured point (tps at a TPOT).

    A fixed point 'tps tokens/s at TPOT t' means batch B* = tps * t / 1000 runs
    at t ms per step; the stand-in grid is flat at t up to B* and grows linearly
    beyond it (twice B* takes twice as long), so B* stays the best batch.
    """
    if profile.decode_curve is not None:
        return profile.decode_curve
    assert profile.decode_fixed_tps is not None
    t = profile.decode_fixed_at_tpot_ms or 20.0
    bstar = max(2.0, profile.decode_fixed_tps * t / 1000.0)
    return DecodeProfile(batch=(1.0, bstar, 2 * bstar), context=(1.0,), tpot_ms=((t, t, 2 * t),))


class PrefixCache:
    """Radix-like prefix cache on fixed blocks: a prompt hits the longest chain of blocks seen before.

    Blocks are identified by the hash of the whole prefix up to and including
    them (as SGLang's radix tree would match), kept in LRU order up to
    `capacity_tokens`.
    """

    def __init__(self, capacity_tokens: float, block: int = 16) -> None:
        self.block = block
        self.capacity_blocks = max(0, int(capacity_tokens // block))
        self._lru: OrderedDict[int, None] = OrderedDict()

    def _chain(self, ids: Sequence[int]) -> list[int]:
        out, h = [], 0
        for i in range(0, len(ids) - len(ids) % self.block, self.block):
            h = hash((h, tuple(ids[i : i + self.block])))
            out.append(h)
        return out

    def match_and_insert(self, ids: Sequence[int]) -> int:
        """Cached tokens of this prompt (at most len-1: the last token is always computed); then cache it."""
        if self.capacity_blocks == 0:
            return 0
        chain = self._chain(ids)
        hit = 0
        for h in chain:
            if h not in self._lru:
                break
            hit += 1
        for h in chain:
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity_blocks:
            self._lru.popitem(last=False)
        return min(hit * self.block, max(len(ids) - 1, 0))

    def clear(self) -> None:
        self._lru.clear()

    @property
    def used_tokens(self) -> int:
        return len(self._lru) * self.block


@dataclass
class _PrefillJob:
    tokens: int
    arrival: float
    done: asyncio.Future[float]


class PrefillEngine:
    def __init__(
        self,
        profile: Profile,
        time_scale: float,
        chunk_tokens: int | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.curve = profile.prefill
        self.time_scale = time_scale
        self.chunk_tokens = chunk_tokens
        self.on_batch = on_batch
        self.queue: deque[_PrefillJob] = deque()
        self.running = 0
        self.running_tokens = 0  # uncached tokens of the batch being computed (its KV is locked, not evictable)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy_until = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="emulator-prefill")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for job in self.queue:
            if not job.done.done():
                job.done.cancel()
        self.queue.clear()

    def service_s(self, tokens: int) -> float:
        return max(_MIN_DURATION_S, float(self.curve.time_s(max(tokens, 1))) * self.time_scale)

    def submit(self, uncached_tokens: int, arrival: float | None = None) -> asyncio.Future[float]:
        """Queue a prefill; the future resolves to the (loop) time the prefill finished.

        `arrival` (loop time, default now) lets a driver that knows the intended arrival time
        (a replay, a benchmark) keep the schedule exact even when it submits late: the server
        is a Lindley recursion, start = max(previous end, arrival).
        """
        loop = asyncio.get_running_loop()
        job = _PrefillJob(uncached_tokens, loop.time() if arrival is None else arrival, loop.create_future())
        self.queue.append(job)
        self._wake.set()
        return job.done

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def queued_tokens(self) -> int:
        return sum(j.tokens for j in self.queue)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            # drop jobs whose client went away
            while self.queue and self.queue[0].done.cancelled():
                self.queue.popleft()
            if not self.queue:
                continue
            batch = [self.queue.popleft()]
            if self.chunk_tokens:
                total = batch[0].tokens
                while self.queue and total + self.queue[0].tokens <= self.chunk_tokens:
                    job = self.queue.popleft()
                    if not job.done.cancelled():
                        batch.append(job)
                        total += job.tokens
            tokens = sum(j.tokens for j in batch)
            # work-conserving virtual start: back to back with the previous batch if it was queued behind it
            start = max(self._busy_until, min(j.arrival for j in batch))
            end = start + self.service_s(tokens)
            self._busy_until = end
            self.running, self.running_tokens = len(batch), tokens
            delay = end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.running, self.running_tokens = 0, 0
            if self.on_batch is not None:
                self.on_batch(tokens, end - start)
            for j in batch:
                if not j.done.done():
                    j.done.set_result(end)


@dataclass
class DecodeSeq:
    """One request in the decode batch. `emit` gets (token index, loop time) for every token."""

    input_tokens: int
    output_tokens: int
    emit: Callable[[int, float], None]
    kv_tokens: int = 0
    generated: int = 0
    arrival: float = 0.0
    admitted_at: float = 0.0
    cancelled: bool = False
    first_sent: bool = False

    @property
    def context(self) -> int:
        return self.input_tokens + self.generated


@dataclass
class DecodeEngine:
    profile: Profile
    time_scale: float
    max_running: int
    kv_capacity_tokens: float = math.inf
    on_step: Callable[[int, float], None] | None = None
    waiting: deque[DecodeSeq] = field(default_factory=deque)
    running: list[DecodeSeq] = field(default_factory=list)
    kv_used: int = 0

    def __post_init__(self) -> None:
        self.curve = decode_curve_of(self.profile)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy_until = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="emulator-decode")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.waiting.clear()
        self.running.clear()
        self.kv_used = 0

    def step_s(self, batch: int, context: float) -> float:
        return max(_MIN_DURATION_S, self.curve.tpot_ms_at(float(batch), context) / 1000.0 * self.time_scale)

    def fits(self, seq: DecodeSeq) -> bool:
        return seq.input_tokens + seq.output_tokens <= self.kv_capacity_tokens

    def submit(self, seq: DecodeSeq) -> None:
        """A request whose KV has arrived: it emits its first token when admitted, then one per step."""
        seq.arrival = asyncio.get_running_loop().time()
        self.waiting.append(seq)
        self._admit()
        self._wake.set()

    def _admit(self) -> None:
        now = asyncio.get_running_loop().time()
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            need = seq.input_tokens + seq.output_tokens
            if self.kv_used + need > self.kv_capacity_tokens:
                break  # FIFO: the head waits for KV, and so does everyone behind it
            self.waiting.popleft()
            seq.kv_tokens = need
            self.kv_used += need
            # the first token was computed by prefill and arrives with the KV; it is sent at the next
            # step boundary (SGLang's prebuilt batch between forward passes), see _loop
            seq.generated = 1
            seq.admitted_at = now
            self.running.append(seq)

    def _release(self, seq: DecodeSeq) -> None:
        self.kv_used -= seq.kv_tokens
        seq.kv_tokens = 0

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.running:
                self._admit()
            if not self.running:
                self._wake.clear()
                await self._wake.wait()
                # idle until now: the next step starts now, not back to back with the last one
                self._busy_until = max(self._busy_until, loop.time())
                continue
            # back to back with the previous step; catch up at most _MAX_LAG_S of event-loop lag
            now = loop.time()
            start = max(self._busy_until, now - _MAX_LAG_S)
            if start < min(s.admitted_at for s in self.running):
                # the engine sat idle since its last step: this one starts now, with everyone admitted so far
                start = now
            # a request admitted after this (virtual) step began runs from the next one
            batch = [s for s in self.running if s.admitted_at <= start]
            # joiners first get their prefill-computed token, at this boundary, as SGLang streams it from a
            # prebuilt batch run between forward passes before merging them into the running batch
            for s in batch:
                if not s.first_sent:
                    s.first_sent = True
                    if not s.cancelled:
                        s.emit(0, start)
            done_now = {id(s) for s in batch if s.cancelled or s.generated >= s.output_tokens}
            if done_now:
                for s in batch:
                    if id(s) in done_now:
                        self._release(s)
                self.running = [s for s in self.running if id(s) not in done_now]
                batch = [s for s in batch if id(s) not in done_now]
                if not batch:
                    self._admit()
                    continue
            b = len(batch)
            ctx = sum(s.context for s in batch) / b
            dt = self.step_s(b, ctx)
            end = start + dt
            self._busy_until = end
            delay = end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.on_step is not None:
                self.on_step(b, dt)
            # requests admitted during this step joined after it started: they run from the next step
            in_step = {id(s) for s in batch}
            still = [s for s in self.running if id(s) not in in_step]
            for s in batch:
                if s.cancelled:
                    self._release(s)
                    continue
                s.emit(s.generated, end)
                s.generated += 1
                if s.generated >= s.output_tokens:
                    self._release(s)
                else:
                    still.append(s)
            self.running = still
            self._admit()
