"""The real PD router (smg by default, sglang-router 0.3.2 with PD_ROUTER=sglang-router) registers emulated
workers and serves /generate and both OpenAI endpoints, by served model name."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from harness.fleet import EmulatedFleet

pytestmark = [pytest.mark.e2e, pytest.mark.router_compat]


@pytest.fixture(scope="module")
def fleet():
    with EmulatedFleet("llama2-70b-h100-tp8", n_prefill=2, n_decode=1, time_scale=0.05) as f:
        yield f


async def test_router_lists_the_emulated_workers_with_their_roles(fleet):
    async with aiohttp.ClientSession() as s:
        body = await (await s.get(f"{fleet.router_url}/workers")).json()
    got = {(w["url"], w["worker_type"], w.get("bootstrap_port")) for w in body["workers"]}
    want = {(w.url, "prefill", w.bootstrap_port) for w in fleet.prefill} | {(w.url, "decode", None) for w in fleet.decode}
    assert got == want


async def test_generate_through_router_streaming_and_not(fleet):
    async with aiohttp.ClientSession() as s:
        body = {"model": fleet.model, "text": "the quick brown fox jumps",
                "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}
        r = await s.post(f"{fleet.router_url}/generate", json=body)
        assert r.status == 200
        out = await r.json()
        assert out["meta_info"]["prompt_tokens"] == 5 and out["meta_info"]["completion_tokens"] == 6
        r = await s.post(f"{fleet.router_url}/generate", json=dict(body, stream=True))
        chunks = [line for line in (await r.text()).splitlines() if line.startswith("data: {")]
        assert len(chunks) == 6


async def test_openai_client_chat_and_completions(fleet):
    client = AsyncOpenAI(base_url=f"{fleet.router_url}/v1", api_key="none")
    try:
        chat = await client.chat.completions.create(
            model=fleet.model, messages=[{"role": "user", "content": "hello there"}], max_tokens=4,
            extra_body={"ignore_eos": True},
        )
        assert chat.usage.completion_tokens == 4 and len(chat.choices[0].message.content.split()) == 4
        assert chat.choices[0].finish_reason == "length"
        comp = await client.completions.create(model=fleet.model, prompt="one two three", max_tokens=3,
                                               extra_body={"ignore_eos": True})
        assert comp.usage.prompt_tokens == 3 and comp.usage.completion_tokens == 3
        stream = await client.chat.completions.create(
            model=fleet.model, messages=[{"role": "user", "content": "stream me"}], max_tokens=5, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        pieces, usage = [], None
        async for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                pieces.append(ch.choices[0].delta.content)
            if ch.usage is not None:
                usage = ch.usage
        assert len(pieces) == 5 and usage is not None and usage.completion_tokens == 5
        cstream = await client.completions.create(model=fleet.model, prompt="a b", max_tokens=2, stream=True,
                                                  extra_body={"ignore_eos": True})
        texts = [c.choices[0].text async for c in cstream if c.choices]
        assert len(texts) == 2
    finally:
        await client.close()


async def test_concurrent_requests_and_engine_metrics(fleet):
    async with aiohttp.ClientSession() as s:
        body = {"model": fleet.model, "text": "w " * 200, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
        rs = await asyncio.gather(*(s.post(f"{fleet.router_url}/generate", json=body) for _ in range(12)))
        assert [r.status for r in rs] == [200] * 12
        text = await (await s.get(f"{fleet.router_url}/engine_metrics")).text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    # the router re-exports the workers' metrics with a worker label (smg keeps `sglang:`, 0.3.2 writes `sglang_`)
    gen = fams.get("sglang:generation_tokens") or fams["sglang_generation_tokens"]
    per = {x.labels["worker_addr"]: x.value for x in gen.samples if x.name.endswith("_total")}
    assert per[fleet.decode[0].url] >= 12 * 8


async def test_spare_worker_starts_unregistered_and_stops(fleet):
    w = await fleet.start_worker("decode")
    try:
        async with aiohttp.ClientSession() as s:
            assert (await s.get(f"{w.url}/health")).status == 200
            info = await (await s.get(f"{w.url}/server_info")).json()
            assert info["disaggregation_mode"] == "decode" and info["disaggregation_bootstrap_port"] == w.bootstrap_port
            listed = await (await s.get(f"{fleet.router_url}/workers")).json()
            assert w.url not in {x["url"] for x in listed["workers"]}
    finally:
        await fleet.stop_worker(w)
    assert w.proc.poll() is not None and w not in fleet.extra
