"""Prometheus scraping of the router: `/metrics` (router's own) and `/engine_metrics` (the workers' `sglang:*`).

Two uses:
- pool gauges for the core (`WorkerStats`): requests in flight, queued
  requests per pool, mean running decode batch, observed TPOT;
- when no tap is deployed, request events synthesized from counter deltas
  between two scrapes: Δrequests records carrying the mean input, cached and
  output lengths and the mean TTFT/TPOT of that interval. The core's
  estimators then work unchanged; only the length *distribution* is lost
  (every synthesized record has the mean), which the docs say.

In PD mode a request passes through one prefill and one decode worker, so
requests and output tokens are counted on decode workers and input (and
cached) tokens on prefill workers; the roles come from the router's /workers.
The router re-exports the workers' `sglang:*` series as `sglang_*` with a
`worker_addr` label (measured on sglang-router 0.3.2); both spellings are read.
A scrape that times out, fails or does not parse is counted by reason and
skipped; counters that go backwards (a restarted worker) restart the baseline.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from controller.core.control.types import WorkerStats
from controller.core.events import EVENT_DTYPE
from controller.metrics import ControllerMetrics
from controller.telemetry.hub import TelemetryHub
from router_plugin.wire import FLAG_SYNTHETIC

# label naming the worker in /engine_metrics, in order of preference (the router adds one)
WORKER_LABELS = ("worker_addr", "worker", "worker_url", "instance", "url")
MAX_SYNTH_PER_SCRAPE = 200_000

Samples = dict[str, dict[str, float]]  # metric sample name -> worker -> value (summed over other labels)


class ScrapeError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_exposition(text: str) -> Samples:
    """Sample name -> {worker: value}. Raises ScrapeError('scrape_parse_error') on bad text."""
    out: Samples = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                worker = next((s.labels[k] for k in WORKER_LABELS if k in s.labels), "")
                v = float(s.value)
                if not math.isfinite(v) or v < 0:
                    # bucket upper bounds are labels, not values; a NaN/negative value is junk
                    continue
                # the router's /engine_metrics re-exports `sglang:x` as `sglang_x`: one name for both
                name = "sglang:" + s.name[7:] if s.name.startswith("sglang_") else s.name
                d = out.setdefault(name, {})
                d[worker] = d.get(worker, 0.0) + v
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise ScrapeError("scrape_parse_error", str(e)[:200]) from None
    return out


def _norm(url: str) -> str:
    u = url.rstrip("/")
    for p in ("http://", "https://"):
        u = u.removeprefix(p)
    return u


@dataclass
class ScrapeState:
    t: float | None = None
    counters: Samples = field(default_factory=dict)


COUNTERS = {
    # completions: the end-to-end histogram is observed when a request finishes (SGLang and the emulator);
    # num_requests_total is the fallback (SGLang counts it at finish too, some servers at arrival)
    "requests": ("sglang:e2e_request_latency_seconds_count", "sglang:num_requests_total"),
    "prompt": ("sglang:prompt_tokens_total",),
    "generation": ("sglang:generation_tokens_total",),
    "cached": ("sglang:cached_tokens_total",),
    "ttft_sum": ("sglang:time_to_first_token_seconds_sum",),
    "ttft_count": ("sglang:time_to_first_token_seconds_count",),
    "tpot_sum": ("sglang:inter_token_latency_seconds_sum", "sglang:time_per_output_token_seconds_sum"),
    "tpot_count": ("sglang:inter_token_latency_seconds_count", "sglang:time_per_output_token_seconds_count"),
}


def _pick(samples: Samples, names: tuple[str, ...]) -> dict[str, float]:
    for n in names:
        if n in samples:
            return samples[n]
    return {}


@dataclass(frozen=True)
class ScrapeResult:
    stats: WorkerStats
    events: np.ndarray  # synthesized EVENT_DTYPE records (empty when not synthesizing or no baseline)
    per_worker: dict[str, dict[str, float]]


def interpret(
    prev: ScrapeState,
    engine: Samples,
    router: Samples | None,
    roles: Mapping[str, str],
    now: float,
    synthesize: bool,
) -> tuple[ScrapeResult, ScrapeState]:
    """Pure: two consecutive scrapes -> pool gauges and (optionally) synthesized events."""
    cur = {k: _pick(engine, names) for k, names in COUNTERS.items()}
    role_of = {_norm(u): r for u, r in roles.items()}

    def role(w: str) -> str | None:
        return role_of.get(_norm(w))

    def in_role(r: str) -> Callable[[str], bool]:
        known = any(role(w) is not None for w in cur["requests"] | cur["prompt"])
        return (lambda w: role(w) == r) if known else (lambda _w: True)

    dec, pre = in_role("decode"), in_role("prefill")
    running = engine.get("sglang:num_running_reqs", {})
    queued = engine.get("sglang:num_queue_reqs", {})
    dec_running = [v for w, v in running.items() if dec(w)]
    in_flight = None
    if router is not None and "smg_worker_requests_active" in router:
        # each PD request is active on one prefill and one decode worker: count decode side
        act = router["smg_worker_requests_active"]
        dec_act = [v for w, v in act.items() if role(w) == "decode"]
        in_flight = round(sum(dec_act)) if dec_act else round(sum(act.values()))

    deltas: dict[str, dict[str, float]] = {}
    dt = None if prev.t is None else now - prev.t
    if prev.t is not None:
        for k, vals in cur.items():
            old = prev.counters.get(k, {})
            # a counter that went backwards restarted: no delta from that worker this time
            deltas[k] = {w: v - old[w] for w, v in vals.items() if w in old and v >= old[w]}

    def dsum(k: str, sel: Callable[[str], bool]) -> float:
        return sum(v for w, v in deltas.get(k, {}).items() if sel(w))

    tpot_n = dsum("tpot_count", dec)
    tpot_s = dsum("tpot_sum", dec) / tpot_n if tpot_n > 0 else None
    stats = WorkerStats(
        in_flight=in_flight,
        prefill_queued=int(sum(v for w, v in queued.items() if role(w) == "prefill")) if queued else None,
        decode_queued=int(sum(v for w, v in queued.items() if dec(w))) if queued else None,
        decode_running_mean=(sum(dec_running) / len(dec_running)) if dec_running else None,
        decode_tpot_ms_mean=tpot_s * 1000.0 if tpot_s is not None else None,
    )
    events = np.zeros(0, dtype=EVENT_DTYPE)
    if synthesize and dt is not None and dt > 0:
        n_req = dsum("requests", dec)
        n = int(min(round(n_req), MAX_SYNTH_PER_SCRAPE))
        if n > 0:
            inp = dsum("prompt", pre) / n
            out = dsum("generation", dec) / n
            cached = min(dsum("cached", pre) / n, inp)
            ttft_n = dsum("ttft_count", lambda _w: True)
            ttft = dsum("ttft_sum", lambda _w: True) / ttft_n if ttft_n > 0 else math.nan
            tpot = tpot_s if tpot_s is not None else math.nan
            e2e = (0.0 if math.isnan(ttft) else ttft) + (0.0 if math.isnan(tpot) else tpot * max(out - 1, 0))
            events = np.zeros(n, dtype=EVENT_DTYPE)
            # completions spread evenly over the interval; arrival = completion - latency
            done = prev.t + dt * (np.arange(n) + 1) / n  # type: ignore[operator]
            events["arrival_s"] = done - e2e
            events["input_tokens"] = round(inp)
            events["cached_tokens"] = round(cached)
            events["output_tokens"] = round(out)
            events["ttft_s"] = ttft
            events["tpot_s"] = tpot
            events["e2e_s"] = e2e
            events["status"] = 200
            events["flags"] = FLAG_SYNTHETIC
    # per worker, for operators and calibration: batch (running), queue, mean TPOT and TTFT over the interval
    per_worker: dict[str, dict[str, float]] = {}
    for name, key in (("running", running), ("queued", queued)):
        for w, v in key.items():
            per_worker.setdefault(w, {})[name] = v
    for name, (num, den, scale) in (("tpot_ms", ("tpot_sum", "tpot_count", 1000.0)),
                                    ("ttft_s", ("ttft_sum", "ttft_count", 1.0))):
        for w, c in deltas.get(den, {}).items():
            if c > 0 and w in deltas.get(num, {}):
                per_worker.setdefault(w, {})[name] = deltas[num][w] / c * scale
    return ScrapeResult(stats, events, per_worker), ScrapeState(now, cur)


class PrometheusScraper:
    """Scrapes the router every `interval_s`; the latest `WorkerStats` is read by the tick."""

    def __init__(
        self,
        router_url: str,
        hub: TelemetryHub,
        clock: Callable[[], float],
        *,
        metrics_url: str | None = None,
        interval_s: float = 5.0,
        timeout_s: float = 2.0,
        synthesize: bool = False,
        roles: Callable[[], Mapping[str, str]] = dict,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.engine_url = router_url.rstrip("/") + "/engine_metrics"
        self.metrics_url = metrics_url
        self.hub = hub
        self.clock = clock
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.synthesize = synthesize
        self.roles = roles
        self.metrics = metrics
        self.state = ScrapeState()
        self.latest: ScrapeResult | None = None
        self.last_ok_s: float | None = None

    async def _get(self, session: aiohttp.ClientSession, url: str, target: str) -> Samples:
        try:
            async with session.get(url) as r:
                if r.status != 200:
                    raise ScrapeError("scrape_http_error", f"{url}: HTTP {r.status}")
                text = await r.text(errors="replace")
        except TimeoutError:
            raise ScrapeError("scrape_timeout", url) from None
        except aiohttp.ClientError as e:
            raise ScrapeError("scrape_unreachable", f"{url}: {e}") from None
        return parse_exposition(text)

    async def scrape_once(self, session: aiohttp.ClientSession) -> ScrapeResult | None:
        now = self.clock()
        results: dict[str, Samples | None] = {"engine": None, "router": None}
        targets = [("engine", self.engine_url)] + ([("router", self.metrics_url)] if self.metrics_url else [])
        for target, url in targets:
            try:
                results[target] = await self._get(session, url, target)
                self._count(target, "ok")
            except ScrapeError as e:
                self.hub.drop(e.reason)
                self._count(target, e.reason.removeprefix("scrape_"))
        engine = results["engine"]
        if engine is None:
            return None
        res, self.state = interpret(self.state, engine, results["router"], self.roles(), now, self.synthesize)
        if res.events.size:
            self.hub.add_events(res.events, "scrape", now)
        self.latest = res
        self.last_ok_s = now
        return res

    def _count(self, target: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.scrapes.labels(target=target, result=result).inc()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                try:
                    await self.scrape_once(session)
                except Exception:  # a scrape must never take the sidecar down: count, go on
                    self.hub.drop("scrape_internal_error")
                await asyncio.sleep(self.interval_s)
