"""`first usage`: ingest the usage spool into DuckDB, report, query, export, chart."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from core.settings import get_settings
from core.timewindow import TimeBoundError, parse_time_bound
from first.cli.render import OutputFormat, emit, err

app = typer.Typer(help="Usage records: ingest the spool into DuckDB and report.", no_args_is_help=True)

if TYPE_CHECKING:
    from analytics.reports import UsageFilter
    from analytics.store import UsageStore

_USAGE_EPILOG = (
    "Filters: --since/--until take 30m, 12h, 1d, 2w (ago) or an ISO date/time (UTC unless it has an offset); "
    "--since is inclusive, --until exclusive. Each command first ingests the spool (--no-ingest skips that). "
    "Formats: table (default: the key columns that fit the terminal; --wide for all, --columns to pick), "
    "csv, json, parquet (needs --output FILE); those keep every column."
)


UsageSince = Annotated[
    str | None, typer.Option("--since", help="Window start, inclusive: 30m, 12h, 1d, 2w (ago) or an ISO date/time")
]
UsageUntil = Annotated[str | None, typer.Option("--until", help="Window end, exclusive (same forms as --since)")]
UsageUser = Annotated[str | None, typer.Option("--user", help="Only this user")]
UsageModel = Annotated[str | None, typer.Option("--model", help="Only this model")]
UsageCluster = Annotated[str | None, typer.Option("--cluster", help="Only this cluster")]
UsageGroup = Annotated[str | None, typer.Option("--group", help="Only users in this group (the request's groups)")]
UsageFmt = Annotated[
    OutputFormat,
    typer.Option("--format", "-f", case_sensitive=False, help="table | csv | json | parquet (parquet needs --output)"),
]
UsageOutput = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout (required for parquet)")
]
UsageColumns = Annotated[
    str | None,
    typer.Option("--columns", help="Only these columns, in this order (comma-separated), in every format"),
]
UsageWide = Annotated[
    bool,
    typer.Option("--wide", help="Table: every column (default: the key ones that fit the terminal; csv/json keep all)"),
]
UsageIngest = Annotated[
    bool, typer.Option("--ingest/--no-ingest", help="Ingest the spool first, so the latest requests count")
]


def _when(value: str | None, option: str) -> datetime | None:
    """A --since/--until value, in the forms /v1/usage accepts too (core/timewindow.py)."""
    try:
        return parse_time_bound(value, datetime.now(UTC), option)
    except TimeBoundError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _usage_filter(
    since: str | None,
    until: str | None,
    user: str | None,
    model: str | None,
    cluster: str | None,
    group: str | None,
    traffic: str | None = None,
) -> UsageFilter:
    from analytics.reports import UsageFilter

    return UsageFilter(
        since=_when(since, "--since"),
        until=_when(until, "--until"),
        user=user,
        model=model,
        cluster=cluster,
        group=group,
        traffic=traffic,
    )


def _usage_store(ingest: bool) -> UsageStore:
    from analytics.store import UsageStore

    s = get_settings()
    store = UsageStore(s.usage_db)
    if ingest:
        store.ingest(s.spool_root)
    return store


def _check_output(fmt: OutputFormat, output: Path | None) -> None:
    if fmt is OutputFormat.parquet and output is None:
        raise typer.BadParameter("--format parquet writes a file: add --output FILE", param_hint="--output")


def _title(name: str, since: str | None, until: str | None, **filters: str | None) -> str:
    parts = [f"usage {name}", f"since {since}" if since else "", f"until {until}" if until else ""]
    parts += [f"{k}={v}" for k, v in filters.items() if v]
    return " ".join(p for p in parts if p)


def _report(
    name: str,
    *,
    since: str | None,
    until: str | None,
    user: str | None,
    model: str | None,
    cluster: str | None,
    group: str | None,
    fmt: OutputFormat,
    output: Path | None,
    ingest: bool,
    columns: str | None = None,
    wide: bool = False,
    traffic: str | None = None,
    **options: object,
) -> None:
    from analytics.reports import run_report

    _check_output(fmt, output)
    f = _usage_filter(since, until, user, model, cluster, group, traffic)
    df = run_report(_usage_store(ingest), name, f, **options)
    title = _title(name, since, until, user=user, model=model, cluster=cluster, group=group, traffic=traffic)
    emit(df, fmt, output, title, columns=columns, wide=wide)


@app.command("ingest")
def usage_ingest() -> None:
    """Move the gateway's usage spool into DuckDB (idempotent by request id)."""
    from analytics.store import UsageStore

    s = get_settings()
    n = UsageStore(s.usage_db).ingest(s.spool_root)
    err.print(f"ingested {n} new usage record(s) into {s.usage_db}")


@app.command("summary", epilog=_USAGE_EPILOG)
def usage_summary(
    since: UsageSince = None,
    until: UsageUntil = None,
    user: UsageUser = None,
    model: UsageModel = None,
    cluster: UsageCluster = None,
    group: UsageGroup = None,
    by: Annotated[
        str,
        typer.Option(
            help="Group rows by a comma-separated list of user, model, cluster, endpoint, day, traffic "
            "(interactive or batch); 'none' for one row"
        ),
    ] = "user,model",
    traffic: Annotated[
        str | None, typer.Option(help="Only 'interactive' requests or only 'batch' lines (default: both)")
    ] = None,
    fmt: UsageFmt = OutputFormat.table,
    output: UsageOutput = None,
    columns: UsageColumns = None,
    wide: UsageWide = False,
    ingest: UsageIngest = True,
) -> None:
    """Requests, users, errors and error rate, tokens, p50/p95 latency, p50 TTFT, cold starts, first/last request.

    One row per user and model by default; --by none gives one overall row.
    Examples: first usage summary --since 1d; first usage summary --by none --since 2026-01-01 --format json;
    first usage summary --by day,model --model tiny --format csv -o daily.csv; first usage summary --by traffic
    """
    from analytics.reports import SUMMARY_BY

    keys = tuple(b.strip() for b in by.split(",") if b.strip() and b.strip().lower() != "none")
    bad = [b for b in keys if b not in SUMMARY_BY]
    if bad:
        raise typer.BadParameter(
            f"choose from {', '.join(SUMMARY_BY)} or none, not {', '.join(bad)}", param_hint="--by"
        )
    if traffic not in (None, "interactive", "batch"):
        raise typer.BadParameter("choose interactive or batch", param_hint="--traffic")
    _report(
        "summary", since=since, until=until, user=user, model=model, cluster=cluster, group=group,
        fmt=fmt, output=output, ingest=ingest, columns=columns, wide=wide, by=keys, traffic=traffic,
    )  # fmt: skip


@app.command("top-users", epilog=_USAGE_EPILOG)
def usage_top_users(
    since: UsageSince = None,
    until: UsageUntil = None,
    user: UsageUser = None,
    model: UsageModel = None,
    cluster: UsageCluster = None,
    group: UsageGroup = None,
    limit: Annotated[int, typer.Option(min=1, help="How many users")] = 10,
    fmt: UsageFmt = OutputFormat.table,
    output: UsageOutput = None,
    columns: UsageColumns = None,
    wide: UsageWide = False,
    ingest: UsageIngest = True,
) -> None:
    """The users with the most tokens: requests, total/prompt/completion tokens, errors.

    Examples: first usage top-users --since 7d --limit 5; first usage top-users --model tiny --format csv
    """
    _report(
        "top-users", since=since, until=until, user=user, model=model, cluster=cluster, group=group,
        fmt=fmt, output=output, ingest=ingest, columns=columns, wide=wide, limit=limit,
    )  # fmt: skip


def _simple_report(name: str, doc: str) -> None:
    """Register ``first usage <name>`` for a report that takes only the filters."""

    def command(
        since: UsageSince = None,
        until: UsageUntil = None,
        user: UsageUser = None,
        model: UsageModel = None,
        cluster: UsageCluster = None,
        group: UsageGroup = None,
        fmt: UsageFmt = OutputFormat.table,
        output: UsageOutput = None,
        columns: UsageColumns = None,
        wide: UsageWide = False,
        ingest: UsageIngest = True,
    ) -> None:
        _report(
            name, since=since, until=until, user=user, model=model, cluster=cluster, group=group,
            fmt=fmt, output=output, ingest=ingest, columns=columns, wide=wide,
        )  # fmt: skip

    command.__doc__ = doc
    command.__name__ = f"usage_{name.replace('-', '_')}"
    app.command(name, epilog=_USAGE_EPILOG)(command)


_simple_report(
    "by-model",
    """Per model: requests, users, total/prompt/completion tokens, errors, p50 latency.

    Examples: first usage by-model --since 1d; first usage by-model --group staff --format json
    """,
)
_simple_report(
    "by-cluster",
    """Per cluster: requests, models, tokens, errors, p50 latency, cold starts (an empty cluster: never routed).

    Examples: first usage by-cluster --since 12h; first usage by-cluster --model tiny --format csv
    """,
)
_simple_report(
    "latency",
    """Latency per model and cluster, successful requests only: p50/p95/p99 of latency and of TTFT (streams).

    Examples: first usage latency --since 1d; first usage latency --cluster local --format json
    """,
)
_simple_report(
    "errors",
    """Failed requests (status >= 400) per status, error type and model: requests, users, last seen, rate
    (share of all the requests the filters match).

    Examples: first usage errors --since 1d; first usage errors --user alice --format csv
    """,
)
_simple_report(
    "daily",
    """Per UTC day and model: requests, users, tokens, errors, p50 latency.

    Examples: first usage daily --since 30d; first usage daily --format parquet --output daily.parquet
    """,
)


@app.command("sql", epilog=_USAGE_EPILOG)
def usage_sql(
    query: Annotated[str, typer.Argument(help="SQL over the table `usage` (columns: docs/analysts/usage-schema.md)")],
    fmt: UsageFmt = OutputFormat.table,
    output: UsageOutput = None,
    columns: UsageColumns = None,
    wide: UsageWide = False,
    ingest: UsageIngest = True,
) -> None:
    """Run your own read-only SQL (DuckDB) over the usage table; writes and file access are refused.

    Examples: first usage sql "SELECT model, count(*) FROM usage GROUP BY model";
    first usage sql "SELECT * FROM usage WHERE status >= 400 ORDER BY ts DESC LIMIT 20" --format json
    """
    from analytics.reports import UsageQueryError, sql

    _check_output(fmt, output)
    store = _usage_store(ingest)
    try:
        df = sql(store, query)
    except UsageQueryError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    emit(df, fmt, output, "usage sql", columns=columns, wide=wide)


@app.command("export", epilog=_USAGE_EPILOG)
def usage_export(
    to: Annotated[Path, typer.Option("--to", help="Directory to write day=YYYY-MM-DD/*.parquet into")],
    since: UsageSince = None,
    until: UsageUntil = None,
    user: UsageUser = None,
    model: UsageModel = None,
    cluster: UsageCluster = None,
    group: UsageGroup = None,
    ingest: UsageIngest = True,
) -> None:
    """Export usage rows as Parquet partitioned by UTC day (Hive layout); rerunning replaces the days it writes.

    Prints the files written. Read them back with duckdb (read_parquet('DIR/**/*.parquet')) or polars
    (pl.scan_parquet('DIR/**/*.parquet')). Examples: first usage export --to usage-parquet;
    first usage export --to /data/first --since 2026-01-01 --until 2026-02-01
    """
    from analytics.reports import export_parquet

    f = _usage_filter(since, until, user, model, cluster, group)
    files = export_parquet(_usage_store(ingest), to, f)
    for p in files:
        print(p)
    err.print(f"exported {len(files)} file(s) under {to}")


@app.command("allocations")
def usage_allocations(
    fmt: UsageFmt = OutputFormat.table,
    output: UsageOutput = None,
    chart: Annotated[Path | None, typer.Option("--chart", help="Also draw the burn as a PNG to this file")] = None,
    columns: UsageColumns = None,
    wide: UsageWide = False,
    ingest: UsageIngest = True,
) -> None:
    """Each project's GPU-hours this period (month, quarter or year, as its block says): budget, used, left, and
    whether it is spent; then the idle owner (FIRST_ALLOCATION_IDLE_OWNER) and callers in no project.

    Instance time (GPUs x wall time from warm-up to scale-down) is charged to the projects whose callers used
    the instance in each hour, pro rata by tokens; hours nobody used go to the idle owner. Projects are FIRST
    Project blocks (`first apply` a file with a `projects:` list).

    Examples: first usage allocations; first usage allocations --format json; first usage allocations --chart
    burn.png
    """
    import asyncio

    from analytics.allocations import allocation_report
    from blocks.registry import Registry

    _check_output(fmt, output)
    s = get_settings()
    registry = asyncio.run(Registry.load(s))
    if not registry.projects:
        err.print("no projects are declared: add a `projects:` list to your registry file and `first apply` it")
    df = allocation_report(_usage_store(ingest), s.instance_events_dir, registry, s.allocation_idle_owner)
    emit(df, fmt, output, "GPU-hours by project, this period", columns=columns, wide=wide)
    if chart is not None:
        from analytics.charts import write_allocation_chart

        err.print(f"wrote {write_allocation_chart(df, chart)}")


@app.command("chart", epilog=_USAGE_EPILOG)
def usage_chart(
    out: Annotated[Path, typer.Option("--out", help="Directory for the PNG files")] = Path("usage-charts"),
    since: UsageSince = None,
    until: UsageUntil = None,
    user: UsageUser = None,
    model: UsageModel = None,
    cluster: UsageCluster = None,
    group: UsageGroup = None,
    ingest: UsageIngest = True,
) -> None:
    """Write PNG charts (1000x500): tokens per day per model, latency percentiles per cluster, top users, and
    the error rate per day. Prints the files written. Example: first usage chart --since 30d --out charts/
    """
    from analytics.charts import write_charts

    f = _usage_filter(since, until, user, model, cluster, group)
    files = write_charts(_usage_store(ingest), out, f)
    for p in files:
        print(p)
    err.print(f"wrote {len(files)} chart(s) under {out}")
