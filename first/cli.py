"""The ``first`` command line: run the gateway, manage API keys, build the demo model, read usage."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.settings import get_settings

app = typer.Typer(
    help="FIRST: an OpenAI-compatible inference gateway for HPC clusters, with Prefect as its control plane.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(
    help="Local API keys (auth mode 'local'). Keys are stored only as SHA-256 hashes.", no_args_is_help=True
)
model_app = typer.Typer(help="Models the project builds itself.", no_args_is_help=True)
usage_app = typer.Typer(help="Usage records: ingest the spool into DuckDB and report.", no_args_is_help=True)
registry_app = typer.Typer(help="Clusters and models (Prefect Blocks).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(model_app, name="model")
app.add_typer(usage_app, name="usage")
app.add_typer(registry_app, name="registry")
globus_app = typer.Typer(
    help="The gateway's Globus Auth settings (auth mode 'globus'): a Prefect Block, editable in the UI too.",
    no_args_is_help=True,
)
app.add_typer(globus_app, name="globus")
functions_app = typer.Typer(help="The functions FIRST runs on clusters (Globus Compute).", no_args_is_help=True)
app.add_typer(functions_app, name="functions")

err = Console(stderr=True)


# ---- running ----


@app.command()
def run(
    prefect_port: Annotated[int, typer.Option(help="Port of the local Prefect server (UI and API)")] = 4200,
    warm: Annotated[bool, typer.Option(help="Warm the demo model up at start (through the warm-up deployment)")] = True,
) -> None:
    """Run everything on this machine until Ctrl-C: Prefect server, lifecycle worker, gateway, vLLM CPU."""
    import os

    from core.settings import prefect_env

    settings = get_settings()
    # Prefect reads its settings when first imported: point this process at the local server first.
    os.environ.update(prefect_env(settings, prefect_port))
    from first.runner import Runner

    raise SystemExit(Runner(settings, prefect_port=prefect_port, warm=warm).run())


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="Bind address (default FIRST_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default FIRST_PORT)")] = None,
) -> None:
    """Run only the gateway (uvicorn), against whatever PREFECT_API_URL points at."""
    import uvicorn

    from first.runner import KEEP_ALIVE_S

    s = get_settings()
    uvicorn.run(
        "first.asgi:app", host=host or s.host, port=port or s.port, log_level="warning", access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
    )  # fmt: skip


# ---- keys ----


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option(help="Who the key belongs to (recorded in usage)")],
    group: Annotated[list[str] | None, typer.Option(help="A group the user belongs to (repeatable)")] = None,
    rpm: Annotated[int, typer.Option(help="Requests per minute allowed (0: no limit)")] = 0,
) -> None:
    """Create an API key and print it, alone, on stdout (it can't be shown again)."""
    from serving.auth import KeyStore

    key, info = KeyStore(get_settings().keys_db).create(user, group or [], rpm)
    err.print(f"created key {info.key_id} for {user} (groups: {', '.join(info.groups) or '-'})")
    print(key)


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (ids, users, groups; never the keys themselves)."""
    from serving.auth import KeyStore

    t = Table("id", "user", "groups", "rpm", "created", "ends with", "status")
    for k in KeyStore(get_settings().keys_db).list():
        created = datetime.fromtimestamp(k.created, UTC).strftime("%Y-%m-%d %H:%M")
        t.add_row(
            k.key_id,
            k.user,
            ",".join(k.groups),
            str(k.rpm or "-"),
            created,
            "…" + k.last4,
            "revoked" if k.revoked else "active",
        )
    Console().print(t)


@keys_app.command("revoke")
def keys_revoke(
    key_id_or_user: Annotated[str, typer.Argument(help="A key id, or a user (revokes all their keys)")],
) -> None:
    """Revoke a key (the gateway stops accepting it within a second)."""
    from serving.auth import KeyStore

    n = KeyStore(get_settings().keys_db).revoke(key_id_or_user)
    if n == 0:
        err.print(f"[red]no active key matches {key_id_or_user!r}[/red] (see `first keys list`)")
        raise typer.Exit(1)
    err.print(f"revoked {n} key(s)")


# ---- model ----


@model_app.command("build-tiny")
def build_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model into")],
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same bytes")] = 0,
) -> None:
    """Build the tiny demo model (byte-level BPE + a 0.8 M-parameter Llama with random weights)."""
    from compute.tiny_model import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed, progress=lambda m: err.print(f"[dim]·[/dim] {m}"))
    err.print(f"[green]tiny model written to {path}[/green]")


# ---- usage ----

if TYPE_CHECKING:
    import polars as pl

    from analytics.reports import UsageFilter
    from analytics.store import UsageStore

_USAGE_EPILOG = (
    "Filters: --since/--until take 1d, 12h, 30m (ago) or an ISO date/time (UTC unless it has an offset); "
    "--since is inclusive, --until exclusive. Each command first ingests the spool (--no-ingest skips that). "
    "Formats: table (default), csv, json, parquet (needs --output FILE)."
)


class UsageFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


UsageSince = Annotated[
    str | None, typer.Option("--since", help="Window start, inclusive: 1d, 12h, 30m (ago) or an ISO date/time")
]
UsageUntil = Annotated[str | None, typer.Option("--until", help="Window end, exclusive (same forms as --since)")]
UsageUser = Annotated[str | None, typer.Option("--user", help="Only this user")]
UsageModel = Annotated[str | None, typer.Option("--model", help="Only this model")]
UsageCluster = Annotated[str | None, typer.Option("--cluster", help="Only this cluster")]
UsageGroup = Annotated[str | None, typer.Option("--group", help="Only users in this group (the request's groups)")]
UsageFmt = Annotated[
    UsageFormat,
    typer.Option("--format", "-f", case_sensitive=False, help="table | csv | json | parquet (parquet needs --output)"),
]
UsageOutput = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout (required for parquet)")
]
UsageIngest = Annotated[
    bool, typer.Option("--ingest/--no-ingest", help="Ingest the spool first, so the latest requests count")
]


def _since(value: str | None) -> datetime | None:
    """'1d', '12h', '30m', or an ISO date/time."""
    if not value:
        return None
    m = re.fullmatch(r"(\d+)([dhm])", value)
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"use 1d, 12h, 30m or an ISO date, not {value!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _when(value: str | None, option: str) -> datetime | None:
    try:
        return _since(value)
    except typer.BadParameter as e:
        e.param_hint = option
        raise


def _usage_filter(
    since: str | None, until: str | None, user: str | None, model: str | None, cluster: str | None, group: str | None
) -> UsageFilter:
    from analytics.reports import UsageFilter

    return UsageFilter(
        since=_when(since, "--since"),
        until=_when(until, "--until"),
        user=user,
        model=model,
        cluster=cluster,
        group=group,
    )


def _usage_store(ingest: bool) -> UsageStore:
    from analytics.store import UsageStore

    s = get_settings()
    store = UsageStore(s.usage_db)
    if ingest:
        store.ingest(s.spool_dir)
    return store


def _check_output(fmt: UsageFormat, output: Path | None) -> None:
    if fmt is UsageFormat.parquet and output is None:
        raise typer.BadParameter("--format parquet writes a file: add --output FILE", param_hint="--output")


def _cell(name: str, v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1%}" if name.endswith("rate") else f"{v:,.1f}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if "tokens" in name or name in ("requests",) else str(v)
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def _json_default(v: object) -> object:
    from datetime import date

    if isinstance(v, datetime | date):
        return v.isoformat()
    return str(v)


def _emit(df: pl.DataFrame, fmt: UsageFormat, output: Path | None, title: str) -> None:
    """Print (or write to ``output``) a polars frame as a rich table, CSV, JSON (a list of objects) or Parquet."""
    import polars as pl

    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
    if fmt is UsageFormat.parquet:
        df.write_parquet(output)
        err.print(f"wrote {df.height} row(s) to {output}")
        return
    if fmt is UsageFormat.csv:
        nested = [c for c, t in df.schema.items() if t.is_nested()]
        flat = df.with_columns(
            pl.col(c).cast(pl.List(pl.String)).list.join(",")
            if isinstance(df.schema[c], pl.List)
            else pl.col(c).map_elements(str, return_dtype=pl.String)
            for c in nested
        )
        text = flat.write_csv()
    elif fmt is UsageFormat.json:
        text = json.dumps(df.to_dicts(), default=_json_default) + "\n"
    else:
        if df.height == 1 and df.width > 6:  # one wide row (e.g. summary --by none): one line per column
            t = Table("column", "value", title=title)
            for c, v in df.row(0, named=True).items():
                t.add_row(c, _cell(c, v))
        else:
            t = Table(*df.columns, title=title)
            for row in df.iter_rows():
                t.add_row(*[_cell(c, v) for c, v in zip(df.columns, row, strict=True)])
        if output is None:
            Console().print(t)
            return
        with output.open("w") as fh:
            Console(file=fh, width=200).print(t)
        return
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


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
    fmt: UsageFormat,
    output: Path | None,
    ingest: bool,
    **options: object,
) -> None:
    from analytics.reports import run_report

    _check_output(fmt, output)
    f = _usage_filter(since, until, user, model, cluster, group)
    df = run_report(_usage_store(ingest), name, f, **options)
    _emit(df, fmt, output, _title(name, since, until, user=user, model=model, cluster=cluster, group=group))


@usage_app.command("ingest")
def usage_ingest() -> None:
    """Move the gateway's usage spool into DuckDB (idempotent by request id)."""
    from analytics.store import UsageStore

    s = get_settings()
    n = UsageStore(s.usage_db).ingest(s.spool_dir)
    err.print(f"ingested {n} new usage record(s) into {s.usage_db}")


@usage_app.command("summary", epilog=_USAGE_EPILOG)
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
            help="Group rows by a comma-separated list of user, model, cluster, endpoint, day; 'none' for one row"
        ),
    ] = "user,model",
    fmt: UsageFmt = UsageFormat.table,
    output: UsageOutput = None,
    ingest: UsageIngest = True,
) -> None:
    """Requests, users, errors and error rate, tokens, p50/p95 latency, p50 TTFT, cold starts, first/last request.

    One row per user and model by default; --by none gives one overall row.
    Examples: first usage summary --since 1d; first usage summary --by none --since 2026-01-01 --format json;
    first usage summary --by day,model --model tiny --format csv -o daily.csv
    """
    from analytics.reports import SUMMARY_BY

    keys = tuple(b.strip() for b in by.split(",") if b.strip() and b.strip().lower() != "none")
    bad = [b for b in keys if b not in SUMMARY_BY]
    if bad:
        raise typer.BadParameter(
            f"choose from {', '.join(SUMMARY_BY)} or none, not {', '.join(bad)}", param_hint="--by"
        )
    _report(
        "summary", since=since, until=until, user=user, model=model, cluster=cluster, group=group,
        fmt=fmt, output=output, ingest=ingest, by=keys,
    )  # fmt: skip


@usage_app.command("top-users", epilog=_USAGE_EPILOG)
def usage_top_users(
    since: UsageSince = None,
    until: UsageUntil = None,
    user: UsageUser = None,
    model: UsageModel = None,
    cluster: UsageCluster = None,
    group: UsageGroup = None,
    limit: Annotated[int, typer.Option(min=1, help="How many users")] = 10,
    fmt: UsageFmt = UsageFormat.table,
    output: UsageOutput = None,
    ingest: UsageIngest = True,
) -> None:
    """The users with the most tokens: requests, total/prompt/completion tokens, errors.

    Examples: first usage top-users --since 7d --limit 5; first usage top-users --model tiny --format csv
    """
    _report(
        "top-users", since=since, until=until, user=user, model=model, cluster=cluster, group=group,
        fmt=fmt, output=output, ingest=ingest, limit=limit,
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
        fmt: UsageFmt = UsageFormat.table,
        output: UsageOutput = None,
        ingest: UsageIngest = True,
    ) -> None:
        _report(
            name, since=since, until=until, user=user, model=model, cluster=cluster, group=group,
            fmt=fmt, output=output, ingest=ingest,
        )  # fmt: skip

    command.__doc__ = doc
    command.__name__ = f"usage_{name.replace('-', '_')}"
    usage_app.command(name, epilog=_USAGE_EPILOG)(command)


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


@usage_app.command("sql", epilog=_USAGE_EPILOG)
def usage_sql(
    query: Annotated[str, typer.Argument(help="SQL over the table `usage` (columns: docs/usage-schema.md)")],
    fmt: UsageFmt = UsageFormat.table,
    output: UsageOutput = None,
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
    _emit(df, fmt, output, "usage sql")


@usage_app.command("export", epilog=_USAGE_EPILOG)
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


@usage_app.command("chart", epilog=_USAGE_EPILOG)
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


# ---- registry ----


@registry_app.command("init")
def registry_init(
    force: Annotated[bool, typer.Option(help="Overwrite existing blocks of the same names")] = False,
) -> None:
    """Save the embedded default (cluster 'local', model 'tiny') as Prefect Blocks, unless blocks exist."""
    from blocks.registry import ClusterBlock, ModelBlock, Registry

    async def go() -> None:
        from blocks.globus import GlobusAuthBlock

        for block_type in (ClusterBlock, ModelBlock, GlobusAuthBlock):  # so the UI offers them under "Blocks"
            await block_type.register_type_and_schema()
        existing = await Registry.load_blocks()
        if existing.models and not force:
            err.print(f"registry already has {len(existing.models)} model(s); left as is (--force to reset)")
            return
        await Registry.embedded_default(get_settings()).save_blocks()
        err.print("saved the embedded default registry as blocks (cluster 'local', model 'tiny')")

    asyncio.run(go())


@registry_app.command("show")
def registry_show() -> None:
    """Print the clusters and models the gateway would load."""
    from blocks.registry import Registry

    reg = asyncio.run(Registry.load(get_settings()))
    print(json.dumps(reg.describe(), indent=2))


@app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(help="YAML with `clusters:` and `models:` lists (the blocks' fields)")],
    prune: Annotated[bool, typer.Option(help="Delete cluster and model blocks the file does not declare")] = False,
    dry_run: Annotated[bool, typer.Option(help="Only show what would change")] = False,
) -> None:
    """Declare the whole registry (clusters and models) from a file, for a reproducible setup.

    Saves a FIRST Cluster / FIRST Model block for each entry, shows what was created, updated or left as it
    was, and with --prune deletes blocks the file does not name. Running gateways follow within
    FIRST_REGISTRY_REFRESH_S (5 s)."""
    from blocks.registry import ClusterBlock, ModelBlock, Registry

    try:
        desired = Registry.from_yaml(file.read_text())
    except (OSError, ValueError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None

    async def go() -> list[tuple[str, str, str]]:
        for block_type in (ClusterBlock, ModelBlock):
            await block_type.register_type_and_schema()
        current = await Registry.load_blocks()
        return current.plan(desired, prune) if dry_run else await current.apply(desired, prune)

    steps = asyncio.run(go())
    t = Table("action", "kind", "name", title=f"{'plan for' if dry_run else 'applied'} {file}")
    for action, kind, name in steps:
        t.add_row(action, kind, name)
    Console(stderr=True).print(t)


# ---- operators: cluster functions ----


@functions_app.command("register")
def functions_register(
    cluster: Annotated[str, typer.Option(help="The cluster (its block) whose endpoint will run the functions")],
    group: Annotated[str | None, typer.Option(help="Share the functions with this Globus group id")] = None,
    public: Annotated[bool, typer.Option(help="Let anyone run them (they hold no secrets)")] = False,
) -> None:
    """Register FIRST's cluster functions with Globus Compute once and store their ids in the cluster's block.

    The gateway then runs them by id (submit_to_registered_function). Run it as the gateway's own client
    (GLOBUS_COMPUTE_CLIENT_ID / GLOBUS_COMPUTE_CLIENT_SECRET), so the functions belong to the identity that
    runs them; otherwise Globus Compute asks you to log in, and you must share them (--group or --public)."""
    import os

    from blocks.registry import ClusterBlock, Registry, _slug
    from compute.globus_compute import compute_client, register_functions

    reg = asyncio.run(Registry.load_blocks())
    spec = reg.clusters.get(cluster)
    if spec is None:
        err.print(f"[red]no cluster block named {cluster!r}[/red]; known: {', '.join(sorted(reg.clusters)) or 'none'}")
        raise typer.Exit(1)
    if spec.transport != "globus-compute":
        err.print(
            f"cluster {cluster!r} has transport {spec.transport!r}: nothing to register (a local endpoint registers "
            "the functions itself when it starts; a direct-HTTP cluster runs none)"
        )
        return
    if os.environ.get("GLOBUS_COMPUTE_CLIENT_ID"):
        client = compute_client()
    else:
        from globus_compute_sdk import Client

        err.print("no GLOBUS_COMPUTE_CLIENT_ID: registering as you (Globus Compute may ask you to log in)")
        client = Client()
    kwargs = {"group": group} if group else {}
    ids = register_functions(client, public=public, **kwargs)
    spec.function_ids = ids
    asyncio.run(ClusterBlock(spec=spec).save(_slug(spec.name), overwrite=True))
    t = Table("function", "id", title=f"registered for cluster {cluster} (saved in its block)")
    for name, fid in ids.items():
        t.add_row(name, fid)
    Console(stderr=True).print(t)


# ---- operators: Globus Auth ----


def _ids(values: list[str] | None) -> list[str]:
    """Repeatable options also take comma-separated lists."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


@globus_app.command("configure")
def globus_configure(
    client_id: Annotated[str, typer.Option(help="The gateway's confidential client id (app.globus.org)")],
    client_secret: Annotated[
        str,
        typer.Option(
            envvar="FIRST_GLOBUS_CLIENT_SECRET",
            prompt=True,
            hide_input=True,
            help="Its secret (prompted for, or FIRST_GLOBUS_CLIENT_SECRET; never pass it on a shared command line)",
        ),
    ],
    allowed_domain: Annotated[
        list[str] | None, typer.Option(help="Identity-provider domain callers must sign in with (repeatable)")
    ] = None,
    policy: Annotated[list[str] | None, typer.Option(help="Authentication policy id to pass (repeatable)")] = None,
    required_group: Annotated[
        list[str] | None, typer.Option(help="Group id; callers must be in one of these (repeatable)")
    ] = None,
    admin_group: Annotated[list[str] | None, typer.Option(help="Group id of admins (repeatable)")] = None,
    service_account: Annotated[
        list[str] | None, typer.Option(help="Client id allowed to call with client-credentials tokens (repeatable)")
    ] = None,
    native_client_id: Annotated[
        str | None, typer.Option(help="Native app client id callers use with `first login` (shown to them)")
    ] = None,
    scope: Annotated[str | None, typer.Option(help="Required scope (default .../<client id>/action_all)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait on Globus for a new token, then 503")] = 5.0,
    cache_ttl: Annotated[float, typer.Option(help="Longest a token's check is reused (bounded by its expiry)")] = 300.0,
    auth_url: Annotated[str | None, typer.Option(help="Globus Auth base URL (default: production)")] = None,
    groups_url: Annotated[str | None, typer.Option(help="Globus Groups base URL (default: production)")] = None,
    name: Annotated[str | None, typer.Option(help="Block name (default FIRST_GLOBUS_BLOCK, 'default')")] = None,
) -> None:
    """Save the gateway's Globus Auth block (replacing one of the same name). Gateways pick it up within a
    minute; start a gateway with FIRST_AUTH_MODE=globus to use it."""
    from blocks.globus import GlobusAuthBlock

    block = GlobusAuthBlock(
        client_id=client_id, client_secret=client_secret, allowed_domains=_ids(allowed_domain),
        policies=_ids(policy), required_groups=_ids(required_group), admin_groups=_ids(admin_group),
        service_accounts=_ids(service_account), native_client_id=native_client_id, scope=scope, timeout_s=timeout,
        cache_ttl_s=cache_ttl, auth_base_url=auth_url, groups_base_url=groups_url,
    )  # fmt: skip
    block_name = name or get_settings().globus_block

    async def go() -> None:
        await GlobusAuthBlock.register_type_and_schema()
        await block.save(block_name, overwrite=True)

    asyncio.run(go())
    err.print(f"saved Globus Auth block {block_name!r} (first-globus-auth/{block_name}); the secret is stored masked")


@globus_app.command("show")
def globus_show(
    name: Annotated[str | None, typer.Option(help="Block name (default FIRST_GLOBUS_BLOCK, 'default')")] = None,
) -> None:
    """Print the Globus Auth block the gateway would use (the secret masked)."""
    from blocks.globus import GlobusAuthBlock

    block_name = name or get_settings().globus_block
    try:
        block = GlobusAuthBlock.load(block_name)
    except ValueError as exc:
        err.print(f"[red]no Globus Auth block {block_name!r}[/red] ({exc}); create it with `first globus configure`")
        raise typer.Exit(1) from None
    doc = block.model_dump(mode="json", exclude={"block_type_slug"})
    doc["client_secret"] = "**********"
    doc["required_scope"] = block.required_scope
    print(json.dumps(doc, indent=2))


# ---- callers: Globus login ----

ClientIdOption = Annotated[
    str | None,
    typer.Option(
        envvar="FIRST_LOGIN_CLIENT_ID",
        help="The gateway's Globus native-app client id (ask the gateway's operator for it)",
        show_default=False,
    ),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        envvar="FIRST_TOKEN_FILE",
        help="Where the tokens are kept (default: $XDG_CONFIG_HOME/first/globus-tokens.json)",
        show_default=False,
    ),
]


def _token_file(token_file: Path | None) -> Path:
    from first.login import default_token_file

    return token_file or default_token_file()


def _read_code(_url: str) -> str:
    """The prompt goes to stderr and nothing to stdout (click's prompt writes a space to stdout)."""
    typer.echo("Authorization code: ", err=True, nl=False)
    return sys.stdin.readline().strip()


@app.command("login")
def login_cmd(
    client_id: ClientIdOption = None,
    scope: Annotated[
        str | None,
        typer.Option(
            envvar="FIRST_LOGIN_SCOPE",
            help="The gateway's Globus scope, e.g. https://auth.globus.org/scopes/<gateway client id>/action_all",
            show_default=False,
        ),
    ] = None,
    token_file: TokenFileOption = None,
) -> None:
    """Sign in with Globus (as a caller of a FIRST gateway) and keep the tokens for `first token`.

    Prints a URL to open in a browser; paste back the code Globus shows. Nothing secret is printed.

    The tokens are kept in a private file (mode 0600) and refreshed automatically by `first token`.
    """
    from first.login import LoginError, login

    if not client_id or not scope:
        needs = [
            f"  {opt} (or {env}): {what}"
            for value, opt, env, what in [
                (client_id, "--client-id", "FIRST_LOGIN_CLIENT_ID", "the gateway's Globus native-app client id"),
                (scope, "--scope", "FIRST_LOGIN_SCOPE", "the gateway's scope, like "
                 "https://auth.globus.org/scopes/<gateway client id>/action_all"),
            ]
            if not value
        ]  # fmt: skip
        typer.echo("first login needs:\n" + "\n".join(needs), err=True)
        typer.echo("Both come from the gateway's operator (they are not secret).", err=True)
        raise typer.Exit(2)
    try:
        login(
            client_id,
            scope,
            _token_file(token_file),
            code_reader=_read_code,
        )
    except LoginError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command("token")
def token_cmd(
    client_id: ClientIdOption = None,
    token_file: TokenFileOption = None,
    min_valid: Annotated[
        int, typer.Option("--min-valid", help="Refresh first if the token expires within this many seconds")
    ] = 60,
) -> None:
    """Print a valid Globus access token, alone, on stdout (refreshing it if needed).

    Use it as the gateway's API key: export OPENAI_API_KEY=$(first token). Run `first login` once first.
    """
    from first.login import LoginError, get_token

    try:
        token = get_token(client_id, _token_file(token_file), min_valid_s=min_valid)
    except LoginError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    print(token)


@app.command("logout")
def logout_cmd(client_id: ClientIdOption = None, token_file: TokenFileOption = None) -> None:
    """Revoke the Globus tokens that `first login` stored, and delete the token file."""
    from first.login import LoginError, logout

    try:
        logout(client_id, _token_file(token_file))
    except LoginError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
