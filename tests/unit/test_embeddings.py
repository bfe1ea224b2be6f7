"""/v1/embeddings through the gateway (a direct-HTTP stand-in answers like vLLM; the real vLLM CPU server with the
project's tiny embedding model is tests/e2e/test_gateway_e2e_api_surface.py): the official client's calls,
metering, limits, and which models may be asked."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator, Iterator

import openai
import pytest
import yaml
from litestar.testing import AsyncTestClient

from analytics.store import UsageStore
from blocks.registry import ClusterSpec, ModelSpec, RateLimits, Registry
from core.settings import Settings
from first.gateway import create_gateway
from serving.auth import KeyStore
from serving.protocol import EmbeddingRequest, token_estimate
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess


@pytest.fixture(scope="module")
def sim() -> Iterator[OpenAISimulatorDouble]:
    with OpenAISimulatorDouble(latency_s=0.0, capacity=16, name="embed-sim") as s:
        yield s


def _registry(sim: OpenAISimulatorDouble) -> Registry:
    c = ClusterSpec(name="c", transport="http", base_url=sim.base_url)
    return Registry(clusters={"c": c}, models={
        "emb": ModelSpec(name="emb", clusters=["c"], path="-", kind="embed", aliases=["text-embedding-3-small"]),
        "chat": ModelSpec(name="chat", clusters=["c"], path="-"),
        "emb-tpm": ModelSpec(name="emb-tpm", clusters=["c"], path="-", kind="embed", limits=RateLimits(tpm=50)),
    })  # fmt: skip


@pytest.fixture
async def client(settings: Settings, sim) -> AsyncIterator[tuple[AsyncTestClient, dict[str, str]]]:
    key = KeyStore(settings.keys_db).create("alice")[0]
    async with AsyncTestClient(app=create_gateway(settings, _registry(sim))) as c:
        yield c, {"Authorization": f"Bearer {key}"}


async def test_string_list_and_token_id_inputs(client) -> None:
    c, h = client
    for given, n in (("hello world", 1), (["a b", "c"], 2), ([1, 2, 3], 1), ([[1, 2], [3]], 2)):
        r = await c.post("/v1/embeddings", json={"model": "emb", "input": given}, headers=h)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["object"] == "list" and doc["model"] == "emb" and len(doc["data"]) == n
        assert all(len(d["embedding"]) == 8 for d in doc["data"]) and doc["usage"]["prompt_tokens"] > 0


async def test_dimensions_and_base64_pass_through(client) -> None:
    c, h = client
    r = await c.post("/v1/embeddings", json={"model": "emb", "input": "x", "dimensions": 4,
                                             "encoding_format": "base64"}, headers=h)  # fmt: skip
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(struct.unpack("<4f", raw)) == 4


async def test_bad_inputs_and_the_wrong_kind_of_model_are_400(client) -> None:
    c, h = client
    for body in ({"model": "emb", "input": ""}, {"model": "emb", "input": []}, {"model": "emb", "input": ["a", ""]},
                 {"model": "emb", "input": {"x": 1}}, {"model": "emb", "input": "x", "encoding_format": "hex"},
                 {"model": "emb", "input": "x", "dimensions": 0}, {"model": "emb"}):  # fmt: skip
        r = await c.post("/v1/embeddings", json=body, headers=h)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (body, r.text)
    r = await c.post("/v1/embeddings", json={"model": "chat", "input": "x"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_endpoint"
    assert "/v1/chat/completions" in r.json()["error"]["message"]
    r = await c.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_a_tpm_limit_counts_the_inputs(client) -> None:
    c, h = client
    ok = await c.post("/v1/embeddings", json={"model": "emb-tpm", "input": "x" * 30}, headers=h)
    assert ok.status_code == 200
    over = await c.post("/v1/embeddings", json={"model": "emb-tpm", "input": "y" * 60}, headers=h)
    assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error"


def test_the_estimate_counts_every_input() -> None:
    assert token_estimate(EmbeddingRequest(model="m", input="héllo"), 512) == len("héllo".encode()) + 2
    assert token_estimate(EmbeddingRequest(model="m", input=[5, 6, 7]), 512) == 3
    assert token_estimate(EmbeddingRequest(model="m", input=[[5, 6], [7]]), 512) == 3
    assert token_estimate(EmbeddingRequest(model="m", input=["ab", "c"]), 512) == (2 + 2) + (1 + 2)


def test_the_official_client_and_the_usage_rows(tmp_path, sim) -> None:
    """client.embeddings.create through a real gateway process; each call has its usage row (endpoint
    `embeddings`, prompt tokens)."""
    home = tmp_path / "home"
    registry = tmp_path / "registry.yaml"
    reg = _registry(sim)
    registry.write_text(yaml.safe_dump({
        "clusters": [c.model_dump(exclude_defaults=True) for c in reg.clusters.values()],
        "models": [m.model_dump(exclude_defaults=True) for m in reg.models.values()],
    }))  # fmt: skip
    key = KeyStore(Settings(home=home).keys_db).create("alice")[0]
    gw = GatewayProcess(home, registry).start()
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
        one = client.embeddings.create(model="text-embedding-3-small", input="The quick brown fox")
        assert len(one.data) == 1 and len(one.data[0].embedding) == 8 and one.usage.prompt_tokens == 4
        many = client.embeddings.create(model="emb", input=["a", "b c"], dimensions=16)
        assert [d.index for d in many.data] == [0, 1] and len(many.data[1].embedding) == 16
        b64 = client.embeddings.create(model="emb", input="x", encoding_format="base64")  # the client decodes it
        assert b64.data[0].embedding
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="chat", input="x")
    finally:
        gw.stop()
    store = UsageStore(Settings(home=home).usage_db)
    store.ingest(Settings(home=home).spool_dir)
    rows = store.query("SELECT endpoint, model, status, prompt_tokens FROM usage ORDER BY ts").rows()
    assert [r[:3] for r in rows] == [("embeddings", "emb", 200)] * 3 + [("embeddings", "chat", 400)]
    assert rows[0][3] == 4
