"""GET /v1/usage: one usage report, the caller's own usage or (admins) everyone's."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from litestar import Controller, Request, get

from api.errors import GUARDED, error_responses
from api.guards import DEPENDENCIES, authenticate, principal_of
from blocks.registry import RateLimits
from core.errors import APIError
from core.timewindow import TimeBoundError, parse_time_bound
from serving.limits import Limit
from serving.request import Services

log = logging.getLogger("first.api")


class UsageController(Controller):
    guards = [authenticate]
    dependencies = DEPENDENCIES

    @get(
        "/v1/usage",
        summary="Usage reports: yours, or everyone's for admins",
        responses=error_responses(*GUARDED, 400, 403, 503),
    )
    async def usage_report(
        self,
        request: Request,
        services: Services,
        report: str = "summary",
        since: str | None = None,
        until: str | None = None,
        model: str | None = None,
        cluster: str | None = None,
        group: str | None = None,
        user: str | None = None,
        traffic: str | None = None,
        limit: int = 10,
    ) -> dict[str, Any]:
        """One usage report (summary, by-traffic, top-users, by-model, by-cluster, latency, errors, daily) over the
        usage table, filtered by time (since inclusive, until exclusive: ISO 8601 or a span before now such as 12h
        or 7d), model, cluster, group, user and traffic (`interactive` requests or `batch` lines). Callers see
        only their own usage; admins see everyone's and may pick a user.

        The gateway only reads the table: the ingest-usage deployment moves the usage spool into it every
        minute, so the last minute or so of requests may be missing."""
        from analytics.reports import REPORTS, UsageFilter

        principal = principal_of(request)
        name = report.strip().lower().replace("_", "-")
        if name == "allocations":
            return {"object": "usage.report", "report": name, "data": await _allocations(principal, services)}
        if name not in REPORTS:
            raise APIError(400, f"Unknown report '{report}'; choose from {', '.join([*REPORTS, 'allocations'])}.",
                           param="report", code="unknown_report")  # fmt: skip
        if not 1 <= limit <= 1000:
            raise APIError(400, "'limit' must be between 1 and 1000.", param="limit")
        if principal.is_admin:
            user = user or None  # everyone's, unless the admin picks one user
        elif user in (None, "", principal.user):
            user = principal.user  # always filtered, even by a name that is empty: never everyone's rows
        else:
            raise APIError(403, "You may only see your own usage (admins see everyone's).", param="user",
                           code="usage_forbidden")  # fmt: skip
        now = datetime.now(UTC)
        if traffic not in (None, "", "interactive", "batch"):
            raise APIError(400, "'traffic' must be 'interactive' or 'batch'.", param="traffic")
        f = UsageFilter(
            since=_bound(since, "since", now), until=_bound(until, "until", now), user=user, model=model or None,
            cluster=cluster or None, group=group or None, traffic=traffic or None,
        )  # fmt: skip
        caller = principal.key_id or principal.user
        limit_rpm = services.settings.usage_rpm
        if limit_rpm:
            await services.limiter.reserve(principal.user, [Limit(f"usage:{caller}", RateLimits(rpm=limit_rpm),
                                                            "usage reports")], 0)  # fmt: skip
        reports: UsageReports = request.app.state.usage_reports
        rows = await reports.rows(services.settings.usage_db, name, f, limit)
        return {"object": "usage.report", "report": name, "data": rows}


class UsageReports:
    """Where /v1/usage runs its DuckDB reads: a small pool of its own (warm-ups, executor builds and status checks
    keep the default one), and a short cache (a dashboard polling every few seconds reads the file once). An
    entry lasts ``ttl_s`` and never outlives a change of the database file (an ingest)."""

    def __init__(self, workers: int = 2, ttl_s: float = 5.0, max_entries: int = 256) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="first-usage")
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._cache: dict[tuple[Any, ...], tuple[float, float, list[dict[str, Any]]]] = {}

    async def rows(self, db: Path, report: str, f: Any, limit: int) -> list[dict[str, Any]]:
        key = (str(db), report, repr(f), limit)
        version = db.stat().st_mtime if db.exists() else 0.0
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now and hit[1] == version:
            return hit[2]
        rows = await asyncio.get_running_loop().run_in_executor(self._pool, _usage_rows, db, report, f, limit)
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = (now + self.ttl_s, version, rows)
        return rows

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _allocations(principal: Any, services: Services) -> list[dict[str, Any]]:
    """Each project's GPU-hour burn this period (admins: every project; others: their own project's row)."""
    import duckdb

    from analytics.allocations import allocation_report
    from analytics.store import UsageStore

    registry, settings = services.registry, services.settings
    try:
        df = await asyncio.get_running_loop().run_in_executor(
            None, allocation_report, UsageStore(settings.usage_db), settings.instance_events_dir, registry,
            settings.allocation_idle_owner,
        )  # fmt: skip
    except duckdb.Error as exc:
        log.warning("allocations report failed: %s", exc)
        raise APIError(503, "The usage database is busy or unavailable; try again shortly.", code="usage_unavailable",
                       headers={"Retry-After": "5"}) from None  # fmt: skip
    rows = [{k: _json_value(v) for k, v in row.items()} for row in df.iter_rows(named=True)]
    if principal.is_admin:
        return rows
    own = registry.project_of(principal.groups)
    return [r for r in rows if own is not None and r["project"] == own.name]


def _bound(value: str | None, param: str, now: datetime) -> datetime | None:
    try:
        return parse_time_bound(value, now, param)
    except TimeBoundError as exc:
        raise APIError(400, str(exc), param=param) from None


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, float) and v != v:  # NaN
        return None
    return v


def _usage_rows(db: Path, report: str, f: Any, limit: int) -> list[dict[str, Any]]:
    """Run one report against the usage table (blocking: DuckDB; called in a thread)."""
    import duckdb

    from analytics.reports import REPORTS
    from analytics.store import UsageStore

    try:
        df = REPORTS[report](UsageStore(db), f, **({"limit": limit} if report == "top-users" else {}))
    except duckdb.Error as exc:  # the file is locked past the store's retries, or unreadable
        log.warning("usage report %s failed: %s", report, exc)
        raise APIError(503, "The usage database is busy or unavailable; try again shortly.", code="usage_unavailable",
                       headers={"Retry-After": "5"}) from None  # fmt: skip
    return [{k: _json_value(v) for k, v in row.items()} for row in df.iter_rows(named=True)]
