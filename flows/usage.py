"""Usage analytics as Prefect flows (deployments in prefect.yaml, run by the `first-local` worker):

* ``ingest-usage`` (every minute): move the gateways' usage spool into the DuckDB ``usage`` table. Idempotent
  (``request_id`` is the key) and crash-safe: spool segments are deleted only after their rows are committed
  (see :mod:`analytics.store`). ``GET /v1/usage`` reads that table, so it is at most about a minute behind.
* ``usage-report`` (daily): ingest, then a markdown artifact with the usage of the last ``days`` days (summary,
  top users, models, clusters, latency, errors) and PNG charts in ``FIRST_HOME/reports/<date>/``.
* ``audit-retention`` (daily): delete the audit-mode day files older than ``FIRST_AUDIT_RETENTION_DAYS``.

The work is done by small functions (``ingest``, ``build_report``, ``markdown_table``) that tests call without
Prefect; the flows add logging and artifacts. Called outside a flow run (``ingest_usage.fn()``), the flows log
to the ``first.usage`` logger and skip their artifacts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from analytics import reports
from analytics.audit import AuditLog
from analytics.reports import UsageFilter
from analytics.store import IngestTimings, UsageStore
from core.settings import Settings, get_settings

log = logging.getLogger("first.usage")


# ---- helpers (no Prefect) ----


def _logger() -> Any:
    """The run's logger inside a flow run, else the module's."""
    return get_run_logger() if FlowRunContext.get() is not None else log


def _artifact(key: str, markdown: str, description: str) -> None:
    """A markdown artifact on the current flow run (skipped outside one)."""
    if FlowRunContext.get() is None:
        log.debug("not in a flow run: artifact %s not created", key)
        return
    create_markdown_artifact(key=key, markdown=markdown, description=description)


def _cell(value: Any, width: int = 60) -> str:
    """One markdown table cell: numbers rounded, times in UTC, text on one line."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.1f}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        value = ", ".join(map(str, value)) or "-"
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(df: pl.DataFrame, max_rows: int = 50, empty: str = "No requests in this period.") -> str:
    """A polars frame as a markdown table (at most ``max_rows`` rows, then a note of how many were left out)."""
    if df.is_empty():
        return f"_{empty}_\n"
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.head(max_rows).iter_rows()]
    if df.height > max_rows:
        lines.append(f"\n_{df.height - max_rows} more row(s) not shown._")
    return "\n".join(lines) + "\n"


@dataclass
class IngestResult:
    rows: int  # new rows in the usage table
    seconds: float
    skipped_lines: int  # malformed spool lines skipped
    total_rows: int  # rows in the table afterwards
    timings: IngestTimings  # where the time went


def ingest(settings: Settings) -> IngestResult:
    """Move every spool (``settings.spool_root``: each replica's folder in it) into the usage table
    (``settings.usage_db``)."""
    store = UsageStore(settings.usage_db)
    t0 = time.perf_counter()
    rows = store.ingest(settings.spool_root)
    seconds = time.perf_counter() - t0
    return IngestResult(rows, seconds, store.last_skipped_lines, store.count(), store.timings)


# The report's sections: (title, report function).
SECTIONS: tuple[tuple[str, Any], ...] = (
    ("Summary", reports.summary),
    ("Top users (by tokens)", reports.top_users),
    ("By model", reports.by_model),
    ("By cluster", reports.by_cluster),
    ("Latency of successful requests (ms)", reports.latency),
    ("Errors", reports.errors),
)


@dataclass
class Report:
    markdown: str
    since: datetime
    until: datetime
    requests: int
    charts: list[Path] = field(default_factory=list)
    markdown_file: Path | None = None


def report_dir(settings: Settings, until: datetime, days: int) -> Path:
    """``FIRST_HOME/reports/<date>/`` for the daily one-day report; ``<date>-<days>d/`` for other windows (so
    an ad-hoc weekly run does not overwrite the daily charts)."""
    day = until.astimezone(UTC).date().isoformat()
    return settings.reports_dir / (day if days == 1 else f"{day}-{days}d")


def build_report(
    store: UsageStore, since: datetime, until: datetime, out_dir: Path | None = None, *, ingested: int | None = None
) -> Report:
    """The usage report for ``since <= ts < until``: markdown tables of every section and, with ``out_dir``, the
    charts (PNG) and the same report as ``report.md`` there (which, unlike the Prefect artifact, shows them)."""
    f = UsageFilter(since=since, until=until)
    window = f"{f.since:%Y-%m-%d %H:%M} to {f.until:%Y-%m-%d %H:%M} UTC"
    head = f"# Usage from {window}\n\n"
    if ingested is not None:
        head += f"{ingested} new usage record(s) were ingested from the spool first.\n\n"
    summary = reports.summary(store, f)
    requests = int(summary["requests"][0]) if summary.height else 0
    tables = ""
    for title, fn in SECTIONS:
        df = summary if fn is reports.summary else fn(store, f)
        tables += f"## {title}\n\n" + markdown_table(df) + "\n"
    if out_dir is None:
        return Report(head + tables, f.since, f.until, requests)  # type: ignore[arg-type]
    from analytics.charts import write_charts  # matplotlib: only runs that draw pay for its import

    charts = write_charts(store, out_dir, f)
    md_file = out_dir / "report.md"
    md_file.write_text(head + tables + "## Charts\n\n" + "".join(f"![{p.stem}]({p.name})\n\n" for p in charts))
    listing = (
        "## Charts\n\n"
        f"Written on the host that ran this report, in `{out_dir}` (a Prefect artifact cannot show local files; "
        f"`{md_file.name}` there is this report with the charts in it):\n\n" + "".join(f"- `{p}`\n" for p in charts)
    )
    return Report(head + tables + listing, f.since, f.until, requests, charts, md_file)  # type: ignore[arg-type]


# ---- flows ----


@flow(name="ingest-usage", log_prints=True)
def ingest_usage() -> int:
    """Move the gateways' usage spool (FIRST_HOME/spool) into the DuckDB usage table (FIRST_HOME/usage.duckdb).

    Idempotent: a row is inserted only if its request_id is not in the table yet, and spool files are deleted
    only after their rows (and the day rollups the reports read) are committed, so a run that crashes midway
    loses nothing and the next run finishes its work. Returns the number of new rows.
    """
    logger = _logger()
    result = ingest(get_settings())
    t = result.timings
    logger.info("ingested %d new usage row(s) in %.3f s (%d batch(es): stage %.2f s, insert %.2f s, rollups %.2f s,"
                " commit %.2f s); %d row(s) in the table", result.rows, result.seconds, len(t.batches), t.stage_s,
                t.insert_s, t.rollup_s, t.commit_s, result.total_rows)  # fmt: skip
    if result.skipped_lines:
        logger.warning("skipped %d malformed spool line(s) (see the worker's log)", result.skipped_lines)
    return result.rows


@flow(name="usage-report", log_prints=True)
def usage_report(days: int = 1) -> dict[str, Any]:
    """Ingest the spool, then report the usage of the last `days` days: the "usage-report" artifact (summary,
    top users, by model, by cluster, latency, errors) and PNG charts in FIRST_HOME/reports/<date>/.

    Args:
        days: How many days back from now the report covers (1 = the last 24 hours).
    """
    if days < 1:
        raise ValueError("days must be >= 1")
    logger = _logger()
    settings = get_settings()
    ingested = ingest(settings)
    logger.info("ingested %d new usage row(s) in %.3f s", ingested.rows, ingested.seconds)
    until = datetime.now(UTC)
    since = until - timedelta(days=days)
    out_dir = report_dir(settings, until, days)
    report = build_report(UsageStore(settings.usage_db), since, until, out_dir, ingested=ingested.rows)
    logger.info("%d request(s) from %s to %s; charts in %s", report.requests, f"{since:%Y-%m-%d %H:%M}",
                f"{until:%Y-%m-%d %H:%M} UTC", out_dir)  # fmt: skip
    _artifact("usage-report", report.markdown, f"usage of the last {days} day(s)")
    return {
        "since": report.since.isoformat(),
        "until": report.until.isoformat(),
        "requests": report.requests,
        "ingested": ingested.rows,
        "charts": [str(p) for p in report.charts],
        "report": str(report.markdown_file) if report.markdown_file else None,
    }


@flow(name="audit-retention", log_prints=True)
def enforce_audit_retention(retention_days: int | None = None, dry_run: bool = False) -> list[str]:
    """Delete the audit-mode files (FIRST_HOME/audit/<YYYY-MM-DD>.jsonl, prompts and completions) of the days
    older than the retention period; today's file is always kept. Runs whether audit mode is on or not, so the
    files of a period when it was on still expire.

    Args:
        retention_days: Days to keep before today (default: FIRST_AUDIT_RETENTION_DAYS); 0 keeps only today.
        dry_run: Only list the files that would be deleted.
    """
    logger = _logger()
    settings = get_settings()
    keep = settings.audit_retention_days if retention_days is None else retention_days
    audit = AuditLog(settings.audit_dir)
    files = audit.expired(keep) if dry_run else audit.enforce_retention(keep)
    verb = "would delete" if dry_run else "deleted"
    logger.info("%s %d audit file(s) older than %d day(s) in %s", verb, len(files), keep, settings.audit_dir)
    left = audit.days()
    kept = f"{len(left)} day file(s) kept" + (f", {left[0][0]} to {left[-1][0]}" if left else "")
    _artifact(
        "audit-retention",
        f"### Audit retention: {keep} day(s){' (dry run)' if dry_run else ''}\n\n"
        + (f"{verb.capitalize()}:\n\n" + "".join(f"- `{p.name}`\n" for p in files) if files else "Nothing to delete.\n")
        + f"\n{kept} in `{settings.audit_dir}`.\n",
        "audit files past their retention",
    )
    return [str(p) for p in files]
