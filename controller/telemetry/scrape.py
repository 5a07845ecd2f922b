"""Prometheus scraping of the router: `/metrics` (router's own) and `/engine_metrics` (the workers' `sglang:*`).

Two uses:
- pool gauges for the core (`WorkerStats`): requests in flight, queued
  requests per pool, requests held at smg's decode admission gate, mean
  running decode batch, observed TPOT;
- tap-free telemetry: when no tap is deployed, request events synthesized
  from what the workers and the router export between two scrapes. With
  SGLang's `--collect-tokens-histogram` (`sglang:prompt_tokens_histogram`,
  `sglang:uncached_prompt_tokens_histogram`, `sglang:generation_tokens_histogram`)
  the synthesized records follow the interval's length *distributions*: n
  records (n = requests completed in the interval) take the n mid-quantiles of
  each histogram's bucket deltas (linear inside a bucket, as PromQL's
  histogram_quantile), scaled so their mean is the interval's exact mean
  (histogram sum / count). TTFT follows `sglang:time_to_first_token_seconds`
  the same way (else smg's `smg_pd_ttft_seconds`); TPOT is the interval's mean
  inter-token latency. Without the token histograms every record carries the
  interval means (counter deltas), as before. docs/telemetry.md says what each
  mode loses against the tap.

In PD mode a request passes through one prefill and one decode worker, so
requests and output tokens are counted on decode workers and input (and
cached) tokens on prefill workers; the roles come from the router's /workers.
sglang-router 0.3.2 re-exports the workers' `sglang:*` series as `sglang_*`
with a `worker_addr` label; smg 1.x keeps `sglang:`: both spellings are read.
smg's decode admission gate (a dispatch waits while the decode worker's
`max_running_requests` window is in use): `smg_pd_admission_window{worker}`,
`smg_pd_admission_waits_total`, `smg_pd_admission_sheds_total`; the requests
it holds are the router's active requests to a decode worker beyond its window
and beyond what the worker itself lists as waiting (`smg_worker_requests_active`
- window - `smg_engine_waiting_requests`, per decode worker, floored at 0).
A scrape that times out, fails or does not parse is counted by reason and
skipped; counters that go backwards (a restarted worker) restart the baseline.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

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
# series whose one label matters (kept in the sample name as "name|value"): smg's shed counter by stage
KEEP_LABEL = {"smg_worker_overload_shed_total": "stage"}

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
                # sglang-router 0.3.2's /engine_metrics re-exports `sglang:x` as `sglang_x`: one name for both
                name = "sglang:" + s.name[7:] if s.name.startswith("sglang_") else s.name
                if name.endswith("_bucket") and "le" in s.labels:
                    name = f"{name}|{s.labels['le']}"  # one series per bucket bound (see hist_delta)
                elif name in KEEP_LABEL:
                    name = f"{name}|{s.labels.get(KEEP_LABEL[name], '')}"
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
    hist: Samples = field(default_factory=dict)  # raw histogram series (buckets, sums, counts) of HISTOGRAMS
    router: Samples = field(default_factory=dict)  # the router's counters and histograms of ROUTER_SERIES


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

# per-request distributions exported by the workers (token histograms need --collect-tokens-histogram)
H_PROMPT = "sglang:prompt_tokens_histogram"
H_UNCACHED = "sglang:uncached_prompt_tokens_histogram"
H_GENERATION = "sglang:generation_tokens_histogram"
H_TTFT = "sglang:time_to_first_token_seconds"
HISTOGRAMS = (H_PROMPT, H_UNCACHED, H_GENERATION, H_TTFT)
# the router's own (smg): TTFT and prefill duration over every request, the decode gate's counters
R_TTFT = "smg_pd_ttft_seconds"
R_PREFILL = "smg_pd_prefill_duration_seconds"
R_WAITS = "smg_pd_admission_waits_total"
R_SHEDS = "smg_pd_admission_sheds_total"
R_SHED_STAGE = "smg_worker_overload_shed_total|pd_admission"  # the gate's 503s, counted by stage
ROUTER_HISTOGRAMS = (R_TTFT, R_PREFILL)


def _pick(samples: Samples, names: tuple[str, ...]) -> dict[str, float]:
    for n in names:
        if n in samples:
            return samples[n]
    return {}


def _hist_keys(samples: Samples, base: str) -> list[str]:
    pre = base + "_bucket|"
    return [k for k in samples if k.startswith(pre)] + [k for k in (base + "_sum", base + "_count") if k in samples]


@dataclass(frozen=True)
class HistDelta:
    """One histogram's change over an interval, summed over the selected workers: bucket counts, sum, count."""

    bounds: tuple[float, ...]  # upper bounds, ascending, +inf last
    cum: tuple[float, ...]  # cumulative counts at those bounds
    total: float
    count: float

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float:
        """PromQL histogram_quantile: linear inside the bucket; the +Inf bucket answers its lower bound."""
        n = self.cum[-1] if self.cum else 0.0
        if n <= 0:
            return math.nan
        rank = q * n
        lo_b, lo_c = 0.0, 0.0
        for b, c in zip(self.bounds, self.cum, strict=True):
            if c >= rank and c > lo_c:
                if math.isinf(b):
                    return lo_b
                return lo_b + (b - lo_b) * (rank - lo_c) / (c - lo_c)
            lo_b, lo_c = (b if not math.isinf(b) else lo_b), c
        return lo_b

    def sample(self, n: int) -> np.ndarray:
        """n values at the mid-quantiles (k + 0.5)/n, scaled so their mean is the exact interval mean."""
        if n <= 0 or not self.cum or self.cum[-1] <= 0:
            return np.full(max(n, 0), np.nan)
        v = np.array([self.quantile((k + 0.5) / n) for k in range(n)]) if n <= 2048 else \
            np.interp((np.arange(n) + 0.5) / n, np.linspace(0, 1, 2049),
                      [self.quantile(min(max(x, 1e-9), 1 - 1e-9)) for x in np.linspace(0, 1, 2049)])
        m = self.mean
        vm = float(v.mean())
        if m is not None and vm > 0:
            v = v * (m / vm)
        return v


def hist_delta(cur: Samples, old: Samples, base: str, sel: Callable[[str], bool]) -> HistDelta | None:
    """The change of histogram `base` between two scrapes over the workers `sel` picks (None: not exported)."""
    keys = [k for k in cur if k.startswith(base + "_bucket|")]
    if not keys:
        return None
    by_bound: dict[float, float] = {}
    workers_ok: set[str] = set()
    count_k, sum_k = base + "_count", base + "_sum"
    for w, c in cur.get(count_k, {}).items():
        if sel(w) and w in old.get(count_k, {}) and c >= old[count_k][w]:
            workers_ok.add(w)  # a worker whose count went backwards restarted: left out this time
    for k in keys:
        b = float(k.rsplit("|", 1)[1])
        for w, c in cur[k].items():
            if w in workers_ok:
                by_bound[b] = by_bound.get(b, 0.0) + max(0.0, c - old.get(k, {}).get(w, 0.0))
    if not by_bound:
        return HistDelta((), (), 0.0, 0.0)
    bounds = tuple(sorted(by_bound))
    total = sum(cur.get(sum_k, {}).get(w, 0.0) - old.get(sum_k, {}).get(w, 0.0) for w in workers_ok)
    count = sum(cur[count_k][w] - old[count_k][w] for w in workers_ok)
    return HistDelta(bounds, tuple(by_bound[b] for b in bounds), max(total, 0.0), count)


@dataclass(frozen=True)
class ScrapeResult:
    stats: WorkerStats
    events: np.ndarray  # synthesized EVENT_DTYPE records (empty when not synthesizing or no baseline)
    per_worker: dict[str, dict[str, float]]
    # smg's decode admission gate: requests it holds now (None: no gate exported), and waits/sheds this interval
    decode_gate_waiting: int | None = None
    gate: dict[str, float] = field(default_factory=dict)
    # the router's own histograms over the interval: {"pd_ttft_s": {"mean", "p50", "p90", "p99", "count"}, ...}
    router_latency: dict[str, dict[str, float]] = field(default_factory=dict)
    # which source the synthesized lengths came from: "token_histograms" | "counter_means" | ""
    length_source: str = ""


def _gate_waiting(router: Samples, role: Callable[[str], str | None]) -> int | None:
    window = router.get("smg_pd_admission_window")
    if not window:
        return None
    active = router.get("smg_worker_requests_active", {})
    waiting = router.get("smg_engine_waiting_requests", {})
    held = 0.0
    for w, win in window.items():
        if role(w) not in (None, "decode") or win <= 0:
            continue
        # dispatched or held for this decode worker, beyond its window and beyond its own waiting queue
        held += max(0.0, active.get(w, 0.0) - win - waiting.get(w, 0.0))
    return round(held)


def _router_hist(cur: Samples, old: Samples, base: str) -> dict[str, float]:
    h = hist_delta(cur, old, base, lambda _w: True)
    if h is None or h.count <= 0:
        return {}
    return {"count": h.count, "mean": h.mean or 0.0, "p50": h.quantile(0.5), "p90": h.quantile(0.9),
            "p99": h.quantile(0.99)}


def _sub(cur: Samples, old: Samples, name: str) -> float:
    """Counter delta summed over every series (a series that went backwards counts from 0)."""
    c, o = cur.get(name, {}), old.get(name, {})
    return sum(v - o[w] if w in o and v >= o[w] else 0.0 for w, v in c.items())


def _stats_fields() -> set[str]:
    return {f.name for f in fields(WorkerStats)}


_WS_FIELDS = _stats_fields()


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
    hist_cur = {k: engine[k] for base in HISTOGRAMS for k in _hist_keys(engine, base)}
    router = router or {}
    router_cur = {k: router[k] for base in ROUTER_HISTOGRAMS for k in _hist_keys(router, base)}
    for name in (R_WAITS, R_SHEDS, R_SHED_STAGE):
        if name in router:
            router_cur[name] = router[name]
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
    if "smg_worker_requests_active" in router:
        # each PD request is active on one prefill and one decode worker: count decode side
        act = router["smg_worker_requests_active"]
        dec_act = [v for w, v in act.items() if role(w) == "decode"]
        in_flight = round(sum(dec_act)) if dec_act else round(sum(act.values()))
    gate_waiting = _gate_waiting(router, role)

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
    extra: dict[str, object] = {}
    if "decode_gate_waiting" in _WS_FIELDS:  # the core's field (controller/core/control/types.py)
        extra["decode_gate_waiting"] = gate_waiting
    stats = WorkerStats(
        in_flight=in_flight,
        prefill_queued=int(sum(v for w, v in queued.items() if role(w) == "prefill")) if queued else None,
        decode_queued=int(sum(v for w, v in queued.items() if dec(w))) if queued else None,
        decode_running_mean=(sum(dec_running) / len(dec_running)) if dec_running else None,
        decode_tpot_ms_mean=tpot_s * 1000.0 if tpot_s is not None else None,
        **extra,  # type: ignore[arg-type]
    )
    gate: dict[str, float] = {}
    router_latency: dict[str, dict[str, float]] = {}
    if prev.t is not None:
        for key, name in (("waits", R_WAITS), ("sheds", R_SHEDS)):
            if name in router_cur:
                gate[key] = _sub(router_cur, prev.router, name)
        if R_SHED_STAGE in router_cur:  # the gate's own sheds counter is preferred when both are exported
            gate.setdefault("sheds", _sub(router_cur, prev.router, R_SHED_STAGE))
        for key, base in (("pd_ttft_s", R_TTFT), ("pd_prefill_s", R_PREFILL)):
            h = _router_hist(router_cur, prev.router, base)
            if h:
                router_latency[key] = h
    events = np.zeros(0, dtype=EVENT_DTYPE)
    source = ""
    if synthesize and dt is not None and dt > 0:
        events, source = _synthesize(prev, deltas, hist_cur, router_cur, dsum, dec, pre, tpot_s, dt)
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
    for w, win in router.get("smg_pd_admission_window", {}).items():
        per_worker.setdefault(w, {})["gate_window"] = win
    res = ScrapeResult(stats, events, per_worker, gate_waiting, gate, router_latency, source)
    return res, ScrapeState(now, cur, hist_cur, router_cur)


def _synthesize(
    prev: ScrapeState, deltas: dict[str, dict[str, float]], hist_cur: Samples, router_cur: Samples,
    dsum: Callable[[str, Callable[[str], bool]], float], dec: Callable[[str], bool], pre: Callable[[str], bool],
    tpot_s: float | None, dt: float,
) -> tuple[np.ndarray, str]:
    """Records of the requests completed in (prev.t, prev.t + dt]: lengths from the token histograms if exported."""
    h_gen = hist_delta(hist_cur, prev.hist, H_GENERATION, dec)
    h_in = hist_delta(hist_cur, prev.hist, H_PROMPT, pre)
    h_unc = hist_delta(hist_cur, prev.hist, H_UNCACHED, pre)
    have_hist = h_gen is not None and h_in is not None and h_gen.count > 0 and h_in.count > 0
    n_req = h_gen.count if have_hist and h_gen is not None else dsum("requests", dec)
    n = int(min(round(n_req), MAX_SYNTH_PER_SCRAPE))
    if n <= 0:
        return np.zeros(0, dtype=EVENT_DTYPE), ""
    ttft_n = dsum("ttft_count", lambda _w: True)
    ttft_mean = dsum("ttft_sum", lambda _w: True) / ttft_n if ttft_n > 0 else math.nan
    tpot = tpot_s if tpot_s is not None else math.nan
    events = np.zeros(n, dtype=EVENT_DTYPE)
    if have_hist and h_in is not None and h_gen is not None:
        inp = np.maximum(np.rint(h_in.sample(n)), 1.0)
        if h_unc is not None and h_unc.count > 0:
            # rank-paired with the inputs (longer prompts leave more to compute): cached = input - uncached
            unc = np.minimum(np.rint(h_unc.sample(n)), inp)
        else:
            frac = 1.0 - min(dsum("cached", pre) / max(dsum("prompt", pre), 1.0), 1.0)
            unc = np.rint(inp * frac)
        out = np.maximum(np.rint(h_gen.sample(n)), 1.0)
        # outputs are independent of inputs in what histograms tell: a fixed-seed shuffle pairs them
        out = np.random.default_rng(n).permutation(out)
        h_tt = hist_delta(hist_cur, prev.hist, H_TTFT, dec)
        if h_tt is None or h_tt.count <= 0:
            h_tt = hist_delta(router_cur, prev.router, R_TTFT, lambda _w: True)
        ttft = h_tt.sample(n) if h_tt is not None and h_tt.count > 0 else np.full(n, ttft_mean)
        source = "token_histograms"
    else:
        m_in = dsum("prompt", pre) / n
        inp = np.full(n, round(m_in), dtype=np.float64)
        unc = np.full(n, round(m_in - min(dsum("cached", pre) / n, m_in)), dtype=np.float64)
        out = np.full(n, round(dsum("generation", dec) / n), dtype=np.float64)
        ttft = np.full(n, ttft_mean)
        source = "counter_means"
    ttft_f = np.where(np.isnan(ttft), 0.0, ttft)
    tpot_f = 0.0 if math.isnan(tpot) else tpot
    e2e = ttft_f + tpot_f * np.maximum(out - 1, 0)
    # completions spread evenly over the interval; arrival = completion - latency
    assert prev.t is not None
    done = prev.t + dt * (np.arange(n) + 1) / n
    events["arrival_s"] = done - e2e
    events["input_tokens"] = inp
    events["cached_tokens"] = inp - unc
    events["output_tokens"] = out
    events["ttft_s"] = ttft
    events["tpot_s"] = tpot
    events["e2e_s"] = e2e
    events["status"] = 200
    events["flags"] = FLAG_SYNTHETIC
    return events, source


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
