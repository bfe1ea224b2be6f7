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


def emit(df: pl.DataFrame, fmt: OutputFormat, output: Path | None, title: str) -> None:
    """Print (or write to ``output``) a polars frame as a rich table, CSV, JSON (a list of objects) or Parquet."""
    import polars as pl

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
