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
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import polars as pl

from analytics.records import UsageRecord
from analytics.schema import (
    COLUMN_LIST,
    DAY_SQL,
    READ_JSON_COLUMNS,
    STAGED_COLUMNS,
    migrate,
    refresh_rollups,
    ts_literal,
)
from analytics.segments import (
    Batch,
    DecodedRow,
    ReadJsonRefused,
    Segment,
    oldest_first,
    read_all,
    read_file,
    release,
    to_arrow,
)
from analytics.spool import SEGMENT_RE, segment_owner_alive, try_lock_segment

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no hand-over between batches
    fcntl = None  # type: ignore[assignment]

__all__ = ["IngestTimings", "UsageStore"]

log = logging.getLogger(__name__)


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
        self._decoder = msgspec.json.Decoder(DecodedRow)
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
                migrate(con)
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
        """Move the spool's records into the ``usage`` table; returns the number of new rows. The spool's folder
        and each folder in it (one per gateway replica or worker: ``FIRST_REPLICA``) are read."""
        spool_dir = Path(spool_dir)
        self.last_skipped_lines = 0
        self.timings = IngestTimings()
        try:
            paths = oldest_first(spool_dir)
        except FileNotFoundError:
            return 0
        batch_bytes = self.batch_rows * self.BYTES_PER_RECORD
        inserted = 0
        batch = Batch()
        try:
            for path in paths:
                m = SEGMENT_RE.match(path.name)
                if m is None:
                    continue
                seg = self._segment(path, is_open=m["open"] is not None)
                if seg is None:
                    continue
                batch.add(seg)
                if batch.bytes >= batch_bytes:
                    inserted += self._flush(batch)
                    batch = Batch()
                    self._let_waiters_in()
            inserted += self._flush(batch)
        finally:
            for seg in batch.segments:  # only on error: _flush releases what it handled
                release(seg)
        return inserted

    def _segment(self, path: Path, *, is_open: bool) -> Segment | None:
        """A closed segment as a path for read_json; an open one read (complete lines) and decoded now."""
        if not is_open:
            try:
                return Segment(path, deletable=True, size=path.stat().st_size)
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
            data = read_all(fd)
        except BaseException:
            os.close(fd)
            raise
        if lock_fd is None:
            os.close(fd)
        end = data.rfind(b"\n")  # only complete lines; a partial tail is a crash or a write in flight
        records = self._decode(path, data[: end + 1])
        return Segment(path, deletable, size=end + 1, records=records, lock_fd=lock_fd)

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

    def _flush(self, batch: Batch) -> int:
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
                    except ReadJsonRefused:  # a closed segment with a malformed line: decode them all with msgspec
                        for seg in batch.segments:
                            if seg.records is None:
                                seg.records = self._decode(seg.path, read_file(seg.path))
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
                release(seg)
            batch.segments.clear()
        return inserted

    def _insert(self, con: duckdb.DuckDBPyConnection, batch: Batch) -> int:
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
                        f"INSERT INTO _usage_batch SELECT {STAGED_COLUMNS} FROM read_json($files, "
                        f"format = 'newline_delimited', columns = {READ_JSON_COLUMNS})",
                        {"files": closed},
                    )
                except (
                    duckdb.IOException,  # a segment vanished: someone else ingested it
                    duckdb.InvalidInputException,  # a malformed line
                    duckdb.ConversionException,
                    duckdb.ConstraintException,  # a NULL where the schema has none
                ) as e:
                    raise ReadJsonRefused(str(e)) from e
            records = [r for s in batch.segments if s.records for r in s.records]
            if records:
                t2 = time.perf_counter()
                table = to_arrow(records)
                tm.decode_s += time.perf_counter() - t2
                con.register("_usage_arrow", table)
                try:
                    con.execute(f"INSERT INTO _usage_batch SELECT {STAGED_COLUMNS} FROM _usage_arrow")
                finally:
                    con.unregister("_usage_arrow")
            lo, hi, staged = con.execute("SELECT min(ts), max(ts), count(*) FROM _usage_batch").fetchall()[0]
            tm.stage_s += time.perf_counter() - t
            inserted = 0
            if staged:
                t = time.perf_counter()
                # Literal bounds (not parameters), so the scan of `usage` is pruned by its zone maps.
                window = f"u.ts BETWEEN {ts_literal(lo)} AND {ts_literal(hi)}"
                inserted = con.execute(
                    f"""
                    INSERT INTO usage
                    SELECT {COLUMN_LIST} FROM _usage_batch b
                    WHERE NOT EXISTS (SELECT 1 FROM usage u WHERE {window} AND u.request_id = b.request_id)
                    QUALIFY row_number() OVER (PARTITION BY b.request_id ORDER BY b.ts) = 1
                    ORDER BY b.ts
                    """
                ).fetchall()[0][0]
                tm.insert_s += time.perf_counter() - t
                if inserted:
                    t = time.perf_counter()
                    days = [d for (d,) in con.execute(f"SELECT DISTINCT {DAY_SQL} FROM _usage_batch").fetchall()]
                    refresh_rollups(con, days)
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
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, how)
    except OSError:
        os.close(fd)
        return None
    return fd


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
