"""How every `first` command prints: rich tables for people, CSV/JSON/Parquet for programs; messages to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import polars as pl

err = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def print_table(
    columns: Iterable[str], rows: Iterable[Iterable[object]], title: str | None = None, *, stderr: bool = False
) -> None:
    """A rich table of already-formatted rows, on stdout (data) or stderr (a report of what a command did)."""
    t = Table(*columns, title=title)
    for row in rows:
        t.add_row(*[str(v) for v in row])
    (err if stderr else Console()).print(t)


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


# Which columns a narrow table keeps first: the group keys, then what an analyst reads first. Any other column
# (an analyst's own SQL) comes after these, left to right.
_FIRST_SHOWN = (
    "user", "model", "cluster", "endpoint", "day", "traffic", "status", "error_type", "project",
    "requests", "errors", "total_tokens", "users", "error_rate", "rate", "p50_latency_ms", "p95_latency_ms",
    "p50_ttft_ms", "gpu_hours", "budget_gpu_hours", "used", "cold_starts", "models", "streams", "p99_latency_ms",
    "prompt_tokens", "completion_tokens", "last_ts",
)  # fmt: skip
_BORDER = 3  # what rich adds per column: a space either side and a rule


def pick_columns(df: pl.DataFrame, columns: str | None) -> pl.DataFrame:
    """``--columns a,b,c``: those columns in that order, or a BadParameter naming the ones there are."""
    if not columns:
        return df
    import typer

    wanted = [c.strip() for c in columns.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in df.columns]
    if unknown:
        raise typer.BadParameter(
            f"no column {', '.join(unknown)}; this report has {', '.join(df.columns)}", param_hint="--columns"
        )
    return df.select(wanted)


def fit_columns(df: pl.DataFrame, width: int) -> tuple[list[str], list[str]]:
    """The columns a table of ``df`` can show whole in ``width`` characters, in the frame's order (chosen by
    :data:`_FIRST_SHOWN`), and those left out."""
    rank = {c: i for i, c in enumerate(_FIRST_SHOWN)}
    by_importance = sorted(df.columns, key=lambda c: (rank.get(c, len(rank)), df.columns.index(c)))
    used, keep = 1, set()
    for c in by_importance:
        need = max([len(c), *(len(_cell(c, v)) for v in df[c].head(200))]) + _BORDER
        if keep and used + need > width:
            continue
        keep.add(c)
        used += need
    return [c for c in df.columns if c in keep], [c for c in df.columns if c not in keep]


def emit(
    df: pl.DataFrame,
    fmt: OutputFormat,
    output: Path | None,
    title: str,
    *,
    columns: str | None = None,
    wide: bool = False,
) -> None:
    """Print (or write to ``output``) a polars frame as a rich table, CSV, JSON (a list of objects) or Parquet.

    ``columns`` (``--columns``) picks columns for every format. Otherwise a table on a terminal shows the columns
    that fit its width whole (80 when it is not a terminal) and names the rest on stderr; ``wide`` (``--wide``),
    a file, and the csv, json and parquet formats keep every column."""
    import polars as pl

    df = pick_columns(df, columns)
    vertical = df.height == 1 and df.width > 6  # one wide row (summary --by none): one line per column, all fit
    if fmt is OutputFormat.table and not (columns or wide or vertical or output is not None):
        shown, left_out = fit_columns(df, Console().width)
        if left_out:
            df = df.select(shown)
            err.print(
                f"[dim]{len(left_out)} more column(s): {', '.join(left_out)}. --wide shows every column, "
                "--columns a,b picks; --format csv|json|parquet keeps them all.[/dim]"
            )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
    if fmt is OutputFormat.parquet:
        df.write_parquet(output)
        err.print(f"wrote {df.height} row(s) to {output}")
        return
    if fmt is OutputFormat.csv:
        nested = [c for c, t in df.schema.items() if t.is_nested()]
        flat = df.with_columns(
            pl.col(c).cast(pl.List(pl.String)).list.join(",")
            if isinstance(df.schema[c], pl.List)
            else pl.col(c).map_elements(str, return_dtype=pl.String)
            for c in nested
        )
        text = flat.write_csv()
    elif fmt is OutputFormat.json:
        text = json.dumps(df.to_dicts(), default=_json_default) + "\n"
    else:
        if vertical:
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
