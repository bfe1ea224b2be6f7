"""The ``predictive-warm-up`` flow: warm models ahead of the demand their usage history predicts, so that the first
caller of a busy hour does not wait the whole cold start (issue 17). The forecast and the rules are in
``flows/forecast.py``; the run's artifact shows each model's forecast, the lead and what was done, and why.

It starts each warm-up as a run of the ``warm-up`` deployment (cluster "best"), which the UI shows on its own.
``scale-down-idle`` asks the same forecast before it stops a model (``busy_models``): a model in a predicted busy
hour is kept. Override per model in its block: ``warm_ahead: off``, or ``warm_ahead_min_per_hour``.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from analytics.demand import hourly_demand
from analytics.store import UsageStore
from blocks.registry import Registry
from flows.fleet_decisions import md_table, utc
from flows.forecast import Forecast, WarmAhead, keeps, warm_ahead_decisions
from flows.lifecycle_tasks import Probe, fleet, fleet_pairs, probe_fleet

INTERVAL_S = 600.0  # its schedule in prefect.yaml: a warm-up starts at most this late
WEEKS = 4


@task(name="read-demand", cache_policy=NO_CACHE)
def read_demand(weeks: int) -> pl.DataFrame:
    """Interactive requests per model and hour over the last ``weeks`` weeks (two at least: the trend)."""
    now = datetime.now(UTC)
    since = now - timedelta(weeks=max(weeks, 2), hours=1)
    return hourly_demand(UsageStore(fleet().settings.usage_db), since, now)


def decide(registry: Registry, demand: pl.DataFrame, probes: list[Probe], weeks: int) -> list[WarmAhead]:
    states: dict[str, list[str]] = {}
    for p in probes:
        states.setdefault(p.model.name, []).append(str(p.status.get("state")))
    return warm_ahead_decisions(registry, Forecast(demand, datetime.now(UTC), weeks), states, INTERVAL_S)


async def busy_models(registry: Registry, probes: list[Probe]) -> set[str]:
    """The models a predicted busy hour keeps running (for scale-down-idle)."""
    return keeps(decide(registry, read_demand.fn(WEEKS), probes, WEEKS))


@flow(name="predictive-warm-up", log_prints=True)
async def predictive_warm_up(dry_run: bool = False, weeks: int = WEEKS) -> list[dict[str, Any]]:
    """Warm each model whose usage in past weeks predicts a busy hour within its cold start (plus this flow's
    interval), unless it already runs.

    Args:
        dry_run: Only forecast and report; start nothing.
        weeks: How many past weeks the forecast averages.
    """
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    registry = await fleet().current_registry()
    demand = read_demand(weeks)
    probes = await probe_fleet(fleet_pairs(registry), 30.0)
    decisions = decide(registry, demand, probes, weeks)
    for d in decisions:
        if d.action == "warm" and not dry_run:
            run = await run_deployment("warm-up/warm-up", parameters={"model": d.model, "cluster": "best"},
                                       timeout=0, tags=["predictive"])  # fmt: skip
            d.reason += f" (run {run.name})"
        elif d.action == "warm":
            d.reason += " (dry run: not started)"
        logger.info("%s: %s, %s", d.model, d.action, d.reason)
    rows = [[d.model, d.action, f"{d.expected:.1f}", f"{d.at:%a %H:00}" if d.at else "-", round(d.lead_s), d.reason]
            for d in decisions]  # fmt: skip
    await create_markdown_artifact(
        key="predictive-warm-up",
        markdown=f"### Predictive warm-up at {utc()}{' (dry run)' if dry_run else ''}\n\n"
        + md_table(["model", "action", "expected/hour", "hour (UTC)", "lead s", "why"], rows)
        + f"\nForecast: the same hour of the week over the last {weeks} weeks, times the trend of the last 7 days "
        f"against the 7 before (held to 0.5 to 2); interactive requests only ({demand.height} model-hours read).\n",
        description="what each model's usage history predicts, and the warm-ups it started",
    )
    return [dataclasses.asdict(d) for d in decisions]
