"""The OpenAI surface of the gateway, with clusters that need no vLLM: every error shape and status,
validation and pass-through, model visibility, and usage records for every answered request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from litestar.testing import AsyncTestClient

from analytics.store import UsageStore
from blocks.registry import ClusterSpec, ModelSpec, Registry
from compute.failures import backend_error
from first.gateway import create_gateway
from first.runner import free_port
from serving.auth import KeyStore
from serving.protocol import ChatCompletionRequest, backend_body

CHAT = {"model": "m-down", "messages": [{"role": "user", "content": "hi"}]}


class HangingBackendDouble:
    """Stands in for a model server that answers /health but never answers a completion (a hung GPU node),
    which a real vLLM can't be made to do on demand."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line.startswith(b"GET /health"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
        await asyncio.sleep(3600)

    def __enter__(self) -> HangingBackendDouble:
        self.thread.start()
        start = asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def hanging() -> Iterator[HangingBackendDouble]:
    with HangingBackendDouble() as h:
        yield h


@pytest.fixture
def registry(hanging: HangingBackendDouble) -> Registry:
    down = ClusterSpec(name="down", transport="http", base_url=f"http://127.0.0.1:{free_port()}")
    hung = ClusterSpec(name="hung", transport="http", base_url=f"http://127.0.0.1:{hanging.port}")
    return Registry(
        clusters={"down": down, "hung": hung},
        models={
            "m-down": ModelSpec(name="m-down", clusters=["down"], path="-"),
            "m-hung": ModelSpec(name="m-hung", clusters=["hung"], path="-", aliases=["hung-alias"]),
            "secret": ModelSpec(name="secret", clusters=["down"], path="-", allowed_groups=["staff"], hidden=True),
            "staff-only": ModelSpec(name="staff-only", clusters=["down"], path="-", allowed_groups=["staff"]),
            "embedder": ModelSpec(name="embedder", clusters=["down"], path="-", kind="embed"),
        },
    )


@pytest.fixture
def keys(settings) -> dict[str, str]:
    store = KeyStore(settings.keys_db)
    return {
        "alice": store.create("alice", ["staff"])[0],
        "bob": store.create("bob")[0],
        "limited": store.create("carol", rpm=1)[0],
    }


@pytest.fixture
async def client(settings, registry, keys):
    app = create_gateway(settings, registry)
    async with AsyncTestClient(app=app) as c:
        yield c


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _is_openai_error(body: dict, status_type: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == status_type and body["error"]["message"]


async def test_missing_and_bad_credentials_are_401(client, keys):
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401
    _is_openai_error(r.json(), "authentication_error")
    r = await client.post("/v1/chat/completions", json=CHAT, headers=_auth("first-not-a-key"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await client.get("/v1/models", headers={"Authorization": "Basic xyz"})
    assert r.status_code == 401


async def test_malformed_json_and_invalid_fields_are_400(client, keys):
    h = {**_auth(keys["bob"]), "Content-Type": "application/json"}
    r = await client.post("/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400
    _is_openai_error(r.json(), "invalid_request_error")
    r = await client.post("/v1/chat/completions", json={**CHAT, "temperature": 9}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = await client.post("/v1/chat/completions", json={"model": "m-down", "messages": []}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = await client.post("/v1/completions", json={"model": "m-down"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = await client.post("/v1/chat/completions", json=CHAT, headers={**h, "X-First-Warm-Wait": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-First-Warm-Wait"


async def test_unknown_and_hidden_models_are_404_alike(client, keys):
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=_auth(keys["bob"]))
    assert r.status_code == 404
    _is_openai_error(r.json(), "not_found_error")
    hidden = await client.post("/v1/chat/completions", json={**CHAT, "model": "secret"}, headers=_auth(keys["bob"]))
    assert hidden.status_code == 404
    assert hidden.json()["error"]["message"].replace("secret", "nope") == r.json()["error"]["message"]
    r = await client.get("/v1/nothing-here", headers=_auth(keys["bob"]))
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


async def test_a_visible_model_the_caller_may_not_use_is_403(client, keys):
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "staff-only"}, headers=_auth(keys["bob"]))
    assert r.status_code == 403
    _is_openai_error(r.json(), "permission_error")
    assert r.json()["error"]["code"] == "model_access_denied" and r.json()["error"]["param"] == "model"
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "staff-only"}, headers=_auth(keys["alice"]))
    assert r.status_code == 503  # alice may: she gets through to the (down) cluster


async def test_model_list_shows_only_what_the_caller_may_use(client, keys):
    bob = (await client.get("/v1/models", headers=_auth(keys["bob"]))).json()
    alice = (await client.get("/v1/models", headers=_auth(keys["alice"]))).json()
    assert bob["object"] == "list"
    assert sorted(m["id"] for m in bob["data"]) == ["embedder", "m-down", "m-hung"]
    assert sorted(m["id"] for m in alice["data"]) == ["embedder", "m-down", "m-hung", "secret", "staff-only"]


async def test_one_model_with_its_capabilities_by_name_or_alias(client, keys):
    """client.models.retrieve(id): the model's capabilities and its state per cluster; 404 in OpenAI's shape for
    a model the caller may not use, hidden or not, as for one that does not exist."""
    h = _auth(keys["bob"])
    m = (await client.get("/v1/models/hung-alias", headers=h)).json()
    assert m["id"] == "m-hung" and m["object"] == "model" and set(m["state"]) == {"hung"}
    assert m["capabilities"] == {
        "kind": "generate", "endpoints": ["chat.completions", "completions", "responses", "messages"],
        "context_length": 512,
        "max_output_tokens": 512, "tools": False, "structured_output": True,
    }  # fmt: skip
    e = (await client.get("/v1/models/embedder", headers=h)).json()
    assert e["capabilities"]["endpoints"] == ["embeddings"] and not e["capabilities"]["tools"]
    for name in ("staff-only", "secret", "nope"):
        r = await client.get(f"/v1/models/{name}", headers=h)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert (await client.get("/v1/models/staff-only", headers=_auth(keys["alice"]))).status_code == 200


async def test_a_chat_request_to_an_embedding_model_is_400(client, keys):
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "embedder"}, headers=_auth(keys["bob"]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_endpoint"
    assert "/v1/embeddings" in r.json()["error"]["message"]


async def test_rate_limit_is_429_with_retry_after(client, keys):
    h = _auth(keys["limited"])
    first = await client.post("/v1/chat/completions", json=CHAT, headers=h)
    assert first.status_code == 503  # allowed through, then the cluster is down
    r = await client.post("/v1/chat/completions", json=CHAT, headers=h)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    _is_openai_error(r.json(), "rate_limit_error")


async def test_unreachable_cluster_is_503_naming_it(client, keys):
    r = await client.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["bob"]))
    assert r.status_code == 503
    body = r.json()
    _is_openai_error(body, "service_unavailable")
    assert "Cluster 'down' is unreachable" in body["error"]["message"]
    assert "127.0.0.1" not in body["error"]["message"]  # where the model server lives is for operators
    assert r.headers["retry-after"] == "30"


async def test_backend_timeout_is_504(client, keys):
    r = await client.post(
        "/v1/chat/completions", json={**CHAT, "model": "hung-alias"}, headers=_auth(keys["bob"]), timeout=30
    )
    assert r.status_code == 504
    _is_openai_error(r.json(), "timeout")
    assert "timed out" in r.json()["error"]["message"]


async def test_max_tokens_past_the_models_cap_is_400_before_any_cluster_work(client, keys):
    """A request sized to run into the timeout (max_tokens near the context, ignore_eos) is refused up front, so
    one caller cannot make a cluster look faulty to everyone."""
    h = _auth(keys["bob"])
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100_000, "ignore_eos": True}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"
    assert r.json()["error"]["param"] == "max_tokens" and "at most 512" in r.json()["error"]["message"]
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 513}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 512}, headers=h)
    assert r.status_code == 503  # within the cap: on to the (down) cluster


async def test_streaming_errors_before_first_byte_are_http_errors(client, keys):
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=_auth(keys["bob"]))
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")


async def test_every_answered_inference_request_has_a_usage_row(client, keys, settings):
    """Every identified caller's request has its row, rejected or not; an unauthenticated 401 is nobody's usage
    (counted in first_auth_failures instead)."""
    h = _auth(keys["bob"])
    answers = [
        (await client.post("/v1/chat/completions", json=CHAT)).status_code,
        (await client.post("/v1/chat/completions", json={**CHAT, "temperature": 9}, headers=h)).status_code,
        (await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=h)).status_code,
        (await client.post("/v1/completions", json={"model": "m-down", "prompt": "x"}, headers=h)).status_code,
    ]
    assert answers == [401, 400, 404, 503]
    store = UsageStore(settings.usage_db)
    store.ingest(settings.spool_dir)
    rows = store.query("SELECT user, model, endpoint, status, error_type, cluster FROM usage ORDER BY status")
    assert rows.rows() == [
        ("bob", "", "chat.completions", 400, "invalid_request_error", None),
        ("bob", "nope", "chat.completions", 404, "not_found_error", None),
        ("bob", "m-down", "completions", 503, "service_unavailable", "down"),
    ]


async def test_every_response_carries_x_request_id_and_rejections_share_it_with_their_usage_row(client, keys, settings):
    """Handlers' answers, the guard's and the validator's rejections, unknown paths: each has its own id, and
    the usage row of a rejected inference request carries the id its response did. The 401 (nobody identified)
    has no row: it is counted in the metrics instead (issue 19: reports no longer open with user '-')."""
    h = _auth(keys["bob"])
    answers = [
        await client.post("/v1/chat/completions", json=CHAT),  # the guard: 401
        await client.post("/v1/chat/completions", json={**CHAT, "temperature": 9}, headers=h),  # validation: 400
        await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=h),  # the pipeline: 404
        await client.get("/v1/nothing-here", headers=h),  # no route: 404
        await client.get("/v1/models", headers=h),  # 200
        await client.get("/health"),  # 200, no credential
    ]
    ids = [r.headers.get("x-request-id") for r in answers]
    assert all(ids) and len(set(ids)) == len(ids), ids
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    store = UsageStore(settings.usage_db)
    store.ingest(settings.spool_dir)
    rows = dict(store.query("SELECT status, request_id FROM usage").rows())
    assert rows == {400: ids[1], 404: ids[2]}
    assert client.app.state.auth_throttle.failures == 1  # what first_auth_failures_total reports


async def test_a_usage_spool_failure_is_a_503_with_its_request_id(client, keys, settings):
    """The spool cannot take a record (here its folder became a file): no unmetered answer, but an
    OpenAI-shaped 503 that still names its request, for an answered request and a rejected one alike (the
    unauthenticated one writes no row, so its 401 stands)."""
    import shutil

    shutil.rmtree(settings.spool_dir)
    settings.spool_dir.write_text("not a folder")
    for r in (
        await client.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["bob"])),
        await client.post("/v1/chat/completions", json={**CHAT, "temperature": 9}, headers=_auth(keys["bob"])),
    ):
        assert r.status_code == 503, r.text
        _is_openai_error(r.json(), "service_unavailable")
        assert r.json()["error"]["code"] == "usage_spool" and len(r.headers["x-request-id"]) == 32
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 401


async def test_the_spool_is_written_for_its_owner_only(client, keys, settings):
    """Usage rows name who asked what: the spool's segments are 0600 in a 0700 state folder."""
    import stat

    await client.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["bob"]))
    assert stat.S_IMODE(settings.home.stat().st_mode) == 0o700
    segments = list(settings.spool_dir.iterdir())
    assert segments and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in segments)


async def test_health_and_openapi_schema(client, keys):
    await client.post("/v1/chat/completions", json={**CHAT, "model": "secret"}, headers=_auth(keys["alice"]))
    r = await client.get("/health")  # no credential: liveness, nothing about the fleet
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert not any(word in r.text for word in ("secret", "m-down", "127.0.0.1", "down", "instances")), r.text
    schema = (await client.get("/docs/openapi.json")).json()
    assert "/v1/chat/completions" in schema["paths"] and "/internal/relay/{request_id}" not in schema["paths"]


async def test_relay_rejects_forged_posts(client, caplog):
    rid = "ab" * 16
    r = await client.post(f"/internal/relay/{rid}", json={"seq": 0, "chunks": []}, headers={"X-Relay-Token": "forged"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_relay_token"
    # A token that is not even ASCII is just as wrong (it used to crash the comparison: a plain-text 500).
    r = await client.post(
        f"/internal/relay/{rid}", json={"seq": 0, "chunks": []}, headers=[(b"x-relay-token", "é".encode())]
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_relay_token"
    # An id that is not one of ours is refused without being written to the log as it came (log forging).
    with caplog.at_level("WARNING", logger="first.api"):
        r = await client.post("/internal/relay/x%0AFAKE%20LOG%20LINE", json={}, headers={"X-Relay-Token": "t"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_stream"
    assert "FAKE" not in caplog.text and "malformed stream id" in caplog.text


@pytest.mark.parametrize(
    ("since", "param"), [("3000000d", "since"), ("9999-12-31T01:00:00", "since"), ("0001-01-01", "since")]
)
async def test_usage_bounds_out_of_range_are_400_not_500(client, keys, since, param):
    r = await client.get("/v1/usage", params={"since": since}, headers=_auth(keys["bob"]))
    assert r.status_code == 400, r.text
    _is_openai_error(r.json(), "invalid_request_error")
    assert r.json()["error"]["param"] == param and "out of range" in r.json()["error"]["message"]


async def test_json_nested_a_thousand_levels_deep_is_a_400(client, keys):
    deep = '{"model": "m-down", "messages": [{"role": "user", "content": "x"}], "x": ' + "[" * 1000 + "]" * 1000 + "}"
    h = {**_auth(keys["bob"]), "Content-Type": "application/json"}
    r = await client.post("/v1/chat/completions", content=deep.encode(), headers=h)
    assert r.status_code == 400, r.text
    _is_openai_error(r.json(), "invalid_request_error")
    assert r.headers["x-request-id"]


def test_key_names_cannot_smuggle_a_group(tmp_path):
    """Groups are stored comma-joined: a comma in one would have made `--group "x,admin"` an admin key."""
    store = KeyStore(tmp_path / "keys.sqlite")
    for user, groups in (("mallory", ["x,admin"]), ("", []), ("a b", []), ("eve", ["admin\n"])):
        with pytest.raises(ValueError, match="not allowed"):
            store.create(user, groups)
    assert store.list() == []


def test_backend_body_passes_vendor_fields_and_always_asks_for_usage():
    req = ChatCompletionRequest.model_validate(
        {**CHAT, "stream": True, "top_k": 5, "repetition_penalty": 1.1, "stream_options": {"include_usage": False}}
    )
    body = backend_body(req, "served-name")
    assert body["model"] == "served-name"
    assert body["top_k"] == 5 and body["repetition_penalty"] == 1.1
    assert body["stream_options"] == {"include_usage": True}
    assert "temperature" not in body  # unset fields stay unset: vLLM's defaults apply


def test_backend_errors_map_to_openai_statuses():
    assert (
        backend_error({"status": 400, "body": {"error": {"message": "too long", "param": "max_tokens"}}}, "c").status
        == 400
    )
    e = backend_error({"status": 500, "body": {"error": {"message": "EngineCore died"}}}, "Cluster 'x'")
    assert e.status == 502 and "Cluster 'x'" in e.message
    assert "EngineCore died" not in e.message and "EngineCore died" in e.internal  # operators see it, callers don't
    down = {"status": 503, "kind": "unreachable", "message": "vLLM at http://10.1.2.3:8100 is unreachable: ..."}
    e = backend_error(down, "Cluster 'x'")
    assert e.status == 503 and "10.1.2.3" not in e.message and "10.1.2.3" in e.internal
    assert backend_error({"status": 504, "kind": "timeout", "message": "slow"}, "c").status == 504
