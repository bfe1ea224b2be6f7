"""OpenAI's Responses API and Anthropic's Messages API through a real gateway process, with the official clients,
on both paths a request can take: a direct-HTTP cluster, and a local cluster whose streams come back through the
cluster function and the relay. The model server is the stand-in (tests/fakes/openai_simulator.py answers these
routes as vLLM does); tests/e2e/test_gateway_e2e_api_surface.py drives the real vLLM CPU server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import yaml

from analytics.store import UsageStore
from core.settings import Settings
from serving.auth import KeyStore
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess, stand_in_instance


class Stack:
    def __init__(self, gw: GatewayProcess, key: str, home: Path) -> None:
        self.gw, self.key, self.home = gw, key, home

    def rows(self) -> list[tuple]:
        store = UsageStore(Settings(home=self.home).usage_db)
        store.ingest(Settings(home=self.home).spool_dir)
        return store.query("SELECT endpoint, model, cluster, status, prompt_tokens, completion_tokens FROM usage "
                           "ORDER BY ts").rows()  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp("api-surface")) / "home"
    with (
        OpenAISimulatorDouble(latency_s=0.05, capacity=32, name="sim") as sim,
        stand_in_instance(home, "relayed", "m-relayed", sim.base_url, sim.port),
    ):
        registry = home / "registry.yaml"
        registry.write_text(yaml.safe_dump({
            "clusters": [{"name": "direct", "transport": "http", "base_url": sim.base_url},
                         {"name": "relayed", "transport": "local"}],
            "models": [{"name": "m", "clusters": ["direct"], "path": "-"},
                       {"name": "m-relayed", "clusters": ["relayed"], "path": "-", "port": sim.port},
                       {"name": "emb", "clusters": ["direct"], "path": "-", "kind": "embed"}],
        }))  # fmt: skip
        key = KeyStore(Settings(home=home).keys_db).create("alice")[0]
        gw = GatewayProcess(home, registry).start()
        try:
            yield Stack(gw, key, home)
        finally:
            gw.stop()


@pytest.mark.parametrize("model", ["m", "m-relayed"])
def test_responses_with_the_openai_client(stack, model) -> None:
    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key=stack.key, max_retries=0)
    r = client.responses.create(model=model, input="Say hi", instructions="Be brief.", max_output_tokens=6)
    assert r.object == "response" and r.model == model and r.status == "completed"
    assert r.output_text and r.usage.output_tokens == 6 and r.usage.input_tokens > 0
    events = list(client.responses.create(model=model, input=[{"role": "user", "content": "Hi"}],
                                          max_output_tokens=5, stream=True))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 5
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.model == model and events[-1].response.usage.output_tokens == 5


def test_responses_the_gateway_does_not_offer_are_400(stack) -> None:
    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key=stack.key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input="more", previous_response_id="resp_123")
    assert e.value.body["code"] == "unsupported_parameter" and "input" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="emb", input="x")
    assert e.value.body["code"] == "unsupported_endpoint"


@pytest.mark.parametrize("model", ["m", "m-relayed"])
def test_messages_with_the_anthropic_client(stack, model) -> None:
    client = anthropic.Anthropic(base_url=stack.gw.url, api_key=stack.key, max_retries=0)
    msg = client.messages.create(model=model, max_tokens=7, messages=[{"role": "user", "content": "Hello"}],
                                 system="Be brief.")  # fmt: skip
    assert msg.type == "message" and msg.model == model and msg.content[0].text
    assert msg.usage.output_tokens == 7 and msg.usage.input_tokens > 0
    with client.messages.stream(model=model, max_tokens=5, messages=[{"role": "user", "content": "Hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.model == model and final.usage.output_tokens == 5


def test_messages_errors_are_in_anthropics_shape(stack) -> None:
    url = stack.gw.url + "/v1/messages"
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    cases = [
        (httpx.post(url, json=body, headers={"x-api-key": "wrong"}), 401, "authentication_error"),
        (httpx.post(url, json={**body, "max_tokens": None}, headers={"x-api-key": stack.key}), 400,
         "invalid_request_error"),
        (httpx.post(url, json={**body, "model": "nope"}, headers={"x-api-key": stack.key}), 404, "not_found_error"),
        (httpx.post(url, content=b"{", headers={"x-api-key": stack.key, "content-type": "application/json"}), 400,
         "invalid_request_error"),
    ]  # fmt: skip
    for r, status, kind in cases:
        assert r.status_code == status, r.text
        doc = r.json()
        assert doc["type"] == "error" and doc["error"]["type"] == kind and doc["error"]["message"], doc
        assert r.headers["x-request-id"]
    client = anthropic.Anthropic(base_url=stack.gw.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {stack.key}", "anthropic-version": "2023-06-01"})
    assert ok.status_code == 200  # a bearer token works too


def test_every_call_has_its_usage_row(stack) -> None:
    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key=stack.key, max_retries=0)
    client.responses.create(model="m", input="count me", max_output_tokens=3)
    anthropic.Anthropic(base_url=stack.gw.url, api_key=stack.key, max_retries=0).messages.create(
        model="m", max_tokens=4, messages=[{"role": "user", "content": "count me"}]
    )
    stack.gw.stop()  # the spool's open segment is closed and ingestible
    stack.gw.start()
    rows = stack.rows()
    mine = [r for r in rows if r[3] == 200 and r[0] in ("responses", "messages")]
    assert ("responses", "m", "direct", 200) in {r[:4] for r in mine}
    assert ("messages", "m", "direct", 200) in {r[:4] for r in mine}
    assert ("responses", "m-relayed", "relayed", 200) in {r[:4] for r in mine}
    assert all(r[4] > 0 and r[5] > 0 for r in mine), mine  # input and output tokens, from each API's usage
    assert not [r for r in rows if r[3] == 401]  # the wrong key of an earlier test: nobody's usage (metrics only)
