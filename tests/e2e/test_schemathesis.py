"""Schemathesis over the gateway's own OpenAPI document (issue 13's reliability suite): every operation, with a
valid credential and without one, against a real gateway process. Whatever it generates (schema-valid and not):
no 5xx, every error in OpenAI's shape (Anthropic's on /v1/messages), every response with X-Request-Id, and
every status one the document names for that operation (issue 19).

Examples per operation: FIRST_SCHEMATHESIS_EXAMPLES (default 40 in CI; set it higher for a longer hunt)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from core.settings import Settings
from serving.auth import KeyStore
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess, http_registry_yaml

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FIRST_SCHEMATHESIS_EXAMPLES", "40"))


class Gateway:
    def __init__(self, gw: GatewayProcess, key: str) -> None:
        self.gw, self.key = gw, key


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    home = Path(tmp_path_factory.mktemp("schemathesis"))
    with OpenAISimulatorDouble(latency_s=0.0, capacity=64, name="sim") as sim:
        registry = home / "registry.yaml"
        registry.write_text(http_registry_yaml({"c": sim.base_url}, {"m": ["c"]}))
        key = KeyStore(Settings(home=home).keys_db).create("fuzz", ["admin"])[0]
        # No throttle (the fuzzer sends many bad credentials from one address) and no usage-report rate limit.
        env = {"FIRST_AUTH_FAILURES_PER_MIN": "0", "FIRST_USAGE_RPM": "0", "FIRST_MAX_INFLIGHT_PER_CALLER": "0"}
        gw = GatewayProcess(home, registry, env=env).start()
        try:
            yield Gateway(gw, key)
        finally:
            gw.stop()


def _check_shape(response: schemathesis.Response, path: str) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    assert response.headers.get("x-request-id"), "no X-Request-Id"
    if response.status_code >= 400:
        doc = response.json()
        error = doc["error"]
        assert isinstance(error.get("message"), str) and error["message"], error
        if path == "/v1/messages":  # Anthropic's shape on Anthropic's route
            assert doc["type"] == "error" and isinstance(error["type"], str), doc
        else:
            assert "type" in error and "code" in error, error


def _fuzz(gateway: Gateway, credential: bool, examples: int) -> list[str]:
    """Every operation of the gateway's OpenAPI document, ``examples`` generated cases each (schema-valid ones
    and, by Schemathesis' negative mode, invalid ones)."""
    schema = schemathesis.openapi.from_url(gateway.gw.url + "/docs/openapi.json")
    documented = httpx.get(gateway.gw.url + "/docs/openapi.json").json()["paths"]
    headers = {"Authorization": f"Bearer {gateway.key}"} if credential else {}
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=gateway.gw.url, headers=headers, timeout=30)
            _check_shape(response, case.path)
            statuses = documented[case.operation.path][case.method.lower()]["responses"]
            assert str(response.status_code) in statuses, f"{response.status_code} is not in the OpenAPI document"
            if not credential and case.path.startswith("/v1"):
                assert response.status_code == 401, (case.path, response.status_code)

        run()
    return seen


def test_every_operation_with_a_valid_key(gateway: Gateway) -> None:
    seen = _fuzz(gateway, credential=True, examples=EXAMPLES)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /v1/usage"} <= set(seen)


def test_every_operation_without_a_credential(gateway: Gateway) -> None:
    _fuzz(gateway, credential=False, examples=max(5, EXAMPLES // 4))
