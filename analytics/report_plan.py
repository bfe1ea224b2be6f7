"""The plan of a report: rollup rows where they cover whole days of the window, raw rows at its edges, and
percentiles exact from raw rows or from the 2% latency histograms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import polars as pl

from analytics.filters import TRAFFIC_SQL, UsageFilter
from analytics.schema import DAY_SQL, HIST_BASE, HIST_SELECT, ROLLUP_SELECT, rollup_sql, rollups_match
from analytics.store import UsageStore


def query(store: UsageStore, query: str, params: dict[str, Any] | None = None) -> pl.DataFrame:
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
    "traffic": TRAFFIC_SQL,  # interactive or batch
}
_HIST_KEYS = frozenset({"day", "model", "cluster"})  # what usage_latency_hist is kept per


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_sum(col: str) -> str:
    return f"coalesce(sum({col}), 0)::BIGINT"


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
    if f.traffic is not None and not hist:  # the rollup rows carry it as a column, the raw rows derive it
        src, params = _source(replace(f, traffic=None), rollups)
        return f"SELECT * FROM ({src}) t WHERE traffic = $traffic", {**params, "traffic": f.traffic}
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
        or f.traffic is not None  # the histograms are not kept per traffic
        or not set(keys) <= _HIST_KEYS
    )
    key_cols = [f"{SUMMARY_BY[k]} AS {ident(k)}" for k in keys]
    if exact:
        where, params = f.and_("status < 400") if ok_only else f.where()
        by_metric: dict[str, list[float]] = {}
        for metric, q in wanted.values():
            by_metric.setdefault(metric, []).append(q)
        lists = [f"quantile_cont({m}, {qs!r}) AS _{m}" for m, qs in by_metric.items()]
        picks = [f"_{m}[{by_metric[m].index(q) + 1}] AS {ident(name)}" for name, (m, q) in wanted.items()]
        group = f"GROUP BY {', '.join(ident(k) for k in keys)}" if keys else ""
        inner = f"SELECT {', '.join(key_cols + lists)} FROM usage {where} {group}"
        return f"SELECT {', '.join([*map(ident, keys), *picks])} FROM ({inner})", params
    src, params = _source(f, rollups, hist=True)
    part = ", ".join(["metric", *map(ident, keys)])
    picks = [
        f"pow({HIST_BASE!r}, min(bucket) FILTER (WHERE metric = '{m}' AND cum > {q!r} * (tot - 1))) AS {ident(name)}"
        for name, (m, q) in wanted.items()
    ]
    group = f"GROUP BY {', '.join(ident(k) for k in keys)}" if keys else ""
    return (
        f"""
        SELECT {", ".join([*map(ident, keys), *picks])}
        FROM (
            SELECT *, sum(n) OVER (PARTITION BY {part} ORDER BY bucket ROWS UNBOUNDED PRECEDING) AS cum,
                   sum(n) OVER (PARTITION BY {part}) AS tot
            FROM (SELECT {", ".join(map(ident, keys))}{", " if keys else ""}metric, bucket, sum(n) AS n
                  FROM ({src}) h {"WHERE ok" if ok_only else ""} GROUP BY ALL)
        )
        {group}
        """,
        params,
    )


def planned_report(
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
        key_list = ", ".join(map(ident, keys))
        aggs = ", ".join(f"{sql} AS {ident(name)}" for name, sql in aggregates.items())
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
            on = " AND ".join(f"a.{ident(k)} IS NOT DISTINCT FROM p.{ident(k)}" for k in keys) or "true"
            query = f"""
                SELECT {", ".join([*(f"a.{ident(k)}" for k in keys), *map(ident, columns)])}
                FROM ({agg}) a LEFT JOIN ({pct}) p ON {on}
                {order} {f"LIMIT {int(limit)}" if limit is not None else ""}
            """
            params = {**params, **pct_params}
        else:
            query = f"""
                SELECT {", ".join([*map(ident, keys), *map(ident, columns)])} FROM ({agg}) a
                {order} {f"LIMIT {int(limit)}" if limit is not None else ""}
            """
        return con.sql(query, params=params or None).pl()
