"""DuckDB usage store: batch ingestion of the spool and the usage summary.

``ingest`` reads the spool's segments (see :mod:`analytics.spool`), inserts their records into the
``usage`` table in batches through an Arrow table and ``INSERT ... SELECT ... ON CONFLICT DO
NOTHING`` (``request_id`` is the primary key, so re-reading a segment never doubles a row), and
only after the insert has committed deletes what is fully ingested:

* closed segments (``.jsonl``);
* open segments (``.jsonl.open``) whose writer is dead: its ``flock`` can be taken (or, where
  locking is unsupported, its pid is gone).  Only complete lines are read; a partial last line
  left by a crash mid-write is dropped with the file.

Open segments of live writers are read up to their last complete line and left in place; the next
ingest re-reads them, which the primary key makes harmless.  A crash between commit and delete is
harmless for the same reason.

Every call uses a short-lived DuckDB connection (open, work, close) and retries briefly while
another process holds the database file lock, so analysts and the ingester can take turns.
:meth:`UsageStore.connect_read_only` is the same for readers (the reports in :mod:`analytics.reports`):
several may share the file, and a read-only and a read-write connection within one process wait for
each other too (DuckDB refuses to open one file with both configurations at once).
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

__all__ = ["USAGE_COLUMNS", "UsageStore"]

log = logging.getLogger(__name__)

# Column name -> (DuckDB type, Arrow type of the staged batch). Order = UsageRecord fields.
_COLUMNS: dict[str, tuple[str, pa.DataType]] = {
    "request_id": ("VARCHAR PRIMARY KEY", pa.string()),
    "ts": ("TIMESTAMPTZ NOT NULL", pa.float64()),  # staged as epoch seconds, stored as UTC timestamp
    "user": ("VARCHAR NOT NULL", pa.string()),
    "groups": ("VARCHAR[] NOT NULL", pa.list_(pa.string())),
    "model": ("VARCHAR NOT NULL", pa.string()),
    "cluster": ("VARCHAR", pa.string()),
    "endpoint": ("VARCHAR NOT NULL", pa.string()),
    "stream": ("BOOLEAN NOT NULL", pa.bool_()),
    "prompt_tokens": ("BIGINT NOT NULL", pa.int64()),
    "completion_tokens": ("BIGINT NOT NULL", pa.int64()),
    "total_tokens": ("BIGINT NOT NULL", pa.int64()),
    "latency_ms": ("DOUBLE NOT NULL", pa.float64()),
    "ttft_ms": ("DOUBLE", pa.float64()),
    "status": ("INTEGER NOT NULL", pa.int32()),
    "error_type": ("VARCHAR", pa.string()),
    "cold_start": ("BOOLEAN NOT NULL", pa.bool_()),
}
USAGE_COLUMNS: tuple[str, ...] = tuple(_COLUMNS)
if UsageRecord.__struct_fields__ != USAGE_COLUMNS:  # pragma: no cover - guards schema drift
    raise RuntimeError(f"usage columns {USAGE_COLUMNS} != UsageRecord fields {UsageRecord.__struct_fields__}")

_ARROW_SCHEMA = pa.schema([(name, arrow_type) for name, (_, arrow_type) in _COLUMNS.items()])
_DDL = (
    "CREATE TABLE IF NOT EXISTS usage (\n"
    + ",\n".join(f'  "{name}" {sql_type}' for name, (sql_type, _) in _COLUMNS.items())
    + "\n)"
)
_INSERT = (
    "INSERT INTO usage SELECT "
    + ", ".join('to_timestamp("ts")' if name == "ts" else f'"{name}"' for name in USAGE_COLUMNS)
    + " FROM _usage_batch ON CONFLICT DO NOTHING"
)


class _Row(UsageRecord, gc=False):
    """UsageRecord decoded for ingestion: untracked by the cyclic GC (halves the decode time)."""


@dataclass
class _Segment:
    path: Path
    records: list[UsageRecord]
    deletable: bool  # closed, or open with a dead writer
    lock_fd: int | None = None  # held flock on a dead writer's open segment until it is deleted


@dataclass
class _Batch:
    segments: list[_Segment] = field(default_factory=list)
    rows: int = 0

    def add(self, seg: _Segment) -> None:
        self.segments.append(seg)
        self.rows += len(seg.records)


class UsageStore:
    """The ``usage`` table in a DuckDB file, fed from a :class:`analytics.spool.UsageSpool` directory."""

    def __init__(self, db_path: Path, *, batch_rows: int = 200_000, lock_timeout_s: float = 10.0) -> None:
        self.db_path = Path(db_path)
        self.batch_rows = batch_rows
        self.lock_timeout_s = lock_timeout_s
        self._decoder = msgspec.json.Decoder(_Row)
        self._schema_ready = False
        self.last_skipped_lines = 0  # malformed complete lines skipped by the last ingest

    # --- connections ------------------------------------------------------------------------

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-write connection (retried while another process holds the file lock)."""
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.01
        while True:
            try:
                con = duckdb.connect(str(self.db_path))
                break
            except (duckdb.IOException, duckdb.ConnectionException) as e:
                if not _is_busy(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
        try:
            con.execute("SET TimeZone = 'UTC'")
            if not self._schema_ready:
                con.execute(_DDL)
                self._schema_ready = True
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def connect_read_only(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection that cannot write (``read_only=True``), retried like :meth:`connect`.

        Several read-only connections (processes) may share the file; a writer waits for them and they
        for it.  Creates the database (and the ``usage`` table) first when the file does not exist yet.
        The session time zone is UTC.
        """
        if not self.db_path.exists():
            with self.connect():
                pass
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.01
        while True:
            try:
                con = duckdb.connect(str(self.db_path), read_only=True)
                break
            except (duckdb.IOException, duckdb.ConnectionException) as e:
                if not _is_busy(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
        try:
            con.execute("SET TimeZone = 'UTC'")
            yield con
        finally:
            con.close()

    # --- ingestion --------------------------------------------------------------------------

    def ingest(self, spool_dir: Path) -> int:
        """Move the spool's records into the ``usage`` table; returns the number of new rows."""
        spool_dir = Path(spool_dir)
        try:
            names = sorted(os.listdir(spool_dir))
        except FileNotFoundError:
            return 0
        self.last_skipped_lines = 0
        inserted = 0
        batch = _Batch()
        try:
            for name in names:
                m = SEGMENT_RE.match(name)
                if m is None:
                    continue
                seg = self._read_segment(spool_dir / name, is_open=m["open"] is not None)
                if seg is None:
                    continue
                batch.add(seg)
                if batch.rows >= self.batch_rows:
                    inserted += self._flush(batch)
                    batch = _Batch()
            inserted += self._flush(batch)
        finally:
            for seg in batch.segments:  # only on error: _flush releases what it handled
                _release(seg)
        return inserted

    def _read_segment(self, path: Path, *, is_open: bool) -> _Segment | None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:  # ingested by someone else, or an open one just renamed to closed
            return None
        lock_fd: int | None = None
        try:
            if is_open:
                locked = try_lock_segment(fd)
                deletable = (not segment_owner_alive(path)) if locked is None else locked
                if locked:
                    lock_fd = fd  # hold it: nobody may write it while we read and delete it
            else:
                deletable = True
            data = _read_all(fd)
        except BaseException:
            os.close(fd)
            raise
        if lock_fd is None:
            os.close(fd)
        end = data.rfind(b"\n")  # only complete lines; a partial tail is a crash or a write in flight
        return _Segment(path, self._decode(path, data[: end + 1]), deletable, lock_fd)

    def _decode(self, path: Path, data: bytes) -> list[UsageRecord]:
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

    def _flush(self, batch: _Batch) -> int:
        inserted = 0
        try:
            records = [r for seg in batch.segments for r in seg.records]
            if records:
                table = _to_arrow(records)
                with self.connect() as con:
                    con.register("_usage_batch", table)
                    try:
                        inserted = con.execute(_INSERT).fetchone()[0]
                    finally:
                        con.unregister("_usage_batch")
            # Committed (autocommit statement): now the fully ingested segments may go.
            for seg in batch.segments:
                if seg.deletable:
                    with contextlib.suppress(FileNotFoundError):
                        seg.path.unlink()
        finally:
            for seg in batch.segments:
                _release(seg)
            batch.segments.clear()
        return int(inserted)

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
            return con.execute("SELECT count(*) FROM usage").fetchone()[0]

    def summary(self, since: datetime | None = None, until: datetime | None = None) -> pl.DataFrame:
        """Per user and model, for ``since <= ts < until``: requests, errors (status >= 400), token
        sums, and the median (p50, interpolated) latency_ms and ttft_ms; sorted by user, model.

        Naive datetimes are taken as UTC.
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


def _is_busy(e: duckdb.Error) -> bool:
    """Another process holds the file lock, or this process has the file open with another configuration
    (read-write vs read-only): both go away when that short-lived connection closes."""
    msg = str(e).lower()
    return "lock" in msg or "different configuration" in msg


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


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
