"""Interactive demand per model and hour, from the usage table: what predictive warm-up forecasts from
(``flows/forecast.py``). Batch lines are left out: a batch waits for a warm-up, a person should not."""

from __future__ import annotations

from datetime import datetime

import polars as pl

from analytics.store import UsageStore

HOURLY_SQL = """
SELECT model, date_trunc('hour', ts) AS hour, count(*) AS requests
FROM usage
WHERE ts >= $since AND ts < $until AND batch_id IS NULL
GROUP BY ALL
ORDER BY hour
"""


def hourly_demand(store: UsageStore, since: datetime, until: datetime) -> pl.DataFrame:
    """Requests per model per hour (UTC) in [since, until): columns model, hour (aware UTC), requests."""
    if not store.db_path.exists():
        return pl.DataFrame(schema={"model": pl.String, "hour": pl.Datetime("us", "UTC"), "requests": pl.Int64})
    return store.query(HOURLY_SQL, {"since": since, "until": until})
