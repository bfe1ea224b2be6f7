"""End to end in Globus mode: a second gateway, started with FIRST_AUTH_MODE=globus and its Globus Auth block
saved by `first globus configure`, serves the real tiny model (vLLM CPU, reached directly over HTTP) to
callers holding tokens from FakeGlobusServer, the stand-in for Globus Auth and Groups. Checks per-user
limits with real usage numbers: a concurrent burst may not use more tokens than the TPM limit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from blocks.registry import ClusterSpec, ModelSpec, RateLimits, Registry
from tests.e2e.conftest import BIN, REPO_ROOT, Stack
from tests.fakes.globus_server import FakeGlobusServer
from tests.gateway_factory import GatewayProcess

pytestmark = pytest.mark.e2e
TPM = 400
MSG = [{"role": "user", "content": "hi"}]


@dataclass
class GlobusGateway:
    url: str
    fake: FakeGlobusServer
    env: dict[str, str]
    configure: list[str]  # the `first globus configure` command line that saved the block

    def client(self, token: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def globus_gateway(stack: Stack) -> Iterator[GlobusGateway]:
    # vLLM is up (earlier tests warmed it; this makes sure), so the models below can reach it directly.
    r = httpx.post(
        f"{stack.base_url}/v1/completions", json={"model": "tiny", "prompt": "warm", "max_tokens": 1},
        headers={"Authorization": f"Bearer {stack.keys['alice']}"}, timeout=300,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    with FakeGlobusServer() as fake:
        pro = fake.group_id("pro")
        # vLLM wants its own key: the direct cluster reads it from a Prefect Secret block, as an upstream API's.
        vllm_key = json.loads((stack.settings.instances_dir / "local" / "tiny.json").read_text())["api_key"]
        direct = ClusterSpec(name="vllm-direct", transport="http", base_url=stack.vllm_url,
                             api_key_secret="tiny-vllm-key")  # fmt: skip
        served = {"served_name": "tiny", "path": "-", "clusters": ["vllm-direct"], "context_length": 512}
        reg = Registry(
            clusters={"vllm-direct": direct},
            models={
                "tiny-metered": ModelSpec(name="tiny-metered", limits=RateLimits(tpm=TPM), **served),
                "tiny-rpm": ModelSpec(
                    name="tiny-rpm", limits=RateLimits(rpm=2), group_limits={pro: RateLimits(rpm=0)}, **served
                ),
                "tiny-pro": ModelSpec(name="tiny-pro", allowed_groups=[pro], **served),
            },
        )
        with temporary_settings(
            {PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: stack.env["PREFECT_API_AUTH_STRING"]}
        ):
            asyncio.run(reg.save_blocks())
            Secret(value=vllm_key).save("tiny-vllm-key", overwrite=True)
        env = {**stack.env, "FIRST_GLOBUS_CLIENT_SECRET": fake.client_secret}
        configure = [
            str(BIN / "first"), "globus", "configure", "--client-id", fake.client_id, "--auth-url", fake.url,
            "--groups-url", fake.url, "--allowed-domain", "uchicago.edu", "--native-client-id", "native-123",
        ]  # fmt: skip
        subprocess.run(configure, env=env, cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
        gw = GatewayProcess(stack.home / "logs", base_env=stack.env, env={
            "FIRST_AUTH_MODE": "globus", "FIRST_FLOW_TRACKING": "off", "FIRST_GLOBUS_BLOCK_REFRESH_S": "1",
        }).start()  # fmt: skip
        try:
            yield GlobusGateway(gw.url, fake, env, configure)
        finally:
            gw.stop()


def test_globus_show_masks_the_secret(stack: Stack, globus_gateway: GlobusGateway) -> None:
    out = subprocess.run(
        [str(BIN / "first"), "globus", "show"], env=stack.env, cwd=REPO_ROOT, capture_output=True, text=True,
        check=True, timeout=120,
    ).stdout  # fmt: skip
    doc = json.loads(out)
    assert doc["client_id"] == globus_gateway.fake.client_id and doc["allowed_domains"] == ["uchicago.edu"]
    assert doc["client_secret"] == "**********" and globus_gateway.fake.client_secret not in out


def test_a_globus_caller_gets_completions_and_usage_rows(stack: Stack, globus_gateway: GlobusGateway) -> None:
    gw = globus_gateway
    health = httpx.get(gw.url + "/health", timeout=10).json()
    assert health["auth_mode"] == "globus"
    token = gw.fake.user_token("dana@uchicago.edu")

    async def go() -> tuple:
        c = gw.client(token)
        done = await c.chat.completions.create(model="tiny-metered", messages=MSG, max_tokens=5)
        chunks = [
            ch async for ch in await c.chat.completions.create(
                model="tiny-metered", messages=MSG, max_tokens=5, stream=True, stream_options={"include_usage": True}
            )
        ]  # fmt: skip
        models = await c.models.list()
        return done, chunks, models

    done, chunks, models = asyncio.run(go())
    assert done.usage.completion_tokens > 0 and done.model == "tiny-metered"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    ids = sorted(m.id for m in models.data)
    assert "tiny-metered" in ids and "tiny-pro" not in ids  # dana is not in the "pro" group
    # The gateway refuses the stack's local API key, and a caller from another identity provider.
    r = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {stack.keys['alice']}"}, timeout=10)
    assert r.status_code == 401
    r = httpx.get(
        gw.url + "/v1/models", headers={"Authorization": f"Bearer {gw.fake.user_token('eve@evil.example')}"},
        timeout=10,
    )  # fmt: skip
    assert r.status_code == 403 and r.json()["error"]["code"] == "identity_provider_not_allowed"
    # Each request that got a response has a usage row under the caller's Globus username.
    rows = json.loads(
        subprocess.run(
            [str(BIN / "first"), "usage", "summary", "--format", "json"], env=stack.env, cwd=REPO_ROOT,
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
    )  # fmt: skip
    mine = [r for r in rows if r["user"] == "dana@uchicago.edu" and r["model"] == "tiny-metered"]
    assert len(mine) == 1 and mine[0]["requests"] == 2, rows
    assert gw.fake.calls["introspect"] == 3  # one per token: dana's 4 calls were checked with Globus once


def test_a_concurrent_burst_cannot_overshoot_the_tpm_limit(globus_gateway: GlobusGateway) -> None:
    gw = globus_gateway
    token = gw.fake.user_token("frank@uchicago.edu")
    body = {"max_tokens": 30, "extra_body": {"ignore_eos": True}}  # every answer uses all 30 tokens

    async def one(c: openai.AsyncOpenAI) -> tuple[int, object]:
        try:
            r = await c.chat.completions.create(model="tiny-metered", messages=MSG, **body)
            return 200, r.usage.total_tokens
        except openai.RateLimitError as e:
            return 429, e.response

    async def burst() -> list[tuple[int, object]]:
        c = gw.client(token)
        return await asyncio.gather(*(one(c) for _ in range(12)))

    results = asyncio.run(burst())
    used = [u for status, u in results if status == 200]
    refused = [resp for status, resp in results if status == 429]
    assert used and refused, results
    assert sum(used) <= TPM, (sum(used), used)  # admitted together, they fit the limit
    for resp in refused:
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["error"]["type"] == "rate_limit_error"
        assert "tokens per minute" in resp.json()["error"]["message"]
    # Each request fits the limit alone, and all 12 together would not (12 x 30 completion tokens alone is
    # near it, with prompts over it): a check-then-record limiter, seeing nothing used yet, admits all 12.


def test_rpm_limit_and_group_override(globus_gateway: GlobusGateway) -> None:
    gw = globus_gateway
    plain = gw.fake.user_token("gina@uchicago.edu")
    pro = gw.fake.user_token("hugo@uchicago.edu", groups=["pro"])

    async def calls(token: str, n: int) -> list[int]:
        c = gw.client(token)
        out = []
        for _ in range(n):
            try:
                await c.completions.create(model="tiny-rpm", prompt="x", max_tokens=1)
                out.append(200)
            except openai.RateLimitError:
                out.append(429)
        return out

    assert asyncio.run(calls(plain, 3)) == [200, 200, 429]  # 2 requests per minute
    assert asyncio.run(calls(pro, 5)) == [200] * 5  # the "pro" group's override: no limit
    r = asyncio.run(gw.client(pro).chat.completions.create(model="tiny-pro", messages=MSG, max_tokens=2))
    assert r.usage.completion_tokens > 0  # a group-restricted model, for its group


def test_an_edit_of_the_globus_block_reaches_the_running_gateway(globus_gateway: GlobusGateway) -> None:
    """Operators edit the block (UI or CLI); the gateway applies it within its refresh period (1 s here)."""
    gw = globus_gateway
    h = {"Authorization": f"Bearer {gw.fake.user_token('ivan@uchicago.edu')}"}
    assert httpx.get(gw.url + "/v1/models", headers=h, timeout=10).status_code == 200  # cached as valid
    narrowed = [*gw.configure[: gw.configure.index("--allowed-domain")], "--allowed-domain", "anl.gov"]
    subprocess.run(narrowed, env=gw.env, cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
    deadline = time.monotonic() + 30
    while (status := httpx.get(gw.url + "/v1/models", headers=h, timeout=10).status_code) == 200:
        assert time.monotonic() < deadline, "the gateway did not apply the edited block within 30 s"
        time.sleep(0.5)
    assert status == 403
