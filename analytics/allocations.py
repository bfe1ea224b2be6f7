"""Allocation accounting: the GPU-hours each project's callers cost, against the project's budget.

An HPC project is billed for the GPUs it holds, not the tokens it reads, so FIRST charges **instance time**: the
GPUs of a model's instance (``gpus``, per cluster) times its wall time from warm-up (``starting``) to scale-down
(``cold``) or failure, as the lifecycle runs observed it (``InstanceEvent`` lines, appended by ``serving.bus``
whenever a model's state on a cluster changes). Each hour of an instance's time is shared out among the
projects whose callers used it in that hour, pro rata by tokens; an hour nobody used is idle time, charged to
the facility's idle owner (``FIRST_ALLOCATION_IDLE_OWNER``). Callers in no project are "(no project)".

Hour buckets keep the arithmetic small (an instance up all month is 744 buckets) and the pro-rata honest enough:
a project that sent one request in an hour shares that hour with the others who did.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import polars as pl

from analytics.store import UsageStore
from blocks.registry import ProjectSpec, Registry

HOLDS_GPUS = frozenset({"starting", "hot"})  # queued: waiting in the batch queue, no GPUs yet
RELEASES_GPUS = frozenset({"cold", "failed"})
NO_PROJECT = "(no project)"
HOUR = 3600.0


class InstanceEvent(msgspec.Struct, frozen=True):
    """A model's state on a cluster changed (what a lifecycle run observed)."""

    ts: float
    cluster: str
    model: str
    state: str


def append_event(directory: Path, event: InstanceEvent) -> None:
    """One JSON line in this process's own file (O_APPEND: whole lines, even with other writers). A line torn
    by a crash is ended first, so that it spoils only itself."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{socket.gethostname()}-{os.getpid()}.jsonl"
    with open(path, "a+b") as f:
        torn = f.tell() > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + msgspec.json.encode(event) + b"\n")


def read_events(directory: Path) -> list[InstanceEvent]:
    """Every event in the folder, oldest first; a torn last line (a writer killed mid-line) is skipped."""
    events = []
    decoder = msgspec.json.Decoder(InstanceEvent)
    for path in sorted(directory.glob("*.jsonl")) if directory.is_dir() else []:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            for line in f:
                with contextlib.suppress(msgspec.DecodeError):
                    events.append(decoder.decode(line))
    return sorted(events, key=lambda e: e.ts)


@dataclass(frozen=True)
class Interval:
    cluster: str
    model: str
    start: float
    end: float


def instance_intervals(events: Iterable[InstanceEvent], since: float, until: float) -> list[Interval]:
    """When each instance held its GPUs, clipped to [since, until): from a ``starting``/``hot`` event to the
    next ``cold``/``failed`` one (or ``until``, if it still runs)."""
    began: dict[tuple[str, str], float] = {}
    out = []
    for e in events:
        key = (e.cluster, e.model)
        if e.state in HOLDS_GPUS:
            began.setdefault(key, e.ts)
        elif e.state in RELEASES_GPUS and key in began:
            out.append(Interval(e.cluster, e.model, began.pop(key), e.ts))
    out += [Interval(c, m, t, until) for (c, m), t in began.items()]
    clipped = [Interval(i.cluster, i.model, max(i.start, since), min(i.end, until)) for i in out]
    return [i for i in clipped if i.end > i.start]


def hour_slices(interval: Interval) -> Iterable[tuple[float, float]]:
    """(hour start, seconds of the interval in that hour)."""
    t = interval.start
    while t < interval.end:
        hour = t - t % HOUR
        end = min(hour + HOUR, interval.end)
        yield hour, end - t
        t = end


def charges(
    intervals: list[Interval],
    gpus: dict[tuple[str, str], int],
    tokens: dict[tuple[str, str, float], dict[str, int]],
    idle_owner: str,
) -> dict[str, dict[float, float]]:
    """GPU-hours per project per hour. ``gpus``: (cluster, model) -> GPUs per instance; ``tokens``: (cluster,
    model, hour) -> project -> tokens its callers used there."""
    out: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for iv in intervals:
        n = gpus.get((iv.cluster, iv.model), 1)
        for hour, seconds in hour_slices(iv):
            gpu_hours = n * seconds / HOUR
            used = tokens.get((iv.cluster, iv.model, hour), {})
            total = sum(used.values())
            if total <= 0:
                out[idle_owner][hour] += gpu_hours
                continue
            for project, t in used.items():
                out[project][hour] += gpu_hours * t / total
    return out


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The current budget period (UTC calendar month, quarter or year) that ``now`` falls in."""
    if period == "year":
        return datetime(now.year, 1, 1, tzinfo=UTC), datetime(now.year + 1, 1, 1, tzinfo=UTC)
    months = 3 if period == "quarter" else 1
    first = (now.month - 1) // months * months + 1
    start = datetime(now.year, first, 1, tzinfo=UTC)
    year, month = divmod(first - 1 + months, 12)
    return start, datetime(now.year + year, month + 1, 1, tzinfo=UTC)


def _tokens_by_hour(store: UsageStore, registry: Registry, since: float, until: float) -> dict:
    """(cluster, model, hour) -> project -> tokens, from the usage table (nothing if it does not exist yet)."""
    out: dict[tuple[str, str, float], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    if not store.db_path.exists():
        return out
    query = """
        SELECT cluster, model, epoch(date_trunc('hour', ts)) AS hour, "groups", sum(total_tokens)::BIGINT AS tokens
        FROM usage WHERE ts >= to_timestamp($since) AND ts < to_timestamp($until) AND cluster IS NOT NULL
          AND total_tokens > 0
        GROUP BY ALL
    """
    with store.connect_read_only() as con:
        rows = con.execute(query, {"since": since, "until": until}).fetchall()
    for cluster, model, hour, groups, n in rows:
        project = registry.project_of(groups or [])
        out[(cluster, model, float(hour))][project.name if project else NO_PROJECT] += int(n)
    return out


def allocation_report(
    store: UsageStore, events_dir: Path, registry: Registry, idle_owner: str, now: datetime | None = None
) -> pl.DataFrame:
    """One row per project (its current period, budget, GPU-hours used and left, whether it is spent), then
    the idle owner and callers in no project."""
    now = now or datetime.now(UTC)
    periods = {p.name: period_bounds(p.period, now) for p in registry.projects.values()}
    since = min((start for start, _ in periods.values()), default=period_bounds("month", now)[0]).timestamp()
    until = now.timestamp()
    intervals = instance_intervals(read_events(events_dir), since, until)
    gpus = {(c, m.name): m.on(c).gpus or 0 for m in registry.models.values() for c in m.clusters}
    per_hour = charges(intervals, gpus, _tokens_by_hour(store, registry, since, until), idle_owner)
    rows = []
    for p in registry.projects.values():
        start, end = periods[p.name]
        used = sum(h for hour, h in per_hour.get(p.name, {}).items() if hour >= start.timestamp())
        rows.append(_row(p, start, end, used))
    month_start, month_end = period_bounds("month", now)
    for other in (idle_owner, NO_PROJECT):
        if other in registry.projects:
            continue
        used = sum(h for hour, h in per_hour.get(other, {}).items() if hour >= month_start.timestamp())
        rows.append({"project": other, "period": "month", "period_start": month_start, "renews": month_end,
                     "gpu_hours_budget": None, "gpu_hours_used": round(used, 4), "gpu_hours_left": None,
                     "used_pct": None, "spent": False, "when_spent": None})  # fmt: skip
    return pl.DataFrame(rows, schema=_SCHEMA, orient="row")


_SCHEMA = {
    "project": pl.String, "period": pl.String, "period_start": pl.Datetime("us", "UTC"),
    "renews": pl.Datetime("us", "UTC"), "gpu_hours_budget": pl.Float64, "gpu_hours_used": pl.Float64,
    "gpu_hours_left": pl.Float64, "used_pct": pl.Float64, "spent": pl.Boolean, "when_spent": pl.String,
}  # fmt: skip


def _row(p: ProjectSpec, start: datetime, end: datetime, used: float) -> dict:
    return {
        "project": p.name, "period": p.period, "period_start": start, "renews": end, "gpu_hours_budget": p.gpu_hours,
        "gpu_hours_used": round(used, 4), "gpu_hours_left": round(max(0.0, p.gpu_hours - used), 4),
        "used_pct": round(100 * used / p.gpu_hours, 1), "spent": used >= p.gpu_hours, "when_spent": p.when_spent,
    }  # fmt: skip
