"""The usage database's schema: the ``usage`` table's columns (one per ``UsageRecord`` field), the per-day rollups
and 2% latency histograms kept at ingest, the SQL that reads them, and the migration of older files."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa

from analytics.filters import TRAFFIC_SQL
from analytics.records import UsageRecord

log = logging.getLogger("analytics.store")

# Column name -> (DuckDB type, Arrow type of the staged batch, read_json type). Order = UsageRecord fields.
COLUMNS: dict[str, tuple[str, pa.DataType, str]] = {
    "request_id": ("VARCHAR NOT NULL", pa.string(), "VARCHAR"),
    "ts": ("TIMESTAMPTZ NOT NULL", pa.float64(), "DOUBLE"),  # staged as epoch seconds, stored as UTC timestamp
    "user": ("VARCHAR NOT NULL", pa.string(), "VARCHAR"),
    "groups": ("VARCHAR[] NOT NULL", pa.list_(pa.string()), "VARCHAR[]"),
    "model": ("VARCHAR NOT NULL", pa.string(), "VARCHAR"),
    "cluster": ("VARCHAR", pa.string(), "VARCHAR"),
    "endpoint": ("VARCHAR NOT NULL", pa.string(), "VARCHAR"),
    "stream": ("BOOLEAN NOT NULL", pa.bool_(), "BOOLEAN"),
    "prompt_tokens": ("BIGINT NOT NULL", pa.int64(), "BIGINT"),
    "completion_tokens": ("BIGINT NOT NULL", pa.int64(), "BIGINT"),
    "total_tokens": ("BIGINT NOT NULL", pa.int64(), "BIGINT"),
    "latency_ms": ("DOUBLE NOT NULL", pa.float64(), "DOUBLE"),
    "ttft_ms": ("DOUBLE", pa.float64(), "DOUBLE"),
    "status": ("INTEGER NOT NULL", pa.int32(), "INTEGER"),
    "error_type": ("VARCHAR", pa.string(), "VARCHAR"),
    "cold_start": ("BOOLEAN NOT NULL", pa.bool_(), "BOOLEAN"),
    "batch_id": ("VARCHAR", pa.string(), "VARCHAR"),
}
USAGE_COLUMNS: tuple[str, ...] = tuple(COLUMNS)
if UsageRecord.__struct_fields__ != USAGE_COLUMNS:  # pragma: no cover - guards schema drift
    raise RuntimeError(f"usage columns {USAGE_COLUMNS} != UsageRecord fields {UsageRecord.__struct_fields__}")

ARROW_SCHEMA = pa.schema([(name, arrow_type) for name, (_, arrow_type, _) in COLUMNS.items()])
COLUMN_LIST = ", ".join(f'"{c}"' for c in USAGE_COLUMNS)
# The staged rows, with ts as a timestamp: what `usage` holds.
STAGED_COLUMNS = ", ".join('to_timestamp("ts") AS ts' if c == "ts" else f'"{c}"' for c in USAGE_COLUMNS)
READ_JSON_COLUMNS = "{" + ", ".join(f"'{c}': '{j}'" for c, (_, _, j) in COLUMNS.items()) + "}"

# The UTC day of ts, by integer arithmetic on the epoch (about 4x faster than timezone('UTC', ts)::DATE).
DAY_SQL = "(DATE '1970-01-01' + CAST(epoch_us(ts) // 86400000000 AS INTEGER))"
HIST_BASE = 1.02  # usage_latency_hist bucket b holds the values that round to HIST_BASE ** b (within 1%)
BUCKET = "CAST(round(ln(greatest({x}, 0.001)) / ln(" + repr(HIST_BASE) + ")) AS SMALLINT)"

DDL = (
    "CREATE TABLE IF NOT EXISTS usage (\n"
    + ",\n".join(f'  "{name}" {sql_type}' for name, (sql_type, _, _) in COLUMNS.items())
    + "\n)",
    """
    CREATE TABLE IF NOT EXISTS usage_daily (
      day DATE NOT NULL, "user" VARCHAR NOT NULL, "groups" VARCHAR[] NOT NULL, model VARCHAR NOT NULL,
      cluster VARCHAR, endpoint VARCHAR NOT NULL,
      requests BIGINT NOT NULL, errors BIGINT NOT NULL, streams BIGINT NOT NULL, ok_streams BIGINT NOT NULL,
      cold_starts BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
      total_tokens BIGINT NOT NULL, first_ts TIMESTAMPTZ NOT NULL, last_ts TIMESTAMPTZ NOT NULL,
      traffic VARCHAR NOT NULL DEFAULT 'interactive'
    )""",
    """
    CREATE TABLE IF NOT EXISTS usage_latency_hist (
      day DATE NOT NULL, model VARCHAR NOT NULL, cluster VARCHAR, ok BOOLEAN NOT NULL,
      metric VARCHAR NOT NULL, bucket SMALLINT NOT NULL, n BIGINT NOT NULL
    )""",
)

# Rollup rows from `usage` rows (WHERE filled in): the same SQL serves ingestion and the reports' edges.
ROLLUP_SELECT = f"""
    SELECT {DAY_SQL} AS day, "user", "groups", model, cluster, endpoint,
           count(*) AS requests, count(*) FILTER (WHERE status >= 400) AS errors,
           count(*) FILTER (WHERE stream) AS streams, count(*) FILTER (WHERE stream AND status < 400) AS ok_streams,
           count(*) FILTER (WHERE cold_start) AS cold_starts, sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens, sum(total_tokens) AS total_tokens,
           min(ts) AS first_ts, max(ts) AS last_ts, {TRAFFIC_SQL} AS traffic
    FROM usage {{where}}
    GROUP BY ALL
"""
HIST_SELECT = f"""
    SELECT {DAY_SQL} AS day, model, cluster, status < 400 AS ok, 'latency_ms' AS metric,
           {BUCKET.format(x="latency_ms")} AS bucket, count(*) AS n
    FROM usage {{where}}
    GROUP BY ALL
    UNION ALL
    SELECT {DAY_SQL} AS day, model, cluster, status < 400 AS ok, 'ttft_ms' AS metric,
           {BUCKET.format(x="ttft_ms")} AS bucket, count(*) AS n
    FROM usage {{where}} {{and_}} ttft_ms IS NOT NULL
    GROUP BY ALL
"""


def rollup_sql(template: str, where: str) -> str:
    return template.format(where=where, and_="AND" if where else "WHERE")


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Create the tables; drop the primary key of an older ``usage`` table; rebuild rollups that disagree."""
    con.execute("BEGIN TRANSACTION")
    try:
        for ddl in DDL:
            con.execute(ddl)
        (keys,) = con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'usage' AND constraint_type = 'PRIMARY KEY'"
        ).fetchall()[0]
        if keys:
            log.info("migrating the usage table: dropping its primary-key index (ingestion dedupes by time window)")
            con.execute(DDL[0].replace("TABLE IF NOT EXISTS usage", "TABLE usage_migrated"))
            had = {r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'usage'")
                   .fetchall()}  # fmt: skip
            cols = ", ".join(f'"{c}"' for c in USAGE_COLUMNS if c in had)
            con.execute(f"INSERT INTO usage_migrated ({cols}) SELECT {cols} FROM usage ORDER BY ts")
            con.execute("DROP TABLE usage")
            con.execute("ALTER TABLE usage_migrated RENAME TO usage")
        con.execute('ALTER TABLE usage ADD COLUMN IF NOT EXISTS "batch_id" VARCHAR')  # a file from before batches
        con.execute("ALTER TABLE usage_daily ADD COLUMN IF NOT EXISTS traffic VARCHAR DEFAULT 'interactive'")
        if not rollups_match(con):
            log.info("rebuilding the usage rollups (usage_daily, usage_latency_hist) from every usage row")
            refresh_rollups(con, None)
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise


def rollups_match(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the rollups account for exactly the rows of ``usage`` (false where they do not exist)."""
    try:
        n, daily, hist = con.execute(
            """
            SELECT (SELECT count(*) FROM usage),
                   (SELECT coalesce(sum(requests), 0) FROM usage_daily),
                   (SELECT coalesce(sum(n), 0) FROM usage_latency_hist WHERE metric = 'latency_ms')
            """
        ).fetchall()[0]
    except duckdb.CatalogException:
        return False
    return n == daily == hist


def refresh_rollups(con: duckdb.DuckDBPyConnection, days: list[Any] | None) -> None:
    """Recompute the rollups of ``days`` (UTC dates; None = all) from ``usage``, in the caller's transaction."""
    if days is None:
        con.execute("DELETE FROM usage_daily")
        con.execute("DELETE FROM usage_latency_hist")
        where = ""
    else:
        if not days:
            return
        in_days = ", ".join(f"DATE '{d.isoformat()}'" for d in sorted(days))
        lo = datetime.combine(min(days), datetime.min.time(), UTC)
        hi = datetime.combine(max(days), datetime.min.time(), UTC).timestamp() + 86400
        con.execute(f"DELETE FROM usage_daily WHERE day IN ({in_days})")
        con.execute(f"DELETE FROM usage_latency_hist WHERE day IN ({in_days})")
        where = (
            f"WHERE ts >= {ts_literal(lo)} AND ts < {ts_literal(datetime.fromtimestamp(hi, UTC))} "
            f"AND {DAY_SQL} IN ({in_days})"
        )
    con.execute("INSERT INTO usage_daily " + rollup_sql(ROLLUP_SELECT, where))
    con.execute("INSERT INTO usage_latency_hist " + rollup_sql(HIST_SELECT, where))


def ts_literal(dt: datetime) -> str:
    """A SQL TIMESTAMPTZ literal of ``dt`` (naive = UTC)."""
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return f"TIMESTAMPTZ '{dt.isoformat()}'"
