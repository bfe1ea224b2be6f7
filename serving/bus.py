"""Live state shared between gateways and lifecycle flows, through Prefect Variables.

Lifecycle flows run in other processes (the worker that executes deployments), so they cannot touch a
gateway's memory, and a gateway cannot see what a flow run did. Both sides meet in Prefect, which both reach:

- ``first_state__<cluster>__<model>``: the latest observation of a model on a cluster (cold, queued, starting,
  hot, failed), written by every lifecycle run (warm-up, scale-down, refresh-status, scale-down-idle,
  drain-cluster). Gateways poll them every ``FIRST_STATE_SYNC_S`` and adopt what is newer than what they know.
- ``first_gateway__<id>``: each gateway's own view, written every few seconds: in-flight requests and last use
  of each instance, the clusters it routes nothing to, and a heartbeat. ``scale-down-idle`` and
  ``drain-cluster`` read these to know what is idle and when a drain is complete.

Operators see both under Variables in the Prefect UI. The values are JSON documents (the models below).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger("first.bus")

STATE_PREFIX = "first_state__"
GATEWAY_PREFIX = "first_gateway__"
STATE_TAG = "first-state"
GATEWAY_TAG = "first-gateway"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())


def state_variable(cluster: str, model: str) -> str:
    return f"{STATE_PREFIX}{_slug(cluster)}__{_slug(model)}"


class Observation(BaseModel):
    """What a lifecycle run saw of one model on one cluster."""

    cluster: str
    model: str
    state: str = Field(description="cold | queued | starting | hot | failed")
    base_url: str | None = None
    detail: str | None = None
    ts: float = Field(default_factory=time.time)
    since: float | None = Field(default=None, description="When it entered this state (kept across observations)")
    source: str = Field(default="", description="Which flow run saw it")


class InstanceUse(BaseModel):
    state: str
    inflight: int = 0
    last_used: float | None = None
    hot_since: float | None = None
    # What autoscale reads (the last LOAD_WINDOW_S): requests waiting for a slot now, requests served, requests
    # refused after waiting their bound, and the median wait for a slot.
    waiting: int = 0
    requests_1m: int = 0
    refused_1m: int = 0
    queue_ms_p50: float | None = None


class GatewayReport(BaseModel):
    """One gateway's view of the instances it routes to."""

    gateway: str
    ts: float = Field(default_factory=time.time)
    instances: dict[str, InstanceUse] = Field(default_factory=dict, description='keyed "cluster/model"')
    maintenance: list[str] = Field(default_factory=list, description="clusters this gateway routes nothing to")

    def fresh(self, max_age_s: float, now: float | None = None) -> bool:
        return (now or time.time()) - self.ts <= max_age_s


async def _filter(prefix: str) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    docs: list[dict[str, Any]] = []
    async with get_client() as client:
        while True:  # the server answers at most 200 per request (PREFECT_API_DEFAULT_LIMIT)
            response = await client.request(
                "POST",
                "/variables/filter",  # type: ignore[arg-type]
                json={"variables": {"name": {"like_": prefix + "%"}}, "limit": 200, "offset": len(docs)},
            )  # "_" in like_ matches any character: the prefix is checked below
            page = response.json()
            docs += page
            if len(page) < 200:
                break
    return [v for v in docs if v["name"].startswith(prefix)]


async def publish(obs: Observation) -> None:
    """Record an observation, keeping ``since`` when the state did not change; never raises (a flow must not
    fail because Prefect's variables did)."""
    from prefect.variables import Variable

    name = state_variable(obs.cluster, obs.model)
    try:
        if obs.since is None:
            previous = await Variable.aget(name)
            same = isinstance(previous, dict) and previous.get("state") == obs.state and previous.get("since")
            obs.since = float(previous["since"]) if same else obs.ts  # type: ignore[index]
            if not same:
                record_transition(obs)
        await Variable.aset(name, obs.model_dump(mode="json"), overwrite=True, tags=[STATE_TAG])
    except Exception as exc:
        log.warning("could not publish %s on %s = %s (%s)", obs.model, obs.cluster, obs.state, exc)


def record_transition(obs: Observation) -> None:
    """Keep the change for allocation accounting (instance time: analytics/allocations.py)."""
    from analytics.allocations import InstanceEvent, append_event
    from core.settings import get_settings

    try:
        append_event(get_settings().instance_events_dir, InstanceEvent(obs.ts, obs.cluster, obs.model, obs.state))
    except OSError as exc:
        log.warning("could not record %s on %s becoming %s (%s)", obs.model, obs.cluster, obs.state, exc)


async def observations() -> list[Observation]:
    out = []
    for doc in await _filter(STATE_PREFIX):
        try:
            out.append(Observation.model_validate(doc["value"]))
        except Exception:
            log.warning("ignoring variable %s: not an observation", doc["name"])
    return out


async def observation(cluster: str, model: str) -> Observation | None:
    """The latest observation of one model on one cluster (None if none, or unreadable)."""
    from prefect.variables import Variable

    try:
        doc = await Variable.aget(state_variable(cluster, model))
        return Observation.model_validate(doc) if doc else None
    except Exception:
        return None


async def publish_gateway(report: GatewayReport) -> None:
    from prefect.variables import Variable

    await Variable.aset(
        GATEWAY_PREFIX + _slug(report.gateway), report.model_dump(mode="json"), overwrite=True, tags=[GATEWAY_TAG]
    )


async def gateway_reports(max_age_s: float = 60.0) -> list[GatewayReport]:
    """The reports of gateways alive in the last ``max_age_s`` (a stopped gateway's last report is ignored)."""
    out = []
    for doc in await _filter(GATEWAY_PREFIX):
        try:
            report = GatewayReport.model_validate(doc["value"])
        except Exception:
            continue
        if report.fresh(max_age_s):
            out.append(report)
    return out
