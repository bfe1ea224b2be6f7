"""The usage flows (ingest-usage, usage-report, audit-retention) run as plain functions, the charts they draw, their
deployments, and audit mode through the gateway: prompts and completions go to the audit log, never to usage."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from litestar.testing import AsyncTestClient

from analytics.audit import AuditEntry, AuditLog
from analytics.charts import CHARTS, HEIGHT, WIDTH, write_charts
from analytics.records import UsageRecord
from analytics.reports import UsageFilter
from analytics.spool import UsageSpool
from analytics.store import UsageStore
from blocks.registry import ClusterSpec, ModelSpec, Registry
from core.settings import REPO_ROOT, Settings, get_settings
from deployments.local import DEPLOYMENTS
from first.gateway import create_gateway
from flows import usage
from flows.usage import build_report, enforce_audit_retention, ingest_usage, markdown_table, usage_report
from serving.auth import KeyStore
from tests.fakes.openai_simulator import OpenAISimulatorDouble

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rec(rid: str, when: datetime, **kw) -> UsageRecord:
    base = dict(request_id=rid, ts=when.timestamp(), user="alice", groups=["staff"], model="m-a", cluster="polaris",
                endpoint="chat.completions", latency_ms=100.0)  # fmt: skip
    base.update(kw)
    return UsageRecord(**base)


# A small data set whose report numbers are known by hand (r5 is outside the window).
# fmt: off
RECORDS = [
    rec("r1", T0, prompt_tokens=60, completion_tokens=40, total_tokens=100, latency_ms=100.0),
    rec("r2", T0 + timedelta(minutes=5), prompt_tokens=30, completion_tokens=20, total_tokens=50, latency_ms=300.0),
    rec("r3", T0 + timedelta(hours=1), user="bob", groups=[], model="m-b", cluster="aurora", prompt_tokens=20,
        completion_tokens=10, total_tokens=30, latency_ms=200.0),
    rec("r4", T0 + timedelta(hours=2), user="bob", groups=[], model="m-b", cluster="aurora", latency_ms=5.0,
        status=503, error_type="service_unavailable"),
    rec("r5", T0 - timedelta(days=2), user="carol", total_tokens=9999),
]
# fmt: on


def spool(settings: Settings, records: list[UsageRecord]) -> None:
    with UsageSpool(settings.spool_dir) as s:
        for r in records:
            s.append(r)


@pytest.fixture
def flow_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The settings a worker process running these flows reads from its environment (FIRST_HOME)."""
    monkeypatch.setenv("FIRST_HOME", str(settings.home))
    get_settings.cache_clear()
    assert get_settings().usage_db == settings.usage_db
    yield settings
    get_settings.cache_clear()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---- ingest-usage ----


def test_ingest_usage_is_idempotent_and_loses_nothing(flow_settings: Settings) -> None:
    spool(flow_settings, RECORDS[:3])
    [segment] = list(flow_settings.spool_dir.iterdir())
    saved = segment.read_bytes()
    assert ingest_usage.fn() == 3
    store = UsageStore(flow_settings.usage_db)
    table = store.rows()
    assert table.height == 3 and not any(flow_settings.spool_dir.iterdir())  # the spool is emptied after commit
    # A crash between commit and delete leaves the segment behind: the next run adds nothing.
    segment.write_bytes(saved)
    assert ingest_usage.fn() == 0
    assert store.rows().equals(table)
    assert ingest_usage.fn() == 0  # nothing left
    spool(flow_settings, RECORDS[3:])
    assert ingest_usage.fn() == 2 and store.count() == 5


# ---- reports ----


def test_markdown_table_formats_cells() -> None:
    import polars as pl

    df = pl.DataFrame({"a": ["x|y", None], "b": [0.23456, 1234.5], "c": [T0, None], "d": [[1, 2], []]})
    assert markdown_table(df).splitlines() == [
        "| a | b | c | d |",
        "|---|---|---|---|",
        "| x\\|y | 0.235 | 2026-01-01 10:00:00 | 1, 2 |",
        "| - | 1234.5 | - | - |",
    ]
    assert markdown_table(df.clear()) == "_No requests in this period._\n"
    assert "1 more row(s) not shown" in markdown_table(df, max_rows=1)


def test_report_has_the_hand_counted_numbers(settings: Settings, tmp_path: Path) -> None:
    spool(settings, RECORDS)
    store = UsageStore(settings.usage_db)
    store.ingest(settings.spool_dir)
    out = tmp_path / "report"
    report = build_report(store, T0 - timedelta(hours=1), T0 + timedelta(days=1), out, ingested=5)
    md = report.markdown
    assert report.requests == 4
    assert "# Usage from 2026-01-01 09:00 to 2026-01-02 10:00 UTC" in md and "5 new usage record(s)" in md
    # summary: requests, users, errors, error_rate, prompt, completion, total tokens, p50 latency (5,100,200,300)
    assert "| 4 | 2 | 1 | 0.250 | 110 | 70 | 180 | 150.0 |" in md
    # top users: user, requests, total, prompt, completion tokens, errors
    assert "| alice | 2 | 150 | 90 | 60 | 0 |" in md and "| bob | 2 | 30 | 20 | 10 | 1 |" in md
    # by model: model, requests, users, total, prompt, completion, errors, p50 latency
    assert "| m-a | 2 | 1 | 150 | 90 | 60 | 0 | 200.0 |" in md
    # by cluster: cluster, requests, models, total tokens, errors, p50 latency (200 and 5), cold starts
    assert "| aurora | 2 | 1 | 30 | 1 | 102.5 | 0 |" in md and "| polaris | 2 | 1 | 150 | 0 | 200.0 | 0 |" in md
    # latency (successful only): model, cluster, requests, streams, p50, p95, p99
    assert "| m-a | polaris | 2 | 0 | 200.0 | 290.0 | 298.0 |" in md and "| m-b | aurora | 1 | 0 | 200.0 |" in md
    # errors: status, error_type, model, requests, users
    assert "| 503 | service_unavailable | m-b | 1 | 1 |" in md
    assert "carol" not in md and "9999" not in md  # outside the window
    # the charts are listed (an artifact can't show local files) and report.md shows them
    assert [p.name for p in report.charts] == list(CHARTS)
    assert all(f"`{p}`" in md for p in report.charts)
    assert report.markdown_file == out / "report.md"
    assert "![tokens-per-day](tokens-per-day.png)" in report.markdown_file.read_text()


def test_usage_report_flow_ingests_and_writes_todays_charts(flow_settings: Settings) -> None:
    now = datetime.now(UTC)
    spool(flow_settings, [rec("new1", now - timedelta(hours=1)), rec("new2", now - timedelta(hours=2), user="bob"),
                          rec("old", now - timedelta(days=3))])  # fmt: skip
    result = usage_report.fn(days=1)
    assert (result["ingested"], result["requests"]) == (3, 2)
    charts = [Path(p) for p in result["charts"]]
    assert [p.parent for p in charts] == [flow_settings.reports_dir / datetime.fromisoformat(result["until"]).date()
                                          .isoformat()] * len(CHARTS)  # fmt: skip
    assert all(png_size(p) == (WIDTH, HEIGHT) for p in charts)
    week = usage_report.fn(days=7)
    assert week["requests"] == 3 and week["ingested"] == 0
    assert Path(week["charts"][0]).parent.name.endswith("-7d")  # does not overwrite the daily charts
    with pytest.raises(ValueError):
        usage_report.fn(days=0)


# ---- charts ----


def test_charts_are_pngs_of_the_fixed_size(settings: Settings, tmp_path: Path) -> None:
    spool(settings, RECORDS + [rec(f"d{i}", T0 + timedelta(days=i), model=f"m-{i % 3}") for i in range(1, 9)])
    store = UsageStore(settings.usage_db)
    store.ingest(settings.spool_dir)
    paths = write_charts(store, tmp_path / "charts")
    assert [p.name for p in paths] == list(CHARTS) == [
        "tokens-per-day.png", "latency-by-cluster.png", "top-users.png", "error-rate.png",
    ]  # fmt: skip
    assert all(png_size(p) == (WIDTH, HEIGHT) == (1000, 500) for p in paths)
    filtered = write_charts(store, tmp_path / "bob", UsageFilter(user="bob", since=T0))
    assert all(png_size(p) == (WIDTH, HEIGHT) for p in filtered)


def test_charts_of_no_data_say_so_instead_of_failing(settings: Settings, tmp_path: Path) -> None:
    paths = write_charts(UsageStore(settings.usage_db), tmp_path / "empty")
    assert len(paths) == 4 and all(png_size(p) == (WIDTH, HEIGHT) for p in paths)
    # a window with rows but only failed requests: no latency to draw
    spool(settings, RECORDS[3:4])
    store = UsageStore(settings.usage_db)
    store.ingest(settings.spool_dir)
    assert all(png_size(p) == (WIDTH, HEIGHT) for p in write_charts(store, tmp_path / "errors-only"))


# ---- audit retention ----


def _day_files(log: AuditLog, today: date, ages: range) -> None:
    for age in ages:
        day = datetime.combine(today - timedelta(days=age), datetime.min.time(), UTC) + timedelta(hours=12)
        log.append(AuditEntry(request_id=f"a{age}", ts=day.timestamp(), user="u", model="m", endpoint="completions"))


def test_retention_deletes_only_days_older_than_n(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    today = date(2026, 3, 31)
    _day_files(log, today, range(0, 40))
    (log.directory / "notes.txt").write_text("not an audit file")
    assert len(log.days()) == 40
    assert log.expired(30, today) == [log.path_for(today - timedelta(days=a)) for a in range(39, 30, -1)]
    deleted = log.enforce_retention(30, today)
    assert [p.name for p in deleted] == [f"{today - timedelta(days=a)}.jsonl" for a in range(39, 30, -1)]
    assert [d for d, _ in log.days()] == [today - timedelta(days=a) for a in range(30, -1, -1)]
    assert (log.directory / "notes.txt").exists()
    assert log.enforce_retention(30, today) == []
    assert [p.name for p in log.enforce_retention(0, today)] == [
        f"{today - timedelta(days=a)}.jsonl" for a in range(30, 0, -1)
    ]  # only today is left
    assert [p.name for p in log.purge(today)] == [f"{today}.jsonl"] and log.days() == []


def test_audit_files_are_private_and_purgeable_by_range(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    today = date(2026, 3, 31)
    _day_files(log, today, range(0, 5))
    assert (log.directory.stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o777) == 0o600 for _, p in log.days())
    deleted = log.purge(today - timedelta(days=3), today - timedelta(days=1))
    assert len(deleted) == 3 and [d for d, _ in log.days()] == [today - timedelta(days=4), today]
    [entry] = log.entries(today)
    assert entry["request_id"] == "a0" and entry["time"].startswith(today.isoformat())


def test_audit_retention_flow(flow_settings: Settings) -> None:
    log = AuditLog(flow_settings.audit_dir)
    today = datetime.now(UTC).date()
    _day_files(log, today, range(0, 3))
    _day_files(log, today, range(40, 43))
    old = [log.path_for(today - timedelta(days=a)) for a in (42, 41, 40)]
    assert enforce_audit_retention.fn(dry_run=True) == [str(p) for p in old]
    assert len(log.days()) == 6
    assert enforce_audit_retention.fn() == [str(p) for p in old]  # FIRST_AUDIT_RETENTION_DAYS: 30
    assert len(log.days()) == 3
    assert len(enforce_audit_retention.fn(retention_days=1)) == 1


# ---- deployments ----


def test_the_usage_deployments_are_declared_and_scheduled() -> None:
    doc = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    declared = {d["name"]: d for d in doc["deployments"] if d["entrypoint"].startswith("flows/usage.py:")}
    assert sorted(declared) == ["audit-retention", "ingest-usage", "usage-report"]
    for name, d in declared.items():
        fn = getattr(usage, d["entrypoint"].split(":")[1])
        assert f"{fn.name}/{name}" in DEPLOYMENTS and fn.name == name
        assert d["work_pool"]["name"] == "first-local" and d["description"].strip()
    assert declared["ingest-usage"]["schedules"] == [{"interval": 60}]
    assert declared["usage-report"]["schedules"] == [{"cron": "0 6 * * *", "timezone": "UTC"}]
    assert declared["usage-report"]["parameters"] == {"days": 1}
    assert declared["audit-retention"]["schedules"][0]["cron"] == "0 3 * * *"


@pytest.mark.parametrize("fn", [ingest_usage, usage_report, enforce_audit_retention])
def test_every_usage_flow_parameter_has_a_description(fn) -> None:
    from prefect.utilities.callables import parameter_schema

    for name, prop in parameter_schema(fn.fn).properties.items():
        assert prop.get("description"), f"{fn.name}: parameter {name} has no description"


# ---- audit mode through the gateway ----

PROMPT = "please remember the secret word periwinkle"


@pytest.fixture
def sim():
    with OpenAISimulatorDouble(latency_s=0.01, name="sim") as s:
        yield s


def _registry(sim: OpenAISimulatorDouble) -> Registry:
    return Registry(
        clusters={"sim": ClusterSpec(name="sim", transport="http", base_url=sim.base_url)},
        models={"m": ModelSpec(name="m", clusters=["sim"], path="-")},
    )


async def _requests(settings: Settings, sim: OpenAISimulatorDouble) -> tuple[str, str, str]:
    """One non-streaming chat, one streaming chat and one completion; returns the three generated texts."""
    key = KeyStore(settings.keys_db).create("alice", ["staff"])[0]
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}],
            "max_tokens": 5}  # fmt: skip
    async with AsyncTestClient(app=create_gateway(settings, _registry(sim))) as client:
        r = await client.post("/v1/chat/completions", json=chat, headers=auth)
        assert r.status_code == 200, r.text
        plain = r.json()["choices"][0]["message"]["content"]
        r = await client.post("/v1/chat/completions", json={**chat, "stream": True, "max_tokens": 7}, headers=auth)
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in events if c.get("choices"))
        r = await client.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 3}, headers=auth)
        assert r.status_code == 200
        text = r.json()["choices"][0]["text"]
    return plain, streamed, text


async def test_audit_mode_keeps_text_in_the_audit_log_and_never_in_usage(settings: Settings, sim) -> None:
    settings = settings.model_copy(update={"audit_mode": True})
    plain, streamed, text = await _requests(settings, sim)
    assert plain and streamed and text and len(streamed.split()) == 7
    log = AuditLog(settings.audit_dir)
    [(day, _)] = log.days()
    entries = list(log.entries(day))
    assert [(e["endpoint"], e["user"], e["model"], e["cluster"], e["status"]) for e in entries] == [
        ("chat.completions", "alice", "m", "sim", 200), ("chat.completions", "alice", "m", "sim", 200),
        ("completions", "alice", "m", "sim", 200),
    ]  # fmt: skip
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    assert [e["prompt"] for e in entries] == [messages, messages, PROMPT]
    assert [e["completion"] for e in entries] == [plain, streamed, text]
    # the usage records (spool and table) hold no text
    spooled = b"".join(p.read_bytes() for p in settings.spool_dir.iterdir())
    assert spooled.count(b'"request_id"') == 3
    assert b"periwinkle" not in spooled and plain.encode() not in spooled
    store = UsageStore(settings.usage_db)
    assert store.ingest(settings.spool_dir) == 3
    rows = store.rows()
    assert sorted(rows["request_id"]) == sorted(e["request_id"] for e in entries)
    assert not any("periwinkle" in str(v) or plain in str(v) for row in rows.iter_rows() for v in row)


async def test_audit_mode_keeps_the_text_of_responses_and_anthropic_messages(settings: Settings, sim) -> None:
    """The Responses API and Anthropic's Messages, whole and streamed: their prompts (with ``instructions`` and
    ``system``) and generated text are in the audit log, in the same form as chat's."""
    settings = settings.model_copy(update={"audit_mode": True})
    key = KeyStore(settings.keys_db).create("alice", ["staff"])[0]
    auth = {"Authorization": f"Bearer {key}"}
    resp = {"model": "m", "input": PROMPT, "instructions": "be brief", "max_output_tokens": 4}
    msgs = {"model": "m", "system": "be brief", "max_tokens": 6, "messages": [{"role": "user", "content": PROMPT}]}
    texts = []
    async with AsyncTestClient(app=create_gateway(settings, _registry(sim))) as client:
        for path, body in (("/v1/responses", resp), ("/v1/messages", msgs)):
            r = await client.post(path, json=body, headers=auth)
            assert r.status_code == 200, r.text
            doc = r.json()
            texts.append(
                doc["output"][0]["content"][0]["text"] if path.endswith("responses") else doc["content"][0]["text"]
            )
            r = await client.post(path, json={**body, "stream": True}, headers=auth)
            assert r.status_code == 200, r.text
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            deltas = [e["delta"] for e in events if e.get("type") == "response.output_text.delta"] + [
                e["delta"]["text"] for e in events if e.get("type") == "content_block_delta"
            ]
            texts.append("".join(deltas))
    assert all(texts)
    [(day, _)] = AuditLog(settings.audit_dir).days()
    entries = list(AuditLog(settings.audit_dir).entries(day))
    assert [e["endpoint"] for e in entries] == ["responses", "responses", "messages", "messages"]
    assert [e["completion"] for e in entries] == texts
    assert entries[0]["prompt"] == {"instructions": "be brief", "input": PROMPT}
    assert entries[2]["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]


async def test_without_audit_mode_no_text_is_kept(settings: Settings, sim) -> None:
    await _requests(settings, sim)
    assert not settings.audit_dir.exists()
    assert b"periwinkle" not in b"".join(p.read_bytes() for p in settings.spool_dir.iterdir())


async def test_an_audit_write_failure_fails_open_and_is_counted(settings: Settings, sim) -> None:
    """Audit mode with an audit folder that cannot be created: the answers are still served and metered, and
    /metrics counts the entries lost, for operators to alert on."""
    settings = settings.model_copy(update={"audit_mode": True})
    settings.audit_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.audit_dir.write_text("a file where the audit folder should be")
    keys = KeyStore(settings.keys_db)
    alice, root = keys.create("alice")[0], keys.create("root", ["admin"])[0]
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    async with AsyncTestClient(app=create_gateway(settings, _registry(sim))) as client:
        for stream in (False, True):
            r = await client.post(
                "/v1/chat/completions", json={**body, "stream": stream}, headers={"Authorization": f"Bearer {alice}"}
            )
            assert r.status_code == 200, r.text
        metrics = (await client.get("/metrics", headers={"Authorization": f"Bearer {root}"})).text
    assert "first_audit_write_failures_total 2.0" in metrics
    assert settings.audit_dir.is_file()
    assert UsageStore(settings.usage_db).ingest(settings.spool_dir) == 2
