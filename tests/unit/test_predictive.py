"""Predictive warm-up's forecast and decisions (flows/forecast.py), on usage rows in a real DuckDB store read by
analytics/demand.py: the same hour of past weeks, the trend, batch lines left out, the per-model override, and the
models a predicted busy hour keeps running."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from analytics.demand import hourly_demand
from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from analytics.store import UsageStore
from blocks.registry import ClusterSpec, ModelSpec, Registry
from flows.forecast import Forecast, keeps, warm_ahead_decisions

MONDAY_9 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)  # a Monday
NOW = MONDAY_9 - timedelta(minutes=10)


def _rows(model: str, at: datetime, n: int, batch: str | None = None) -> list[UsageRecord]:
    return [
        UsageRecord(request_id=f"{model}-{at:%Y%m%d%H}-{i}-{batch}", ts=(at + timedelta(minutes=i % 50)).timestamp(),
                    user="u", model=model, endpoint="chat.completions", batch_id=batch)
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def demand(tmp_path: Path):  # type: ignore[no-untyped-def]
    rows = []
    for k in range(1, 5):  # four past Mondays at 9: 'a' busy (20 an hour), and a batch at the same hour
        rows += _rows("a", MONDAY_9 - timedelta(weeks=k), 20) + _rows("a", MONDAY_9 - timedelta(weeks=k), 500, "b1")
    rows += _rows("b", MONDAY_9 - timedelta(weeks=1), 8)  # 'b' only last week: 2 an hour on average
    rows += _rows("a", NOW - timedelta(minutes=30), 50)  # today, not a past week: no weight in the forecast
    store = UsageStore(tmp_path / "usage.duckdb")
    with UsageSpool(tmp_path / "spool") as spool:
        for r in rows:
            spool.append(r)
    store.ingest(tmp_path / "spool")
    return hourly_demand(store, NOW - timedelta(weeks=5), NOW)


REGISTRY = Registry(
    clusters={"c": ClusterSpec(name="c", expected_start_s=120)},
    models={"a": ModelSpec(name="a", clusters=["c"], path="-"), "b": ModelSpec(name="b", clusters=["c"], path="-"),
            "off": ModelSpec(name="off", clusters=["c"], path="-", warm_ahead="off")},
)  # fmt: skip


def test_the_forecast_is_the_same_hour_of_past_weeks_without_batch_lines(demand) -> None:  # type: ignore[no-untyped-def]
    f = Forecast(demand, NOW, weeks=4)
    assert f.expected("a", MONDAY_9) == 20.0  # batch lines and today's requests left out
    assert f.expected("b", MONDAY_9) == 2.0
    assert f.expected("a", MONDAY_9 + timedelta(hours=1)) == 0.0


def test_a_cold_model_is_warmed_ahead_of_its_busy_hour_and_a_running_one_kept(demand) -> None:  # type: ignore[no-untyped-def]
    f = Forecast(demand, NOW, weeks=4)
    # 10 minutes before 9:00, a 2-minute cold start plus the flow's 10-minute interval reaches into the busy hour
    cold = {d.model: d for d in warm_ahead_decisions(REGISTRY, f, {"a": ["cold"], "b": ["cold"]}, 600)}
    assert cold["a"].action == "warm" and "20.0 requests expected by Mon 09:00 UTC" in cold["a"].reason
    assert cold["b"].action == "none" and "under its 10 per hour" in cold["b"].reason
    assert cold["off"].action == "off"
    hot = {d.model: d for d in warm_ahead_decisions(REGISTRY, f, {"a": ["hot"]}, 600)}
    assert hot["a"].action == "keep"
    assert keeps(list(hot.values())) == {"a"}
    early = Forecast(demand, MONDAY_9 - timedelta(hours=2), weeks=4)  # two hours before: too early to warm
    assert {d.model: d.action for d in warm_ahead_decisions(REGISTRY, early, {}, 600)}["a"] == "none"


def test_a_growing_model_is_forecast_higher_within_bounds() -> None:
    import polars as pl

    hours = [MONDAY_9 - timedelta(weeks=k) for k in (1, 2)] + [NOW - timedelta(days=3), NOW - timedelta(days=10)]
    counts = [20, 20, 80, 20]  # the last 7 days carry 100 requests, the 7 before 40: a trend of 2.5, held to 2
    demand = pl.DataFrame({"model": ["a"] * 4, "hour": hours, "requests": counts})
    f = Forecast(demand, NOW, weeks=2)
    assert f.trend("a") == 2.0 and f.expected("a", MONDAY_9) == 40.0
    assert Forecast(demand, NOW, weeks=2).trend("nobody") == 1.0
