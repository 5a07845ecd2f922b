"""The emulated SGLang worker in-process: request validation, the PD handshake, role switch, metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.emulator.engine import PrefixCache
from controller.emulator.server import EmulatedWorker, WorkerOptions
from controller.emulator.text import BadRequest, parse_request, tokenize
from controller.profiles import load_profile

PROFILE = load_profile("llama2-70b-h100-tp8")


@pytest.fixture
async def pair():
    """A prefill and a decode worker (role switch enabled), in this event loop, on free ports."""
    p = EmulatedWorker(PROFILE, WorkerOptions(role="prefill", bootstrap_port=0, time_scale=0.01,
                                              enable_pd_role_switch=True))
    d = EmulatedWorker(PROFILE, WorkerOptions(role="decode", bootstrap_port=0, time_scale=0.01,
                                              enable_pd_role_switch=True))
    await p.start()
    await d.start()
    async with aiohttp.ClientSession() as s:
        yield p, d, s
    await d.stop()
    await p.stop()


def _pd(body: dict, p: EmulatedWorker, room: int) -> dict:
    return dict(body, bootstrap_host="127.0.0.1", bootstrap_port=p.bootstrap_port, bootstrap_room=room)


async def test_pd_generate_counts_tokens(pair):
    p, d, s = pair
    body = {"text": "one two three four five", "sampling_params": {"max_new_tokens": 7, "ignore_eos": True}}
    rp, rd = await asyncio.gather(s.post(f"{p.url}/generate", json=_pd(body, p, 1)),
                                  s.post(f"{d.url}/generate", json=_pd(body, p, 1)))
    assert rp.status == 200 and rd.status == 200
    out = await rd.json()
    assert out["meta_info"]["prompt_tokens"] == 5
    assert out["meta_info"]["completion_tokens"] == 7
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 7}
    assert len(out["text"].split()) == 7
    assert (await rp.json())["meta_info"]["completion_tokens"] == 1


async def test_decode_waits_for_its_room_and_role_switch_refused_while_busy(pair):
    p, d, s = pair
    body = {"prompt": "a b c", "max_tokens": 3, "ignore_eos": True}
    # the decode request waits for room 7's prefill, which has not been sent yet: the worker is busy
    pending = asyncio.ensure_future(s.post(f"{d.url}/v1/completions", json=_pd(body, p, 7)))
    while (await (await s.get(f"{d.url}/get_load")).json())[0]["num_reqs"] == 0:
        await asyncio.sleep(0.01)
    r = await s.post(f"{d.url}/pd_role_switch", json={"new_role": "prefill"})
    refused = await r.json()
    assert r.status == 400 and refused["success"] is False and "not idle" in refused["message"]
    assert refused["old_role"] == "decode"
    assert not pending.done()
    # waiting for its KV is SGLang's transfer queue, not the decode waiting queue (num_queue_reqs)
    fams = {f.name: f for f in text_string_to_metric_families(await (await s.get(f"{d.url}/metrics")).text())}
    assert fams["sglang:num_decode_transfer_queue_reqs"].samples[0].value == 1
    assert fams["sglang:num_queue_reqs"].samples[0].value == 0
    # now the prefill of room 7 runs; the decode finishes
    rp = await s.post(f"{p.url}/v1/completions", json=_pd(body, p, 7))
    assert rp.status == 200
    rd = await pending
    out = await rd.json()
    assert out["usage"]["completion_tokens"] == 3 and out["usage"]["prompt_tokens"] == 3
    # idle: same role is a no-op success, the other role is accepted and served
    same = await (await s.post(f"{d.url}/pd_role_switch", json={"new_role": "decode"})).json()
    assert same["success"] is True and same["new_role"] == "decode"
    ok = await (await s.post(f"{d.url}/pd_role_switch", json={"new_role": "prefill"})).json()
    assert ok == {"success": True, "message": ok["message"], "old_role": "decode", "new_role": "prefill"}
    info = await (await s.get(f"{d.url}/server_info")).json()
    assert info["disaggregation_mode"] == "prefill"
    # as a prefill worker it now answers a request with no bootstrap room on its own (one token)
    r = await s.post(f"{d.url}/generate", json={"text": "x y", "sampling_params": {"max_new_tokens": 4}})
    assert (await r.json())["meta_info"]["completion_tokens"] == 1


async def test_role_switch_disabled_is_refused():
    w = EmulatedWorker(PROFILE, WorkerOptions(role="decode"))
    await w.start()
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.post(f"{w.url}/pd_role_switch", json={"new_role": "prefill"})
            assert r.status == 400
            assert "enable-pd-role-switch" in (await r.json())["message"]
    finally:
        await w.stop()


@pytest.mark.parametrize(
    ("path", "payload", "needle"),
    [
        ("/generate", b"{not json", "not valid JSON"),
        ("/generate", b"", "empty"),
        ("/generate", b"[1, 2]", "JSON object"),
        ("/generate", b'{"sampling_params": {}}', "text / input_ids"),
        ("/generate", b'{"text": "a", "sampling_params": {"max_new_tokens": -1}}', "max_new_tokens=-1"),
        ("/generate", b'{"text": "a", "sampling_params": {"max_new_tokens": 10000000000}}', "context length"),
        ("/generate", b'{"input_ids": [1, "x"]}', "input_ids"),
        ("/v1/completions", b'{"model": "m"}', "prompt: required"),
        ("/v1/completions", b'{"prompt": "a", "max_tokens": "lots"}', "max_tokens='lots'"),
        ("/v1/completions", b'{"prompt": ["a", "b"]}', "batched"),
        ("/v1/chat/completions", b'{"messages": []}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "hi"}]}', "role"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
        ("/pd_role_switch", b'{"new_role": "mixed"}', "new_role='mixed'"),
    ],
)
async def test_bad_requests_get_400_with_a_message(pair, path, payload, needle):
    p, d, s = pair
    for w in (p, d):
        r = await s.post(f"{w.url}{path}", data=payload, headers={"Content-Type": "application/json"})
        assert r.status == 400, await r.text()
        assert needle in (await r.json())["error"]["message"]
        assert (await s.get(f"{w.url}/health")).status == 200


async def test_decode_without_bootstrap_info_is_a_client_error(pair):
    _, d, s = pair
    r = await s.post(f"{d.url}/generate", json={"text": "a b"})
    assert r.status == 400 and "bootstrap_room" in (await r.json())["error"]["message"]


async def test_metrics_are_sglang_names_and_types(pair):
    p, d, s = pair
    body = {"text": "w " * 40, "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}
    for room in (11, 12):  # the same prompt twice: the second hits the prefix cache
        await asyncio.gather(s.post(f"{p.url}/generate", json=_pd(body, p, room)),
                             s.post(f"{d.url}/generate", json=_pd(body, p, room)))
    fams = {f.name: f for f in text_string_to_metric_families(await (await s.get(f"{d.url}/metrics")).text())}
    assert fams["sglang:generation_tokens"].type == "counter"
    assert fams["sglang:time_to_first_token_seconds"].type == "histogram"
    assert fams["sglang:inter_token_latency_seconds"].type == "histogram"
    assert fams["sglang:num_running_reqs"].type == "gauge"
    gen = [x.value for x in fams["sglang:generation_tokens"].samples if x.name.endswith("_total")]
    assert gen == [10.0]
    itl = [x.value for x in fams["sglang:inter_token_latency_seconds"].samples if x.name.endswith("_count")]
    assert itl == [8.0]  # 4 inter-token gaps per request
    pf = {f.name: f for f in text_string_to_metric_families(await (await s.get(f"{p.url}/metrics")).text())}
    cached = [x.value for x in pf["sglang:cached_tokens"].samples if x.name.endswith("_total")]
    assert cached == [32.0]  # 40 tokens: two full 16-token blocks hit the second time
    assert [x.value for x in pf["sglang:cache_hit_rate"].samples] == [32.0 / 80.0]


def test_parse_request_lengths_and_eos():
    r = parse_request("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}, 1000)
    assert r.max_new_tokens == 9 and r.input_tokens == len(tokenize("user: hi\nassistant:"))
    r = parse_request("chat", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3,
                               "max_tokens": 9}, 1000)
    assert r.max_new_tokens == 3
    g = parse_request("generate", {"input_ids": list(range(100)), "sampling_params": {"max_new_tokens": 50}}, 1000)
    assert g.output_tokens(None) == (50, "length")
    n, why = g.output_tokens(10)  # EOS within [1, 20] comes before 50
    assert 1 <= n <= 20 and why == "stop"
    ig = parse_request("generate", {"input_ids": list(range(100)), "sampling_params": {"max_new_tokens": 50,
                                                                                       "ignore_eos": True}}, 1000)
    assert ig.output_tokens(10) == (50, "length")
    with pytest.raises(BadRequest, match="context length 1000"):
        parse_request("generate", {"input_ids": list(range(100)), "sampling_params": {"max_new_tokens": 901}}, 1000)


def test_tokenizer_is_deterministic_and_counts_words_and_punctuation():
    assert tokenize("Hello, world!") == tokenize("Hello, world!")
    assert len(tokenize("Hello, world!")) == 4  # Hello , world !
    assert len(tokenize("a  b\n c")) == 3


def test_prefix_cache_hits_shared_prefix_and_evicts_lru():
    c = PrefixCache(capacity_tokens=64, block=16)
    a = list(range(48))
    assert c.match_and_insert(a) == 0
    assert c.match_and_insert(a + [99] * 16) == 48
    assert c.match_and_insert([7, *a]) == 0  # a different first block: nothing shared
    # capacity 4 blocks: the oldest chain was evicted
    assert c.match_and_insert(a) < 48


# ---- what smg polls: /loads and /v1/loads; SGLang's token histograms ------------------------------------------

CORE_LOAD_FIELDS = {"timestamp", "dp_rank", "num_running_reqs", "num_waiting_reqs", "num_waiting_uncached_tokens",
                    "num_used_tokens", "num_total_tokens", "num_active_tokens", "max_total_num_tokens",
                    "max_running_requests", "token_usage", "gen_throughput", "cache_hit_rate", "utilization"}


async def test_v1_loads_has_sglangs_fields_and_sections(pair):
    p, d, s = pair
    body = await (await s.get(f"{d.url}/v1/loads?include=core,disagg,queues,memory")).json()
    assert {"timestamp", "version", "accelerator", "num_accelerators", "loads"} <= set(body)
    (load,) = body["loads"]
    assert set(load) >= CORE_LOAD_FIELDS
    assert load["max_running_requests"] == d.max_running  # the running window smg's decode gate uses
    assert load["disaggregation"]["mode"] == "decode" and "decode_transfer_queue_reqs" in load["disaggregation"]
    assert set(load["queues"]) == {"waiting", "grammar", "paused", "retracted", "prealloc_ready"}
    core = (await (await s.get(f"{p.url}/loads?include=core")).json())["loads"][0]
    assert set(core) == CORE_LOAD_FIELDS  # core only: no sections
    assert (await (await s.get(f"{p.url}/loads?model={p.model_name}")).json())["loads"][0]["dp_rank"] == 0
    r = await s.get(f"{p.url}/loads?model=not-served")
    assert r.status == 404 and "not-served" in (await r.json())["error"]["message"]
    r = await s.get(f"{p.url}/v1/loads?include=core,bogus")
    assert r.status == 400 and "bogus" in (await r.json())["error"]["message"]


async def test_waiting_uncached_tokens_count_the_prefill_queue():
    w = EmulatedWorker(PROFILE, WorkerOptions(role="prefill", bootstrap_port=0, time_scale=1.0))
    await w.start()
    try:
        async with aiohttp.ClientSession() as s:
            reqs = [asyncio.ensure_future(s.post(f"{w.url}/generate", json=_pd(
                {"text": " ".join(f"r{i}w{k}" for k in range(3000)), "sampling_params": {"max_new_tokens": 1}},
                w, 100 + i))) for i in range(3)]
            load = {}
            for _ in range(200):
                load = (await (await s.get(f"{w.url}/v1/loads")).json())["loads"][0]
                if load["num_waiting_reqs"] >= 2:
                    break
                await asyncio.sleep(0.01)
            # one prefill runs, two wait with all their tokens uncached (distinct prompts hit nothing)
            assert load["num_waiting_reqs"] == 2 and load["num_waiting_uncached_tokens"] == 2 * 3000
            for r in reqs:
                r.cancel()
            await asyncio.gather(*reqs, return_exceptions=True)
    finally:
        await w.stop()


async def test_token_histograms_only_with_collect_flag(pair):
    p, d, s = pair
    for w in (p, d):
        text = await (await s.get(f"{w.url}/metrics")).text()
        assert "sglang:prompt_tokens_histogram" not in text  # off by default, as in SGLang
    hp = EmulatedWorker(PROFILE, WorkerOptions(role="prefill", bootstrap_port=0, time_scale=0.01,
                                               collect_tokens_histogram=True))
    hd = EmulatedWorker(PROFILE, WorkerOptions(role="decode", time_scale=0.01, collect_tokens_histogram=True))
    await hp.start()
    await hd.start()
    try:
        for room, (n_in, n_out) in enumerate(((120, 5), (450, 9), (450, 2))):
            body = {"text": " ".join(f"t{room}x{i}" for i in range(n_in)),
                    "sampling_params": {"max_new_tokens": n_out, "ignore_eos": True}}
            await asyncio.gather(s.post(f"{hp.url}/generate", json=_pd(body, hp, 500 + room)),
                                 s.post(f"{hd.url}/generate", json=_pd(body, hp, 500 + room)))

        def hist(text: str, name: str) -> dict[str, float]:
            fam = next(f for f in text_string_to_metric_families(text) if f.name == name)
            return {(x.name.rsplit("_", 1)[1] + x.labels.get("le", "")): x.value for x in fam.samples}

        pt = await (await s.get(f"{hp.url}/metrics")).text()
        dt = await (await s.get(f"{hd.url}/metrics")).text()
        prompt = hist(pt, "sglang:prompt_tokens_histogram")
        assert prompt["count"] == 3 and prompt["sum"] == 120 + 450 + 450
        assert prompt["bucket100.0"] == 0 and prompt["bucket300.0"] == 1 and prompt["bucket500.0"] == 3
        assert hist(pt, "sglang:uncached_prompt_tokens_histogram")["sum"] == 120 + 450 + 450  # nothing cached
        gen = hist(dt, "sglang:generation_tokens_histogram")
        assert gen["count"] == 3 and gen["sum"] == 5 + 9 + 2  # the decode side counts what the client got
    finally:
        await hd.stop()
        await hp.stop()
