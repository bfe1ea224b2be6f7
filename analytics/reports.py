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
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from analytics.filters import _ALL, UsageFilter, UsageQueryError
from analytics.report_plan import SUMMARY_BY, ident, planned_report, query, sql_sum
from analytics.schema import DAY_SQL
from analytics.store import UsageStore

__all__ = [
    "REPORTS",
    "SUMMARY_BY",
    "UsageFilter",
    "UsageQueryError",
    "by_cluster",
    "by_model",
    "by_traffic",
    "cluster_latency",
    "daily",
    "errors",
    "export_parquet",
    "latency",
    "run_report",
    "sql",
    "summary",
    "top_users",
]


_REQ, _ERRS, _USERS = sql_sum("requests"), sql_sum("errors"), 'count(DISTINCT "user")::BIGINT'
_TOKEN_SUMS = {c: sql_sum(c) for c in ("total_tokens", "prompt_tokens", "completion_tokens")}
_P50_LATENCY = {"p50_latency_ms": ("latency_ms", 0.5)}


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
    aggregates = {
        "requests": _REQ,
        "users": _USERS,
        "errors": _ERRS,
        "error_rate": "sum(errors)::DOUBLE / nullif(sum(requests), 0)",
        "prompt_tokens": sql_sum("prompt_tokens"),
        "completion_tokens": sql_sum("completion_tokens"),
        "total_tokens": sql_sum("total_tokens"),
        "cold_starts": sql_sum("cold_starts"),
        "first_ts": "min(first_ts)",
        "last_ts": "max(last_ts)",
    }
    percentiles = {
        "p50_latency_ms": ("latency_ms", 0.5),
        "p95_latency_ms": ("latency_ms", 0.95),
        "p50_ttft_ms": ("ttft_ms", 0.5),
    }
    columns = [
        "requests", "users", "errors", "error_rate", "prompt_tokens", "completion_tokens", "total_tokens",
        "p50_latency_ms", "p95_latency_ms", "p50_ttft_ms", "cold_starts", "first_ts", "last_ts",
    ]  # fmt: skip
    order = "ORDER BY " + ", ".join(f"a.{ident(b)}" for b in by) if by else ""
    return planned_report(store, f, by, aggregates, percentiles, columns, order=order)


def top_users(store: UsageStore, f: UsageFilter = _ALL, limit: int = 10) -> pl.DataFrame:
    """The ``limit`` users with the most tokens: user, requests, total/prompt/completion tokens, errors;
    ordered by total_tokens descending, then user."""
    aggregates = {"requests": _REQ, **_TOKEN_SUMS, "errors": _ERRS}
    return planned_report(
        store, f, ["user"], aggregates, {}, list(aggregates), order='ORDER BY total_tokens DESC, "user"', limit=limit
    )


def by_model(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per model: requests, users, total/prompt/completion tokens, errors, p50_latency_ms; ordered by model."""
    aggregates = {"requests": _REQ, "users": _USERS, **_TOKEN_SUMS, "errors": _ERRS}
    return planned_report(
        store, f, ["model"], aggregates, _P50_LATENCY, [*aggregates, "p50_latency_ms"], order="ORDER BY a.model"
    )


def by_cluster(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per cluster: requests, models, total_tokens, errors, p50_latency_ms, cold_starts; ordered by cluster.

    A null cluster collects the requests that never reached one (refused or failed before routing);
    it comes last.
    """
    aggregates = {
        "requests": _REQ,
        "models": "count(DISTINCT model)::BIGINT",
        "total_tokens": sql_sum("total_tokens"),
        "errors": _ERRS,
        "cold_starts": sql_sum("cold_starts"),
    }
    columns = ["requests", "models", "total_tokens", "errors", "p50_latency_ms", "cold_starts"]
    return planned_report(
        store, f, ["cluster"], aggregates, _P50_LATENCY, columns, order="ORDER BY a.cluster NULLS LAST"
    )


def latency(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per model and cluster, successful requests only (status < 400): requests, streams,
    p50/p95/p99 latency_ms and p50/p95/p99 ttft_ms (streams only; null without streams);
    ordered by model, cluster (null last)."""
    percentiles = {f"p{round(q * 100)}_{m}": (m, q) for m in ("latency_ms", "ttft_ms") for q in (0.5, 0.95, 0.99)}
    aggregates = {"requests": "sum(requests - errors)::BIGINT", "streams": sql_sum("ok_streams")}
    return planned_report(
        store, f, ["model", "cluster"], aggregates, percentiles, [*aggregates, *percentiles], ok_only=True,
        order="ORDER BY a.model, a.cluster NULLS LAST",
    )  # fmt: skip


def cluster_latency(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per cluster, successful requests only (status < 400): requests and p50/p95/p99 latency_ms; ordered by
    cluster (null last).  The latency chart's data."""
    percentiles = {f"p{round(q * 100)}_latency_ms": ("latency_ms", q) for q in (0.5, 0.95, 0.99)}
    aggregates = {"requests": "sum(requests - errors)::BIGINT"}
    return planned_report(
        store, f, ["cluster"], aggregates, percentiles, [*aggregates, *percentiles], ok_only=True,
        order="ORDER BY a.cluster NULLS LAST",
    )  # fmt: skip


def errors(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Failed requests (status >= 400) per status, error_type and model: requests, users, last_ts, and
    ``rate`` = those requests / all requests the filter matches (successful ones included).

    Ordered by requests descending, then status, error_type, model.  (Read from the raw rows: failures
    are few.)
    """
    where, params = f.where()
    err_where, _ = f.and_("status >= 400")
    return query(
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
    aggregates = {"requests": _REQ, "users": _USERS, "total_tokens": sql_sum("total_tokens"), "errors": _ERRS}
    return planned_report(
        store, f, ["day", "model"], aggregates, _P50_LATENCY, [*aggregates, "p50_latency_ms"],
        order="ORDER BY a.day, a.model",
    )  # fmt: skip


def by_traffic(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Interactive requests against batch lines: :func:`summary` per ``traffic`` (``interactive``, ``batch``)."""
    return summary(store, f, by=("traffic",))


REPORTS: dict[str, Callable[..., pl.DataFrame]] = {
    "summary": summary,
    "by-traffic": by_traffic,
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
            for (d,) in con.execute(
                f"SELECT DISTINCT {DAY_SQL} FROM usage {where} ORDER BY 1", params or None
            ).fetchall()
        ]
        if not days:
            return []
        to.mkdir(parents=True, exist_ok=True)
        for d in days:
            shutil.rmtree(to / f"day={d.isoformat()}", ignore_errors=True)
        target = str(to).replace("'", "''")
        con.execute(
            f"""
            COPY (SELECT *, {DAY_SQL} AS day FROM usage {where} ORDER BY ts, request_id)
            TO '{target}' (FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE true, FILENAME_PATTERN 'usage_{{i}}')
            """,
            params or None,
        )
    return sorted(p for d in days for p in (to / f"day={d.isoformat()}").glob("*.parquet"))
