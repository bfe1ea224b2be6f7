"""OpenAISimulatorDouble (tests/fakes/openai_simulator.py) answers like vLLM, bounds its concurrency, fails on
demand, and the real gateway serves through it as a direct-HTTP cluster."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator

import httpx
import pytest
from litestar.testing import TestClient

from blocks.registry import ClusterSpec, ModelSpec, Registry
from first.gateway import create_gateway
from serving.auth import KeyStore
from tests.fakes.openai_simulator import OpenAISimulatorDouble, text_tokens
from tests.live_gateway import gateway_settings

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


@pytest.fixture
def sim() -> Iterator[OpenAISimulatorDouble]:
    with OpenAISimulatorDouble(latency_s=0.01, capacity=4, name="sim-a") as s:
        yield s


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]


def test_non_streaming_chat_and_completion(sim):
    r = httpx.post(sim.base_url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    doc = r.json()
    assert doc["object"] == "chat.completion" and doc["model"] == "m" and doc["system_fingerprint"] == "sim-a"
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": " the quick brown fox jumps"}
    assert doc["choices"][0]["finish_reason"] == "length"
    usage = doc["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    r = httpx.post(sim.base_url + "/v1/completions", json={"model": "other", "prompt": "one two three"})
    doc = r.json()
    assert r.status_code == 200 and doc["object"] == "text_completion" and doc["model"] == "other"
    assert doc["choices"][0]["text"] == "".join(text_tokens(16))  # no max_tokens: 16
    assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}
    assert (sim.requests, sim.served, sim.active) == (2, 2, 0)
    assert httpx.get(sim.base_url + "/health").status_code == 200
    assert httpx.get(sim.base_url + "/v1/models").json()["data"][0]["id"] == "sim-a"


def test_streaming_chunks_usage_and_done(sim):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(sim.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = [c for c in chunks if c["choices"]]
    assert len(content) == 5 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == " the quick brown fox jumps"
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 4 + ["length"]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5

    r = httpx.post(sim.base_url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3, "stream": 1})
    events = sse_events(r.text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and len(chunks) == 3 and all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == " the quick brown"
    assert sim.served == 2


async def test_capacity_bounds_concurrency_and_queues_the_rest():
    n, capacity, latency = 20, 4, 0.05
    with OpenAISimulatorDouble(latency_s=latency, capacity=capacity) as sim:
        async with httpx.AsyncClient(base_url=sim.base_url, timeout=30) as client:
            t0 = time.perf_counter()
            answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(n)))
            elapsed = time.perf_counter() - t0
    assert [r.status_code for r in answers] == [200] * n
    assert sim.max_active_seen == capacity  # all slots were used, never more
    assert (sim.requests, sim.served, sim.active) == (n, n, 0)
    assert elapsed >= math.ceil(n / capacity) * latency * 0.9  # the rest waited their turn


def test_fail_modes(sim):
    sim.fail_mode = "500"
    r = httpx.post(sim.base_url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 500 and r.json()["error"]["message"] == "simulated failure"

    sim.fail_mode = "close"
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(sim.base_url + "/v1/chat/completions", json=CHAT)

    sim.fail_mode = "hang"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(sim.base_url + "/v1/completions", json={"model": "m", "prompt": "x"}, timeout=0.3)

    sim.fail_mode = None
    sim.healthy = False
    assert httpx.get(sim.base_url + "/health").status_code == 503
    sim.healthy = True
    assert httpx.get(sim.base_url + "/health").status_code == 200
    assert httpx.post(sim.base_url + "/v1/chat/completions", json=CHAT).status_code == 200
    assert (sim.requests, sim.served) == (4, 1)


def test_the_gateway_serves_through_it(sim, tmp_path):
    settings = gateway_settings(tmp_path)
    # DirectHTTPBackend calls base_url + "/v1/chat/completions" and base_url + "/health": no /v1 here.
    registry = Registry(
        clusters={"sim": ClusterSpec(name="sim", transport="http", base_url=sim.base_url)},
        models={"m": ModelSpec(name="m", clusters=["sim"], path="-", served_name="served-m")},
    )
    key = KeyStore(settings.keys_db).create("alice")[0]
    with TestClient(create_gateway(settings, registry)) as client:
        auth = {"Authorization": f"Bearer {key}"}
        r = client.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["choices"][0]["message"]["content"] == " the quick brown fox jumps"
        assert doc["system_fingerprint"] == "sim-a" and doc["model"] == "m" and doc["usage"]["completion_tokens"] == 5

        r = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth)
        events = sse_events(r.text)
        assert r.status_code == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " the quick brown fox jumps"
        assert all("usage" not in c or c["usage"] is None for c in chunks)  # the caller did not ask for usage
    assert sim.served == 2
