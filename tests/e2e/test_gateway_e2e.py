"""End to end: the official openai client -> gateway -> inference flow -> local compute endpoint ->
vLLM CPU with the tiny model, on a real Prefect server. Tests run in file order and share one stack."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import openai
import pytest

from analytics.store import UsageStore
from tests.e2e.conftest import REPO_ROOT, Stack, prefect_auth, prefect_flow_runs

pytestmark = pytest.mark.e2e
MSG = [{"role": "user", "content": "Write a function that adds two numbers."}]


def client(stack: Stack, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.base_url + "/v1", api_key=key or stack.keys["alice"], max_retries=0, timeout=300
    )


def aclient(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=stack.keys["alice"], max_retries=0, timeout=300)


def vllm_servers(stack: Stack) -> list[str]:
    out = subprocess.run(
        ["pgrep", "-f", f"api_server --model {stack.settings.models_dir}"], capture_output=True, text=True
    ).stdout.split()
    return out


def test_cold_start_waits_for_one_warm_up(stack: Stack) -> None:
    assert vllm_servers(stack) == []
    # A caller that won't wait gets 503 + Retry-After while the warm-up it triggered goes on.
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 4},
        headers={"Authorization": f"Bearer {stack.keys['alice']}", "X-First-Warm-Wait": "1"},
        timeout=30,
    )
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and "warming up on cluster 'local'" in r.json()["error"]["message"]

    async def many() -> list:
        c = aclient(stack)
        return await asyncio.gather(*[
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=8) for _ in range(6)
        ])  # fmt: skip

    t0 = time.monotonic()
    results = asyncio.run(many())
    assert all(r.choices[0].message.content and r.usage.completion_tokens > 0 for r in results)
    assert len(vllm_servers(stack)) == 1, "concurrent cold requests must start one vLLM"
    runs = prefect_flow_runs(stack, "warm-up")
    assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED", runs
    print(f"cold start served after {time.monotonic() - t0:.1f} s")


def test_chat_streaming_completions_and_models(stack: Stack) -> None:
    c = client(stack)
    chat = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    assert chat.object == "chat.completion" and chat.model == "tiny"
    assert chat.usage.completion_tokens == 12 and chat.usage.total_tokens == chat.usage.prompt_tokens + 12

    chunks = list(
        c.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    plain = list(c.chat.completions.create(model="tiny", messages=MSG, max_tokens=10, stream=True))
    assert all(ch.usage is None for ch in plain) and any(ch.choices and ch.choices[0].finish_reason for ch in plain)

    comp = c.completions.create(model="first-tiny", prompt="def add(a, b):", max_tokens=8)  # an alias
    assert comp.choices[0].text and comp.usage.completion_tokens == 8 and comp.model == "first-tiny"
    streamed = list(
        c.completions.create(
            model="tiny", prompt="import", max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    assert streamed[-1].usage.completion_tokens == 6

    assert [m.id for m in c.models.list()] == ["tiny", "tiny-embed"]


def test_vendor_fields_pass_through(stack: Stack) -> None:
    r = client(stack).chat.completions.create(
        model="tiny", messages=MSG, max_tokens=50, temperature=0, extra_body={"min_tokens": 20, "ignore_eos": True}
    )
    assert r.usage.completion_tokens == 50


def test_errors_through_the_openai_client(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(stack, key="first-wrong").chat.completions.create(model="tiny", messages=MSG)
    with pytest.raises(openai.BadRequestError) as e:
        client(stack).chat.completions.create(model="tiny", messages=MSG, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:  # past the model's max_tokens cap: the gateway's own 400
        client(stack).chat.completions.create(model="tiny", messages=MSG, max_tokens=100_000)
    assert e.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client(stack).chat.completions.create(model="gpt-17", messages=MSG)
    limited = client(stack, key=stack.keys["limited"])
    limited.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    limited.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        limited.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_32_concurrent_streams(stack: Stack) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"n{i}"}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
            if ch.usage:
                usage = ch.usage.completion_tokens
        return text, usage

    async def all32() -> list:
        c = aclient(stack)
        return await asyncio.gather(*[one(c, i) for i in range(32)])

    results = asyncio.run(all32())
    assert len(results) == 32
    assert all(text and usage == 24 for text, usage in results), results


def test_usage_rows_match_responses_exactly(stack: Stack) -> None:
    c = client(stack)
    expected: dict[str, tuple[int, int, bool]] = {}
    for i in range(4):
        raw = c.chat.completions.with_raw_response.create(model="tiny", messages=MSG, max_tokens=5 + i)
        r = raw.parse()
        expected[raw.headers["x-request-id"]] = (r.usage.prompt_tokens, r.usage.completion_tokens, False)
    for i in range(3):
        with c.chat.completions.with_streaming_response.create(
            model="tiny", messages=MSG, max_tokens=7 + i, stream=True, stream_options={"include_usage": True}
        ) as raw:
            usage = [ch.usage for ch in raw.parse() if ch.usage][-1]
            expected[raw.headers["x-request-id"]] = (usage.prompt_tokens, usage.completion_tokens, True)
    store = UsageStore(stack.settings.usage_db)
    store.ingest(stack.settings.spool_dir)
    ids = "', '".join(expected)
    rows = store.query(
        f"SELECT request_id, prompt_tokens, completion_tokens, stream, status, cluster, ttft_ms FROM usage"
        f" WHERE request_id IN ('{ids}')"
    )
    got = {r[0]: (r[1], r[2], r[3]) for r in rows.rows()}
    assert got == expected
    assert all(r[4] == 200 and r[5] == "local" for r in rows.rows())
    assert all((r[6] is not None) == r[3] for r in rows.rows())  # time to first token, for streams only
    out = stack.first("usage", "summary", "--format", "json").stdout
    assert '"user": "alice"' in out and '"model": "tiny"' in out


def test_failed_and_cold_requests_are_recorded_as_flow_runs(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = prefect_flow_runs(stack, "infer-record")
        failed = [r for r in runs if r["state_type"] == "FAILED"]
        names = [r["name"] for r in failed]
        if any("gpt-17" in n for n in names) and any(n.endswith(": 429") for n in names):
            break
        time.sleep(1)
    assert any("gpt-17" in r["name"] and ": 404" in r["name"] for r in failed), [r["name"] for r in runs]
    assert any(r["name"].endswith(": 429") for r in failed)
    assert any(r["name"].endswith(": 200") and r["state_type"] == "COMPLETED" for r in runs)  # the cold starts


def test_tracking_all_records_every_request_as_an_infer_flow_run(stack: Stack) -> None:
    """A second gateway on the same stack with FIRST_FLOW_TRACKING=all: each request is a real flow run."""
    from tests.gateway_factory import GatewayProcess

    gw = GatewayProcess(stack.home / "logs", base_env=stack.env, env={"FIRST_FLOW_TRACKING": "all"}).start()
    try:
        c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=stack.keys["alice"], max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3)
        chunks = list(
            c.completions.create(
                model="tiny", prompt="x", max_tokens=3, stream=True, stream_options={"include_usage": True}
            )
        )
        assert r.usage.completion_tokens == 3 and chunks[-1].usage.completion_tokens == 3
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="nope", messages=MSG)
        # The response goes out before the run's final state is written: wait for it (gateway still up).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            runs = {r["name"]: r for r in prefect_flow_runs(stack, "infer")}
            if len(runs) == 3 and all(r["state_type"] in ("COMPLETED", "FAILED") for r in runs.values()):
                break
            time.sleep(0.5)
    finally:
        gw.stop()
    assert runs["chat.completions tiny for alice"]["state_type"] == "COMPLETED"
    assert runs["completions tiny for alice"]["state_type"] == "COMPLETED"
    assert runs["chat.completions nope for alice"]["state_type"] == "FAILED"
    flow_run_id = runs["chat.completions tiny for alice"]["id"]
    expected = {"authorize", "select-cluster", "ensure-warm", "wait-for-slot", "execute", "record-usage"}
    deadline = time.monotonic() + 30  # the server's task-run recorder writes in batches
    while time.monotonic() < deadline:
        tasks = httpx.post(
            f"{stack.prefect_api}/task_runs/filter",
            json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
            timeout=10,
            auth=prefect_auth(stack.env),
        ).json()
        names = {t["name"].rsplit("-", 1)[0] for t in tasks}
        if names >= expected:
            break
        time.sleep(0.5)
    assert names == expected


def test_relay_rejects_forged_posts(stack: Stack) -> None:
    r = httpx.post(
        f"{stack.base_url}/internal/relay/{'ab' * 16}",
        json={"seq": 0, "chunks": [], "done": True},
        headers={"X-Relay-Token": "0" * 64},
    )
    assert r.status_code == 401


def test_scale_down_then_next_request_warms_it_again(stack: Stack) -> None:
    code = "import asyncio; from flows.lifecycle import scale_down; print(asyncio.run(scale_down(model='tiny')))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=stack.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'stopped': True" in out.stdout and vllm_servers(stack) == []
    # The gateway still believes the model is hot: the request (a stream, through the relay) finds vLLM
    # gone before its first byte, re-warms it, and succeeds.
    chunks = list(
        client(stack).chat.completions.create(
            model="tiny", messages=MSG, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.completion_tokens == 4
    assert len(vllm_servers(stack)) == 1
