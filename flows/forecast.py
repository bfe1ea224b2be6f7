"""Predictive warm-up's forecast and decisions, pure (no Prefect, no I/O), tested on their own.

The forecast of a model's requests in an hour is the mean of the same hour of the week over the last ``weeks``
weeks (a week with no request there counts as 0), times the recent trend (the last 7 days' requests over the 7
before, held to 0.5 to 2). Only past weeks count, never today: a model used for the first time this morning is not
predicted busy tomorrow morning until next week.

A model with ``warm_ahead: auto`` is warmed ahead when the forecast of any hour from now to now + lead reaches its
``warm_ahead_min_per_hour`` and none of its instances is running: the lead is the longest expected cold start of
its clusters plus the flow's own interval, so the model is hot when the demand arrives. While the current hour's
forecast is above that bound, a running model is kept (scale-down-idle does not stop it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl

from blocks.registry import ModelSpec, Registry
from serving.routing import RUNNING

TREND_BOUNDS = (0.5, 2.0)


def _hour(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@dataclass
class Forecast:
    """Requests per (model, hour) from past weeks (``analytics.demand.hourly_demand``)."""

    demand: pl.DataFrame
    now: datetime
    weeks: int = 4
    _counts: dict[tuple[str, datetime], int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for model, hour, n in self.demand.select("model", "hour", "requests").iter_rows():
            self._counts[(model, _hour(hour))] = int(n)

    def trend(self, model: str) -> float:
        """The last 7 days' requests over the 7 before, held to TREND_BOUNDS (1 without both)."""
        start = _hour(self.now)
        recent = sum(n for (m, h), n in self._counts.items() if m == model and start - timedelta(days=7) <= h < start)
        before = sum(n for (m, h), n in self._counts.items()
                     if m == model and start - timedelta(days=14) <= h < start - timedelta(days=7))  # fmt: skip
        if not recent or not before:
            return 1.0
        return min(TREND_BOUNDS[1], max(TREND_BOUNDS[0], recent / before))

    def expected(self, model: str, at: datetime) -> float:
        """Requests expected in the hour of ``at``."""
        hour = _hour(at)
        past = sum(self._counts.get((model, hour - timedelta(weeks=k)), 0) for k in range(1, self.weeks + 1))
        return past / self.weeks * self.trend(model)


@dataclass
class WarmAhead:
    model: str
    action: str  # "warm", "keep", "none", "off"
    expected: float  # the most requests expected in one hour of the look-ahead
    at: datetime | None  # that hour
    lead_s: float
    reason: str


def warm_ahead_decisions(
    registry: Registry, forecast: Forecast, states: dict[str, list[str]], interval_s: float
) -> list[WarmAhead]:
    """One decision per model: ``states`` holds the states of each model's instances (from the clusters)."""
    out = []
    for spec in registry.models.values():
        out.append(_decide(spec, registry, forecast, states.get(spec.name, []), interval_s))
    return out


def _decide(spec: ModelSpec, registry: Registry, f: Forecast, states: list[str], interval_s: float) -> WarmAhead:
    clusters = [registry.clusters[c] for c in spec.clusters if c in registry.clusters]
    lead = max((c.expected_start_s for c in clusters), default=0.0) + interval_s
    if spec.warm_ahead == "off":
        return WarmAhead(spec.name, "off", 0.0, None, lead, "warm_ahead is off for this model")
    hours = []
    t = f.now
    while t <= f.now + timedelta(seconds=lead):
        hours.append(_hour(t))
        t += timedelta(hours=1)
    hours.append(_hour(f.now + timedelta(seconds=lead)))
    at, expected = max(((h, f.expected(spec.name, h)) for h in hours), key=lambda x: x[1])
    bound = spec.warm_ahead_min_per_hour
    running = any(s in RUNNING for s in states)
    if expected < bound:
        return WarmAhead(spec.name, "none", expected, at, lead, f"{expected:.1f} requests expected in the busiest "
                         f"hour ahead, under its {bound:g} per hour")  # fmt: skip
    if running:
        return WarmAhead(spec.name, "keep", expected, at, lead, f"{expected:.1f} requests expected by {at:%a %H:00} "
                         f"UTC: running, kept through the busy hour")  # fmt: skip
    if not any(not c.maintenance for c in clusters):
        return WarmAhead(spec.name, "none", expected, at, lead, "busy hour ahead, but every cluster of the model is "
                         "in maintenance")  # fmt: skip
    why = f"{expected:.1f} requests expected by {at:%a %H:00} UTC (at least {bound:g}); a cold start takes up to "
    return WarmAhead(spec.name, "warm", expected, at, lead, why + f"{lead - interval_s:.0f} s: warm it now")


def keeps(decisions: list[WarmAhead]) -> set[str]:
    """The models a predicted busy hour keeps running (scale-down-idle passes over them)."""
    return {d.model for d in decisions if d.action in ("keep", "warm")}
