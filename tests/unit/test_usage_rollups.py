"""The rollups behind the reports (``usage_daily``, ``usage_latency_hist``): kept exact through ingestion,
used only where they cover the window (raw rows at its edges), ignored when stale, built for old databases.

The oracle is the same report over the raw rows: a copy of the database whose rollups were emptied behind
FIRST's back, which the reports detect (``rollups_match``) and answer from ``usage`` alone.
"""

from __future__ import annotations

import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import msgspec
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analytics import reports
from analytics.records import UsageRecord
from analytics.reports import UsageFilter
from analytics.schema import HIST_BASE, rollups_match
from analytics.spool import UsageSpool
from analytics.store import UsageStore

T0 = datetime(2026, 3, 1, tzinfo=UTC)
USERS = [f"u{i}" for i in range(12)]
MODELS = ["m-a", "m-b", "m-c"]
CLUSTERS = ["polaris", "aurora", None]


def synthetic(n: int, seed: int = 3) -> list[UsageRecord]:
    """``n`` requests over 5 days, in time order, with errors, streams and a few cold starts."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user = rng.choice(USERS)
        err = rng.random() < 0.08
        stream = rng.random() < 0.4
        prompt, completion = rng.randint(1, 500), 0 if err else rng.randint(1, 300)
        out.append(
            UsageRecord(
                request_id=f"r{i:06d}", ts=(T0 + timedelta(seconds=i * 5 * 86400 / n)).timestamp(), user=user,
                groups=["hpc"] if int(user[1:]) % 2 else ["staff", "hpc"], model=rng.choice(MODELS),
                cluster=rng.choice(CLUSTERS), endpoint=rng.choice(["chat.completions", "completions"]),
                stream=stream, prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                latency_ms=round(rng.lognormvariate(6.0, 0.6), 3), ttft_ms=round(rng.lognormvariate(4, 0.5), 3)
                if stream else None, status=rng.choice([500, 429, 400]) if err else 200,
                error_type="api_error" if err else None, cold_start=rng.random() < 0.01,
                batch_id=f"batch_{i % 3:024x}" if rng.random() < 0.25 else None,
            )
        )  # fmt: skip
    return out


def ingest(db: Path, spool_dir: Path, records: list[UsageRecord], **store_args: int) -> UsageStore:
    spool = UsageSpool(spool_dir, max_records=500)  # many segments: several batches, days split across them
    for r in records:
        spool.append(r)
    spool.close()
    store = UsageStore(db, batch_rows=700, **store_args)
    assert store.ingest(spool_dir) == len(records)
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[UsageStore, UsageStore]:
    """(with rollups, raw-only copy) of the same 6,000 rows."""
    tmp = tmp_path_factory.mktemp("rollups")
    store = ingest(tmp / "usage.duckdb", tmp / "spool", synthetic(6000))
    with duckdb.connect(str(store.db_path), read_only=True) as con:
        assert rollups_match(con)
    shutil.copy(store.db_path, tmp / "raw.duckdb")
    with duckdb.connect(str(tmp / "raw.duckdb")) as con:  # stale rollups, as if edited behind FIRST's back
        con.execute("DELETE FROM usage_daily WHERE day = DATE '2026-03-02'")
        assert not rollups_match(con)
    return store, UsageStore(tmp / "raw.duckdb")


FILTERS = [
    UsageFilter(),
    UsageFilter(since=T0 + timedelta(days=1), until=T0 + timedelta(days=3)),  # whole days: rollups only
    UsageFilter(since=T0 + timedelta(hours=30), until=T0 + timedelta(days=3, hours=7)),  # partial days at both ends
    UsageFilter(since=T0 + timedelta(hours=50)),  # open end
    UsageFilter(until=T0 + timedelta(hours=50, minutes=17)),  # open start
    UsageFilter(since=T0 + timedelta(hours=26), until=T0 + timedelta(hours=40)),  # within one day: raw rows only
    UsageFilter(user="u3", since=T0 + timedelta(hours=6)),
    UsageFilter(model="m-b", cluster="polaris"),
    UsageFilter(group="staff", until=T0 + timedelta(days=4, minutes=1)),
    UsageFilter(cluster="nowhere"),
    UsageFilter(traffic="batch", since=T0 + timedelta(hours=30), until=T0 + timedelta(days=3, hours=7)),
    UsageFilter(traffic="interactive", model="m-a"),
]
REPORT_CALLS = {
    "summary": lambda s, f: reports.summary(s, f),
    "summary by day, cluster": lambda s, f: reports.summary(s, f, by=("day", "cluster")),
    "summary by user, endpoint": lambda s, f: reports.summary(s, f, by=("user", "endpoint")),
    "by-traffic": reports.by_traffic,
    "top-users": lambda s, f: reports.top_users(s, f, limit=5),
    "by-model": reports.by_model,
    "by-cluster": reports.by_cluster,
    "latency": reports.latency,
    "daily": reports.daily,
}


@pytest.mark.parametrize("name", list(REPORT_CALLS))
@pytest.mark.parametrize("f", FILTERS, ids=lambda f: repr(f)[12:60])
def test_rollup_answers_equal_raw_answers(stores: tuple[UsageStore, UsageStore], name: str, f: UsageFilter) -> None:
    store, raw = stores
    got, want = REPORT_CALLS[name](store, f), REPORT_CALLS[name](raw, f)
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9)
    if name == "summary":
        expected = raw.rows().filter(_polars_filter(f)).height  # a third, independent count
        assert got["requests"][0] == expected


def _polars_filter(f: UsageFilter) -> pl.Expr:
    e = pl.lit(True)
    if f.since is not None:
        e &= pl.col("ts") >= f.since
    if f.until is not None:
        e &= pl.col("ts") < f.until
    for col, value in (("user", f.user), ("model", f.model), ("cluster", f.cluster)):
        if value is not None:
            e &= pl.col(col) == value
    if f.group is not None:
        e &= pl.col("groups").list.contains(f.group)
    if f.traffic is not None:
        e &= pl.col("batch_id").is_null() if f.traffic == "interactive" else pl.col("batch_id").is_not_null()
    return e


HIST_CASES = {  # report -> (its keys, whether it covers successful requests only)
    reports.summary: ((), False),
    reports.by_model: (("model",), False),
    reports.by_cluster: (("cluster",), False),
    reports.latency: (("model", "cluster"), True),
    reports.daily: (("day", "model"), False),
}


@pytest.mark.parametrize("call", list(HIST_CASES), ids=lambda c: c.__name__)
def test_histogram_percentiles_are_within_one_percent_of_the_ranked_values(
    stores: tuple[UsageStore, UsageStore], call: object
) -> None:
    """Past ``exact_percentile_rows`` a percentile comes from 2%-wide buckets: it is within 1% of the
    value at its rank (between the two values quantile_cont interpolates), and the other columns stay exact."""
    exact = stores[0]
    approx = UsageStore(exact.db_path, exact_percentile_rows=0)  # past 0 matched rows: the histograms
    keys, ok_only = HIST_CASES[call]  # type: ignore[index]
    want, got = call(exact), call(approx)  # type: ignore[operator]
    pct = pl.selectors.matches(r"^p\d+_")
    assert got.drop(pct).equals(want.drop(pct))
    rows = exact.rows().with_columns(day=pl.col("ts").dt.date())
    if ok_only:
        rows = rows.filter(pl.col("status") < 400)
    half = (HIST_BASE - 1) / 2 + 1e-9
    checked = 0
    for col in got.select(pct).columns:
        q, metric = int(col[1:3]) / 100, col.split("_", 1)[1]
        bounds = (rows.group_by(keys) if keys else rows.group_by(pl.lit(0).alias("_all"))).agg(
            lo=pl.col(metric).quantile(q, interpolation="lower"), hi=pl.col(metric).quantile(q, interpolation="higher")
        )
        joined = (
            got.join(bounds, on=list(keys), how="left", nulls_equal=True) if keys else got.join(bounds, how="cross")
        )
        for value, lo, hi in joined.select(col, "lo", "hi").iter_rows():
            if lo is None:
                assert value is None
                continue
            assert lo / (1 + half) <= value <= hi * (1 + half), (call, col, lo, value, hi)  # type: ignore[operator]
            checked += 1
    assert checked >= len(got)
    # A user filter has no histogram: exact percentiles even past the limit.
    f = UsageFilter(user="u5")
    assert reports.summary(approx, f).equals(reports.summary(exact, f))


def test_ingest_keeps_rollups_exact_across_reingest_and_overlapping_days(tmp_path: Path) -> None:
    recs = synthetic(3000, seed=9)
    store = ingest(tmp_path / "u.duckdb", tmp_path / "spool", recs[:2000])
    # Late arrivals for days already rolled up, plus 300 duplicates of rows already in the table.
    spool = UsageSpool(tmp_path / "spool2", max_records=250)
    for r in recs[2000:] + recs[100:400]:
        spool.append(r)
    spool.close()
    assert store.ingest(tmp_path / "spool2") == 1000
    assert store.ingest(tmp_path / "spool2") == 0
    with store.connect() as con:
        assert rollups_match(con)
        daily = con.execute("SELECT day, sum(requests) FROM usage_daily GROUP BY day ORDER BY day").fetchall()
        raw = con.execute(
            "SELECT CAST(timezone('UTC', ts) AS DATE) d, count(*) FROM usage GROUP BY d ORDER BY d"
        ).fetchall()
    assert daily == raw and sum(n for _, n in raw) == 3000


def test_an_old_database_with_a_primary_key_and_no_rollups_is_migrated(tmp_path: Path) -> None:
    recs = synthetic(800, seed=5)
    store = ingest(tmp_path / "new.duckdb", tmp_path / "spool", recs)
    old = tmp_path / "old.duckdb"
    with duckdb.connect(str(old)) as con:  # the schema FIRST wrote before the rollups existed
        con.execute(f"ATTACH '{store.db_path}' AS new (READ_ONLY)")
        con.execute(_old_ddl())
        con.execute("INSERT INTO usage SELECT * FROM new.usage")
    before = reports.summary(UsageStore(old))  # read-only readers work on it (from the raw rows)
    migrated = UsageStore(old)
    assert migrated.count() == 800  # the first read-write connection migrates
    with duckdb.connect(str(old), read_only=True) as con:
        keys = con.execute("SELECT count(*) FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY'")
        assert keys.fetchall() == [(0,)]
        assert rollups_match(con)
    assert_frame_equal(reports.summary(migrated), before)
    assert_frame_equal(reports.daily(migrated), reports.daily(store))
    assert migrated.ingest(tmp_path / "spool") == 0  # nothing left, nothing doubled


def test_a_database_from_before_batches_gets_the_traffic_split(tmp_path: Path) -> None:
    """A usage file written before batch_id existed: the first read-write connection adds the column (its rows
    are interactive), and the rollups carry the traffic from then on."""
    from analytics.schema import COLUMNS as _COLUMNS

    store = ingest(tmp_path / "new.duckdb", tmp_path / "spool", [
        msgspec.structs.replace(r, batch_id=None) for r in synthetic(300, seed=9)])  # fmt: skip
    old = tmp_path / "old.duckdb"
    cols = [c for c in _COLUMNS if c != "batch_id"]
    with duckdb.connect(str(old)) as con:
        con.execute(f"ATTACH '{store.db_path}' AS new (READ_ONLY)")
        con.execute("CREATE TABLE usage (" + ", ".join(f'"{c}" {_COLUMNS[c][0]}' for c in cols) + ")")
        con.execute(f"INSERT INTO usage SELECT {', '.join(repr(c).replace(chr(39), chr(34)) for c in cols)} "
                    "FROM new.usage")  # fmt: skip
    migrated = UsageStore(old)
    assert migrated.count() == 300
    split = reports.by_traffic(migrated)
    assert split["traffic"].to_list() == ["interactive"] and split["requests"][0] == 300
    assert reports.summary(migrated, UsageFilter(traffic="batch"))["requests"][0] == 0


def _old_ddl() -> str:
    from analytics.schema import COLUMNS as _COLUMNS

    cols = ",\n".join(
        f'"{name}" {"VARCHAR PRIMARY KEY" if name == "request_id" else sql}' for name, (sql, _, _) in _COLUMNS.items()
    )
    return f"CREATE TABLE usage ({cols})"
