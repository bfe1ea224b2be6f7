"""The ``autoscale`` flow (every 30 s) and ``retire-instance``, the scale-in it starts (issue 17).

``autoscale`` reads each instance's state (the lifecycle observations) and the load every live gateway reports
(in flight, waiting for a slot, refused, median wait), decides per model with ``flows.autoscale_decisions`` and
acts through runs the UI shows on their own: a scale-out is a run of ``warm-up`` for the next instance of the
model ("m@1") on the chosen cluster; a scale-in is a run of ``retire-instance``, which marks the instance
draining (gateways stop sending it requests within seconds), waits for its requests in flight, then stops it.
Its artifact lists every model with its signals, the decision and why, including the bound that stopped one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from blocks.registry import Registry
from flows.autoscale_decisions import InstanceLoad, Memory, Policy, ScaleDecision, decide_model
from flows.fleet_decisions import md_table, utc
from flows.lifecycle_tasks import fleet, fleet_pairs, publish_state, resolve_cluster, resolve_model, stop_model
from serving import bus
from serving.bus import GatewayReport, Observation

MEMORY_VARIABLE = "first_autoscale"
REPORT_AGE_S = 60.0


def fleet_loads(
    registry: Registry, observations: list[Observation], reports: list[GatewayReport]
) -> dict[str, list[InstanceLoad]]:
    """Per model, each of its instances: the observed state, and the load the gateways report, summed."""
    seen = {(o.cluster, o.model): o for o in observations}
    out: dict[str, list[InstanceLoad]] = {}
    for cl, spec in fleet_pairs(registry):
        key = f"{cl.name}/{spec.instance_name}"
        uses = [r.instances[key] for r in reports if key in r.instances]
        obs = seen.get((cl.name, spec.instance_name))
        state = obs.state if obs is not None else next((u.state for u in uses), "cold")
        waits = [u.queue_ms_p50 for u in uses if u.queue_ms_p50 is not None]
        out.setdefault(spec.name, []).append(InstanceLoad(
            cl.name, spec.replica, state, inflight=sum(u.inflight for u in uses), waiting=sum(u.waiting for u in uses),
            refused_1m=sum(u.refused_1m for u in uses), queue_ms_p50=max(waits) if waits else None,
        ))  # fmt: skip
    return out


@task(name="read-autoscale-memory", cache_policy=NO_CACHE)
async def read_memory() -> dict[str, Memory]:
    from prefect.variables import Variable

    doc = await Variable.aget(MEMORY_VARIABLE, default={})
    return {m: Memory(**v) for m, v in (doc or {}).items() if isinstance(v, dict)}


@task(name="save-autoscale-memory", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
async def save_memory(memory: dict[str, Memory]) -> None:
    from prefect.variables import Variable

    doc = {m: dataclasses.asdict(v) for m, v in memory.items()}
    await Variable.aset(MEMORY_VARIABLE, doc, overwrite=True, tags=["first-autoscale"])


@flow(name="autoscale", log_prints=True)
async def autoscale(
    dry_run: bool = False,
    high: float = Policy.high,
    low: float = Policy.low,
    queue_ms_high: float = Policy.queue_ms_high,
    scale_in_after_s: float = Policy.scale_in_after_s,
    out_cooldown_s: float = Policy.out_cooldown_s,
    in_cooldown_s: float = Policy.in_cooldown_s,
) -> list[dict[str, Any]]:
    """Scale each model out or in from the gateways' load: another instance (on this cluster or the next best)
    when it is under pressure, one fewer after a sustained quiet spell; min_instances kept up.

    Args:
        dry_run: Only decide and report; start and stop nothing.
        high: Scale out at or above this utilization ((in flight + waiting) / (hot instances x max_concurrency)).
        low: Scale in at or below this utilization, once it lasted scale_in_after_s.
        queue_ms_high: Scale out when the median wait for a slot reaches this (milliseconds).
        scale_in_after_s: How long utilization stays low before one instance is retired.
        out_cooldown_s: No second scale-out of a model within this many seconds.
        in_cooldown_s: No scale-in of a model within this many seconds of its last scale action.
    """
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    policy = Policy(high, low, queue_ms_high, scale_in_after_s, out_cooldown_s, in_cooldown_s)
    registry = await fleet().current_registry()
    observations = await bus.observations()
    reports = await bus.gateway_reports(REPORT_AGE_S)
    loads = fleet_loads(registry, observations, reports)
    cluster_running: dict[str, int] = {}
    for instances in loads.values():
        for i in instances:
            if i.state in ("hot", "starting", "queued"):
                cluster_running[i.cluster] = cluster_running.get(i.cluster, 0) + 1
    memory = await read_memory()
    now = time.time()
    decisions: list[ScaleDecision] = []
    for model, instances in loads.items():
        mem = memory.setdefault(model, Memory())
        before = dataclasses.replace(mem)
        d = decide_model(registry, model, instances, mem, now, policy, cluster_running)
        if d.action != "keep" and dry_run:
            memory[model] = before  # a dry run remembers nothing it did not do
            d.reason += " (dry run: not done)"
        elif d.action == "out":
            run = await run_deployment("warm-up/warm-up", parameters={"model": d.instance, "cluster": d.cluster},
                                       timeout=0, tags=["autoscale"])  # fmt: skip
            d.reason += f" -> run {run.name}"
        elif d.action == "in":
            run = await run_deployment("retire-instance/retire-instance", timeout=0, tags=["autoscale"],
                                       parameters={"model": d.instance, "cluster": d.cluster})  # fmt: skip
            d.reason += f" -> run {run.name}"
        logger.info("%s: %s%s: %s", model, d.action, f" {d.instance} on {d.cluster}" if d.cluster else "", d.reason)
        decisions.append(d)
    await save_memory(memory)
    rows = [[d.model, d.action, f"{d.instance} on {d.cluster}" if d.cluster else "-", d.signals.get("hot"),
             d.signals.get("utilization"), d.signals.get("in_flight+waiting"), d.signals.get("refused_1m"),
             d.signals.get("queue_ms_p50"), d.reason] for d in decisions]  # fmt: skip
    header = ["model", "action", "instance", "hot", "utilization", "in flight + waiting", "refused (1 min)",
              "wait p50 ms", "why"]  # fmt: skip
    await create_markdown_artifact(
        key="autoscale",
        markdown=f"### Autoscale at {utc()}{' (dry run)' if dry_run else ''}\n\n"
        + md_table(header, rows)
        + f"\nBand [{low}, {high}]; scale in after {scale_in_after_s:.0f} s low; cooldowns {out_cooldown_s:.0f} s "
        f"(out), {in_cooldown_s:.0f} s (in). Load from {len(reports)} live gateway report(s).\n",
        description="each model's load and what autoscale did about it",
    )
    return [dataclasses.asdict(d) for d in decisions]


@flow(name="retire-instance", log_prints=True)
async def retire_instance(model: str, cluster: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Scale in by one instance: mark it draining (gateways stop sending it requests), wait until no gateway
    has a request in flight on it (at most timeout_s), then stop it.

    Args:
        model: The instance, as autoscale and the fleet status name it ("m@1"), or a model's first ("m").
        cluster: The cluster it runs on.
        timeout_s: The longest wait for its requests in flight; past it, it is stopped anyway.
    """
    logger = get_run_logger()
    registry, spec = await resolve_model(model)
    cl = resolve_cluster(registry, spec, cluster)
    key = f"{cl.name}/{spec.instance_name}"
    await publish_state(cl.name, spec.instance_name, "draining", detail="retired by autoscale")
    t0 = time.monotonic()
    inflight = -1
    while time.monotonic() - t0 < timeout_s:
        reports = await bus.gateway_reports(REPORT_AGE_S)
        uses = [r.instances[key] for r in reports if key in r.instances]
        inflight = sum(u.inflight for u in uses)
        routing = [u for u in uses if u.state != "draining"]  # a gateway that has not seen it yet
        if inflight == 0 and not routing:
            break
        await asyncio.sleep(1.0)
    waited = time.monotonic() - t0
    if inflight:
        logger.warning("%s on %s: %d request(s) still in flight after %.0f s; stopping it anyway", spec.instance_name,
                       cl.name, inflight, waited)  # fmt: skip
    result = await stop_model(spec, cl, f"retired by autoscale after a {waited:.0f} s drain")
    await create_markdown_artifact(
        key="retire-instance",
        markdown=f"### Retired `{spec.instance_name}` on `{cl.name}` at {utc()}\n\nDrained in {waited:.1f} s; "
        f"{result['result']}.\n",
        description=f"scale-in of {spec.instance_name} on {cl.name}",
    )
    return {"model": spec.instance_name, "cluster": cl.name, "drained_s": waited, **result}
