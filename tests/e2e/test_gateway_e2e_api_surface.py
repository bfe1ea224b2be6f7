"""The rest of the API surface end to end, with the official clients, on the real vLLM CPU server (runs after
test_gateway_e2e.py, on the same stack): embeddings from the project's tiny embedding model (warmed on first use),
the Responses API and Anthropic's Messages API (streaming and not), model details, structured output, sampling
parameters that must match vLLM's own answer, and an upstream OpenAI-compatible API whose key is a Prefect
Secret block."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time

import anthropic
import httpx
import openai
import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from analytics.store import UsageStore
from blocks.registry import ClusterSpec, ModelSpec, Registry
from tests.e2e.conftest import Stack
from tests.fakes.openai_simulator import OpenAISimulatorDouble

pytestmark = pytest.mark.e2e
MSG = [{"role": "user", "content": "Write a function that adds two numbers."}]


def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=stack.keys["alice"], max_retries=0, timeout=300)


def test_embeddings_from_the_tiny_embedding_model(stack: Stack) -> None:
    c = oai(stack)
    r = c.embeddings.create(model="tiny-embed", input=["The quick brown fox", "jumps over the lazy dog"])
    assert [d.index for d in r.data] == [0, 1] and r.model == "tiny-embed"
    assert all(len(d.embedding) == 128 for d in r.data) and r.usage.prompt_tokens > 0
    assert all(abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-3 for d in r.data)  # normalised
    assert r.data[0].embedding != r.data[1].embedding
    short = c.embeddings.create(model="tiny-embed", input="hello", dimensions=32)  # matryoshka
    assert len(short.data[0].embedding) == 32
    b64 = c.embeddings.create(model="tiny-embed", input="hello", encoding_format="base64")
    assert len(base64.b64decode(b64.data[0].embedding)) == 128 * 4  # float32s, as asked
    ids = c.embeddings.create(model="tiny-embed", input=[[5, 6, 7], [8, 9]])
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="tiny", input="x")
    assert e.value.body["code"] == "unsupported_endpoint"


def test_langchain_embeddings_and_chat_as_the_user_guide_shows(stack: Stack) -> None:
    """The user guide's LangChain lines, as written: no tokenizer download (``check_embedding_ctx_length=False``)."""
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    base, key = stack.base_url + "/v1", stack.keys["alice"]
    emb = OpenAIEmbeddings(model="tiny-embed", base_url=base, api_key=key, check_embedding_ctx_length=False)
    docs = emb.embed_documents(["first document", "second document"])
    assert len(docs) == 2 and all(len(v) == 128 for v in docs) and docs[0] != docs[1]
    assert len(emb.embed_query("a question")) == 128
    chat = ChatOpenAI(model="tiny", base_url=base, api_key=key, max_tokens=8, max_retries=0)
    reply = chat.invoke("Say hello")
    assert isinstance(reply.content, str) and reply.usage_metadata["output_tokens"] > 0
    pieces = list(chat.stream("Say hello"))
    assert len(pieces) > 1 and "".join(p.content for p in pieces)


def test_model_details(stack: Stack) -> None:
    c = oai(stack)
    c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)  # hot (if this file runs alone)
    tiny = c.models.retrieve("tiny")
    caps = tiny.model_extra["capabilities"]
    assert caps["endpoints"] == ["chat.completions", "completions", "responses", "messages"]
    assert caps["tools"] and caps["structured_output"] and caps["context_length"] == 512
    assert tiny.model_extra["state"]["local"] == "hot"
    assert c.models.retrieve("tiny-embed").model_extra["capabilities"]["endpoints"] == ["embeddings"]
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_responses_api(stack: Stack) -> None:
    c = oai(stack)
    r = c.responses.create(model="tiny", input="Say hi", instructions="Be brief.", max_output_tokens=6)
    assert r.object == "response" and r.model == "tiny" and r.usage.output_tokens == 6 and r.usage.input_tokens > 0
    events = list(c.responses.create(model="tiny", input=[{"role": "user", "content": "Hi"}], max_output_tokens=5,
                                     stream=True))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and events[-1].response.usage.output_tokens == 5
    assert events[-1].response.model == "tiny"


def test_anthropic_messages(stack: Stack) -> None:
    a = anthropic.Anthropic(base_url=stack.base_url, api_key=stack.keys["alice"], max_retries=0, timeout=300)
    m = a.messages.create(model="tiny", max_tokens=6, system="Be brief.",
                          messages=[{"role": "user", "content": "Hello"}])  # fmt: skip
    assert m.type == "message" and m.model == "tiny" and m.usage.output_tokens == 6 and m.usage.input_tokens > 0
    with a.messages.stream(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.usage.output_tokens == 5 and final.model == "tiny"
    with pytest.raises(anthropic.NotFoundError):
        a.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_structured_output_follows_the_json_schema(stack: Stack) -> None:
    """vLLM's guided decoding makes even random weights answer JSON that matches the schema."""
    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "n"],
              "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                             "n": {"type": "integer", "minimum": 0, "maximum": 9}}}  # fmt: skip
    r = oai(stack).chat.completions.create(
        model="tiny", messages=MSG, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}},
    )  # fmt: skip
    doc = json.loads(r.choices[0].message.content)
    assert doc["answer"] in ("yes", "no") and 0 <= doc["n"] <= 9 and set(doc) == {"answer", "n"}


SET_UNIT = {"type": "function", "function": {
    "name": "set_unit", "description": "Choose the unit of the forecast.", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["unit", "loud"],
                   "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                  "loud": {"type": "boolean"}}},
}}  # fmt: skip


def _valid_set_unit_arguments(arguments: str) -> bool:
    args = json.loads(arguments)
    unit_ok = args.get("unit") in ("celsius", "fahrenheit")
    return set(args) == {"unit", "loud"} and unit_ok and isinstance(args["loud"], bool)


def test_a_forced_tool_call_has_arguments_that_match_the_schema(stack: Stack) -> None:
    """``tool_choice`` names a function: vLLM's guided decoding (the hermes parser's structural tag, arguments pinned
    because the tool is ``strict``) makes even random weights call it with schema-valid arguments, through the
    gateway, whole and streamed."""
    c = oai(stack)
    forced = {"type": "function", "function": {"name": "set_unit"}}
    r = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Forecast for Chicago?"}], tools=[SET_UNIT],
        tool_choice=forced, max_tokens=64, temperature=0,
    )  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "set_unit" and call.id
    assert _valid_set_unit_arguments(call.function.arguments)
    assert r.choices[0].finish_reason in ("stop", "tool_calls")

    names, arguments, ids = [], "", set()
    stream = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Forecast for Chicago?"}], tools=[SET_UNIT],
        tool_choice=forced, max_tokens=64, temperature=0, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.id:
                    ids.add(delta.id)
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
                arguments += (delta.function.arguments or "") if delta.function else ""
    assert names == ["set_unit"] and len(ids) == 1
    assert json.loads(arguments) == json.loads(call.function.arguments)  # the same greedy call, in pieces
    assert usage is not None and usage.completion_tokens > 0


def test_sampling_parameters_give_vllms_own_answer(stack: Stack) -> None:
    """n, stop, seed, logprobs and top_logprobs pass through: the gateway's answer is vLLM's, token for token."""
    body = {"model": "tiny", "messages": MSG, "max_tokens": 12, "n": 2, "stop": ["\n"], "seed": 7,
            "temperature": 1.0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    via = oai(stack).chat.completions.create(**body)
    state = json.loads((stack.settings.instances_dir / "local" / "tiny.json").read_text())
    direct = httpx.post(state["base_url"] + "/v1/chat/completions", json=body, timeout=120,
                        headers={"Authorization": f"Bearer {state['api_key']}"}).json()  # fmt: skip
    assert [c.message.content for c in via.choices] == [c["message"]["content"] for c in direct["choices"]]
    assert [[t.token for t in c.logprobs.content] for c in via.choices] == [
        [t["token"] for t in c["logprobs"]["content"]] for c in direct["choices"]
    ]
    assert len(via.choices[0].logprobs.content[0].top_logprobs) == 2


def test_an_upstream_openai_compatible_api_with_its_key_in_a_secret_block(stack: Stack) -> None:
    """A hosted OpenAI-compatible API as a cluster: its key is a Prefect Secret block, never in the cluster block;
    readiness is GET /v1/models; the model is mapped to the upstream's name; extra headers go along."""
    with OpenAISimulatorDouble(latency_s=0.0, name="upstream", api_key="sk-upstream-123") as upstream:
        cluster = ClusterSpec(name="hosted", transport="http", base_url=upstream.base_url, health_path="/v1/models",
                              api_key_secret="hosted-api-key",
                              headers={"OpenAI-Organization": "org-first"})  # fmt: skip
        model = ModelSpec(name="hosted-model", served_name="gpt-upstream", clusters=["hosted"], path="-")
        settings = {PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: stack.env["PREFECT_API_AUTH_STRING"]}
        with temporary_settings(settings):
            Secret(value="sk-upstream-123").save("hosted-api-key", overwrite=True)
            asyncio.run(Registry(clusters={"hosted": cluster}, models={"hosted-model": model}).save_blocks())
        c = oai(stack)
        deadline = time.monotonic() + 30  # running gateways re-read the blocks every few seconds
        while "hosted-model" not in [m.id for m in c.models.list()] and time.monotonic() < deadline:
            time.sleep(1)
        r = c.chat.completions.create(model="hosted-model", messages=MSG, max_tokens=5)
        assert r.model == "hosted-model" and r.usage.completion_tokens == 5
        assert upstream.served == 1  # it got through the key check
        block = httpx.get(f"{stack.prefect_api}/block_types/slug/first-cluster/block_documents/name/hosted",
                          auth=tuple(stack.env["PREFECT_API_AUTH_STRING"].split(":", 1)),
                          timeout=30).json()  # fmt: skip
        assert "sk-upstream-123" not in json.dumps(block)  # the cluster block names the secret, never holds it


def test_every_new_endpoint_has_its_usage_rows(stack: Stack) -> None:
    store = UsageStore(stack.settings.usage_db)
    store.ingest(stack.settings.spool_dir)
    endpoints = {e for (e,) in store.query("SELECT DISTINCT endpoint FROM usage WHERE status = 200").rows()}
    assert {"embeddings", "responses", "messages"} <= endpoints
    rows = store.query("SELECT endpoint, prompt_tokens, completion_tokens FROM usage WHERE status = 200 AND "
                       "endpoint IN ('embeddings', 'responses', 'messages')").rows()  # fmt: skip
    assert all(p > 0 for _, p, _ in rows) and all(c > 0 for e, _, c in rows if e != "embeddings")
