"""Usage charts as PNG files (matplotlib, Agg: no display needed), for the usage-report flow and the CLI.

:func:`write_charts` writes four charts for a :class:`analytics.reports.UsageFilter`, each ``WIDTH`` x
``HEIGHT`` pixels whatever the data:

* ``tokens-per-day.png``: total tokens per UTC day, stacked by model;
* ``latency-by-cluster.png``: p50/p95/p99 latency of successful requests per cluster;
* ``top-users.png``: the users with the most tokens (horizontal bars);
* ``error-rate.png``: errors / requests per UTC day.

A chart with nothing to show says "no data" instead of failing. Figures are built with
:class:`matplotlib.figure.Figure` (no pyplot global state), so charts can be drawn from several threads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analytics.reports import UsageFilter, cluster_latency, daily, top_users
from analytics.store import UsageStore

__all__ = ["CHARTS", "DPI", "HEIGHT", "WIDTH", "cluster_latency", "write_charts"]

FIGSIZE = (10.0, 5.0)  # inches
DPI = 100
WIDTH, HEIGHT = int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)  # pixels of every chart
TOP_USERS = 15
NO_CLUSTER = "(none)"  # requests that never reached a cluster
MAX_MODELS = 8  # models drawn on their own in the tokens chart; the rest are stacked as OTHER
OTHER = "other models"


def _figure(title: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    return fig, ax


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=20, color="grey", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _day_labels(days: list) -> list[str]:
    return [d.isoformat() if hasattr(d, "isoformat") else str(d) for d in days]


def _tokens_per_day(ax: Axes, d: pl.DataFrame) -> None:
    """Stacked bars: the MAX_MODELS models with the most tokens, the rest as "other"; legend beside the plot."""
    if d.is_empty():
        return _no_data(ax)
    days = sorted(d["day"].unique().to_list())
    labels = _day_labels(days)
    ranked = (
        d.group_by("model").agg(pl.col("total_tokens").sum()).sort("total_tokens", "model", descending=[True, False])
    )
    top = ranked["model"].head(MAX_MODELS).to_list()
    d = d.with_columns(
        pl.when(pl.col("model").is_in(top)).then(pl.col("model")).otherwise(pl.lit(OTHER)).alias("model")
    )
    bottom = [0] * len(days)
    for model in top + ([OTHER] if ranked.height > MAX_MODELS else []):
        per_day = dict(d.filter(pl.col("model") == model).group_by("day").agg(pl.col("total_tokens").sum()).iter_rows())
        heights = [int(per_day.get(day) or 0) for day in days]
        ax.bar(labels, heights, bottom=bottom, label=model)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("total tokens")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax.tick_params(axis="x", labelrotation=45 if len(days) > 7 else 0)
    if len(days) > 15:  # every other label, so they stay readable
        for i, tick in enumerate(ax.get_xticklabels()):
            tick.set_visible(i % 2 == 0)


def _latency_by_cluster(ax: Axes, d: pl.DataFrame) -> None:
    d = d.filter(pl.col("p50_latency_ms").is_not_null())
    if d.is_empty():
        return _no_data(ax)
    clusters = [c if c is not None else NO_CLUSTER for c in d["cluster"].to_list()]
    x = range(len(clusters))
    width = 0.27
    for i, p in enumerate(("p50", "p95", "p99")):
        ax.bar([xi + (i - 1) * width for xi in x], d[f"{p}_latency_ms"].fill_null(0).to_list(), width, label=p)
    ax.set_xticks(list(x), clusters)
    ax.set_ylabel("latency (ms)")
    ax.legend(loc="upper left", fontsize="small")


def _top_users(ax: Axes, d: pl.DataFrame) -> None:
    if d.is_empty():
        return _no_data(ax)
    users, tokens = d["user"].to_list()[::-1], d["total_tokens"].to_list()[::-1]  # the biggest at the top
    ax.barh(users, tokens)
    ax.set_xlabel("total tokens")


def _error_rate(ax: Axes, d: pl.DataFrame) -> None:
    if d.is_empty():
        return _no_data(ax)
    per_day = d.group_by("day").agg(pl.col("requests").sum(), pl.col("errors").sum()).sort("day")
    rates = [100.0 * e / r if r else 0.0 for e, r in zip(per_day["errors"], per_day["requests"], strict=True)]
    labels = _day_labels(per_day["day"].to_list())
    ax.plot(labels, rates, marker="o")
    ax.set_ylabel("errors (% of requests)")
    ax.set_ylim(0, max(5.0, max(rates) * 1.15))
    ax.tick_params(axis="x", labelrotation=45 if len(labels) > 7 else 0)


# file name -> (title, data, drawing)
CHARTS: dict[str, tuple[str, Callable[[UsageStore, UsageFilter], pl.DataFrame], Callable[[Axes, pl.DataFrame], None]]]
CHARTS = {
    "tokens-per-day.png": ("Tokens per day, by model", daily, _tokens_per_day),
    "latency-by-cluster.png": ("Latency per cluster (successful requests)", cluster_latency, _latency_by_cluster),
    "top-users.png": (f"Top {TOP_USERS} users by tokens", lambda s, f: top_users(s, f, TOP_USERS), _top_users),
    "error-rate.png": ("Error rate per day", daily, _error_rate),
}


def _window(f: UsageFilter) -> str:
    if f.since is None and f.until is None:
        return ""
    fmt = "%Y-%m-%d %H:%M"
    since = f.since.strftime(fmt) if f.since else "start"
    until = f.until.strftime(fmt) if f.until else "now"
    return f" ({since} to {until} UTC)"


def write_charts(store: UsageStore, out_dir: Path, f: UsageFilter = UsageFilter()) -> list[Path]:
    """Draw the usage charts for the rows ``f`` selects as PNGs (``WIDTH`` x ``HEIGHT``) into ``out_dir``
    (created if needed; files of the same name are replaced). Returns the files written, in :data:`CHARTS`
    order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames: dict[object, pl.DataFrame] = {}
    written = []
    for name, (title, data, draw) in CHARTS.items():
        if data not in frames:  # daily feeds two charts
            frames[data] = data(store, f)
        fig, ax = _figure(title + _window(f))
        draw(ax, frames[data])
        path = out_dir / name
        fig.savefig(path, dpi=DPI, format="png")
        written.append(path)
    return written


def write_allocation_chart(report: pl.DataFrame, path: Path) -> Path:
    """Each project's GPU-hours used this period against its budget (``analytics.allocations``): a bar per
    project, its budget a tick; the idle owner and callers in no project as plain bars."""
    fig, ax = _figure("GPU-hours used this period, against each project's budget")
    if report.is_empty():
        _no_data(ax)
    else:
        names = report["project"].to_list()
        used = report["gpu_hours_used"].to_list()
        budgets = report["gpu_hours_budget"].to_list()
        colours = ["tab:red" if s else "tab:blue" for s in report["spent"].to_list()]
        ax.bar(names, used, color=colours, label="used (red: spent)")
        marks = [(n, b) for n, b in zip(names, budgets, strict=True) if b is not None]
        if marks:
            ax.scatter([n for n, _ in marks], [b for _, b in marks], marker="_", s=2000, color="black", label="budget")
        ax.set_ylabel("GPU-hours")
        ax.legend(loc="upper right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path
