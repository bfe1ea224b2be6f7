"""Hostile inputs, table-driven (issue 13's reliability suite): whatever a caller or a stranger sends, the gateway
answers in OpenAI's shape with a 4xx (or a 2xx), never a 5xx, always with X-Request-Id, and never shows an
internal URL, a path on the gateway host or a traceback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from blocks.registry import ClusterSpec, ModelSpec, Registry
from core.settings import Settings
from first.gateway import create_gateway
from serving.auth import KeyStore
from tests.fakes.openai_simulator import OpenAISimulatorDouble

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def sim() -> Iterator[OpenAISimulatorDouble]:
    with OpenAISimulatorDouble(latency_s=0.0, capacity=64, name="hostile") as s:
        yield s


@pytest.fixture
async def gateway(tmp_path, sim) -> AsyncIterator[tuple[AsyncTestClient, str, Settings, Any]]:
    settings = Settings(home=tmp_path / "home", auth_failures_per_min=0, request_timeout_s=5)
    reg = Registry(
        clusters={"c": ClusterSpec(name="c", transport="http", base_url=sim.base_url)},
        models={"m": ModelSpec(name="m", clusters=["c"], path="-", context_length=512, max_output_tokens=256)},
    )
    key = KeyStore(settings.keys_db).create("mallory")[0]
    app = create_gateway(settings, reg)
    async with AsyncTestClient(app=app) as client:
        yield client, key, settings, app


def _nest(depth: int) -> Any:
    doc: Any = "x"
    for _ in range(depth):
        doc = {"a": [doc]}
    return doc


UNKNOWN_FIELDS = {
    "an_int": 1, "a_float": 1.5, "a_string": "s", "a_list": [1, "2", None], "an_object": {"k": {"k": []}},
    "a_null": None, "a_bool": True, "a_huge_int": 10**40,
}  # fmt: skip

# (name, path, body bytes or JSON document, extra headers)
BODIES: list[tuple[str, str, Any, dict[str, str]]] = [
    ("empty body", "/v1/chat/completions", b"", {}),
    ("not JSON", "/v1/chat/completions", b"{model: m", {}),
    ("JSON array", "/v1/chat/completions", b"[1, 2, 3]", {}),
    ("JSON string", "/v1/chat/completions", b'"hello"', {}),
    ("invalid UTF-8", "/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "\xff"}]}', {}),
    ("NUL bytes in content", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a\x00b"}]}, {}),
    ("NUL byte in model", "/v1/chat/completions", {**CHAT, "model": "m\x00"}, {}),
    ("deep nesting", "/v1/chat/completions", b'{"a":' * 1000 + b"1" + b"}" * 1000, {}),
    ("deep nesting in an extra field", "/v1/chat/completions", {**CHAT, "extra": _nest(200)}, {}),
    ("n=128", "/v1/chat/completions", {**CHAT, "n": 128}, {}),
    ("max_tokens negative", "/v1/chat/completions", {**CHAT, "max_tokens": -1}, {}),
    ("max_tokens huge", "/v1/chat/completions", {**CHAT, "max_tokens": 10**12}, {}),
    ("max_tokens a string", "/v1/chat/completions", {**CHAT, "max_tokens": "lots"}, {}),
    ("temperature NaN-ish", "/v1/chat/completions", b'{"model": "m", "messages": [], "temperature": 1e999}', {}),
    ("messages not a list", "/v1/chat/completions", {**CHAT, "messages": "hi"}, {}),
    ("message without role", "/v1/chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, {}),
    ("model missing", "/v1/chat/completions", {"messages": CHAT["messages"]}, {}),
    ("model a number", "/v1/chat/completions", {**CHAT, "model": 7}, {}),
    ("model very long", "/v1/chat/completions", {**CHAT, "model": "m" * 100_000}, {}),
    ("unknown fields of every type", "/v1/chat/completions", {**CHAT, **UNKNOWN_FIELDS}, {}),
    ("unknown fields, completions", "/v1/completions", {"model": "m", "prompt": "x", **UNKNOWN_FIELDS}, {}),
    ("prompt of the wrong type", "/v1/completions", {"model": "m", "prompt": {"x": 1}}, {}),
    ("stream not a bool", "/v1/chat/completions", {**CHAT, "stream": "yes please"}, {}),
    ("stream_options junk", "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": [1]}, {}),
    ("huge body", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 12_000_000}]}, {}),
    ("wrong content type", "/v1/chat/completions", json.dumps(CHAT).encode(), {"content-type": "text/plain"}),
    ("usage since overflow", "GET /v1/usage?since=3000000d", None, {}),
    ("usage since far future", "GET /v1/usage?since=9999-12-31T01:00:00", None, {}),
    ("usage junk filter", "GET /v1/usage?group_by=%00&user=%ff", None, {}),
    ("unknown path", "/v1/nope", CHAT, {}),
    ("path traversal", "GET /v1/../../etc/passwd", None, {}),
    ("models/unknown id", "GET /v1/models/%2e%2e%2f", None, {}),
]  # fmt: skip


def _check(r: Any, sim: OpenAISimulatorDouble, settings: Settings) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert r.headers.get("x-request-id"), "every response carries X-Request-Id"
    text = r.text
    for secret in (sim.base_url, f":{sim.port}", str(settings.home), "Traceback", 'File "'):
        assert secret not in text, f"{secret!r} leaked: {text[:300]}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and "type" in error and "code" in error


@pytest.mark.parametrize(("name", "path", "body", "headers"), BODIES, ids=[b[0] for b in BODIES])
async def test_hostile_bodies_get_4xx_in_openai_shape(gateway, sim, name, path, body, headers) -> None:
    client, key, settings, _ = gateway
    auth = {"Authorization": f"Bearer {key}"}
    if path.startswith("GET "):
        r = await client.get(path[4:], headers={**auth, **headers})
    else:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await client.post(path, content=content, headers={"content-type": "application/json", **auth, **headers})
    _check(r, sim, settings)


TOKENS = [
    ("no header", None),
    ("empty bearer", "Bearer "),
    ("bearer only", "Bearer"),
    ("basic scheme", "Basic YWRtaW46YWRtaW4="),
    ("lowercase scheme, bad key", "bearer sk-nope"),
    ("100 KB token", "Bearer " + "A" * 100_000),
    ("non-ASCII token", "Bearer ключ-🔑"),
    ("control characters", "Bearer a\tb"),
    ("SQL in the token", "Bearer ' OR 1=1 --"),
    ("a JWT-looking token", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."),
    ("two tokens", "Bearer a, Bearer b"),
]


@pytest.mark.parametrize(("name", "authorization"), TOKENS, ids=[t[0] for t in TOKENS])
async def test_tokens_of_every_shape_are_401(gateway, sim, name, authorization) -> None:
    client, _, settings, _ = gateway
    headers = {} if authorization is None else {"Authorization": authorization.encode("utf-8")}  # raw UTF-8 bytes
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/usage"),
                         ("GET", "/v1/status"), ("GET", "/metrics")):  # fmt: skip
        r = await client.request(method, path, json=CHAT if method == "POST" else None, headers=headers)
        _check(r, sim, settings)
        assert r.status_code == 401, (path, r.status_code)


async def test_forged_replayed_oversized_and_unknown_relay_posts(gateway, sim) -> None:
    client, _, settings, app = gateway
    hub = app.state.relay
    rid = "0123456789abcdef0123456789abcdef"
    channel = hub.open(rid)
    token = hub.token_for(rid)
    good = {"seq": 0, "chunks": [{"choices": []}], "done": False, "error": None}
    cases = [
        ("no token", rid, None, good, 401),
        ("forged token", rid, "0" * 64, good, 401),
        ("another stream's token", rid, hub.token_for("f" * 32), good, 401),
        ("non-ASCII token", rid, "tökén", good, 401),
        ("malformed id", "../../x", token, good, 404),
        ("an id not ours", "A" * 32, token, good, 404),
        ("delivered", rid, token, good, 200),
        ("replayed", rid, token, good, 409),
        ("malformed batch", rid, token, {"seq": "one", "chunks": 3}, 400),
        ("not JSON", rid, token, b"\xff{", 400),
        ("unknown stream", "e" * 32, hub.token_for("e" * 32), good, 404),
        ("oversized", rid, token, {**good, "seq": 1, "chunks": [{"x": "y" * 12_000_000}]}, 413),
    ]
    for name, request_id, tok, body, expected in cases:
        headers = {"content-type": "application/json", **({"X-Relay-Token": tok.encode()} if tok is not None else {})}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await client.post(f"/internal/relay/{request_id}", content=content, headers=headers)
        assert r.status_code == expected, (name, r.status_code, r.text[:200])
        _check(r, sim, settings)
    assert channel.queue.qsize() == 1  # only the one genuine batch got through
    hub.close(rid)
