"""Usage reports (analytics.reports), the notebook helpers (analytics.usage/report) and `first usage ...`.

Twelve hand-made records over three UTC days; every expected number below was worked out by hand
from this table (not recomputed with the reports' SQL).

    id   day/time (UTC)    user   groups      model cluster  stream  p/c/total   latency ttft  status    cold
    r01  01-01 01:00       alice  staff,hpc   m-a   polaris  yes     10/20/30    100     10    200       yes
    r02  01-01 02:00       alice  staff,hpc   m-a   polaris  no       5/5/10     200           200
    r03  01-01 03:00       bob    hpc         m-b   aurora   yes     20/30/50    300     30    200
    r04  01-01 04:00       carol  -           m-a   -        no       0/0/0        5           502 api_error
    r05  01-02 00:00       alice  staff,hpc   m-b   aurora   yes     10/10/20    400     40    200       yes
    r06  01-02 06:00       bob    hpc         m-b   polaris  no      30/70/100   500           200
    r07  01-02 12:00       bob    hpc         m-a   polaris  no       5/0/5       50           502 api_error
    r08  01-02 18:00       carol  -           m-b   aurora   yes     15/25/40    600     60    200
    r09  01-03 00:00       dave   staff       m-a   polaris  yes     40/60/100   700     70    200
    r10  01-03 01:00       dave   staff       m-a   polaris  no      10/10/20    800           200
    r11  01-03 02:00       alice  staff,hpc   m-b   -        no       0/0/0       10           429 rate_limit_error
    r12  01-03 23:59:59    bob    hpc         m-b   aurora   no      25/25/50    900           200       yes
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import polars as pl
import pytest
from typer.testing import CliRunner

import analytics
from analytics import reports
from analytics.records import UsageRecord
from analytics.reports import UsageFilter, UsageQueryError
from analytics.spool import UsageSpool
from analytics.store import UsageStore
from core.settings import get_settings
from first.cli import app

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
H = 3600.0
D1, D2, D3 = date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)
STAFF_HPC, HPC, STAFF = ["staff", "hpc"], ["hpc"], ["staff"]

# (id, ts, user, groups, model, cluster, stream, prompt, completion, total, latency, ttft, status, error_type, cold)
ROWS = [
    ("r01", T0 + 1 * H, "alice", STAFF_HPC, "m-a", "polaris", True, 10, 20, 30, 100.0, 10.0, 200, None, True),
    ("r02", T0 + 2 * H, "alice", STAFF_HPC, "m-a", "polaris", False, 5, 5, 10, 200.0, None, 200, None, False),
    ("r03", T0 + 3 * H, "bob", HPC, "m-b", "aurora", True, 20, 30, 50, 300.0, 30.0, 200, None, False),
    ("r04", T0 + 4 * H, "carol", [], "m-a", None, False, 0, 0, 0, 5.0, None, 502, "api_error", False),
    ("r05", T0 + 24 * H, "alice", STAFF_HPC, "m-b", "aurora", True, 10, 10, 20, 400.0, 40.0, 200, None, True),
    ("r06", T0 + 30 * H, "bob", HPC, "m-b", "polaris", False, 30, 70, 100, 500.0, None, 200, None, False),
    ("r07", T0 + 36 * H, "bob", HPC, "m-a", "polaris", False, 5, 0, 5, 50.0, None, 502, "api_error", False),
    ("r08", T0 + 42 * H, "carol", [], "m-b", "aurora", True, 15, 25, 40, 600.0, 60.0, 200, None, False),
    ("r09", T0 + 48 * H, "dave", STAFF, "m-a", "polaris", True, 40, 60, 100, 700.0, 70.0, 200, None, False),
    ("r10", T0 + 49 * H, "dave", STAFF, "m-a", "polaris", False, 10, 10, 20, 800.0, None, 200, None, False),
    ("r11", T0 + 50 * H, "alice", STAFF_HPC, "m-b", None, False, 0, 0, 0, 10.0, None, 429, "rate_limit_error", False),
    ("r12", T0 + 72 * H - 1, "bob", HPC, "m-b", "aurora", False, 25, 25, 50, 900.0, None, 200, None, True),
]  # fmt: skip
FIELDS = (
    "request_id", "ts", "user", "groups", "model", "cluster", "stream", "prompt_tokens", "completion_tokens",
    "total_tokens", "latency_ms", "ttft_ms", "status", "error_type", "cold_start",
)  # fmt: skip


def records() -> list[UsageRecord]:
    return [UsageRecord(endpoint="chat.completions", **dict(zip(FIELDS, row, strict=True))) for row in ROWS]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def write_spool(spool_dir: Path, recs: list[UsageRecord]) -> None:
    spool = UsageSpool(spool_dir)
    for r in recs:
        spool.append(r)
    spool.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> UsageStore:
    tmp = tmp_path_factory.mktemp("reports")
    write_spool(tmp / "spool", records())
    s = UsageStore(tmp / "usage.duckdb")
    assert s.ingest(tmp / "spool") == 12
    return s


def records_of(df: pl.DataFrame, key: str | tuple[str, ...]) -> dict:
    keys = (key,) if isinstance(key, str) else key
    out = {}
    for row in df.to_dicts():
        k = tuple(row.pop(c) for c in keys)
        out[k[0] if len(k) == 1 else k] = row
    return out


# --- filter ------------------------------------------------------------------------------------


def test_filter_where_clause_and_time_normalisation() -> None:
    assert UsageFilter().where() == ("", {})
    where, params = UsageFilter(since=datetime(2026, 1, 2), user="bob", group="hpc").where()
    assert where == 'WHERE ts >= $since AND "user" = $user AND list_contains("groups", $group)'
    assert params == {"since": utc(2026, 1, 2), "user": "bob", "group": "hpc"}
    # naive = UTC; aware converted to UTC; dates are UTC midnight; ISO strings parse
    plus_one = timezone(timedelta(hours=1))
    assert UsageFilter(since=datetime(2026, 1, 2, 1, tzinfo=plus_one)).since == utc(2026, 1, 2)
    assert UsageFilter(since=D2).since == utc(2026, 1, 2)  # type: ignore[arg-type]
    assert UsageFilter(until="2026-01-02T06:00").until == utc(2026, 1, 2, 6)  # type: ignore[arg-type]


# --- reports -----------------------------------------------------------------------------------


def test_summary_overall(store: UsageStore) -> None:
    df = reports.summary(store)
    assert df.columns == [
        "requests", "users", "errors", "error_rate", "prompt_tokens", "completion_tokens", "total_tokens",
        "p50_latency_ms", "p95_latency_ms", "p50_ttft_ms", "cold_starts", "first_ts", "last_ts",
    ]  # fmt: skip
    row = df.row(0, named=True)
    assert df.height == 1
    assert (row["requests"], row["users"], row["errors"], row["error_rate"]) == (12, 4, 3, 0.25)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (170, 255, 425)
    # latencies sorted: 5 10 50 100 200 300 | 400 500 600 700 800 900 -> p50 = (300+400)/2; p95 at 10.45 -> 845
    assert row["p50_latency_ms"] == pytest.approx(350.0)
    assert row["p95_latency_ms"] == pytest.approx(845.0)
    assert row["p50_ttft_ms"] == pytest.approx(40.0)  # 10 30 40 60 70
    assert row["cold_starts"] == 3
    assert row["first_ts"] == utc(2026, 1, 1, 1)
    assert row["last_ts"] == utc(2026, 1, 3, 23, 59, 59)


@pytest.mark.parametrize(
    ("f", "requests", "users", "total_tokens", "errors"),
    [
        (UsageFilter(user="bob"), 4, 1, 205, 1),
        (UsageFilter(model="m-a"), 6, 4, 165, 2),
        (UsageFilter(cluster="aurora"), 4, 3, 160, 0),
        (UsageFilter(group="staff"), 6, 2, 180, 1),  # alice and dave
        (UsageFilter(group="hpc"), 8, 2, 265, 2),  # alice and bob
        (UsageFilter(since=datetime(2026, 1, 2)), 8, 4, 335, 2),  # since is inclusive (r05 at 00:00)
        (UsageFilter(since=datetime(2026, 1, 2), until=datetime(2026, 1, 3)), 4, 3, 165, 1),  # until exclusive
        (UsageFilter(until=datetime(2026, 1, 3, 23, 59, 59)), 11, 4, 375, 3),  # r12 is just outside
        (UsageFilter(user="bob", since=datetime(2026, 1, 2)), 3, 1, 155, 1),
        (UsageFilter(group="staff", model="m-b", cluster="aurora"), 1, 1, 20, 0),  # r05
    ],
)
def test_summary_filters(store: UsageStore, f: UsageFilter, requests: int, users: int, total_tokens: int, errors: int):
    row = reports.summary(store, f).row(0, named=True)
    assert (row["requests"], row["users"], row["total_tokens"], row["errors"]) == (
        requests,
        users,
        total_tokens,
        errors,
    )


def test_summary_of_nothing_is_one_row_of_zeros(store: UsageStore) -> None:
    row = reports.summary(store, UsageFilter(user="nobody")).row(0, named=True)
    assert (row["requests"], row["users"], row["errors"], row["total_tokens"], row["cold_starts"]) == (0, 0, 0, 0, 0)
    assert row["error_rate"] is None and row["p50_latency_ms"] is None and row["first_ts"] is None


def test_summary_by_user_and_model(store: UsageStore) -> None:
    df = reports.summary(store, by=("user", "model"))
    assert df.columns[:3] == ["user", "model", "requests"]
    got = {k: (v["requests"], v["total_tokens"], v["errors"]) for k, v in records_of(df, ("user", "model")).items()}
    assert got == {
        ("alice", "m-a"): (2, 40, 0),
        ("alice", "m-b"): (2, 20, 1),
        ("bob", "m-a"): (1, 5, 1),
        ("bob", "m-b"): (3, 200, 0),
        ("carol", "m-a"): (1, 0, 1),
        ("carol", "m-b"): (1, 40, 0),
        ("dave", "m-a"): (2, 120, 0),
    }
    assert list(got) == sorted(got)  # ordered by the group columns
    with pytest.raises(ValueError, match="cannot summarise by"):
        reports.summary(store, by=("nope",))


def test_top_users(store: UsageStore) -> None:
    df = reports.top_users(store)
    assert df.columns == ["user", "requests", "total_tokens", "prompt_tokens", "completion_tokens", "errors"]
    assert df.rows() == [
        ("bob", 4, 205, 80, 125, 1),
        ("dave", 2, 120, 50, 70, 0),
        ("alice", 4, 60, 25, 35, 1),
        ("carol", 2, 40, 15, 25, 1),
    ]
    assert reports.top_users(store, limit=2)["user"].to_list() == ["bob", "dave"]
    assert reports.top_users(store, UsageFilter(model="m-b"))["user"].to_list() == ["bob", "carol", "alice"]


def test_by_model(store: UsageStore) -> None:
    df = reports.by_model(store)
    assert df.columns == [
        "model", "requests", "users", "total_tokens", "prompt_tokens", "completion_tokens", "errors", "p50_latency_ms"
    ]  # fmt: skip
    assert df.rows() == [
        ("m-a", 6, 4, 165, 70, 95, 2, 150.0),  # latencies 5 50 100 | 200 700 800
        ("m-b", 6, 3, 260, 100, 160, 1, 450.0),  # latencies 10 300 400 | 500 600 900
    ]
    assert reports.by_model(store, UsageFilter(cluster="polaris")).rows() == [
        ("m-a", 5, 3, 165, 70, 95, 1, 200.0),
        ("m-b", 1, 1, 100, 30, 70, 0, 500.0),
    ]


def test_by_cluster(store: UsageStore) -> None:
    df = reports.by_cluster(store)
    assert df.columns == ["cluster", "requests", "models", "total_tokens", "errors", "p50_latency_ms", "cold_starts"]
    assert df.rows() == [
        ("aurora", 4, 1, 160, 0, 500.0, 2),
        ("polaris", 6, 2, 265, 1, 350.0, 1),
        (None, 2, 2, 0, 2, 7.5, 0),  # never routed: r04, r11 (last)
    ]


def test_latency_successful_requests_only(store: UsageStore) -> None:
    df = reports.latency(store)
    assert df.columns == [
        "model", "cluster", "requests", "streams", "p50_latency_ms", "p95_latency_ms", "p99_latency_ms",
        "p50_ttft_ms", "p95_ttft_ms", "p99_ttft_ms",
    ]  # fmt: skip
    rows = records_of(df, ("model", "cluster"))
    assert list(rows) == [("m-a", "polaris"), ("m-b", "aurora"), ("m-b", "polaris")]  # no failed-only groups
    expected = {
        # latencies 100 200 700 800; ttft 10 70
        ("m-a", "polaris"): (4, 2, 450.0, 785.0, 797.0, 40.0, 67.0, 69.4),
        # latencies 300 400 600 900; ttft 30 40 60
        ("m-b", "aurora"): (4, 3, 500.0, 855.0, 891.0, 40.0, 58.0, 59.6),
        ("m-b", "polaris"): (1, 0, 500.0, 500.0, 500.0, None, None, None),
    }
    for key, want in expected.items():
        assert tuple(rows[key].values()) == pytest.approx(want), key


def test_errors(store: UsageStore) -> None:
    df = reports.errors(store)
    assert df.columns == ["status", "error_type", "model", "requests", "users", "last_ts", "rate"]
    assert df.rows() == [
        (502, "api_error", "m-a", 2, 2, utc(2026, 1, 2, 12), pytest.approx(2 / 12)),
        (429, "rate_limit_error", "m-b", 1, 1, utc(2026, 1, 3, 2), pytest.approx(1 / 12)),
    ]
    # rate is relative to all the requests the filter matches (bob: 4 requests, 1 failed)
    assert reports.errors(store, UsageFilter(user="bob")).rows() == [
        (502, "api_error", "m-a", 1, 1, utc(2026, 1, 2, 12), 0.25)
    ]
    assert reports.errors(store, UsageFilter(user="dave")).height == 0


def test_daily(store: UsageStore) -> None:
    df = reports.daily(store)
    assert df.columns == ["day", "model", "requests", "users", "total_tokens", "errors", "p50_latency_ms"]
    assert df.schema["day"] == pl.Date
    assert df.rows() == [
        (D1, "m-a", 3, 2, 40, 1, 100.0),
        (D1, "m-b", 1, 1, 50, 0, 300.0),
        (D2, "m-a", 1, 1, 5, 1, 50.0),
        (D2, "m-b", 3, 3, 160, 0, 500.0),
        (D3, "m-a", 2, 1, 120, 0, 750.0),
        (D3, "m-b", 2, 2, 50, 1, 455.0),  # r12 at 23:59:59 UTC is still day 3
    ]
    assert reports.daily(store, UsageFilter(since=D3, model="m-a")).rows() == [(D3, "m-a", 2, 1, 120, 0, 750.0)]  # type: ignore[arg-type]


def test_reports_registry_and_run_report(store: UsageStore) -> None:
    assert list(reports.REPORTS) == [
        "summary",
        "by-traffic",
        "top-users",
        "by-model",
        "by-cluster",
        "latency",
        "errors",
        "daily",
    ]
    assert reports.run_report(store, "top_users", UsageFilter(group="staff"), limit=1)["user"].to_list() == ["dave"]
    with pytest.raises(ValueError, match="unknown report"):
        reports.run_report(store, "nope")


def test_notebook_helpers(store: UsageStore) -> None:
    df = analytics.usage(since=D3, db=store.db_path)
    assert df["request_id"].to_list() == ["r09", "r10", "r11", "r12"]
    assert df.schema["ts"] == pl.Datetime("us", "UTC") and df.schema["groups"] == pl.List(pl.String)
    assert df.row(2, named=True)["groups"] == ["staff", "hpc"]
    assert analytics.usage("2026-01-02", "2026-01-03", user="bob", db=store.db_path)["request_id"].to_list() == [
        "r06",
        "r07",
    ]
    assert analytics.usage(group="staff", cluster="aurora", db=store.db_path)["request_id"].to_list() == ["r05"]
    assert analytics.report("top-users", db=store.db_path, limit=1)["user"].to_list() == ["bob"]
    assert analytics.report("summary", model="m-b", db=store.db_path)["requests"].to_list() == [6]
    assert analytics.REPORTS is reports.REPORTS and analytics.UsageFilter is UsageFilter


# --- ad-hoc SQL --------------------------------------------------------------------------------


def test_sql_reads(store: UsageStore) -> None:
    df = reports.sql(store, "SELECT count(*) AS n FROM usage WHERE list_contains(\"groups\", 'hpc')")
    assert df.rows() == [(8,)]
    df = reports.sql(store, 'SELECT "user" FROM usage WHERE total_tokens >= $t ORDER BY 1', {"t": 100})
    assert df["user"].to_list() == ["bob", "dave"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("DELETE FROM usage", "read-only"),
        ("UPDATE usage SET total_tokens = 0", "read-only"),
        ("INSERT INTO usage SELECT * FROM usage", "read-only"),
        ("CREATE TABLE t AS SELECT 1", "read-only"),
        ("DROP TABLE usage", "read-only"),
        ("COPY usage TO 'leak.csv'", "other files"),
        ("SELECT * FROM read_csv('/etc/hostname')", "other files"),
        ("SET enable_external_access = true", "locked"),
        ("SELEKT 1", "Parser"),
    ],
)
def test_sql_refuses_writes_and_file_access(store: UsageStore, query: str, message: str) -> None:
    with pytest.raises(UsageQueryError, match=message):
        reports.sql(store, query)
    assert reports.summary(store)["requests"].to_list() == [12]


def test_readers_wait_for_the_writer_in_this_process(store: UsageStore) -> None:
    # A read-write connection open in this process (e.g. an ingest in another thread) makes a read-only
    # open fail at once ("different configuration"); the reports retry until it closes, and vice versa.
    opened, results = threading.Event(), []

    def hold(connect) -> None:  # type: ignore[no-untyped-def]
        with connect():
            opened.set()
            time.sleep(0.2)

    for connect, read in [
        (store.connect, lambda: reports.summary(store)["requests"].item()),
        (store.connect_read_only, lambda: store.count()),
    ]:
        opened.clear()
        t = threading.Thread(target=hold, args=(connect,))
        t.start()
        assert opened.wait(5)
        results.append(read())
        t.join()
    assert results == [12, 12]


def test_readers_wait_for_a_writer_process(store: UsageStore) -> None:
    code = (
        "import duckdb, sys, time\n"
        "con = duckdb.connect(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "time.sleep(0.5)\n"
        "con.close()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(store.db_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        assert reports.sql(store, "SELECT count(*) AS n FROM usage")["n"].item() == 12
        assert time.monotonic() - t0 > 0.2  # it did wait for the lock
    finally:
        proc.wait(10)


# --- Parquet export ----------------------------------------------------------------------------


def test_export_parquet_layout_and_rerun(store: UsageStore, tmp_path: Path) -> None:
    out = tmp_path / "export"
    files = reports.export_parquet(store, out)
    assert sorted(p.parent.name for p in files) == ["day=2026-01-01", "day=2026-01-02", "day=2026-01-03"]
    assert all(p.suffix == ".parquet" and p.exists() for p in files)

    def read_back() -> pl.DataFrame:
        return pl.read_parquet(out / "**/*.parquet", hive_partitioning=True).sort("ts", "request_id")

    df = read_back()
    assert df.height == 12
    assert df["request_id"].to_list() == [f"r{i:02d}" for i in range(1, 13)]
    assert df.schema["day"] == pl.Date and df.schema["ts"] == pl.Datetime("us", "UTC")
    assert df.group_by("day").len().sort("day").rows() == [(D1, 4), (D2, 4), (D3, 4)]
    assert df.filter(pl.col("request_id") == "r11")["groups"].to_list() == [["staff", "hpc"]]
    with duckdb.connect() as con:
        glob = str(out / "**" / "*.parquet")
        assert con.execute("SELECT count(*), count(DISTINCT day) FROM read_parquet(?)", [glob]).fetchone() == (12, 3)

    # rerunning replaces the days it writes and leaves the others alone
    again = reports.export_parquet(store, out, UsageFilter(since=D3))  # type: ignore[arg-type]
    assert [p.parent.name for p in again] == ["day=2026-01-03"]
    assert read_back().height == 12
    reports.export_parquet(store, out)
    assert read_back().height == 12
    # a filtered export of a day shrinks that day only
    reports.export_parquet(store, out, UsageFilter(since=D3, user="dave"))  # type: ignore[arg-type]
    assert read_back().group_by("day").len().sort("day").rows() == [(D1, 4), (D2, 4), (D3, 2)]
    assert reports.export_parquet(store, tmp_path / "none", UsageFilter(user="nobody")) == []


# --- CLI ---------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FIRST_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    write_spool(tmp_path / "home" / "spool", records())
    yield tmp_path / "home"
    get_settings.cache_clear()


def invoke(*args: str) -> str:
    r = runner.invoke(app, ["usage", *args])
    assert r.exit_code == 0, r.output
    return r.stdout


def as_json(*args: str) -> list[dict]:
    return json.loads(invoke(*args, "--format", "json"))


@pytest.mark.parametrize(
    "command", ["summary", "top-users", "by-model", "by-cluster", "latency", "errors", "daily", "sql", "export"]
)
def test_cli_help(command: str) -> None:
    r = runner.invoke(app, ["usage", command, "--help"])
    assert r.exit_code == 0 and "Examples" in r.output
    if command not in ("sql", "export"):
        assert "--since" in r.output and "--group" in r.output and "--no-ingest" in r.output


def test_cli_reports_as_json(home: Path) -> None:
    # the first command ingests the spool (default), the rest read the same database
    (overall,) = as_json("summary", "--by", "none")
    assert (overall["requests"], overall["total_tokens"], overall["error_rate"]) == (12, 425, 0.25)
    assert overall["first_ts"] == "2026-01-01T01:00:00+00:00"
    assert not list((home / "spool").glob("*.jsonl"))  # ingested
    per = {(r["user"], r["model"]): r["requests"] for r in as_json("summary")}  # default: per user and model
    assert per[("bob", "m-b")] == 3 and len(per) == 7
    assert [(r["user"], r["total_tokens"]) for r in as_json("top-users", "--limit", "2")] == [
        ("bob", 205),
        ("dave", 120),
    ]
    staff = {r["model"]: (r["requests"], r["total_tokens"]) for r in as_json("by-model", "--group", "staff")}
    assert staff == {"m-a": (4, 160), "m-b": (2, 20)}  # alice r01 r02 r05 r11, dave r09 r10
    assert [(r["cluster"], r["requests"]) for r in as_json("by-cluster")] == [("aurora", 4), ("polaris", 6), (None, 2)]
    lat = as_json("latency", "--cluster", "aurora")
    assert [(r["model"], r["p50_latency_ms"], r["p50_ttft_ms"]) for r in lat] == [("m-b", 500.0, 40.0)]
    errs = as_json("errors", "--since", "2026-01-02", "--until", "2026-01-03")
    assert [(r["status"], r["requests"], r["last_ts"]) for r in errs] == [(502, 1, "2026-01-02T12:00:00+00:00")]
    days = as_json("daily", "--model", "m-b", "--user", "bob")
    assert [(r["day"], r["requests"], r["total_tokens"]) for r in days] == [
        ("2026-01-01", 1, 50),
        ("2026-01-02", 1, 100),
        ("2026-01-03", 1, 50),
    ]


def test_cli_csv_table_and_parquet(home: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(invoke("top-users", "--format", "csv"))))
    assert [(r["user"], int(r["total_tokens"]), int(r["errors"])) for r in rows] == [
        ("bob", 205, 1),
        ("dave", 120, 0),
        ("alice", 60, 1),
        ("carol", 40, 1),
    ]
    table = invoke("by-model")
    assert "m-a" in table and "m-b" in table and "165" in table and "260" in table
    one = invoke("summary", "--by", "none", "--model", "m-a")  # one wide row: printed one line per column
    assert "error_rate" in one and "33.3%" in one
    out = tmp_path / "daily.parquet"
    invoke("daily", "--format", "parquet", "--output", str(out))
    df = pl.read_parquet(out)
    assert df.schema["day"] == pl.Date and df.height == 6 and df["total_tokens"].sum() == 425
    csv_out = tmp_path / "sub" / "errors.csv"
    assert invoke("errors", "-f", "csv", "-o", str(csv_out)) == ""
    assert [r["error_type"] for r in csv.DictReader(csv_out.open())] == ["api_error", "rate_limit_error"]


def test_cli_ingest_by_default_and_no_ingest(home: Path) -> None:
    assert as_json("summary", "--by", "none", "--no-ingest")[0]["requests"] == 0  # the spool is not read
    assert as_json("summary", "--by", "none")[0]["requests"] == 12
    extra = UsageRecord(request_id="r13", ts=T0 + 80 * H, user="erin", model="m-a", endpoint="completions")
    write_spool(home / "spool", [extra])
    assert as_json("top-users", "--no-ingest", "--limit", "100")[-1]["user"] != "erin"
    assert as_json("top-users", "--limit", "100")[-1]["user"] == "erin"


def test_cli_sql(home: Path, tmp_path: Path) -> None:
    rows = as_json("sql", 'SELECT "user", count(*) AS n FROM usage GROUP BY 1 ORDER BY 1')
    assert [(r["user"], r["n"]) for r in rows] == [("alice", 4), ("bob", 4), ("carol", 2), ("dave", 2)]
    rows = list(
        csv.DictReader(io.StringIO(invoke("sql", "SELECT request_id, groups FROM usage ORDER BY 1", "-f", "csv")))
    )
    assert (rows[0]["request_id"], rows[0]["groups"], rows[3]["groups"]) == ("r01", "staff,hpc", "")
    out = tmp_path / "q.parquet"
    invoke("sql", "SELECT * FROM usage", "-f", "parquet", "-o", str(out))
    assert pl.read_parquet(out).height == 12
    refused = runner.invoke(app, ["usage", "sql", "DELETE FROM usage"])
    assert refused.exit_code == 2 and "read-only" in refused.output
    assert as_json("sql", "SELECT count(*) AS n FROM usage") == [{"n": 12}]


def test_cli_export(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "parquet"
    r = runner.invoke(app, ["usage", "export", "--to", str(out), "--since", "2026-01-02"])
    assert r.exit_code == 0, r.output
    printed = r.stdout.split()
    assert [Path(p).parent.name for p in printed] == ["day=2026-01-02", "day=2026-01-03"]
    df = pl.read_parquet(out / "**/*.parquet", hive_partitioning=True)
    assert df.height == 8 and sorted(df["day"].unique().to_list()) == [D2, D3]
    with duckdb.connect() as con:
        assert con.execute("SELECT count(*) FROM read_parquet(?)", [str(out / "**" / "*.parquet")]).fetchone() == (8,)


def test_cli_chart_writes_pngs_of_the_documented_size(home: Path, tmp_path: Path) -> None:
    import struct

    out = tmp_path / "charts"
    r = runner.invoke(app, ["usage", "chart", "--out", str(out)])
    assert r.exit_code == 0, r.output
    files = [Path(p) for p in r.stdout.split()]
    assert len(files) == 4 and all(p.parent == out for p in files)
    for p in files:
        head = p.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
        assert struct.unpack(">II", head[16:24]) == (1000, 500), p


@pytest.mark.parametrize("since", ["2w", "1.5d", "90s", "2026-01-02", "2026-01-02T00:00:00+00:00"])
def test_cli_takes_the_time_forms_the_api_takes(home: Path, since: str) -> None:
    """`first usage --since` and `GET /v1/usage?since=` share one parser (core/timewindow.py): the CLI used to
    refuse 2w, 1.5d and seconds."""
    r = runner.invoke(app, ["usage", "summary", "--by", "none", "--since", since, "--format", "json"])
    assert r.exit_code == 0, r.output
    (overall,) = json.loads(r.stdout)
    assert overall["requests"] == (8 if since.startswith("2026") else 0)  # the records are from January 2026


def test_one_time_bound_parser_for_spans_and_iso_times() -> None:
    from core.timewindow import TimeBoundError, parse_time_bound

    now = datetime(2026, 12, 3, 12, tzinfo=UTC)
    assert parse_time_bound("2w", now) == now - timedelta(weeks=2)
    assert parse_time_bound(" 1.5D ", now) == now - timedelta(hours=36)
    assert parse_time_bound("2026-01-02", now) == datetime(2026, 1, 2, tzinfo=UTC)
    assert parse_time_bound("2026-01-02T01:00:00+01:00", now) == datetime(2026, 1, 2, tzinfo=UTC)
    assert parse_time_bound("", now) is None and parse_time_bound(None, now) is None
    with pytest.raises(TimeBoundError, match=r"'since' must be .* got '5y'"):
        parse_time_bound("5y", now, "since")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["summary", "--format", "xml"], "xml"),
        (["top-users", "--since", "yesterday"], "30m, 12h, 1d, 2w"),
        (["daily", "--until", "soon"], "--until"),
        (["by-model", "--format", "parquet"], "--output"),
        (["summary", "--by", "colour"], "--by"),
        (["top-users", "--limit", "0"], "--limit"),
        (["sql", "UPDATE usage SET status = 200"], "read-only"),
        (["sql", "SELEKT 1"], "error"),
    ],
)
def test_cli_bad_input_exits_2(home: Path, args: list[str], message: str) -> None:
    r = runner.invoke(app, ["usage", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
