"""Usage analytics at scale: spool ingestion into DuckDB, and the reports over N rows in DuckDB and in polars.

1. Generates N synthetic usage records (default 10,000,000) with realistic shapes: ~2,000 users (a few heavy ones),
   20 models (a few popular ones), 6 clusters (each model on 1-3), 30 days with a daily and weekly rhythm, 40%
   streams (with ttft_ms), ~2% errors (429/400 refused before a cluster, 5xx on one), rare cold starts. They are
   written as closed spool segments of 10,000 JSON lines each, the files `analytics.spool.UsageSpool` writes, from
   4 "gateway processes" (numpy + polars `write_ndjson`; timed separately, it is not the gateway's cost).
2. Ingests them with `UsageStore.ingest` (the code `first usage ingest` runs) into a fresh DuckDB file and reports
   rows/s (target >= 100k rows/s) and where the time went, as the store measures it (opening the database,
   staging the segments with `read_json`, the deduplicating INSERT, recomputing the rollups of the days touched,
   commit + checkpoint + deletes), and whether batches slow down as the table grows.
3. Times the reports of `analytics.reports` over all N rows (median of --runs; each opens its own short-lived
   read-only connection, as the CLI and the API do; target <= 1 s each). They read the rollups the ingest keeps,
   with percentiles from their histograms past 2M matched rows. For comparison, polars computes the same
   aggregates from scratch over the Parquet that `reports.export_parquet` writes (lazy `scan_parquet`,
   Hive-partitioned by day, exact percentiles); the results must agree: counts exactly, percentiles within 1.5%.

It prints a table and writes (or replaces) its own section of docs/benchmarks.md. Its data (several GB at 10M
rows: about 600 bytes a row at the peak) lives in a temporary folder on the disk of this repository, removed at
the end unless --keep; it checks the free space first.

    make bench-analytics                             # = .venv/bin/python bench/analytics.py (10M rows, ~10 min)
    .venv/bin/python bench/analytics.py --quick      # 200k rows; leaves docs/ alone unless --out is given
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* is not installed

import duckdb
import msgspec
import numpy as np
import polars as pl
import pyarrow as pa
from rich.table import Table

from analytics import reports
from analytics.records import UsageRecord
from analytics.schema import USAGE_COLUMNS
from analytics.store import IngestTimings, UsageStore
from bench.common import (
    REPO,
    BenchError,
    add_output_args,
    console,
    failure_code,
    log,
    machine_line,
    resolve_output,
    write_section,
)

BEGIN = "<!-- bench/analytics.py: begin (generated; rerun the script to replace this section) -->"
END = "<!-- bench/analytics.py: end -->"
BYTES_PER_ROW = 650  # at the peak: the JSON spool (~340 B) + the DuckDB file + the Parquet export, with headroom
T_END = datetime(2026, 11, 1, tzinfo=UTC).timestamp()  # the synthetic month ends here
DAYS = 30
PROCESSES = 4  # gateway processes whose segments the spool holds
TARGET_INGEST = 100_000  # rows/s
TARGET_QUERY_S = 1.0


# ---- synthetic usage ----

MODELS = (
    "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.3-70B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen2.5-72B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mixtral-8x22B-Instruct-v0.1",
    "google/gemma-2-9b-it", "google/gemma-2-27b-it", "microsoft/Phi-3.5-mini-instruct", "allenai/OLMo-2-1124-13B",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "deepseek-ai/DeepSeek-V3", "meta-llama/Llama-3.2-3B-Instruct",
    "meta-llama/Llama-3.1-405B-Instruct", "Qwen/QwQ-32B", "Qwen/Qwen2.5-Coder-32B-Instruct", "nvidia/NV-Embed-v2",
    "ibm-granite/granite-3.1-8b-instruct", "tiiuae/Falcon3-10B-Instruct", "openai/gpt-oss-120b",
)  # fmt: skip
CLUSTERS = ("polaris", "sophia", "aurora", "crux", "metis", "edith")
# status -> (share of the errors, OpenAI error type, reached a cluster)
ERRORS = {429: (0.40, "rate_limit_error", False), 400: (0.15, "invalid_request_error", False),
          503: (0.20, "service_unavailable", False), 502: (0.10, "bad_gateway", True), 504: (0.10, "timeout", True),
          500: (0.05, "server_error", True)}  # fmt: skip
ERROR_RATE = 0.02
STREAM_RATE = 0.40
COLD_RATE = 0.002
HOUR_WEIGHTS = np.array([2, 1, 1, 1, 1, 2, 3, 5, 8, 10, 11, 11, 9, 10, 11, 11, 10, 8, 6, 5, 4, 4, 3, 3], float)


@dataclass
class World:
    """The fixed population the records are drawn from (users and their groups, models and their clusters)."""

    rng: np.random.Generator
    users: np.ndarray  # names
    user_p: np.ndarray
    user_groups: pl.Series  # List(String), one per user
    model_p: np.ndarray
    model_clusters: np.ndarray  # (models, 3) cluster indices; a model on fewer clusters repeats them
    ms_per_token: np.ndarray  # per model

    @classmethod
    def make(cls, seed: int, n_users: int = 2000) -> World:
        rng = np.random.default_rng(seed)
        users = np.array([f"user{u:04d}" for u in range(n_users)])
        user_p = 1.0 / (np.arange(n_users) + 10.0) ** 1.2
        projects = [f"proj{p:03d}" for p in range(150)]
        groups = [
            (["alcf"] if u % 10 < 7 else []) + [projects[u % 150]] + (["admins"] if u % 400 == 0 else [])
            for u in range(n_users)
        ]
        model_p = 1.0 / (np.arange(len(MODELS)) + 1.0)
        k = len(CLUSTERS)
        # 1-3 clusters per model; a model on fewer repeats its first
        model_clusters = np.array([[m % k, (m + 1 + m % 2) % k if m % 3 else m % k,
                                    (m + 3) % k if m % 4 == 0 else m % k] for m in range(len(MODELS))])  # fmt: skip
        return cls(
            rng=rng, users=users, user_p=user_p / user_p.sum(), user_groups=pl.Series(groups, dtype=pl.List(pl.String)),
            model_p=model_p / model_p.sum(), model_clusters=model_clusters,
            ms_per_token=rng.uniform(8.0, 40.0, len(MODELS)),
        )  # fmt: skip

    def timestamps(self, n: int) -> np.ndarray:
        """``n`` request start times over the DAYS before T_END, busier by day and on weekdays; sorted."""
        day_w = np.array([0.4 if (d + 3) % 7 >= 5 else 1.0 for d in range(DAYS)])  # two weekend days in seven
        w = (day_w[:, None] * HOUR_WEIGHTS[None, :]).ravel()
        slot = self.rng.choice(w.size, size=n, p=w / w.sum())
        ts = T_END - DAYS * 86400.0 + slot * 3600.0 + self.rng.uniform(0.0, 3600.0, n)
        ts.sort()
        return np.round(ts, 6)

    def frame(self, ts: np.ndarray) -> pl.DataFrame:
        """Records for the given start times, columns in UsageRecord's order."""
        rng, n = self.rng, ts.size
        user = rng.choice(self.users.size, size=n, p=self.user_p)
        model = rng.choice(len(MODELS), size=n, p=self.model_p)
        cluster = self.model_clusters[model, rng.integers(0, 3, n)]
        stream = rng.random(n) < STREAM_RATE
        prompt = np.clip(rng.lognormal(6.0, 1.0, n), 1, 32_000).astype(np.int64)
        completion = np.clip(rng.lognormal(5.0, 0.9, n), 1, 4096).astype(np.int64)
        latency = 80.0 + prompt * 0.05 + completion * self.ms_per_token[model] * rng.lognormal(0.0, 0.25, n)
        ttft = 60.0 + prompt * 0.08 * rng.lognormal(0.0, 0.4, n)
        cold = rng.random(n) < COLD_RATE
        extra = np.where(cold, rng.uniform(30_000.0, 240_000.0, n), 0.0)
        latency, ttft = latency + extra, ttft + extra
        # errors
        err = rng.random(n) < ERROR_RATE
        codes = np.array(list(ERRORS))
        status = np.where(err, codes[rng.choice(codes.size, size=n, p=[v[0] for v in ERRORS.values()])], 200)
        reached = np.isin(status, [s for s, v in ERRORS.items() if v[2]]) | ~err
        early = err & ~reached
        latency = np.where(early, rng.uniform(0.5, 30.0, n), latency)
        latency = np.where(status == 504, 120_000.0 + rng.uniform(0, 50, n), latency)
        prompt = np.where(err, 0, prompt)
        completion = np.where(err, 0, completion)
        types = {s: v[1] for s, v in ERRORS.items()}
        df = pl.DataFrame({
            "request_id": request_ids(rng, n),
            "ts": ts,
            "user": self.users[user],
            "groups": self.user_groups.gather(user),
            "model": np.array(MODELS)[model],
            "cluster": pl.Series(np.array(CLUSTERS)[cluster]).set(pl.Series(~reached), None),  # type: ignore[arg-type]
            "endpoint": np.where(rng.random(n) < 0.92, "chat.completions", "completions"),
            "stream": stream,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "latency_ms": np.round(latency, 3),
            "ttft_ms": pl.Series(np.round(ttft, 3)).set(pl.Series(~stream | err), None),  # type: ignore[arg-type]
            "status": status.astype(np.int32),
            "error_type": pl.Series(status).replace_strict(types, default=None, return_dtype=pl.String),
            "cold_start": cold & ~early,
            # a tenth of the rows are batch lines (of 50 batches)
            "batch_id": pl.Series(np.char.add("batch_", (rng.integers(0, 50, n)).astype(str)))
            .set(pl.Series(rng.random(n) >= 0.1), None),  # type: ignore[arg-type]
        })  # fmt: skip
        assert tuple(df.columns) == USAGE_COLUMNS
        return df


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def request_ids(rng: np.random.Generator, n: int) -> pl.Series:
    """``n`` random 32-hex-digit ids, like the gateway's uuid4().hex."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    out = np.empty((n, 32), dtype=np.uint8)
    out[:, 0::2], out[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    return pl.from_arrow(pa.array(out.view("S32").ravel(), type=pa.binary()).cast(pa.string()))  # type: ignore[return-value]


def generate(spool: Path, rows: int, segment_rows: int, seed: int) -> int:
    """Write ``rows`` records as closed spool segments; returns the bytes written."""
    spool.mkdir(parents=True, exist_ok=True)
    world = World.make(seed)
    ts = world.timestamps(rows)
    start_ms = int(T_END * 1000)
    chunk = max(segment_rows, (1_000_000 // segment_rows) * segment_rows)
    written, seg = 0, 0
    for lo in range(0, rows, chunk):
        df = world.frame(ts[lo : lo + chunk])
        for off in range(0, df.height, segment_rows):
            pid, seq = 100_000 + seg % PROCESSES, seg // PROCESSES  # segments of 4 gateways, in turn
            path = spool / f"usage-{pid}-{start_ms}-{seq:06d}.jsonl"
            df.slice(off, segment_rows).write_ndjson(path)
            written += path.stat().st_size
            seg += 1
    # The gateway's decoder must read what was written, field for field.
    first = sorted(spool.iterdir())[0].read_bytes().split(b"\n", 1)[0]
    msgspec.json.decode(first, type=UsageRecord)
    return written


# ---- ingestion, with where its time goes ----


def ingest(spool: Path, db: Path, batch_rows: int) -> tuple[int, float, IngestTimings]:
    """``UsageStore.ingest`` as ``first usage ingest`` runs it; the store times its own steps."""
    store = UsageStore(db, batch_rows=batch_rows)
    t = time.perf_counter()
    n = store.ingest(spool)
    return n, time.perf_counter() - t, store.timings


# ---- the aggregates ----

F = reports.UsageFilter()
DUCKDB: dict[str, Callable[[UsageStore], pl.DataFrame]] = {
    "summary": lambda s: reports.summary(s, F),
    "summary by user, model": lambda s: reports.summary(s, F, by=("user", "model")),
    "by-model": lambda s: reports.by_model(s, F),
    "daily": lambda s: reports.daily(s, F),
    "latency": lambda s: reports.latency(s, F),
    "top-users": lambda s: reports.top_users(s, F),
    "by-cluster": lambda s: reports.by_cluster(s, F),
    "errors": lambda s: reports.errors(s, F),
}
REQUIRED = ("summary", "by-model", "daily", "latency")  # the targets; the others are for information

_ERR = (pl.col("status") >= 400).sum().cast(pl.Int64)


def _q(name: str, p: float) -> pl.Expr:
    return pl.col(name).quantile(p, interpolation="linear")


def _summary_exprs() -> list[pl.Expr]:
    return [
        pl.len().cast(pl.Int64).alias("requests"), pl.col("user").n_unique().cast(pl.Int64).alias("users"),
        _ERR.alias("errors"), (_ERR / pl.len()).alias("error_rate"),
        *(pl.col(c).sum().cast(pl.Int64).alias(c) for c in ("prompt_tokens", "completion_tokens", "total_tokens")),
        _q("latency_ms", 0.5).alias("p50_latency_ms"), _q("latency_ms", 0.95).alias("p95_latency_ms"),
        _q("ttft_ms", 0.5).alias("p50_ttft_ms"), pl.col("cold_start").sum().cast(pl.Int64).alias("cold_starts"),
        pl.col("ts").min().alias("first_ts"), pl.col("ts").max().alias("last_ts"),
    ]  # fmt: skip


def _per() -> list[pl.Expr]:
    return [
        pl.len().cast(pl.Int64).alias("requests"), pl.col("user").n_unique().cast(pl.Int64).alias("users"),
        pl.col("total_tokens").sum().cast(pl.Int64).alias("total_tokens"), _ERR.alias("errors"),
        _q("latency_ms", 0.5).alias("p50_latency_ms"),
    ]  # fmt: skip


POLARS: dict[str, Callable[[pl.LazyFrame], pl.LazyFrame]] = {
    "summary": lambda lf: lf.select(_summary_exprs()),
    "summary by user, model": lambda lf: lf.group_by("user", "model").agg(_summary_exprs()).sort("user", "model"),
    "by-model": lambda lf: lf.group_by("model").agg(
        *_per(),
        *(pl.col(c).sum().cast(pl.Int64).alias(c) for c in ("prompt_tokens", "completion_tokens")),
    ).sort("model"),
    "daily": lambda lf: lf.group_by(pl.col("ts").dt.date().alias("day"), "model").agg(_per())
    .sort("day", "model"),
    "latency": lambda lf: lf.filter(pl.col("status") < 400).group_by("model", "cluster").agg(
        pl.len().cast(pl.Int64).alias("requests"), pl.col("stream").sum().cast(pl.Int64).alias("streams"),
        *(_q("latency_ms", p).alias(f"p{round(p * 100)}_latency_ms") for p in (0.5, 0.95, 0.99)),
        *(_q("ttft_ms", p).alias(f"p{round(p * 100)}_ttft_ms") for p in (0.5, 0.95, 0.99)),
    ).sort("model", pl.col("cluster"), nulls_last=True),
}  # fmt: skip
# Columns that must agree between DuckDB and polars, per aggregate (counts exactly, percentiles to 1e-9).
CHECK = {
    "summary": ["requests", "users", "errors", "total_tokens", "p50_latency_ms", "p95_latency_ms", "p50_ttft_ms"],
    "summary by user, model": ["user", "model", "requests", "errors", "total_tokens", "p50_latency_ms"],
    "by-model": ["model", "requests", "users", "total_tokens", "errors", "p50_latency_ms"],
    "daily": ["day", "model", "requests", "users", "total_tokens", "errors", "p50_latency_ms"],
    "latency": ["model", "cluster", "requests", "streams", "p50_latency_ms", "p99_latency_ms", "p95_ttft_ms"],
}


PCT_TOLERANCE = 0.015  # DuckDB's percentiles past 2M rows come from 2%-wide histogram buckets


def same(name: str, a: pl.DataFrame, b: pl.DataFrame) -> tuple[str | None, float]:
    """(None when DuckDB's ``a`` and polars' ``b`` agree on the CHECK columns, else what differs; the largest
    relative difference of a percentile).  Counts must match exactly, percentiles within PCT_TOLERANCE."""
    cols = CHECK[name]
    a, b = a.select(cols), b.select(cols)
    if a.height != b.height:
        return f"{a.height} rows in DuckDB, {b.height} in polars", float("nan")
    worst = 0.0
    for c in cols:
        x, y = a[c], b[c]
        if x.dtype.is_float():
            rel = ((x - y).abs() / y.abs().clip(1e-9, None)).fill_null(0.0)
            worst = max(worst, float(rel.max() or 0.0))
            bad = (rel > PCT_TOLERANCE) | (x.is_null() != y.is_null())
            if bad.any():
                return f"{c} differs by more than {PCT_TOLERANCE:.1%} in {bad.sum()} rows", worst
        elif x.cast(pl.String).to_list() != y.cast(pl.String).to_list():
            return f"{c} differs", worst
    return None, worst


def timed(fn: Callable[[], Any], runs: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


# ---- results ----


@dataclass
class Results:
    rows: int
    gen_s: float = float("nan")
    spool_bytes: int = 0
    ingest_rows: int = 0
    ingest_s: float = float("nan")
    ingest: IngestTimings = field(default_factory=IngestTimings)
    db_bytes: int = 0
    open_s: list[float] = field(default_factory=list)
    duckdb: dict[str, list[float]] = field(default_factory=dict)
    export_s: float = float("nan")
    parquet_bytes: int = 0
    parquet_files: int = 0
    polars: dict[str, list[float]] = field(default_factory=dict)
    mismatches: dict[str, str] = field(default_factory=dict)
    pct_diff: dict[str, float] = field(default_factory=dict)  # largest relative percentile difference

    @property
    def ingest_rps(self) -> float:
        return self.ingest_rows / self.ingest_s if self.ingest_s else float("nan")

    def batch_rps(self, part: str) -> float:
        """INSERT-part rows/s over the first or last tenth of the batches (how the growing table slows it)."""
        b = self.ingest.batches
        if not b:
            return float("nan")
        k = max(1, len(b) // 10)
        sel = b[:k] if part == "first" else b[-k:]
        return sum(r for r, _ in sel) / sum(s for _, s in sel)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(x: float) -> str:
    return "–" if x != x else (f"{x * 1000:,.0f} ms" if x >= 0.0995 else f"{x * 1000:.1f} ms")


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def query_rows(r: Results) -> list[list[str]]:
    out = []
    for name in DUCKDB:
        d, p = med(r.duckdb.get(name, [])), med(r.polars.get(name, []))
        verdict = ("met" if d <= TARGET_QUERY_S else "not met") if name in REQUIRED else "(info)"
        check = ""
        if name in POLARS:
            diff = r.pct_diff.get(name, float("nan"))
            check = r.mismatches.get(name, "same" + (f" (percentiles within {diff:.2%})" if diff > 1e-6 else ""))
        out.append([name, ms(d), ms(p), check, verdict])
    return out


def ingest_rows(r: Results) -> list[list[str]]:
    t = r.ingest
    other = r.ingest_s - t.decode_s - t.open_s - t.stage_s - t.insert_s - t.rollup_s - t.commit_s
    share = lambda x: f"{x:.1f} s ({100 * x / r.ingest_s:.0f}%)"  # noqa: E731
    met = "met" if r.ingest_rps >= TARGET_INGEST else "not met"
    return [
        ["generate + write the spool (not timed as ingest)", f"{r.gen_s:.1f} s",
         f"{r.rows / r.gen_s:,.0f} rows/s, {gb(r.spool_bytes)} of JSON lines"],
        ["ingest (`UsageStore.ingest`)", f"{r.ingest_s:.1f} s",
         f"**{r.ingest_rps:,.0f} rows/s** (target ≥ {TARGET_INGEST:,}: {met})"],
        ["↳ open the database (per batch)", share(t.open_s), f"{len(t.batches)} batches"],
        ["↳ stage: `read_json` of the closed segments", share(t.stage_s), ""],
        ["↳ msgspec decode (open segments, refused lines)", share(t.decode_s), ""],
        ["↳ INSERT of the new rows (deduped in the batch's time window)", share(t.insert_s),
         f"{r.batch_rps('first'):,.0f} rows/s (whole batch) in the first tenth of the batches, "
         f"{r.batch_rps('last'):,.0f} in the last"],
        ["↳ recompute the rollups of the days touched", share(t.rollup_s), ""],
        ["↳ commit + close (checkpoint) + delete segments", share(t.commit_s), ""],
        ["↳ other (listing, …)", share(max(other, 0.0)), ""],
        ["DuckDB file", gb(r.db_bytes), f"{r.db_bytes / max(r.ingest_rows, 1):.0f} bytes/row, rollups included"],
        ["open a read-only connection + `SELECT 1`", ms(med(r.open_s)), "included in every DuckDB time below"],
        ["`export_parquet` (all rows, by day)", f"{r.export_s:.1f} s",
         f"{gb(r.parquet_bytes)} in {r.parquet_files} files"],
    ]  # fmt: skip


def print_tables(r: Results, args: argparse.Namespace) -> None:
    t1 = Table(title=f"Usage ingestion: {r.rows:,} rows")
    for col in ("step", "time", "notes"):
        t1.add_column(col, justify="right" if col == "time" else "left")
    for row in ingest_rows(r):
        t1.add_row(*(c.replace("**", "") for c in row))
    console.print(t1)
    t2 = Table(title=f"Aggregates over {r.rows:,} rows (median of {args.runs} runs; target ≤ {TARGET_QUERY_S:g} s)")
    for col in ("aggregate", "DuckDB (reports.*)", "polars (scan_parquet)", "results vs polars", "target (DuckDB)"):
        t2.add_column(col, justify="left" if col in ("aggregate", "results") else "right")
    for row in query_rows(r):
        if row[-1] != "(info)":
            row[-1] = f"[{'red' if 'not' in row[-1] else 'green'}]{row[-1]}[/]"
        t2.add_row(*row)
    console.print(t2)


def markdown(r: Results, args: argparse.Namespace, started: datetime, wall_s: float) -> str:
    lines = [
        BEGIN,
        "## Usage analytics: ingestion and reports at scale (`bench/analytics.py`)",
        "",
        machine_line(
            started,
            wall_s,
            quick=args.quick,
            rerun="`make bench-analytics` or `.venv/bin/python bench/analytics.py`",
            extra=f"DuckDB {duckdb.__version__}, polars {pl.__version__}, ",
        )
        + f" Load average {args.load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other work on the "
        "machine slows every number here).",
        "",
        f"Method: {r.rows:,} synthetic usage records (~2,000 users, 20 models, 6 clusters, {DAYS} days, 40% streams "
        "with ttft, ~2% errors, rare cold starts) written as closed spool segments of "
        f"{args.segment_rows:,} JSON lines (what `UsageSpool` writes), ingested by `UsageStore.ingest` "
        f"(batches of {args.batch_rows:,} rows) into a fresh DuckDB file. The reports are `analytics.reports`' "
        "functions, each opening its own short-lived read-only connection and reading the rollups the ingest keeps "
        "(per day, user, model, cluster; latency histograms in 2% buckets, used for percentiles past 2M matched "
        "rows). For comparison, polars computes the same aggregates from scratch, lazily over the Parquet that "
        "`export_parquet` wrote (`scan_parquet`, Hive-partitioned by day, exact percentiles); its results are "
        f"checked against DuckDB's (counts exactly, percentiles within {PCT_TOLERANCE:.1%}). Times are medians of "
        f"{args.runs} runs; targets: ingest ≥ {TARGET_INGEST:,} rows/s, each of {', '.join(REQUIRED)} in DuckDB ≤ "
        f"{TARGET_QUERY_S:g} s.",
        "",
        "| step | time | notes |",
        "|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in ingest_rows(r)),
        "",
        "| aggregate | DuckDB (`reports.*`) | polars (`scan_parquet`) | results vs polars | target (DuckDB) |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in query_rows(r)),
    ]
    if r.mismatches:
        lines += ["", "DuckDB and polars disagreed: " + "; ".join(f"{k}: {v}" for k, v in r.mismatches.items())]
    lines.append(END)
    return "\n".join(lines) + "\n"


# ---- main ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--rows", type=int, help="usage records to generate (default 10,000,000; --quick 200,000)")
    add_output_args(ap, "200k rows, 3 runs")
    ap.add_argument("--runs", type=int, help="timed runs per aggregate (default 5; --quick 3)")
    ap.add_argument("--segment-rows", type=int, default=10_000, help="records per spool segment (default 10,000)")
    ap.add_argument("--batch-rows", type=int, default=200_000, help="UsageStore batch_rows (default 200,000)")
    ap.add_argument("--dir", type=Path, help="where the temporary data goes (default: the system's temp folder "
                    "if it is on this repository's disk, else .first/ here)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the data folder (spool, DuckDB file, Parquet)")
    ap.add_argument("--charts", type=Path, help="also write `first usage chart`'s PNGs of the synthetic month here "
                    "(the README's chart: --quick --charts docs/images)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    if args.rows is None:
        args.rows = 200_000 if args.quick else 10_000_000
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    if min(args.rows, args.runs, args.segment_rows, args.batch_rows) < 1:
        ap.error("counts must be at least 1")
    resolve_output(args)
    return args


def data_dir(args: argparse.Namespace) -> Path:
    base = args.dir
    if base is None:
        tmp = Path(tempfile.gettempdir())
        base = tmp if os.stat(tmp).st_dev == os.stat(REPO).st_dev else REPO / ".first"
    base.mkdir(parents=True, exist_ok=True)
    need, free = args.rows * BYTES_PER_ROW, shutil.disk_usage(base).free
    if free < need:
        raise BenchError(
            f"{args.rows:,} rows need about {gb(need)} of disk at the peak; {base} has {gb(free)} free "
            "(use fewer --rows or another --dir)"
        )
    log(f"data under {base} ({gb(free)} free, about {gb(need)} needed)")
    return Path(tempfile.mkdtemp(prefix="first-bench-analytics-", dir=base))


def du(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files), len(files)


def run(args: argparse.Namespace, home: Path, r: Results) -> None:
    spool, db, parquet = home / "spool", home / "usage.duckdb", home / "parquet"
    log(f"generating {args.rows:,} records as segments of {args.segment_rows:,}...")
    t = time.perf_counter()
    r.spool_bytes = generate(spool, args.rows, args.segment_rows, args.seed)
    r.gen_s = time.perf_counter() - t
    log(f"  {r.gen_s:.1f} s, {gb(r.spool_bytes)}; ingesting...")

    r.ingest_rows, r.ingest_s, r.ingest = ingest(spool, db, args.batch_rows)
    store = UsageStore(db)
    if r.ingest_rows != args.rows or store.count() != args.rows or any(spool.iterdir()):
        raise BenchError(f"ingested {r.ingest_rows:,} rows, the table has {store.count():,}; expected {args.rows:,}")
    r.db_bytes = du(db)[0] + (du(db.with_suffix(".duckdb.wal"))[0] if db.with_suffix(".duckdb.wal").exists() else 0)
    log(f"  {r.ingest_s:.1f} s = {r.ingest_rps:,.0f} rows/s; timing DuckDB reports...")

    def open_only() -> None:
        with store.connect_read_only() as con:
            con.execute("SELECT 1").fetchall()

    r.open_s = timed(open_only, args.runs)[0]
    duck: dict[str, pl.DataFrame] = {}
    for name, fn in DUCKDB.items():
        r.duckdb[name], duck[name] = timed(lambda fn=fn: fn(store), args.runs)
        log(f"  {name}: {ms(med(r.duckdb[name]))}")

    if args.charts is not None:
        from analytics.charts import write_charts

        t = time.perf_counter()
        paths = write_charts(store, args.charts)
        log(f"  {len(paths)} charts in {args.charts} ({time.perf_counter() - t:.1f} s)")

    log("exporting Parquet...")
    t = time.perf_counter()
    reports.export_parquet(store, parquet)
    r.export_s = time.perf_counter() - t
    r.parquet_bytes, r.parquet_files = du(parquet)
    lf = pl.scan_parquet(parquet / "**" / "*.parquet", hive_partitioning=True)
    for name, q in POLARS.items():
        r.polars[name], out = timed(lambda q=q: q(lf).collect(), args.runs)
        log(f"  polars {name}: {ms(med(r.polars[name]))}")
        why, r.pct_diff[name] = same(name, duck[name], out)
        if why is not None:
            r.mismatches[name] = why


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.load = os.getloadavg()
    started, t0 = datetime.now(UTC), time.monotonic()
    r = Results(args.rows)
    code, home = 0, None
    try:
        home = data_dir(args)
        run(args, home, r)
    except (KeyboardInterrupt, Exception) as exc:
        code = failure_code(exc)
    finally:
        if home is not None:
            if args.keep:
                log(f"data kept: {home}")
            else:
                shutil.rmtree(home, ignore_errors=True)
    wall_s = time.monotonic() - t0
    if code == 0:
        print_tables(r, args)
        for name, why in r.mismatches.items():
            console.print(f"[red]DuckDB and polars disagree on {name}:[/red] {why}")
        if args.write:
            write_section(args.out, markdown(r, args, started, wall_s), BEGIN, END)
            log(f"wrote the section in {args.out}")
        else:
            log(f"--quick: {args.out} left alone (give --out to write it)")
        if r.mismatches:
            code = 1
    log(f"total run time {wall_s / 60:.1f} min")
    return code


if __name__ == "__main__":
    sys.exit(main())
