"""Usage analytics: the per-request usage record, its spool, the DuckDB store and the reports.

For notebooks::

    import analytics
    df = analytics.usage(since="2026-01-01", model="tiny")        # the rows, as a polars DataFrame
    analytics.report("top-users", since="2026-01-01", limit=5)    # any report of analytics.reports.REPORTS

Both read ``core.settings.get_settings().usage_db`` unless ``db=`` says otherwise, and ingest
nothing (``first usage ingest`` or ``UsageStore.ingest`` does).  The gateway imports
:mod:`analytics.records` and :mod:`analytics.spool` on its hot path, so this package imports DuckDB
and polars only when these functions (or the report functions re-exported here) are used.
"""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

    from analytics.reports import UsageFilter
    from analytics.store import UsageStore

__all__ = [
    "REPORTS",
    "UsageFilter",
    "by_cluster",
    "by_model",
    "daily",
    "errors",
    "export_parquet",
    "latency",
    "report",
    "sql",
    "summary",
    "top_users",
    "usage",
]

_LAZY = {
    "REPORTS",
    "UsageFilter",
    "by_cluster",
    "by_model",
    "daily",
    "errors",
    "export_parquet",
    "latency",
    "sql",
    "summary",
    "top_users",
}

When = datetime | date | str | None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from analytics import reports

        return getattr(reports, name)
    raise AttributeError(f"module 'analytics' has no attribute {name!r}")


def _store(db: Path | None) -> UsageStore:
    from analytics.store import UsageStore

    if db is None:
        from core.settings import get_settings

        db = get_settings().usage_db
    return UsageStore(Path(db))


def _filter(since: When, until: When, **kw: str | None) -> UsageFilter:
    from analytics.reports import UsageFilter

    return UsageFilter(since=since, until=until, **kw)  # type: ignore[arg-type]


def usage(
    since: When = None,
    until: When = None,
    *,
    user: str | None = None,
    model: str | None = None,
    cluster: str | None = None,
    group: str | None = None,
    db: Path | None = None,
) -> pl.DataFrame:
    """The usage rows with ``since <= ts < until`` (datetimes, naive = UTC; dates; or ISO strings) that
    match the other filters, ordered by ts then request_id, as a polars DataFrame (``ts`` in UTC)."""
    from analytics.report_plan import query

    f = _filter(since, until, user=user, model=model, cluster=cluster, group=group)
    where, params = f.where()
    return query(_store(db), f"SELECT * FROM usage {where} ORDER BY ts, request_id", params)


def report(
    name: str,
    since: When = None,
    until: When = None,
    *,
    user: str | None = None,
    model: str | None = None,
    cluster: str | None = None,
    group: str | None = None,
    db: Path | None = None,
    **options: Any,
) -> pl.DataFrame:
    """The report ``name`` (``summary``, ``top-users``, ``by-model``, ``by-cluster``, ``latency``,
    ``errors``, ``daily``; underscores work too) over the filtered rows; ``options`` go to the report,
    e.g. ``limit=5`` for top-users or ``by=("user", "model")`` for summary."""
    from analytics.reports import run_report

    f = _filter(since, until, user=user, model=model, cluster=cluster, group=group)
    return run_report(_store(db), name, f, **options)
