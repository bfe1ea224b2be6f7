"""The gateway's OpenAPI document names every status each route can return, each with the error body it carries
(issue 19: it named only 200 and 400, so 401, 403, 404, 413, 429, 502, 503 and 504 were undocumented)."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from blocks.registry import Registry
from core.settings import Settings
from first.gateway import create_gateway


@pytest.fixture
async def schema(tmp_path):
    settings = Settings(home=tmp_path / "home")
    async with AsyncTestClient(app=create_gateway(settings, Registry.embedded_default(settings))) as client:
        r = await client.get("/docs/openapi.json")
        assert r.status_code == 200
        yield r.json()


INFERENCE = {"400", "401", "403", "404", "413", "429", "500", "502", "503", "504"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"])
async def test_inference_routes_document_every_status_with_openai_errors(schema, path):
    responses = schema["paths"][path]["post"]["responses"]
    assert INFERENCE | {"200"} == set(responses)
    for status in INFERENCE:
        assert responses[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/OpenAIErrorBody"
        }
        assert len(responses[status]["description"]) > 20  # says what it means, not just its number
    detail = schema["components"]["schemas"]["OpenAIErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}


async def test_messages_documents_anthropic_errors(schema):
    responses = schema["paths"]["/v1/messages"]["post"]["responses"]
    assert set(responses) >= INFERENCE
    assert responses["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicErrorBody")


async def test_every_guarded_route_documents_401_and_no_error_has_litestars_own_shape(schema):
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            statuses = set(op["responses"])
            if path != "/health":
                assert {"401", "429"} <= statuses, (method, path, statuses)
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    ref = response["content"]["application/json"]["schema"].get("$ref", "")
                    assert ref.endswith("ErrorBody"), (method, path, status, response)
    assert "404" in schema["paths"]["/v1/files/{file_id}"]["get"]["responses"]
    assert "409" in schema["paths"]["/v1/batches/{batch_id}/cancel"]["post"]["responses"]
    assert "413" in schema["paths"]["/v1/files"]["post"]["responses"]
