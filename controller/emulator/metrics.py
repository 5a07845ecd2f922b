"""The `sglang:*` Prometheus metrics an SGLang worker exports, with SGLang's names, types and buckets.

Each worker has its own registry (several emulated workers may live in one
process in tests). Counters end in `_total` in the exposition, as SGLang's do.
Which side counts what follows SGLang in PD mode: both count requests and
prompt tokens; the prefill side counts cached tokens (it ran the radix
cache); the decode side counts generated tokens and observes TTFT,
inter-token latency and end-to-end latency as the client sees them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# SGLang's default buckets (python/sglang/srt/metrics/collector.py)
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0)
ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080,
    0.100, 0.200, 0.300, 0.400, 0.500, 0.600, 0.700, 0.800, 0.900, 1.0, 2.0, 4.0, 6.0, 8.0,
)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0, 800.0)
# SGLang's default token-length buckets (`--prompt-tokens-buckets` / `--generation-tokens-buckets` unset): the
# prompt, uncached-prompt and generation histograms of `--collect-tokens-histogram` all use them
TOKEN_BUCKETS = (
    100, 300, 500, 700, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 12500, 15000, 17500,
    20000, 22500, 25000, 27500, 30000, 35000, 40000, 60000, 80000, 100000, 200000, 300000, 400000, 600000,
    800000, 1000000, 1100000,
)


class WorkerMetrics:
    def __init__(self, model_name: str, collect_tokens_histogram: bool = False) -> None:
        self.registry = CollectorRegistry()
        r, lab = self.registry, ["model_name"]
        self.labels = {"model_name": model_name}
        self.prompt_tokens = Counter("sglang:prompt_tokens", "Number of prefill tokens processed.", lab, registry=r)
        self.generation_tokens = Counter("sglang:generation_tokens", "Number of generation tokens processed.", lab, registry=r)
        self.cached_tokens = Counter("sglang:cached_tokens", "Number of cached prompt tokens.", lab, registry=r)
        self.num_requests = Counter("sglang:num_requests", "Number of requests processed.", lab, registry=r)
        self.num_running = Gauge("sglang:num_running_reqs", "The number of running requests.", lab, registry=r)
        self.num_queue = Gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", lab, registry=r)
        self.transfer_queue = Gauge(
            "sglang:num_decode_transfer_queue_reqs", "Decode requests waiting for their KV cache from prefill.",
            lab, registry=r,
        )
        self.num_used_tokens = Gauge("sglang:num_used_tokens", "The number of used tokens.", lab, registry=r)
        self.token_usage = Gauge("sglang:token_usage", "The token usage (fraction of KV cache).", lab, registry=r)
        self.gen_throughput = Gauge("sglang:gen_throughput", "The generation throughput (token/s).", lab, registry=r)
        self.cache_hit_rate = Gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", lab, registry=r)
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", lab,
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", lab,
            buckets=ITL_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds", lab,
            buckets=E2E_BUCKETS, registry=r,
        )
        # `--collect-tokens-histogram`: per-request length distributions, observed when a request finishes
        # (SGLang's observe_one_finished_request): prompt, prompt minus cached, generated
        self.h_prompt = self.h_uncached = self.h_generation = None
        if collect_tokens_histogram:
            self.h_prompt = Histogram("sglang:prompt_tokens_histogram", "Histogram of prompt token length.", lab,
                                      buckets=TOKEN_BUCKETS, registry=r).labels(**self.labels)
            self.h_uncached = Histogram(
                "sglang:uncached_prompt_tokens_histogram", "Histogram of uncached (compute) prompt token length.",
                lab, buckets=TOKEN_BUCKETS, registry=r).labels(**self.labels)
            self.h_generation = Histogram(
                "sglang:generation_tokens_histogram", "Histogram of generation token length.", lab,
                buckets=TOKEN_BUCKETS, registry=r).labels(**self.labels)
        # children bound once: per-token observations stay cheap
        self.c_prompt = self.prompt_tokens.labels(**self.labels)
        self.c_gen = self.generation_tokens.labels(**self.labels)
        self.c_cached = self.cached_tokens.labels(**self.labels)
        self.c_req = self.num_requests.labels(**self.labels)
        self.h_ttft = self.ttft.labels(**self.labels)
        self.h_itl = self.itl.labels(**self.labels)
        self.h_e2e = self.e2e.labels(**self.labels)
        self._prompt_seen = 0.0
        self._cached_seen = 0.0

    def count_prompt(self, prompt: int, cached: int) -> None:
        self.c_prompt.inc(prompt)
        self.c_cached.inc(cached)
        self._prompt_seen += prompt
        self._cached_seen += cached

    def finished(self, prompt: int, cached: int, generated: int) -> None:
        """One request done: the token histograms (when collected)."""
        if self.h_prompt is not None and self.h_uncached is not None and self.h_generation is not None:
            self.h_prompt.observe(float(prompt))
            self.h_uncached.observe(float(max(prompt - cached, 0)))
            self.h_generation.observe(float(generated))

    def set_gauges(self, running: int, queued: int, used_tokens: float, capacity_tokens: float, gen_tps: float) -> None:
        self.num_running.labels(**self.labels).set(running)
        self.num_queue.labels(**self.labels).set(queued)
        self.num_used_tokens.labels(**self.labels).set(used_tokens)
        self.token_usage.labels(**self.labels).set(used_tokens / capacity_tokens if capacity_tokens > 0 else 0.0)
        self.gen_throughput.labels(**self.labels).set(gen_tps)
        rate = self._cached_seen / self._prompt_seen if self._prompt_seen > 0 else 0.0
        self.cache_hit_rate.labels(**self.labels).set(rate)

    def hit_rate(self) -> float:
        return self._cached_seen / self._prompt_seen if self._prompt_seen > 0 else 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
