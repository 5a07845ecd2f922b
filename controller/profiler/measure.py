"""Benchmark a PD deployment into a profile: TPmax per input length, TPOT against decode batch.

What is measured, and how (closed-loop load from a real HTTP client):

- TPmax(L): saturated prefill throughput of ONE prefill instance at input
  length L. Keep enough requests of L fresh tokens and 1 output token in
  flight that the prefill queue never empties (2 per prefill instance plus
  2, within --max-concurrency), then count completions over the steady
  window after a warm-up: TPmax = L * completions / window / n_prefill. The
  prompts are random token ids, so a prefix cache cannot help.
- TPOT(B) at the target context: keep B * n_decode streaming requests of
  the target input length and --output-len tokens (ignore_eos) in flight, so
  each decode instance runs a batch of about B, and time each request's
  tokens: TPOT = (t_last - t_first) / (n - 1), averaged over requests that
  started after the warm-up. The batch recorded is the one the decode side
  really ran, by Little's law (time spent decoding / window), since part of
  each user's loop is prefill and transfer. The prompts share all but their
  last 16 tokens, so a prefix cache keeps prefill from starving decode. The
  context recorded is L_in + L_out / 2 (the mean over a request's decode).
- overhead_s: TTFT of a lone request less its prefill time L / TPmax.

The duration budget (--duration-s) is split over the points; every point has
a warm-up of 20 % of its share. Results are written as a profile YAML (one
context row; the prefill curve and the TPOT row are made non-decreasing,
which the profile format requires; the notes say so).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp

from controller.core.errors import PdControllerError

MAX_CONCURRENCY_LIMIT = 1024
MAX_DURATION_S = 3600.0
# a measuring request that takes longer than this is an error, not a data point
REQUEST_TIMEOUT_S = 300.0
# fraction of requests that may fail before a point is abandoned
MAX_ERROR_FRACTION = 0.05
VOCAB = 256  # token ids sent are drawn below this (any real vocabulary is larger)


class ProfileMeasureError(PdControllerError):
    """The deployment could not be measured: unreachable, or answering errors."""


@dataclass
class Result:
    ok: bool
    status: int = 0
    error: str = ""
    t_start: float = 0.0
    t_first: float = math.nan
    t_last: float = math.nan
    tokens: int = 0


class Target:
    """Where requests go: a PD router, or one prefill + decode pair addressed directly (as the router would)."""

    def __init__(self, session: aiohttp.ClientSession, router: str | None, prefill: str | None, decode: str | None) -> None:
        self.session = session
        self.router = router.rstrip("/") if router else None
        self.prefill = prefill.rstrip("/") if prefill else None
        self.decode = decode.rstrip("/") if decode else None
        self.n_prefill = 1
        self.n_decode = 1
        self.bootstrap: tuple[str, int] | None = None
        self.kv_capacity_tokens: float | None = None
        self.tp_size: int | None = None
        self.model = ""
        self.decode_urls: set[str] = set()

    @property
    def engine_metrics_url(self) -> str:
        return f"{self.router}/engine_metrics" if self.router else f"{self.decode}/metrics"

    async def engine_sample(self) -> EngineSample | None:
        """The decode side's own counters (SGLang's ITL histogram and running-requests gauge), if it exports them."""
        try:
            async with self.session.get(self.engine_metrics_url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status != 200:
                    return None
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        return parse_engine_sample(text, None if not self.router else self.decode_urls)

    async def _get(self, url: str) -> Any:
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                text = await r.text()
                if r.status != 200:
                    raise ProfileMeasureError(f"{url}: HTTP {r.status}: {text[:200]}")
                return json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ProfileMeasureError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
        except json.JSONDecodeError:
            raise ProfileMeasureError(f"{url}: answered something that is not JSON") from None

    async def _server_info(self, base: str) -> dict[str, Any]:
        try:
            info = await self._get(f"{base}/server_info")
        except ProfileMeasureError:
            info = await self._get(f"{base}/get_server_info")
        return info if isinstance(info, dict) else {}

    async def discover(self) -> None:
        if self.router:
            body = await self._get(f"{self.router}/workers")
            workers = body.get("workers", []) if isinstance(body, dict) else []
            pre = [w for w in workers if w.get("worker_type") == "prefill" and w.get("is_healthy", True)]
            dec = [w for w in workers if w.get("worker_type") == "decode" and w.get("is_healthy", True)]
            if not pre or not dec:
                raise ProfileMeasureError(
                    f"{self.router}/workers lists {len(pre)} healthy prefill and {len(dec)} healthy decode workers: "
                    "a PD router with at least one of each is needed"
                )
            self.n_prefill, self.n_decode = len(pre), len(dec)
            self.decode_urls = {str(w["url"]).rstrip("/") for w in dec}
            dec_info = await self._server_info(str(dec[0]["url"]))
        else:
            assert self.prefill and self.decode
            pinfo = await self._server_info(self.prefill)
            port = pinfo.get("disaggregation_bootstrap_port")
            if not isinstance(port, int):
                raise ProfileMeasureError(
                    f"{self.prefill}/server_info has no disaggregation_bootstrap_port: is it a PD prefill server?"
                )
            self.bootstrap = (urlparse(self.prefill).hostname or "127.0.0.1", port)
            dec_info = await self._server_info(self.decode)
        kv = dec_info.get("max_total_num_tokens")
        self.kv_capacity_tokens = float(kv) if isinstance(kv, int | float) and kv > 0 else None
        tp = dec_info.get("tp_size")
        self.tp_size = tp if isinstance(tp, int) and tp >= 1 else None
        self.model = str(dec_info.get("served_model_name") or dec_info.get("model_path") or "")

    async def generate(
        self, input_len: int, output_len: int, stream: bool, rng: random.Random, prefix: Sequence[int] = (),
    ) -> Result:
        ids = list(prefix[:input_len]) + [rng.randrange(3, VOCAB) for _ in range(input_len - min(len(prefix), input_len))]
        body: dict[str, Any] = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0.0},
            "stream": stream,
        }
        res = Result(ok=False, t_start=time.monotonic())
        try:
            if self.router:
                return await self._post(f"{self.router}/generate", body, res)
            assert self.bootstrap is not None and self.prefill and self.decode
            body.update(bootstrap_host=self.bootstrap[0], bootstrap_port=self.bootstrap[1],
                        bootstrap_room=rng.getrandbits(63))
            pre = asyncio.ensure_future(self._post(f"{self.prefill}/generate", dict(body, stream=False),
                                                   Result(ok=False)))
            try:
                res = await self._post(f"{self.decode}/generate", body, res)
            finally:
                pres = await pre
            if not pres.ok and res.ok:
                return pres
            return res
        except (aiohttp.ClientError, TimeoutError) as e:
            res.error = f"{type(e).__name__}: {e}"
            return res

    async def _post(self, url: str, body: dict[str, Any], res: Result) -> Result:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with self.session.post(url, json=body, timeout=timeout) as r:
            res.status = r.status
            if r.status != 200:
                res.error = f"{url}: HTTP {r.status}: {(await r.text())[:200]}"
                return res
            if not body.get("stream"):
                out = await r.json(content_type=None)
                res.t_first = res.t_last = time.monotonic()
                res.tokens = int((out.get("meta_info") or {}).get("completion_tokens", 1))
                res.ok = True
                return res
            async for line in r.content:
                if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                    continue
                now = time.monotonic()
                if math.isnan(res.t_first):
                    res.t_first = now
                res.t_last = now
                res.tokens += 1
            res.ok = res.tokens > 0
            if not res.ok:
                res.error = f"{url}: stream ended without tokens"
            return res


@dataclass(frozen=True)
class EngineSample:
    itl_sum_s: float
    itl_count: float
    running: float  # requests running on the decode workers, summed


_ITL = ("inter_token_latency_seconds", "time_per_output_token_seconds")


def parse_engine_sample(text: str, decode_urls: set[str] | None) -> EngineSample | None:
    """ITL sum/count and running requests from SGLang metrics (`sglang:` on a worker, `sglang_` via the router).

    Through the router, samples carry a worker label; only decode workers' gauges count.
    """
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    running = 0.0
    seen = False
    try:
        fams = list(text_string_to_metric_families(text))
    except ValueError:
        return None
    for fam in fams:
        base = fam.name.split(":", 1)[-1] if fam.name.startswith("sglang:") else fam.name.removeprefix("sglang_")
        for smp in fam.samples:
            worker = (smp.labels.get("worker_addr") or smp.labels.get("worker") or "").rstrip("/")
            if decode_urls is not None and worker and worker not in decode_urls:
                continue
            for h in _ITL:
                if base == h and smp.name.endswith("_sum"):
                    sums[h] = sums.get(h, 0.0) + smp.value
                    seen = True
                elif base == h and smp.name.endswith("_count"):
                    counts[h] = counts.get(h, 0.0) + smp.value
            if base == "num_running_reqs":
                running += smp.value
    if not seen:
        return None
    h = next(h for h in _ITL if h in sums)
    return EngineSample(sums[h], counts.get(h, 0.0), running)


@dataclass
class PointStats:
    done: list[Result] = field(default_factory=list)
    errors: list[Result] = field(default_factory=list)


async def closed_loop(
    target: Target, concurrency: int, seconds: float, input_len: int, output_len: int, stream: bool,
    rng: random.Random, tick: Callable[[float], None] | None = None, prefix: Sequence[int] = (),
) -> PointStats:
    """Keep `concurrency` requests in flight for `seconds`; collect every result."""
    stats = PointStats()
    stop_at = time.monotonic() + seconds

    async def user() -> None:
        while time.monotonic() < stop_at:
            r = await target.generate(input_len, output_len, stream, rng, prefix)
            (stats.done if r.ok else stats.errors).append(r)
            total = len(stats.done) + len(stats.errors)
            if len(stats.errors) >= 3 and len(stats.errors) > MAX_ERROR_FRACTION * total:
                raise ProfileMeasureError(f"the deployment answers errors: {stats.errors[-1].error}")

    async def ticker() -> None:
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            if tick is not None:
                tick(min(1.0, (time.monotonic() - t0) / seconds))

    tk = asyncio.ensure_future(ticker())
    tasks = [asyncio.ensure_future(user()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in (*tasks, tk):
            t.cancel()
        await asyncio.gather(*tasks, tk, return_exceptions=True)
    return stats


async def _sample_engine(target: Target, w0: float, w1: float, out: list[EngineSample]) -> None:
    """Sample the decode side's metrics every 0.25 s within [w0, w1]."""
    await asyncio.sleep(max(0.0, w0 - time.monotonic()))
    while time.monotonic() <= w1:
        smp = await target.engine_sample()
        if smp is None:
            return
        out.append(smp)
        await asyncio.sleep(0.25)


def prefill_tpmax(stats: PointStats, input_len: int, n_prefill: int, warm_until: float, end: float) -> float:
    """Input tokens/s of one prefill instance, from completions in the steady window (warm-up dropped)."""
    t = sorted(r.t_last for r in stats.done if warm_until <= r.t_last <= end)
    if len(t) < 3:
        raise ProfileMeasureError(
            f"input_len={input_len}: only {len(t)} requests finished in the measuring window; "
            "raise --duration-s or lower the input length"
        )
    rate = (len(t) - 1) / (t[-1] - t[0])  # completions per second between the first and last in the window
    return rate * input_len / n_prefill


def decode_tpot_ms(stats: PointStats, output_len: int, warm_until: float) -> tuple[float, int]:
    """Mean TPOT over streamed requests that started after the warm-up, and how many there were."""
    per = [(r.t_last - r.t_first) / (r.tokens - 1) for r in stats.done
           if r.t_start >= warm_until and r.tokens >= 2]
    if len(per) < 2:
        raise ProfileMeasureError(
            f"output_len={output_len}: only {len(per)} requests streamed after the warm-up; raise --duration-s"
        )
    return 1000.0 * sum(per) / len(per), len(per)


def decode_batch(stats: PointStats, n_decode: int, w0: float, w1: float) -> float:
    """Mean decode batch per instance over [w0, w1], by Little's law: time spent decoding / window length.

    A closed loop of B users does not keep B requests decoding: part of each
    request's life is prefill, transfer and the client's turnaround. The
    batch that TPOT was measured at is what the decode instances really ran.
    """
    busy = sum(max(0.0, min(r.t_last, w1) - max(r.t_first, w0)) for r in stats.done if r.tokens >= 2)
    return busy / (w1 - w0) / n_decode


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total_points: int, enabled: bool) -> None:
        self.total = total_points
        self.enabled = enabled
        self.i = 0
        self.label = ""

    def start(self, label: str) -> None:
        self.label = label
        self.update(0.0)

    def update(self, frac: float) -> None:
        if not self.enabled:
            return
        done = (self.i + frac) / self.total
        bar = "#" * int(30 * done)
        sys.stderr.write(f"\r[{bar:<30}] {100 * done:5.1f}%  {self.label:<40}")
        sys.stderr.flush()

    def finish_point(self) -> None:
        self.i += 1
        self.update(0.0)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _monotone(xs: Sequence[float]) -> tuple[list[float], bool]:
    out, changed, m = [], False, 0.0
    for x in xs:
        if x < m:
            changed = True
        m = max(m, x)
        out.append(m)
    return out, changed


@dataclass
class MeasureSpec:
    input_lens: list[int]
    output_len: int
    batches: list[int]
    max_concurrency: int
    duration_s: float
    seed: int = 0

    def validate(self) -> None:
        if not self.input_lens or any(n < 1 for n in self.input_lens):
            raise ProfileMeasureError(f"--input-len={self.input_lens}: need positive token counts")
        if self.output_len < 2:
            raise ProfileMeasureError(f"--output-len={self.output_len}: need at least 2 tokens to time TPOT")
        if not 1 <= self.max_concurrency <= MAX_CONCURRENCY_LIMIT:
            raise ProfileMeasureError(f"--max-concurrency={self.max_concurrency}: must be in 1..{MAX_CONCURRENCY_LIMIT}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ProfileMeasureError(f"--duration-s={self.duration_s:g}: must be in (0, {MAX_DURATION_S:g}]")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ProfileMeasureError(f"--batch={self.batches}: need positive batch sizes")


async def measure(
    target: Target, spec: MeasureSpec, progress: Progress | None = None, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every point; return the raw profile dict (validated by the caller when written)."""
    spec.validate()
    rng = random.Random(spec.seed)
    await target.discover()
    input_lens = sorted(set(spec.input_lens))
    batches = sorted({b for b in spec.batches if b * target.n_decode <= spec.max_concurrency})
    if not batches:
        raise ProfileMeasureError(
            f"--max-concurrency={spec.max_concurrency} is below one request per decode instance "
            f"({target.n_decode} decode instances)"
        )
    skipped = sorted(set(spec.batches) - set(batches))
    n_points = len(input_lens) + len(batches) + 1
    share = spec.duration_s / n_points
    prog = progress or Progress(n_points, False)
    prog.total = n_points
    log(f"measuring {target.router or target.prefill + ' + ' + str(target.decode)}: "
        f"{target.n_prefill} prefill, {target.n_decode} decode instance(s); {share:.1f} s per point")
    if skipped:
        log(f"batches {skipped} skipped: they need more than --max-concurrency={spec.max_concurrency} requests")

    # 1. saturated prefill throughput per input length
    tpmax: dict[int, float] = {}
    conc_p = min(spec.max_concurrency, 2 * target.n_prefill + 2)
    for L in input_lens:
        prog.start(f"TPmax at input {L}")
        t0 = time.monotonic()
        st = await closed_loop(target, conc_p, share, L, 1, False, rng, prog.update)
        tpmax[L] = prefill_tpmax(st, L, target.n_prefill, t0 + 0.2 * share, t0 + share)
        prog.finish_point()
        log(f"  TPmax(input {L}) = {tpmax[L]:,.0f} tok/s per prefill instance ({len(st.done)} requests)")

    # 2. fixed overhead: a lone request's TTFT less its prefill time
    target_in = input_lens[len(input_lens) // 2]
    prog.start("idle TTFT")
    ttfts = []
    t_end = time.monotonic() + share
    while time.monotonic() < t_end and len(ttfts) < 20:
        r = await target.generate(target_in, 2, True, rng)
        if not r.ok:
            raise ProfileMeasureError(f"the deployment answers errors: {r.error}")
        ttfts.append(r.t_first - r.t_start)
        prog.update(min(1.0, len(ttfts) / 20))
    prog.finish_point()
    ttfts.sort()
    overhead = max(0.0, ttfts[len(ttfts) // 2] - target_in / tpmax[target_in])

    # 3. TPOT against batch at the target context. All requests share one prompt but their last
    # block, so a prefix cache makes their prefills short and the decode side can be fed a full
    # batch; the decode side still holds the whole context.
    prefix = [rng.randrange(3, VOCAB) for _ in range(max(0, target_in - 16))]
    points: list[tuple[int, float, float]] = []  # (users per instance, measured batch, TPOT ms)
    for b in batches:
        prog.start(f"TPOT at batch {b}")
        t0 = time.monotonic()
        w0 = t0 + 0.2 * share
        samples: list[EngineSample] = []
        sampler = asyncio.ensure_future(_sample_engine(target, w0, t0 + share, samples))
        try:
            st = await closed_loop(target, b * target.n_decode, share, target_in, spec.output_len, True, rng,
                                   prog.update, prefix)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        ms, n = decode_tpot_ms(st, spec.output_len, w0)
        eff = decode_batch(st, target.n_decode, w0, t0 + share)
        how = "client timings"
        if len(samples) >= 3 and samples[-1].itl_count - samples[0].itl_count > 0:
            # the engine's own inter-token histogram and running gauge: free of client and router jitter
            ms = 1000.0 * (samples[-1].itl_sum_s - samples[0].itl_sum_s) / (samples[-1].itl_count - samples[0].itl_count)
            eff = sum(x.running for x in samples[1:]) / (len(samples) - 1) / target.n_decode
            how = "engine metrics"
        points.append((b, eff, ms))
        prog.finish_point()
        log(f"  TPOT = {ms:.2f} ms at a measured batch of {eff:.2f} "
            f"({b} users per decode instance, {n} requests, {how})")
    prog.close()
    # the grid needs a strictly increasing batch axis: keep points whose measured batch grows
    grid: list[tuple[float, float]] = []
    for _, eff, ms in points:
        b_eff = max(1.0, round(eff, 2))
        if not grid or b_eff > grid[-1][0]:
            grid.append((b_eff, ms))
    if len(grid) < len(points):
        log(f"  {len(points) - len(grid)} TPOT point(s) dropped: their measured batch did not exceed the previous one")
    tpot = [ms for _, ms in grid]

    times = [1000.0 * L / tpmax[L] for L in input_lens]
    times_m, t_fixed = _monotone(times)
    tpot_m, d_fixed = _monotone(tpot)
    notes = [
        f"measured by pd-controller profile: closed-loop load, {spec.duration_s:g} s budget, "
        f"{target.n_prefill}P{target.n_decode}D; TPmax per prefill instance from saturated 1-token requests; "
        f"TPOT from streamed requests of {target_in} input + {spec.output_len} output tokens "
        f"(context = input + output/2); overhead_s = median idle TTFT less prefill time.",
    ]
    if t_fixed or d_fixed:
        notes.append("measurement noise made a curve decrease; it was made non-decreasing (running maximum).")
    raw: dict[str, Any] = {
        "schema": "pd-controller/profile/v1",
        "name": "measured",
        "model": target.model,
        "hardware": "",
        "tensor_parallel": target.tp_size or 1,
        "source": f"measured from {target.router or target.prefill}",
        "license": "measurements of the user's own deployment",
        "notes": " ".join(notes),
        "overhead_s": round(overhead, 6),
        "prefill": {"input_len": [float(L) for L in input_lens], "time_ms": [round(t, 4) for t in times_m]},
        "decode": {
            "batch": [b for b, _ in grid],
            "context": [float(target_in + spec.output_len / 2)],
            "tpot_ms": [[round(t, 4) for t in tpot_m]],
        },
        "measured": {
            "tpmax_tps": {str(L): round(v, 2) for L, v in tpmax.items()},
            "tpot_points": [{"users_per_instance": u, "batch": round(e, 3), "tpot_ms": round(m, 4)}
                            for u, e, m in points],
            "idle_ttft_s_median": round(ttfts[len(ttfts) // 2], 6),
        },
    }
    if target.kv_capacity_tokens is not None:
        raw["decode"]["kv_capacity_tokens"] = target.kv_capacity_tokens
    return raw
