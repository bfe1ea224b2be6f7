"""Usage reports over the DuckDB ``usage`` table, as polars frames (the CLI, notebooks and flows share them).

Every report takes a :class:`UsageFilter` (time window, user, model, cluster, group) and runs in a
short-lived read-only connection (:meth:`analytics.store.UsageStore.connect_read_only`), so several
readers can share the file and the ingester only waits for them briefly.  Nothing here ingests the
spool: call :meth:`UsageStore.ingest` first for fresh data (the CLI does by default).

Conventions, the same in every report:

* an *error* is a request whose HTTP status is >= 400;
* percentiles are ``quantile_cont`` (interpolated); latency percentiles cover every request except
  in :func:`latency`, which only looks at successful ones; ``ttft_ms`` exists for streams only;
* ``day`` is the UTC calendar day of ``ts`` (request start);
* a report over no rows returns an empty frame (``summary``: one row of zero counts and null stats).

:data:`REPORTS` maps the CLI's report names to the functions.  :func:`sql` runs an analyst's own
read-only query; :func:`export_parquet` writes Hive-partitioned Parquet (``day=YYYY-MM-DD/``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from analytics.store import UsageStore

__all__ = [
    "REPORTS",
    "SUMMARY_BY",
    "UsageFilter",
    "UsageQueryError",
    "by_cluster",
    "by_model",
    "daily",
    "errors",
    "export_parquet",
    "latency",
    "run_report",
    "sql",
    "summary",
    "top_users",
]


class UsageQueryError(ValueError):
    """An analyst's query was refused (it tried to write, or to reach files) or is not valid SQL."""


def _as_utc(value: datetime | date | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):  # a date: its UTC midnight
        value = datetime.combine(value, time())
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class UsageFilter:
    """Which usage rows a report looks at; every field left ``None`` matches everything.

    ``since`` is inclusive and ``until`` exclusive; they may be datetimes (naive = UTC), dates (UTC
    midnight) or ISO strings, and are stored as aware UTC datetimes.  ``group`` matches rows whose
    ``groups`` list contains it.
    """

    since: datetime | None = None
    until: datetime | None = None
    user: str | None = None
    model: str | None = None
    cluster: str | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "since", _as_utc(self.since))
        object.__setattr__(self, "until", _as_utc(self.until))

    def where(self) -> tuple[str, dict[str, Any]]:
        """``("WHERE ... AND ...", params)`` for DuckDB named parameters, or ``("", {})`` when empty.

        The parameters are named after the fields (``$since``, ``$until``, ``$user``, ``$model``,
        ``$cluster``, ``$group``); only those in use are returned.
        """
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if self.since is not None:
            clauses.append("ts >= $since")
            params["since"] = self.since
        if self.until is not None:
            clauses.append("ts < $until")
            params["until"] = self.until
        if self.user is not None:
            clauses.append('"user" = $user')
            params["user"] = self.user
        if self.model is not None:
            clauses.append("model = $model")
            params["model"] = self.model
        if self.cluster is not None:
            clauses.append("cluster = $cluster")
            params["cluster"] = self.cluster
        if self.group is not None:
            clauses.append('list_contains("groups", $group)')
            params["group"] = self.group
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), params

    def and_(self, condition: str) -> tuple[str, dict[str, Any]]:
        """:meth:`where` with one more SQL condition ANDed in."""
        where, params = self.where()
        return (f"{where} AND ({condition})" if where else f"WHERE {condition}"), params


_ALL = UsageFilter()


def _query(store: UsageStore, query: str, params: dict[str, Any] | None = None) -> pl.DataFrame:
    with store.connect_read_only() as con:
        return con.sql(query, params=params or None).pl()


_ERR = "count(*) FILTER (WHERE status >= 400)::BIGINT"
_TOKENS = (
    "coalesce(sum(total_tokens), 0)::BIGINT AS total_tokens, "
    "coalesce(sum(prompt_tokens), 0)::BIGINT AS prompt_tokens, "
    "coalesce(sum(completion_tokens), 0)::BIGINT AS completion_tokens"
)
_DAY = "CAST(timezone('UTC', ts) AS DATE)"

# What summary(by=...) may group by: name -> SQL expression.
SUMMARY_BY: dict[str, str] = {
    "user": '"user"',
    "model": "model",
    "cluster": "cluster",
    "endpoint": "endpoint",
    "day": _DAY,
}


def summary(store: UsageStore, f: UsageFilter = _ALL, *, by: Sequence[str] = ()) -> pl.DataFrame:
    """One row: requests, users, errors, error_rate, prompt/completion/total tokens, p50/p95 latency_ms,
    p50 ttft_ms, cold_starts, first_ts, last_ts.

    ``by`` (names from :data:`SUMMARY_BY`, e.g. ``("user", "model")``) gives one row per group
    instead, the group columns first, ordered by them.  ``error_rate`` is errors / requests (null
    without requests); latency percentiles cover failed requests too.
    """
    unknown = [b for b in by if b not in SUMMARY_BY]
    if unknown:
        raise ValueError(f"cannot summarise by {unknown}; choose from {sorted(SUMMARY_BY)}")
    keys = [f"{SUMMARY_BY[b]} AS {_ident(b)}" for b in by]
    where, params = f.where()
    group = (
        ("GROUP BY " + ", ".join(_ident(b) for b in by) + " ORDER BY " + ", ".join(_ident(b) for b in by)) if by else ""
    )
    return _query(
        store,
        f"""
        SELECT {"".join(k + ", " for k in keys)}
               count(*)::BIGINT AS requests,
               count(DISTINCT "user")::BIGINT AS users,
               {_ERR} AS errors,
               ({_ERR})::DOUBLE / nullif(count(*), 0) AS error_rate,
               coalesce(sum(prompt_tokens), 0)::BIGINT AS prompt_tokens,
               coalesce(sum(completion_tokens), 0)::BIGINT AS completion_tokens,
               coalesce(sum(total_tokens), 0)::BIGINT AS total_tokens,
               quantile_cont(latency_ms, 0.5) AS p50_latency_ms,
               quantile_cont(latency_ms, 0.95) AS p95_latency_ms,
               quantile_cont(ttft_ms, 0.5) AS p50_ttft_ms,
               count(*) FILTER (WHERE cold_start)::BIGINT AS cold_starts,
               min(ts) AS first_ts,
               max(ts) AS last_ts
        FROM usage {where}
        {group}
        """,
        params,
    )


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def top_users(store: UsageStore, f: UsageFilter = _ALL, limit: int = 10) -> pl.DataFrame:
    """The ``limit`` users with the most tokens: user, requests, total/prompt/completion tokens, errors;
    ordered by total_tokens descending, then user."""
    where, params = f.where()
    return _query(
        store,
        f"""
        SELECT "user", count(*)::BIGINT AS requests, {_TOKENS}, {_ERR} AS errors
        FROM usage {where}
        GROUP BY "user"
        ORDER BY total_tokens DESC, "user"
        LIMIT {int(limit)}
        """,
        params,
    )


def by_model(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per model: requests, users, total/prompt/completion tokens, errors, p50_latency_ms; ordered by model."""
    where, params = f.where()
    return _query(
        store,
        f"""
        SELECT model, count(*)::BIGINT AS requests, count(DISTINCT "user")::BIGINT AS users, {_TOKENS},
               {_ERR} AS errors, quantile_cont(latency_ms, 0.5) AS p50_latency_ms
        FROM usage {where}
        GROUP BY model
        ORDER BY model
        """,
        params,
    )


def by_cluster(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per cluster: requests, models, total_tokens, errors, p50_latency_ms, cold_starts; ordered by cluster.

    A null cluster collects the requests that never reached one (refused or failed before routing);
    it comes last.
    """
    where, params = f.where()
    return _query(
        store,
        f"""
        SELECT cluster, count(*)::BIGINT AS requests, count(DISTINCT model)::BIGINT AS models,
               coalesce(sum(total_tokens), 0)::BIGINT AS total_tokens, {_ERR} AS errors,
               quantile_cont(latency_ms, 0.5) AS p50_latency_ms,
               count(*) FILTER (WHERE cold_start)::BIGINT AS cold_starts
        FROM usage {where}
        GROUP BY cluster
        ORDER BY cluster NULLS LAST
        """,
        params,
    )


def latency(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per model and cluster, successful requests only (status < 400): requests, streams,
    p50/p95/p99 latency_ms and p50/p95/p99 ttft_ms (streams only; null without streams);
    ordered by model, cluster (null last)."""
    where, params = f.and_("status < 400")
    return _query(
        store,
        f"""
        SELECT model, cluster, count(*)::BIGINT AS requests,
               count(*) FILTER (WHERE stream)::BIGINT AS streams,
               quantile_cont(latency_ms, 0.5) AS p50_latency_ms,
               quantile_cont(latency_ms, 0.95) AS p95_latency_ms,
               quantile_cont(latency_ms, 0.99) AS p99_latency_ms,
               quantile_cont(ttft_ms, 0.5) AS p50_ttft_ms,
               quantile_cont(ttft_ms, 0.95) AS p95_ttft_ms,
               quantile_cont(ttft_ms, 0.99) AS p99_ttft_ms
        FROM usage {where}
        GROUP BY model, cluster
        ORDER BY model, cluster NULLS LAST
        """,
        params,
    )


def errors(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Failed requests (status >= 400) per status, error_type and model: requests, users, last_ts, and
    ``rate`` = those requests / all requests the filter matches (successful ones included).

    Ordered by requests descending, then status, error_type, model.
    """
    where, params = f.where()
    err_where, _ = f.and_("status >= 400")
    return _query(
        store,
        f"""
        SELECT status, error_type, model, count(*)::BIGINT AS requests,
               count(DISTINCT "user")::BIGINT AS users, max(ts) AS last_ts,
               count(*)::DOUBLE / (SELECT count(*) FROM usage {where}) AS rate
        FROM usage {err_where}
        GROUP BY status, error_type, model
        ORDER BY requests DESC, status, error_type NULLS LAST, model
        """,
        params,
    )


def daily(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per UTC day and model: requests, users, total_tokens, errors, p50_latency_ms; ordered by day, model.

    ``day`` is a DATE; days without requests are absent (not zero rows).
    """
    where, params = f.where()
    return _query(
        store,
        f"""
        SELECT {_DAY} AS day, model, count(*)::BIGINT AS requests, count(DISTINCT "user")::BIGINT AS users,
               coalesce(sum(total_tokens), 0)::BIGINT AS total_tokens, {_ERR} AS errors,
               quantile_cont(latency_ms, 0.5) AS p50_latency_ms
        FROM usage {where}
        GROUP BY day, model
        ORDER BY day, model
        """,
        params,
    )


REPORTS: dict[str, Callable[..., pl.DataFrame]] = {
    "summary": summary,
    "top-users": top_users,
    "by-model": by_model,
    "by-cluster": by_cluster,
    "latency": latency,
    "errors": errors,
    "daily": daily,
}


def run_report(store: UsageStore, name: str, f: UsageFilter = _ALL, **options: Any) -> pl.DataFrame:
    """The report ``name`` (a :data:`REPORTS` key; ``top_users`` works too) with extra options such as
    ``limit`` (top-users) or ``by`` (summary)."""
    key = name.replace("_", "-")
    if key not in REPORTS:
        raise ValueError(f"unknown report {name!r}; choose from {', '.join(REPORTS)}")
    return REPORTS[key](store, f, **options)


# --- ad-hoc SQL ------------------------------------------------------------------------------


def sql(store: UsageStore, query: str, params: Any = None, *, external_access: bool = False) -> pl.DataFrame:
    """Run an analyst's query in a connection that cannot write the database, and return its result.

    The database is opened ``read_only=True`` (retried while the ingester holds the file lock), so
    ``INSERT``/``UPDATE``/``DELETE``/``CREATE``/... raise :class:`UsageQueryError`.  Unless
    ``external_access`` is set, the query cannot read or write other files either (no ``COPY ... TO``,
    ``ATTACH``, ``read_csv``...), and cannot change that setting.  Several statements separated by
    ``;`` run in order and the last one's result is returned; a statement without a result gives an
    empty frame.
    """
    with store.connect_read_only() as con:
        if not external_access:
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        try:
            rel = con.sql(query, params=params)
            return rel.pl() if rel is not None else pl.DataFrame()
        except duckdb.InvalidInputException as e:
            if "read-only mode" in str(e):
                raise UsageQueryError(f"usage queries are read-only: {e}") from e
            raise UsageQueryError(str(e)) from e
        except duckdb.PermissionException as e:
            raise UsageQueryError(f"usage queries cannot reach other files: {e}") from e
        except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException) as e:
            raise UsageQueryError(str(e)) from e


# --- Parquet export --------------------------------------------------------------------------


def export_parquet(store: UsageStore, to: Path, f: UsageFilter = _ALL) -> list[Path]:
    """Write the filtered rows as Hive-partitioned Parquet, ``to/day=YYYY-MM-DD/*.parquet`` (UTC days).

    The files hold every ``usage`` column; ``day`` lives in the directory names (readers with Hive
    partitioning, the default in DuckDB, polars and pyarrow, give it back as a column).  Each day
    directory the export writes is emptied first, so rerunning an export replaces those days and
    leaves other days alone.  Returns the files written, sorted.
    """
    to = Path(to)
    where, params = f.where()
    with store.connect_read_only() as con:
        days = [
            d
            for (d,) in con.execute(f"SELECT DISTINCT {_DAY} FROM usage {where} ORDER BY 1", params or None).fetchall()
        ]
        if not days:
            return []
        to.mkdir(parents=True, exist_ok=True)
        for d in days:
            shutil.rmtree(to / f"day={d.isoformat()}", ignore_errors=True)
        target = str(to).replace("'", "''")
        con.execute(
            f"""
            COPY (SELECT *, {_DAY} AS day FROM usage {where} ORDER BY ts, request_id)
            TO '{target}' (FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE true, FILENAME_PATTERN 'usage_{{i}}')
            """,
            params or None,
        )
    return sorted(p for d in days for p in (to / f"day={d.isoformat()}").glob("*.parquet"))
