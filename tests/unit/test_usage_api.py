"""GET /v1/usage through the gateway: reports over the usage table (seeded through the spool and UsageStore, as
the ingest-usage flow does), admins see everyone, callers only themselves, OpenAI-shaped errors, and filters."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from litestar.testing import AsyncTestClient

from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from analytics.store import UsageStore
from blocks.registry import ClusterSpec, ModelSpec, Registry
from core.settings import Settings
from first.gateway import create_gateway
from first.runner import free_port
from serving.auth import KeyStore

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)


def rec(rid: str, when: datetime, user: str, **kw) -> UsageRecord:
    base = dict(request_id=rid, ts=when.timestamp(), user=user, groups=[], model="m-a", cluster="polaris",
                endpoint="chat.completions", total_tokens=10, latency_ms=100.0)  # fmt: skip
    base.update(kw)
    return UsageRecord(**base)


def records() -> list[UsageRecord]:
    """The rows, two of them relative to now: built when a test starts, not when the module was collected (a
    full run reaches these tests half an hour later, and "2 h ago" must still mean that)."""
    now = datetime.now(UTC)
    return [
        rec("a1", T0, "alice", groups=["staff"], total_tokens=100),
        rec("a2", T0 + timedelta(hours=1), "alice", groups=["staff"], model="m-b", cluster="aurora", total_tokens=50),
        rec("a3", now - timedelta(hours=2), "alice", groups=["staff"], total_tokens=7),
        rec("b1", T0, "bob", total_tokens=30, status=503, error_type="service_unavailable"),
        rec("b2", now - timedelta(hours=3), "bob", model="m-b", cluster="aurora", total_tokens=20),
        rec("c1", T0 + timedelta(days=1), "carol", groups=["staff"], total_tokens=1000),
    ]


@pytest.fixture
def keys(settings: Settings) -> dict[str, str]:
    store = KeyStore(settings.keys_db)
    return {
        "root": store.create("root", ["admin"])[0],
        "alice": store.create("alice", ["staff"])[0],
        "bob": store.create("bob")[0],
    }


@pytest.fixture
async def client(settings: Settings, keys):
    with UsageSpool(settings.spool_dir) as spool:
        rows = records()
        for r in rows:
            spool.append(r)
    assert UsageStore(settings.usage_db).ingest(settings.spool_dir) == len(rows)
    down = ClusterSpec(name="down", transport="http", base_url=f"http://127.0.0.1:{free_port()}")
    registry = Registry(clusters={"down": down}, models={"m": ModelSpec(name="m", clusters=["down"], path="-")})
    async with AsyncTestClient(app=create_gateway(settings, registry)) as c:
        yield c


async def usage(client: AsyncTestClient, key: str, **params: str) -> list[dict]:
    r = await client.get("/v1/usage", params=params, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["object"] == "usage.report" and doc["report"] == params.get("report", "summary")
    return doc["data"]


def is_openai_error(r, status: int, kind: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


async def test_admins_see_everyone(client, keys) -> None:
    [s] = await usage(client, keys["root"])
    assert (s["requests"], s["users"], s["errors"], s["total_tokens"]) == (6, 3, 1, 1207)
    assert datetime.fromisoformat(s["first_ts"]) == T0  # datetimes are ISO strings
    top = await usage(client, keys["root"], report="top-users")
    assert [(u["user"], u["total_tokens"]) for u in top] == [("carol", 1000), ("alice", 157), ("bob", 50)]
    assert [u["user"] for u in await usage(client, keys["root"], report="top-users", limit="1")] == ["carol"]
    bob = await usage(client, keys["root"], report="top-users", user="bob")
    assert [(u["user"], u["requests"], u["errors"]) for u in bob] == [("bob", 2, 1)]


async def test_callers_see_only_their_own_usage(client, keys) -> None:
    [s] = await usage(client, keys["alice"])
    assert (s["requests"], s["users"], s["total_tokens"]) == (3, 1, 157)
    assert [u["user"] for u in await usage(client, keys["alice"], report="top-users")] == ["alice"]
    assert (await usage(client, keys["alice"], user="alice"))[0]["requests"] == 3
    models = await usage(client, keys["bob"], report="by-model")
    assert [(m["model"], m["requests"]) for m in models] == [("m-a", 1), ("m-b", 1)]
    # a group filter can't widen it: carol is in staff too
    assert (await usage(client, keys["alice"], group="staff"))[0]["total_tokens"] == 157


async def test_asking_for_someone_elses_usage_is_403(client, keys) -> None:
    r = await client.get("/v1/usage", params={"user": "bob"}, headers={"Authorization": f"Bearer {keys['alice']}"})
    is_openai_error(r, 403, "permission_error", "user")
    r = await client.get("/v1/usage")
    is_openai_error(r, 401, "authentication_error")


async def test_bad_report_and_bad_times_are_400(client, keys) -> None:
    auth = {"Authorization": f"Bearer {keys['root']}"}
    r = await client.get("/v1/usage", params={"report": "everything"}, headers=auth)
    is_openai_error(r, 400, "invalid_request_error", "report")
    assert "top-users" in r.json()["error"]["message"]
    for param, value in (("since", "yesterday"), ("until", "2026-13-45"), ("since", "5y")):
        r = await client.get("/v1/usage", params={param: value}, headers=auth)
        is_openai_error(r, 400, "invalid_request_error", param)
    r = await client.get("/v1/usage", params={"report": "top-users", "limit": "0"}, headers=auth)
    is_openai_error(r, 400, "invalid_request_error", "limit")
    r = await client.get("/v1/usage", params={"limit": "many"}, headers=auth)
    is_openai_error(r, 400, "invalid_request_error")


async def test_filters(client, keys) -> None:
    root = keys["root"]
    [s] = await usage(client, root, model="m-b")
    assert (s["requests"], s["total_tokens"]) == (2, 70)
    clusters = await usage(client, root, report="by-cluster", cluster="aurora")
    assert [(c["cluster"], c["requests"]) for c in clusters] == [("aurora", 2)]
    [s] = await usage(client, root, group="staff")
    assert (s["requests"], s["users"]) == (4, 2)
    # ISO bounds: since inclusive, until exclusive; naive is UTC, a date is its midnight
    [s] = await usage(client, root, since="2026-01-01T10:00:00Z", until="2026-01-01T11:00:00")
    assert s["requests"] == 2  # a1 and b1; a2 starts at until
    [s] = await usage(client, root, since="2026-01-02", until="2026-01-03")
    assert s["total_tokens"] == 1000
    # spans before now
    [s] = await usage(client, root, since="1d")
    assert (s["requests"], s["total_tokens"]) == (2, 27)
    [s] = await usage(client, root, since="150m", until="1h")
    assert s["requests"] == 1  # a3 (2 h ago); b2 is 3 h ago
    days = await usage(client, root, report="daily", until="2026-01-02")
    assert [(d["day"], d["model"], d["requests"]) for d in days] == [("2026-01-01", "m-a", 2), ("2026-01-01", "m-b", 1)]
    errors = await usage(client, root, report="errors")
    assert [(e["status"], e["error_type"], e["users"], e["requests"]) for e in errors] == [
        (503, "service_unavailable", 1, 1)
    ]
    assert await usage(client, keys["alice"], report="errors") == []
    lat = await usage(client, root, report="latency", model="m-a", cluster="polaris")
    assert [(x["model"], x["cluster"], x["requests"], x["p50_latency_ms"]) for x in lat] == [
        ("m-a", "polaris", 3, 100.0)
    ]


async def test_an_empty_table_reports_zero(settings: Settings, keys) -> None:
    registry = Registry(clusters={}, models={})
    async with AsyncTestClient(app=create_gateway(settings, registry)) as client:
        [s] = await usage(client, keys["alice"])
        assert s["requests"] == 0 and s["first_ts"] is None
        assert await usage(client, keys["root"], report="top-users") == []


async def test_usage_reports_are_rate_limited_per_caller(settings: Settings, keys) -> None:
    settings.usage_rpm = 3
    registry = Registry(clusters={}, models={})
    async with AsyncTestClient(app=create_gateway(settings, registry)) as c:
        for _ in range(3):
            await usage(c, keys["bob"])
        r = await c.get("/v1/usage", headers={"Authorization": f"Bearer {keys['bob']}"})
        is_openai_error(r, 429, "rate_limit_error")
        assert int(r.headers["retry-after"]) >= 1
        await usage(c, keys["alice"])  # another caller has a budget of its own


async def test_a_cached_report_never_outlives_an_ingest(client, keys, settings: Settings) -> None:
    """Reports are cached for a few seconds (a polling dashboard reads the file once), but new rows show at once."""
    [before] = await usage(client, keys["bob"])
    assert (await usage(client, keys["bob"]))[0] == before  # the same answer again, within the cache's life
    with UsageSpool(settings.spool_dir) as spool:
        spool.append(rec("new", T0 + timedelta(hours=1), "bob", total_tokens=5))
    time.sleep(0.01)  # a new modification time for the database file
    UsageStore(settings.usage_db).ingest(settings.spool_dir)
    [after] = await usage(client, keys["bob"])
    assert after["requests"] == before["requests"] + 1
