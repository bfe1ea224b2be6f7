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
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from analytics.store import DAY_SQL, HIST_BASE, HIST_SELECT, ROLLUP_SELECT, UsageStore, rollup_sql, rollups_match

__all__ = [
    "REPORTS",
    "SUMMARY_BY",
    "UsageFilter",
    "UsageQueryError",
    "by_cluster",
    "by_model",
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

# What summary(by=...) may group by: name -> SQL expression over `usage` rows.  The rollup rows carry
# the same names as columns.
SUMMARY_BY: dict[str, str] = {
    "user": '"user"',
    "model": "model",
    "cluster": "cluster",
    "endpoint": "endpoint",
    "day": DAY_SQL,
}
_HIST_KEYS = frozenset({"day", "model", "cluster"})  # what usage_latency_hist is kept per


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sum(col: str) -> str:
    return f"coalesce(sum({col}), 0)::BIGINT"


# --- the plan of a report: rollup rows where they cover the window, raw rows at its edges ---------


@dataclass(frozen=True)
class _Window:
    """``f``'s time window split into whole UTC days (read from the rollups) and the partial days at its
    edges (aggregated from the raw rows, with the same SQL the ingester uses for the rollups)."""

    days: tuple[date | None, date | None] | None  # [first, end) whole days; None bound = open; None = no day
    edges: tuple[tuple[datetime | None, datetime | None], ...]  # [since, until) ranges of raw rows

    @classmethod
    def of(cls, f: UsageFilter) -> _Window:
        def midnight(d: date) -> datetime:
            return datetime.combine(d, time(), UTC)

        first = None if f.since is None else f.since.date() + timedelta(days=f.since.time() != time())
        end = None if f.until is None else f.until.date()
        if first is not None and end is not None and first >= end:  # within one day: raw rows only
            return cls(None, ((f.since, f.until),))
        edges = []
        if f.since is not None and first is not None and midnight(first) != f.since:
            edges.append((f.since, midnight(first)))
        if f.until is not None and end is not None and midnight(end) != f.until:
            edges.append((midnight(end), f.until))
        return cls((first, end), tuple(edges))


def _dims(f: UsageFilter, *, hist: bool = False) -> tuple[list[str], dict[str, Any]]:
    """The filter's non-time conditions, valid on `usage`, `usage_daily` and (model, cluster) the histograms."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for name, value, clause in (
        ("user", f.user, '"user" = $user'),
        ("model", f.model, "model = $model"),
        ("cluster", f.cluster, "cluster = $cluster"),
        ("group", f.group, 'list_contains("groups", $group)'),
    ):
        if value is not None and not (hist and name in ("user", "group")):
            clauses.append(clause)
            params[name] = value
    return clauses, params


def _source(f: UsageFilter, rollups: bool, *, hist: bool = False) -> tuple[str, dict[str, Any]]:
    """SQL for rollup-shaped rows (``usage_daily``'s columns, or ``usage_latency_hist``'s with ``hist``)
    covering exactly the rows ``f`` matches."""
    template, table = (HIST_SELECT, "usage_latency_hist") if hist else (ROLLUP_SELECT, "usage_daily")
    dims, params = _dims(f, hist=hist)
    if not rollups:  # every row from `usage` (rollups missing or stale)
        where, params = f.where()
        return rollup_sql(template, where), params
    w = _Window.of(f)
    parts = []
    if w.days is not None:
        conds = list(dims)
        if w.days[0] is not None:
            conds.append("day >= $day_first")
            params["day_first"] = w.days[0]
        if w.days[1] is not None:
            conds.append("day < $day_end")
            params["day_end"] = w.days[1]
        cols = "day, model, cluster, ok, metric, bucket, n" if hist else "*"
        parts.append(f"SELECT {cols} FROM {table}" + (" WHERE " + " AND ".join(conds) if conds else ""))
    if w.edges:
        ranges = []
        for i, (lo, hi) in enumerate(w.edges):
            bounds = []
            if lo is not None:
                bounds.append(f"ts >= $edge{i}_lo")
                params[f"edge{i}_lo"] = lo
            if hi is not None:
                bounds.append(f"ts < $edge{i}_hi")
                params[f"edge{i}_hi"] = hi
            ranges.append("(" + " AND ".join(bounds) + ")")
        where = "WHERE (" + " OR ".join(ranges) + ")" + "".join(f" AND {c}" for c in dims)
        parts.append(rollup_sql(template, where))
    return "\n UNION ALL \n".join(f"({p})" for p in parts), params


def _percentiles(
    store: UsageStore,
    f: UsageFilter,
    keys: Sequence[str],
    wanted: dict[str, tuple[str, float]],
    *,
    rollups: bool,
    matched: int,
    ok_only: bool,
) -> tuple[str, dict[str, Any]]:
    """SQL for one row per ``keys`` with the ``wanted`` percentiles (name -> (metric, q)).

    Exact (``quantile_cont`` over the raw rows) while the filter matches at most
    ``store.exact_percentile_rows`` rows, or when the histograms cannot answer (a user or group
    filter, a key other than day/model/cluster); otherwise from ``usage_latency_hist``: within 1%.
    """
    exact = (
        not rollups
        or matched <= store.exact_percentile_rows
        or f.user is not None
        or f.group is not None
        or not set(keys) <= _HIST_KEYS
    )
    key_cols = [f"{SUMMARY_BY[k]} AS {_ident(k)}" for k in keys]
    if exact:
        where, params = f.and_("status < 400") if ok_only else f.where()
        by_metric: dict[str, list[float]] = {}
        for metric, q in wanted.values():
            by_metric.setdefault(metric, []).append(q)
        lists = [f"quantile_cont({m}, {qs!r}) AS _{m}" for m, qs in by_metric.items()]
        picks = [f"_{m}[{by_metric[m].index(q) + 1}] AS {_ident(name)}" for name, (m, q) in wanted.items()]
        group = f"GROUP BY {', '.join(_ident(k) for k in keys)}" if keys else ""
        inner = f"SELECT {', '.join(key_cols + lists)} FROM usage {where} {group}"
        return f"SELECT {', '.join([*map(_ident, keys), *picks])} FROM ({inner})", params
    src, params = _source(f, rollups, hist=True)
    part = ", ".join(["metric", *map(_ident, keys)])
    picks = [
        f"pow({HIST_BASE!r}, min(bucket) FILTER (WHERE metric = '{m}' AND cum > {q!r} * (tot - 1))) AS {_ident(name)}"
        for name, (m, q) in wanted.items()
    ]
    group = f"GROUP BY {', '.join(_ident(k) for k in keys)}" if keys else ""
    return (
        f"""
        SELECT {", ".join([*map(_ident, keys), *picks])}
        FROM (
            SELECT *, sum(n) OVER (PARTITION BY {part} ORDER BY bucket ROWS UNBOUNDED PRECEDING) AS cum,
                   sum(n) OVER (PARTITION BY {part}) AS tot
            FROM (SELECT {", ".join(map(_ident, keys))}{", " if keys else ""}metric, bucket, sum(n) AS n
                  FROM ({src}) h {"WHERE ok" if ok_only else ""} GROUP BY ALL)
        )
        {group}
        """,
        params,
    )


def _report(
    store: UsageStore,
    f: UsageFilter,
    keys: Sequence[str],
    aggregates: dict[str, str],
    percentiles: dict[str, tuple[str, float]],
    columns: Sequence[str],
    *,
    ok_only: bool = False,
    order: str = "",
    limit: int | None = None,
) -> pl.DataFrame:
    """One report: ``aggregates`` (name -> SQL over rollup rows) per ``keys``, joined with ``percentiles``,
    as ``keys`` + ``columns``.  With ``ok_only``, groups without a successful request are left out."""
    with store.connect_read_only() as con:
        rollups = rollups_match(con)
        src, params = _source(f, rollups)
        key_list = ", ".join(map(_ident, keys))
        aggs = ", ".join(f"{sql} AS {_ident(name)}" for name, sql in aggregates.items())
        having = "HAVING sum(requests - errors) > 0" if ok_only else ""
        group = f"GROUP BY {key_list}" if keys else ""
        agg = f"SELECT {key_list}{', ' if keys else ''}{aggs} FROM ({src}) s {group} {having}"
        if percentiles:
            (matched,) = con.execute(
                f"SELECT coalesce(sum(requests{' - errors' if ok_only else ''}), 0) FROM ({src}) s", params or None
            ).fetchall()[0]
            pct, pct_params = _percentiles(
                store, f, keys, percentiles, rollups=rollups, matched=matched, ok_only=ok_only
            )
            on = " AND ".join(f"a.{_ident(k)} IS NOT DISTINCT FROM p.{_ident(k)}" for k in keys) or "true"
            query = f"""
                SELECT {", ".join([*(f"a.{_ident(k)}" for k in keys), *map(_ident, columns)])}
                FROM ({agg}) a LEFT JOIN ({pct}) p ON {on}
                {order} {f"LIMIT {int(limit)}" if limit is not None else ""}
            """
            params = {**params, **pct_params}
        else:
            query = f"""
                SELECT {", ".join([*map(_ident, keys), *map(_ident, columns)])} FROM ({agg}) a
                {order} {f"LIMIT {int(limit)}" if limit is not None else ""}
            """
        return con.sql(query, params=params or None).pl()


_REQ, _ERRS, _USERS = _sum("requests"), _sum("errors"), 'count(DISTINCT "user")::BIGINT'
_TOKEN_SUMS = {c: _sum(c) for c in ("total_tokens", "prompt_tokens", "completion_tokens")}
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
        "prompt_tokens": _sum("prompt_tokens"),
        "completion_tokens": _sum("completion_tokens"),
        "total_tokens": _sum("total_tokens"),
        "cold_starts": _sum("cold_starts"),
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
    order = "ORDER BY " + ", ".join(f"a.{_ident(b)}" for b in by) if by else ""
    return _report(store, f, by, aggregates, percentiles, columns, order=order)


def top_users(store: UsageStore, f: UsageFilter = _ALL, limit: int = 10) -> pl.DataFrame:
    """The ``limit`` users with the most tokens: user, requests, total/prompt/completion tokens, errors;
    ordered by total_tokens descending, then user."""
    aggregates = {"requests": _REQ, **_TOKEN_SUMS, "errors": _ERRS}
    return _report(
        store, f, ["user"], aggregates, {}, list(aggregates), order='ORDER BY total_tokens DESC, "user"', limit=limit
    )


def by_model(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per model: requests, users, total/prompt/completion tokens, errors, p50_latency_ms; ordered by model."""
    aggregates = {"requests": _REQ, "users": _USERS, **_TOKEN_SUMS, "errors": _ERRS}
    return _report(
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
        "total_tokens": _sum("total_tokens"),
        "errors": _ERRS,
        "cold_starts": _sum("cold_starts"),
    }
    columns = ["requests", "models", "total_tokens", "errors", "p50_latency_ms", "cold_starts"]
    return _report(store, f, ["cluster"], aggregates, _P50_LATENCY, columns, order="ORDER BY a.cluster NULLS LAST")


def latency(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per model and cluster, successful requests only (status < 400): requests, streams,
    p50/p95/p99 latency_ms and p50/p95/p99 ttft_ms (streams only; null without streams);
    ordered by model, cluster (null last)."""
    percentiles = {f"p{round(q * 100)}_{m}": (m, q) for m in ("latency_ms", "ttft_ms") for q in (0.5, 0.95, 0.99)}
    aggregates = {"requests": "sum(requests - errors)::BIGINT", "streams": _sum("ok_streams")}
    return _report(
        store, f, ["model", "cluster"], aggregates, percentiles, [*aggregates, *percentiles], ok_only=True,
        order="ORDER BY a.model, a.cluster NULLS LAST",
    )  # fmt: skip


def cluster_latency(store: UsageStore, f: UsageFilter = _ALL) -> pl.DataFrame:
    """Per cluster, successful requests only (status < 400): requests and p50/p95/p99 latency_ms; ordered by
    cluster (null last).  The latency chart's data."""
    percentiles = {f"p{round(q * 100)}_latency_ms": ("latency_ms", q) for q in (0.5, 0.95, 0.99)}
    aggregates = {"requests": "sum(requests - errors)::BIGINT"}
    return _report(
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
    aggregates = {"requests": _REQ, "users": _USERS, "total_tokens": _sum("total_tokens"), "errors": _ERRS}
    return _report(
        store, f, ["day", "model"], aggregates, _P50_LATENCY, [*aggregates, "p50_latency_ms"],
        order="ORDER BY a.day, a.model",
    )  # fmt: skip


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
