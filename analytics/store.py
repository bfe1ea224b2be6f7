"""DuckDB usage store: batch ingestion of the spool, the rollups the reports read, and a small summary.

``ingest`` reads the spool's segments (see :mod:`analytics.spool`) in batches and, per batch, in one
transaction:

1. stages the batch in a temporary table: closed segments (``.jsonl``) straight through DuckDB's
   ``read_json``; open segments (``.jsonl.open``), and any closed one ``read_json`` refuses (a malformed
   line), through msgspec and Arrow, which skip what they cannot decode;
2. inserts the staged rows that are not in ``usage`` yet.  ``request_id`` is unique but not an indexed
   key (a primary-key index made each insert slower as the table grew): a request's ``ts`` never changes,
   so the batch is checked only against the rows whose ``ts`` lies in the batch's own time window, which
   DuckDB's zone maps find without scanning the rest; duplicates within the batch keep one row;
3. recomputes the rollups (``usage_daily``, ``usage_latency_hist``; see below) of the UTC days the
   new rows fall on, from the ``usage`` rows of those days.

Only after the commit does it delete what is fully ingested: closed segments, and open segments whose
writer is dead (its ``flock`` can be taken or, where locking is unsupported, its pid is gone).  Only
complete lines are read; a partial last line left by a crash mid-write is dropped with the file.  Open
segments of live writers are read up to their last complete line and left in place; the next ingest
re-reads them, which step 2 makes harmless, as it does a crash between commit and delete.

**Rollups.**  ``usage_daily`` holds one row per (UTC day, user, groups, model, cluster, endpoint) with
request, error, stream, cold-start and token counts and the first/last ``ts``; ``usage_latency_hist``
counts ``latency_ms`` and ``ttft_ms`` per (day, model, cluster, success) in logarithmic buckets 2% wide
(bucket ``b`` holds values that round to ``HIST_BASE ** b``, so a bucket's value is within 1% of every
value in it).  They are derived data: rebuilt for the affected days at every ingest, and rebuilt
entirely when their totals disagree with ``usage`` (a database from before they existed).  The reports
in :mod:`analytics.reports` read them to answer in milliseconds over tens of millions of rows.

Every call uses a short-lived DuckDB connection (open, work, close) and retries briefly while another
process holds the database file lock, so analysts and the ingester can take turns.
:meth:`UsageStore.connect_read_only` is the same for readers: several may share the file, and a
read-only and a read-write connection within one process wait for each other too (DuckDB refuses to
open one file with both configurations at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import polars as pl
import pyarrow as pa

from analytics.records import UsageRecord
from analytics.spool import SEGMENT_RE, segment_owner_alive, try_lock_segment

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no hand-over between batches
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DAY_SQL",
    "HIST_BASE",
    "HIST_SELECT",
    "ROLLUP_SELECT",
    "USAGE_COLUMNS",
    "IngestTimings",
    "UsageStore",
    "rollup_sql",
    "rollups_match",
]

log = logging.getLogger(__name__)

# Column name -> (DuckDB type, Arrow type of the staged batch, read_json type). Order = UsageRecord fields.
_COLUMNS: dict[str, tuple[str, pa.DataType, str]] = {
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
}
USAGE_COLUMNS: tuple[str, ...] = tuple(_COLUMNS)
if UsageRecord.__struct_fields__ != USAGE_COLUMNS:  # pragma: no cover - guards schema drift
    raise RuntimeError(f"usage columns {USAGE_COLUMNS} != UsageRecord fields {UsageRecord.__struct_fields__}")

_ARROW_SCHEMA = pa.schema([(name, arrow_type) for name, (_, arrow_type, _) in _COLUMNS.items()])
_COLUMN_LIST = ", ".join(f'"{c}"' for c in USAGE_COLUMNS)
# The staged rows, with ts as a timestamp: what `usage` holds.
_STAGED = ", ".join('to_timestamp("ts") AS ts' if c == "ts" else f'"{c}"' for c in USAGE_COLUMNS)
_READ_JSON_COLUMNS = "{" + ", ".join(f"'{c}': '{j}'" for c, (_, _, j) in _COLUMNS.items()) + "}"

# The UTC day of ts, by integer arithmetic on the epoch (about 4x faster than timezone('UTC', ts)::DATE).
DAY_SQL = "(DATE '1970-01-01' + CAST(epoch_us(ts) // 86400000000 AS INTEGER))"
HIST_BASE = 1.02  # usage_latency_hist bucket b holds the values that round to HIST_BASE ** b (within 1%)
_BUCKET = "CAST(round(ln(greatest({x}, 0.001)) / ln(" + repr(HIST_BASE) + ")) AS SMALLINT)"

_DDL = (
    "CREATE TABLE IF NOT EXISTS usage (\n"
    + ",\n".join(f'  "{name}" {sql_type}' for name, (sql_type, _, _) in _COLUMNS.items())
    + "\n)",
    """
    CREATE TABLE IF NOT EXISTS usage_daily (
      day DATE NOT NULL, "user" VARCHAR NOT NULL, "groups" VARCHAR[] NOT NULL, model VARCHAR NOT NULL,
      cluster VARCHAR, endpoint VARCHAR NOT NULL,
      requests BIGINT NOT NULL, errors BIGINT NOT NULL, streams BIGINT NOT NULL, ok_streams BIGINT NOT NULL,
      cold_starts BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
      total_tokens BIGINT NOT NULL, first_ts TIMESTAMPTZ NOT NULL, last_ts TIMESTAMPTZ NOT NULL
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
           min(ts) AS first_ts, max(ts) AS last_ts
    FROM usage {{where}}
    GROUP BY ALL
"""
HIST_SELECT = f"""
    SELECT {DAY_SQL} AS day, model, cluster, status < 400 AS ok, 'latency_ms' AS metric,
           {_BUCKET.format(x="latency_ms")} AS bucket, count(*) AS n
    FROM usage {{where}}
    GROUP BY ALL
    UNION ALL
    SELECT {DAY_SQL} AS day, model, cluster, status < 400 AS ok, 'ttft_ms' AS metric,
           {_BUCKET.format(x="ttft_ms")} AS bucket, count(*) AS n
    FROM usage {{where}} {{and_}} ttft_ms IS NOT NULL
    GROUP BY ALL
"""


def rollup_sql(template: str, where: str) -> str:
    return template.format(where=where, and_="AND" if where else "WHERE")


@dataclass
class IngestTimings:
    """Where the last :meth:`UsageStore.ingest` spent its time, in seconds (logged by the flow, read by the bench)."""

    decode_s: float = 0.0  # msgspec decoding + Arrow (open segments, and closed ones read_json refused)
    open_s: float = 0.0  # opening the database (and waiting for its lock)
    stage_s: float = 0.0  # read_json / Arrow into the staging table
    insert_s: float = 0.0  # the deduplicating INSERT
    rollup_s: float = 0.0  # recomputing the rollups of the days touched
    commit_s: float = 0.0  # COMMIT + closing the connection (checkpoint) + deleting segments
    batches: list[tuple[int, float]] = field(default_factory=list)  # (rows inserted, seconds) per batch


class _Row(UsageRecord, gc=False):
    """UsageRecord decoded for ingestion: untracked by the cyclic GC (halves the decode time)."""


@dataclass
class _Segment:
    path: Path
    deletable: bool  # closed, or open with a dead writer
    size: int = 0
    records: list[UsageRecord] | None = None  # decoded here; None: a closed segment for read_json
    lock_fd: int | None = None  # held flock on a dead writer's open segment until it is deleted


@dataclass
class _Batch:
    segments: list[_Segment] = field(default_factory=list)
    bytes: int = 0

    def add(self, seg: _Segment) -> None:
        self.segments.append(seg)
        self.bytes += seg.size


class _Refused(Exception):
    """read_json could not take a closed segment as it is (a malformed line): decode it with msgspec."""


class UsageStore:
    """The ``usage`` table (and its rollups) in a DuckDB file, fed from a :class:`analytics.spool.UsageSpool` directory.

    ``batch_rows`` is the approximate number of records per ingest transaction (segments are grouped by
    size, about 350 bytes a record).  Reports compute percentiles exactly over the raw rows while a
    filter matches at most ``exact_percentile_rows`` of them, and from the histograms beyond that.
    """

    BYTES_PER_RECORD = 350

    def __init__(
        self,
        db_path: Path,
        *,
        batch_rows: int = 200_000,
        lock_timeout_s: float = 10.0,
        exact_percentile_rows: int = 2_000_000,
    ) -> None:
        self.db_path = Path(db_path)
        self.batch_rows = batch_rows
        self.lock_timeout_s = lock_timeout_s
        self.exact_percentile_rows = exact_percentile_rows
        self._decoder = msgspec.json.Decoder(_Row)
        self._schema_ready = False
        self.last_skipped_lines = 0  # malformed complete lines skipped by the last ingest
        self.timings = IngestTimings()  # of the last ingest

    # --- connections ------------------------------------------------------------------------

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Connect, retrying while another process holds the file; while it waits, this process holds a
        shared ``flock`` on ``<db>.wait``, which tells the ingester to let it in between two batches."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.005
        waiting: int | None = None
        try:
            while True:
                try:
                    return duckdb.connect(str(self.db_path), read_only=read_only)
                except (duckdb.IOException, duckdb.ConnectionException) as e:
                    if not _is_busy(e) or time.monotonic() >= deadline:
                        raise
                if waiting is None and fcntl is not None:
                    waiting = _flock(self._wait_path, fcntl.LOCK_SH)
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        finally:
            if waiting is not None:
                os.close(waiting)

    @property
    def _wait_path(self) -> Path:
        return self.db_path.with_name(self.db_path.name + ".wait")

    def _let_waiters_in(self, max_wait_s: float = 2.0) -> None:
        """Between two batches: if readers (or another ingester) are waiting for the file, wait until they
        have opened it (up to ``max_wait_s``), so a long ingest never starves them.  Without this the
        ingester, reconnecting within milliseconds, would win almost every race for the file lock."""
        if fcntl is None:
            return
        try:
            fd = os.open(self._wait_path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # no marker: nobody has waited yet
            return
        try:
            deadline = time.monotonic() + max_wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody waiting (any more)
                    return
                except OSError:
                    if time.monotonic() >= deadline:
                        return
                    time.sleep(0.002)
        finally:
            os.close(fd)  # drops the lock

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-write connection (retried while another process holds the file lock).

        The first one of this store creates the tables, and migrates a database from an older FIRST
        (drops the primary-key index, builds missing rollups).
        """
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        con = self._open(read_only=False)
        try:
            con.execute("SET TimeZone = 'UTC'")
            if not self._schema_ready:
                _migrate(con)
                self._schema_ready = True
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def connect_read_only(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection that cannot write (``read_only=True``), retried like :meth:`connect`.

        Several read-only connections (processes) may share the file; a writer waits for them and they
        for it.  Creates the database (and its tables) first when the file does not exist yet.
        The session time zone is UTC.
        """
        if not self.db_path.exists():
            with self.connect():
                pass
        con = self._open(read_only=True)
        try:
            con.execute("SET TimeZone = 'UTC'")
            yield con
        finally:
            con.close()

    # --- ingestion --------------------------------------------------------------------------

    def ingest(self, spool_dir: Path) -> int:
        """Move the spool's records into the ``usage`` table; returns the number of new rows."""
        spool_dir = Path(spool_dir)
        self.last_skipped_lines = 0
        self.timings = IngestTimings()
        try:
            names = _oldest_first(spool_dir)
        except FileNotFoundError:
            return 0
        batch_bytes = self.batch_rows * self.BYTES_PER_RECORD
        inserted = 0
        batch = _Batch()
        try:
            for name in names:
                m = SEGMENT_RE.match(name)
                if m is None:
                    continue
                seg = self._segment(spool_dir / name, is_open=m["open"] is not None)
                if seg is None:
                    continue
                batch.add(seg)
                if batch.bytes >= batch_bytes:
                    inserted += self._flush(batch)
                    batch = _Batch()
                    self._let_waiters_in()
            inserted += self._flush(batch)
        finally:
            for seg in batch.segments:  # only on error: _flush releases what it handled
                _release(seg)
        return inserted

    def _segment(self, path: Path, *, is_open: bool) -> _Segment | None:
        """A closed segment as a path for read_json; an open one read (complete lines) and decoded now."""
        if not is_open:
            try:
                return _Segment(path, deletable=True, size=path.stat().st_size)
            except FileNotFoundError:  # ingested by someone else meanwhile
                return None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:  # ingested by someone else, or just renamed to closed (next ingest)
            return None
        lock_fd: int | None = None
        try:
            locked = try_lock_segment(fd)
            deletable = (not segment_owner_alive(path)) if locked is None else locked
            if locked:
                lock_fd = fd  # hold it: nobody may write it while we read and delete it
            data = _read_all(fd)
        except BaseException:
            os.close(fd)
            raise
        if lock_fd is None:
            os.close(fd)
        end = data.rfind(b"\n")  # only complete lines; a partial tail is a crash or a write in flight
        records = self._decode(path, data[: end + 1])
        return _Segment(path, deletable, size=end + 1, records=records, lock_fd=lock_fd)

    def _decode(self, path: Path, data: bytes) -> list[UsageRecord]:
        t = time.perf_counter()
        try:
            if not data:
                return []
            try:
                return self._decoder.decode_lines(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
            records = []
            for line in data.split(b"\n"):
                if not line.strip():
                    continue
                try:
                    records.append(self._decoder.decode(line))
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    self.last_skipped_lines += 1
                    log.warning("skipping malformed usage line in %s: %s", path.name, e)
            return records
        finally:
            self.timings.decode_s += time.perf_counter() - t

    def _flush(self, batch: _Batch) -> int:
        inserted = 0
        tm = self.timings
        started = time.perf_counter()
        try:
            if batch.segments:
                t = time.perf_counter()
                with self.connect() as con:
                    tm.open_s += time.perf_counter() - t
                    try:
                        inserted = self._insert(con, batch)
                    except _Refused:  # a closed segment with a malformed line: decode them all with msgspec
                        for seg in batch.segments:
                            if seg.records is None:
                                seg.records = self._decode(seg.path, _read_file(seg.path))
                        inserted = self._insert(con, batch)
                    t = time.perf_counter()
                tm.commit_s += time.perf_counter() - t  # close = checkpoint
            t = time.perf_counter()
            # Committed: now the fully ingested segments may go.
            for seg in batch.segments:
                if seg.deletable:
                    with contextlib.suppress(FileNotFoundError):
                        seg.path.unlink()
            tm.commit_s += time.perf_counter() - t
            if batch.segments:
                tm.batches.append((inserted, time.perf_counter() - started))
        finally:
            for seg in batch.segments:
                _release(seg)
            batch.segments.clear()
        return inserted

    def _insert(self, con: duckdb.DuckDBPyConnection, batch: _Batch) -> int:
        """Stage, dedupe-insert and roll up one batch in one transaction; returns the rows inserted."""
        tm = self.timings
        t = time.perf_counter()
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("CREATE OR REPLACE TEMP TABLE _usage_batch AS SELECT * FROM usage LIMIT 0")
            closed = [str(s.path) for s in batch.segments if s.records is None]
            if closed:
                try:
                    con.execute(
                        f"INSERT INTO _usage_batch SELECT {_STAGED} FROM read_json($files, "
                        f"format = 'newline_delimited', columns = {_READ_JSON_COLUMNS})",
                        {"files": closed},
                    )
                except (
                    duckdb.IOException,  # a segment vanished: someone else ingested it
                    duckdb.InvalidInputException,  # a malformed line
                    duckdb.ConversionException,
                    duckdb.ConstraintException,  # a NULL where the schema has none
                ) as e:
                    raise _Refused(str(e)) from e
            records = [r for s in batch.segments if s.records for r in s.records]
            if records:
                t2 = time.perf_counter()
                table = _to_arrow(records)
                tm.decode_s += time.perf_counter() - t2
                con.register("_usage_arrow", table)
                try:
                    con.execute(f"INSERT INTO _usage_batch SELECT {_STAGED} FROM _usage_arrow")
                finally:
                    con.unregister("_usage_arrow")
            lo, hi, staged = con.execute("SELECT min(ts), max(ts), count(*) FROM _usage_batch").fetchall()[0]
            tm.stage_s += time.perf_counter() - t
            inserted = 0
            if staged:
                t = time.perf_counter()
                # Literal bounds (not parameters), so the scan of `usage` is pruned by its zone maps.
                window = f"u.ts BETWEEN {_ts_literal(lo)} AND {_ts_literal(hi)}"
                inserted = con.execute(
                    f"""
                    INSERT INTO usage
                    SELECT {_COLUMN_LIST} FROM _usage_batch b
                    WHERE NOT EXISTS (SELECT 1 FROM usage u WHERE {window} AND u.request_id = b.request_id)
                    QUALIFY row_number() OVER (PARTITION BY b.request_id ORDER BY b.ts) = 1
                    ORDER BY b.ts
                    """
                ).fetchall()[0][0]
                tm.insert_s += time.perf_counter() - t
                if inserted:
                    t = time.perf_counter()
                    days = [d for (d,) in con.execute(f"SELECT DISTINCT {DAY_SQL} FROM _usage_batch").fetchall()]
                    _refresh_rollups(con, days)
                    tm.rollup_s += time.perf_counter() - t
            t = time.perf_counter()
            con.execute("DROP TABLE _usage_batch")
            con.execute("COMMIT")
            tm.commit_s += time.perf_counter() - t
            return int(inserted)
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise

    # --- queries ----------------------------------------------------------------------------

    def query(self, sql: str, params: Any = None) -> pl.DataFrame:
        """Run SQL against the store and return a polars frame."""
        with self.connect() as con:
            return con.sql(sql, params=params).pl()

    def rows(self, since: datetime | None = None, until: datetime | None = None) -> pl.DataFrame:
        """All usage rows (optionally ``since <= ts < until``), ordered by ts then request_id."""
        where, params = _time_filter(since, until)
        return self.query(f"SELECT * FROM usage {where} ORDER BY ts, request_id", params)

    def count(self) -> int:
        with self.connect() as con:
            return con.execute("SELECT count(*) FROM usage").fetchall()[0][0]

    def summary(self, since: datetime | None = None, until: datetime | None = None) -> pl.DataFrame:
        """Per user and model, for ``since <= ts < until``: requests, errors (status >= 400), token
        sums, and the median (p50, interpolated) latency_ms and ttft_ms; sorted by user, model.

        Naive datetimes are taken as UTC.  (:func:`analytics.reports.summary` is the analysts' report.)
        """
        where, params = _time_filter(since, until)
        return self.query(
            f"""
            SELECT "user", model,
                   count(*)::BIGINT AS requests,
                   count(*) FILTER (WHERE status >= 400)::BIGINT AS errors,
                   sum(prompt_tokens)::BIGINT AS prompt_tokens,
                   sum(completion_tokens)::BIGINT AS completion_tokens,
                   sum(total_tokens)::BIGINT AS total_tokens,
                   quantile_cont(latency_ms, 0.5) AS p50_latency_ms,
                   quantile_cont(ttft_ms, 0.5) AS p50_ttft_ms
            FROM usage {where}
            GROUP BY "user", model
            ORDER BY "user", model
            """,
            params,
        )


# --- schema, migration, rollups --------------------------------------------------------------


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Create the tables; drop the primary key of an older ``usage`` table; rebuild rollups that disagree."""
    con.execute("BEGIN TRANSACTION")
    try:
        for ddl in _DDL:
            con.execute(ddl)
        (keys,) = con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'usage' AND constraint_type = 'PRIMARY KEY'"
        ).fetchall()[0]
        if keys:
            log.info("migrating the usage table: dropping its primary-key index (ingestion dedupes by time window)")
            con.execute(_DDL[0].replace("TABLE IF NOT EXISTS usage", "TABLE usage_migrated"))
            con.execute(f"INSERT INTO usage_migrated SELECT {_COLUMN_LIST} FROM usage ORDER BY ts")
            con.execute("DROP TABLE usage")
            con.execute("ALTER TABLE usage_migrated RENAME TO usage")
        if not rollups_match(con):
            log.info("rebuilding the usage rollups (usage_daily, usage_latency_hist) from every usage row")
            _refresh_rollups(con, None)
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


def _refresh_rollups(con: duckdb.DuckDBPyConnection, days: list[Any] | None) -> None:
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
            f"WHERE ts >= {_ts_literal(lo)} AND ts < {_ts_literal(datetime.fromtimestamp(hi, UTC))} "
            f"AND {DAY_SQL} IN ({in_days})"
        )
    con.execute("INSERT INTO usage_daily " + rollup_sql(ROLLUP_SELECT, where))
    con.execute("INSERT INTO usage_latency_hist " + rollup_sql(HIST_SELECT, where))


# --- helpers ---------------------------------------------------------------------------------


def _is_busy(e: duckdb.Error) -> bool:
    """Another process holds the file lock, or this process has the file open with another configuration
    (read-write vs read-only): both go away when that short-lived connection closes."""
    msg = str(e).lower()
    return "lock" in msg or "different configuration" in msg


def _flock(path: Path, how: int) -> int | None:
    """An open fd of ``path`` holding ``flock(how)`` (blocking), or None where flock is unsupported or the
    file cannot be created (a reader without write access to the folder just waits without the marker)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, how)
    except OSError:
        os.close(fd)
        return None
    return fd


def _ts_literal(dt: datetime) -> str:
    return f"TIMESTAMPTZ '{_utc(dt).isoformat()}'"


def _oldest_first(spool_dir: Path) -> list[str]:
    """The spool's file names by last write, oldest first: batches then hold requests close in time (the
    gateways' segments interleave), which keeps the table in ``ts`` order for the zone maps."""
    entries = []
    with os.scandir(spool_dir) as it:
        for e in it:
            with contextlib.suppress(FileNotFoundError):
                entries.append((e.stat().st_mtime_ns, e.name))
    return [name for _, name in sorted(entries)]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_file(path: Path) -> bytes:
    """A closed segment's complete lines (empty if it is gone: ingested by someone else)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b""
    return data[: data.rfind(b"\n") + 1]


def _release(seg: _Segment) -> None:
    if seg.lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(seg.lock_fd)  # closing drops the flock
        seg.lock_fd = None


def _to_arrow(records: list[UsageRecord]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(list(map(attrgetter(f.name), records)), type=f.type) for f in _ARROW_SCHEMA],
        schema=_ARROW_SCHEMA,
    )


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _time_filter(since: datetime | None, until: datetime | None) -> tuple[str, dict[str, datetime]]:
    clauses, params = [], {}
    if since is not None:
        clauses.append("ts >= $since")
        params["since"] = _utc(since)
    if until is not None:
        clauses.append("ts < $until")
        params["until"] = _utc(until)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params
