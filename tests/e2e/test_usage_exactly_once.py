"""Usage records survive a gateway crash exactly once.

A real gateway process (uvicorn, tests/gateway_factory.py) in front of an OpenAISimulatorDouble (0.5 s per request,
50 at a time: most of the load waits in the double's line, served in 4 waves) takes 200 concurrent chat completions,
a quarter of them streaming. Once some have completed the uvicorn process is SIGKILLed with the rest in flight. A
new gateway on the same FIRST_HOME (same spool directory) serves a few more; then the spool is ingested into DuckDB.

Checked: every response the caller received in full has exactly one usage row, with its tokens; no request id has
two rows; every row belongs to a request that reached the backend (the double's counter), none to one that
didn't; ingesting again, and re-ingesting a copy of the spool taken before the first ingest, leaves the table as it
was.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl
import pytest

from analytics.store import UsageStore
from core.settings import Settings
from serving.auth import KeyStore
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess, http_registry_yaml

pytestmark = pytest.mark.e2e

N = 200
MAX_TOKENS = 8
KILL_AFTER_COMPLETED = 20  # SIGKILL the gateway once this many responses have completed


@dataclass
class Call:
    i: int
    stream: bool
    request_id: str | None = None  # X-Request-Id, once the response headers arrived
    status: int | None = None
    completed: bool = False  # HTTP 200 and the whole body read (non-streaming: JSON with usage; stream: [DONE])
    completion_tokens: int | None = None
    error: str | None = None
    done_at: float = float("nan")  # time.monotonic() when it completed or failed


async def one(http: httpx.AsyncClient, call: Call) -> Call:
    body: dict = {"model": "sim", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": f"n{call.i}"}]}
    if call.stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            call.status, call.request_id = r.status_code, r.headers.get("x-request-id")
            if call.stream:
                seen_done = False
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        seen_done = True
                    elif line.startswith("data: "):
                        doc = json.loads(line[6:])
                        if doc.get("usage"):
                            call.completion_tokens = doc["usage"]["completion_tokens"]
                        if "error" in doc:
                            call.error = str(doc["error"])
                call.completed = r.status_code == 200 and seen_done and call.error is None
            else:
                doc = json.loads(await r.aread())
                call.completion_tokens = (doc.get("usage") or {}).get("completion_tokens")
                call.completed = r.status_code == 200 and bool(doc.get("choices"))
    except (httpx.HTTPError, ValueError) as exc:
        call.error = f"{type(exc).__name__}: {exc}"
    if not call.completed and call.error is None:
        call.error = f"HTTP {call.status}"
    call.done_at = time.monotonic()
    return call


async def fire_and_kill(gw: GatewayProcess, key: str) -> tuple[list[Call], float, float]:
    limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
    timeout = httpx.Timeout(30.0, connect=10.0)
    calls = [Call(i, stream=i % 4 == 0) for i in range(N)]
    async with httpx.AsyncClient(
        base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=timeout
    ) as http:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(one(http, c)) for c in calls]
        deadline = t0 + 20
        while sum(c.completed for c in calls) < KILL_AFTER_COMPLETED:
            assert time.monotonic() < deadline, f"only {sum(c.completed for c in calls)} responses in 20 s"
            await asyncio.sleep(0.005)
        assert gw.proc is not None
        killed_at = time.monotonic()
        gw.kill()  # os.kill(uvicorn's pid, SIGKILL)
        await asyncio.gather(*tasks)
    return calls, t0, killed_at


async def a_few(gw: GatewayProcess, key: str, n: int) -> list[Call]:
    async with httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        return list(await asyncio.gather(*(one(http, Call(1000 + i, stream=i % 2 == 1)) for i in range(n))))


def table(store: UsageStore) -> pl.DataFrame:
    return store.query("SELECT * FROM usage ORDER BY request_id")


def test_usage_rows_exactly_once_across_a_gateway_crash(tmp_path: Path) -> None:
    t_start = time.monotonic()
    home = tmp_path / "home"
    settings = Settings(home=home)
    key = KeyStore(settings.keys_db).create("crash-test")[0]
    with OpenAISimulatorDouble(latency_s=0.5, capacity=50, name="sim-a") as sim:
        registry = tmp_path / "registry.yaml"
        registry.write_text(http_registry_yaml({"sim-a": sim.base_url}, {"sim": ["sim-a"]}))
        one_caller = {"FIRST_MAX_INFLIGHT_PER_CALLER": "0"}  # the N requests in flight all come from one key
        gw1 = GatewayProcess(home, registry, env=one_caller)
        gw2 = GatewayProcess(home, registry, env=one_caller)
        try:
            gw1.start()
            calls, t0, killed_at = asyncio.run(fire_and_kill(gw1, key))
            assert gw1.proc is not None and gw1.proc.returncode == -9
            time.sleep(0.6)  # let the double finish (or drop) what it was serving: its counters are final then
            reached_before = sim.requests

            gw2.start()
            after = asyncio.run(a_few(gw2, key, 6))
            reached = sim.requests
            assert all(c.completed for c in after), [c.error for c in after if not c.completed]

            spool = settings.spool_dir
            snapshot = tmp_path / "spool-snapshot"
            shutil.copytree(spool, snapshot)
            store = UsageStore(settings.usage_db)
            store.ingest(spool)  # the dead gateway's abandoned segment + the live one's open segment
        finally:
            gw1.kill()
            gw2.stop()
    store.ingest(spool)  # gw2's segment, closed at its shutdown: re-read, nothing doubled
    first = table(store)

    completed = [c for c in calls if c.completed]
    incomplete = [c for c in calls if not c.completed]
    when = sorted(round(c.done_at - t0, 2) for c in completed)
    assert KILL_AFTER_COMPLETED <= len(completed) < N, (
        f"the kill ({killed_at - t0:.2f} s) must land while requests are in flight; completions at {when}"
    )
    # Each unfinished one broke off with the connection; none got an error answer from the gateway.
    assert not [c.error for c in incomplete if c.error is None or c.error.startswith("HTTP ")]
    assert all(c.completion_tokens == MAX_TOKENS for c in completed + after)
    done_ids = {c.request_id for c in completed + after}
    assert None not in done_ids and len(done_ids) == len(completed) + len(after)

    counts = store.query("SELECT request_id, count(*) AS n FROM usage GROUP BY request_id")
    assert counts["n"].max() == 1, "a request id has more than one row"
    rows = dict(zip(first["request_id"], first.iter_rows(named=True), strict=True))
    assert len(rows) == first.height
    missing = done_ids - rows.keys()
    assert not missing, f"{len(missing)} completed responses have no usage row"
    for rid in done_ids:
        assert rows[rid]["status"] == 200 and rows[rid]["completion_tokens"] == MAX_TOKENS
        assert rows[rid]["user"] == "crash-test" and rows[rid]["cluster"] == "sim-a"
    # Nothing is rejected before the backend here (no limits, one healthy backend): every row is a request that
    # reached the double, a 200, and the rows of unfinished requests are at most the ones that reached it.
    assert first.filter(pl.col("status") != 200).height == 0
    assert first.height <= reached, (first.height, reached)
    assert first.height - len(done_ids) <= reached - len(done_ids)
    print(
        f"\n{len(completed)}/{N} completed before the kill, {reached_before} had reached the backend, "
        f"{first.height - len(after)} rows from the crashed gateway ({first.height - len(done_ids)} for responses "
        f"that never completed); killed at {killed_at - t0:.2f} s, completions {when[0]}-{when[-1]} s; "
        f"{time.monotonic() - t_start:.1f} s in all"
    )

    # Idempotent: ingesting again, and re-ingesting the spool as it was before the first ingest, changes nothing.
    assert store.ingest(spool) == 0
    assert store.ingest(snapshot) == 0
    assert list(snapshot.iterdir()) == []  # the snapshot's segments are all deletable (closed or dead writer)
    assert table(store).equals(first)
