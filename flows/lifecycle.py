"""Model lifecycle as Prefect flows: operators run them from the UI (deployments in prefect.yaml), two run on a
schedule (refresh-status, scale-down-idle), and the gateway runs ``warm_up`` itself when a request finds its
model cold (``flows/control_plane.py``).

Each flow is made of tasks (``flows/lifecycle_tasks.py``) that the Prefect UI shows as its steps; each publishes
what it causes or sees through ``serving.bus`` (gateways adopt it within a few seconds) and leaves a markdown
summary artifact on its run. The decisions are pure functions in ``flows/fleet_decisions.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, State

from blocks.registry import ClusterSpec, ModelSpec, Registry, _slug
from core.stopping import STOPPED_MESSAGE
from flows.fleet_decisions import (
    IdleDecision,
    artifact_key,
    cell,
    drain_progress,
    idle_decision,
    md_table,
    pick_best_cluster,
    utc,
)
from flows.lifecycle_tasks import (
    Probe,
    StillQueued,
    backend_of,
    check_status,
    fleet,
    fleet_pairs,
    follow_queued_start,
    login_backend,
    probe_fleet,
    publish_observations,
    publish_state,
    resolve_cluster,
    resolve_model,
    source,
    stop_model,
    submit_start,
    wait_until_healthy,
)
from flows.parameter_choices import offer_choices
from flows.predictive import busy_models
from serving import bus

IDLE_REPORT_AGE_S = 60.0  # gateway reports older than this are ignored by scale-down-idle
DRAIN_REPORT_AGE_S = 30.0  # ... and by drain-cluster


@flow(name="warm-up", log_prints=True)
async def warm_up(model: str = "tiny", cluster: str = "best", timeout_s: float | None = None) -> dict[str, Any]:
    """Start a model's vLLM server on a cluster and wait until it answers /health.

    Args:
        model: Model name or alias, as callers of the OpenAI API name it.
        cluster: Cluster to run it on; "best" picks where it is already hot, else where it is already starting
            or queued, else the cluster out of maintenance with the smallest expected start time.
        timeout_s: Bound on the whole warm-up in seconds (default: FIRST_WARM_UP_TIMEOUT_S); past it the server
            is stopped and the run fails.

    When the stack stops under it (Ctrl-C), the run ends as Cancelled with a message that says so (a caller
    gets ``prefect.exceptions.CancelledRun``).
    """
    logger = get_run_logger()
    registry, spec = await resolve_model(model)
    if cluster in ("", "best"):
        cluster, why = pick_best_cluster(spec, registry, await bus.observations())
        logger.info("best cluster for %s: %s (%s)", spec.instance_name, cluster, why)
    cl = resolve_cluster(registry, spec, cluster)
    bound = timeout_s or fleet().settings.warm_up_timeout_s
    try:
        return await _warm(spec, cl, bound)
    except StillQueued:
        raise  # the other run's "queued" stands
    except Exception as exc:
        await publish_state(cl.name, spec.instance_name, "failed", detail=f"warm-up failed: {exc}")
        raise


async def _warm(spec: ModelSpec, cl: ClusterSpec, bound: float) -> dict[str, Any] | State:
    """check-status -> (submit-start) -> wait-until-healthy -> publish-state "hot", within ``bound`` seconds.
    A wait that ends because the stack stops returns its Cancelled state, which the run ends in."""
    logger = get_run_logger()
    t0 = time.monotonic()
    if cl.scheduler != "none" and await follow_queued_start(spec, cl, t0, bound) is not None:
        return Cancelled(message=STOPPED_MESSAGE)
    status = await check_status(cl, spec)
    job = status.get("job_id")
    queue_wait_s = 0.0
    if status["state"] == "hot":
        logger.info("%s on %s is already hot at %s", spec.instance_name, cl.name, status.get("base_url"))
        await publish_state(cl.name, spec.instance_name, "hot", status.get("base_url"))
        await create_markdown_artifact(
            key=artifact_key("warm-up", spec.instance_name),
            markdown=f"### Warm-up of `{spec.instance_name}` on `{cl.name}`\n\nAlready hot at "
            f"{status.get('base_url')}.\n",
            description=f"warm-up of {spec.instance_name} on {cl.name}",
        )
        return {**status, "cluster": cl.name, "load_s": 0.0, "queue_wait_s": 0.0}
    if status["state"] == "starting":
        logger.info("%s on %s is already starting; waiting for it (bound %.0f s)", spec.instance_name, cl.name, bound)
        await publish_state(cl.name, spec.instance_name, "starting", status.get("base_url"))
    else:
        status = await submit_start(spec, cl, t0, bound)
        queue_wait_s = time.monotonic() - t0
        job = status.get("job_id")
        if status["state"] != "hot":
            await publish_state(cl.name, spec.instance_name, "starting", status.get("base_url"))
    left = max(1.0, bound - (time.monotonic() - t0))
    try:
        status = await wait_until_healthy.with_options(timeout_seconds=left)(spec, cl, status)
    except TimeoutError:
        await backend_of(cl).stop(spec)
        raise TimeoutError(
            f"{spec.instance_name} did not become healthy on {cl.name} within {bound:.0f} s; stopped it"
        ) from None
    if isinstance(status, State):  # the wait's Cancelled state: this one, with its message, is the run's
        logger.warning("warm-up of %s on %s cancelled: the stack is stopping", spec.instance_name, cl.name)
        return Cancelled(message=STOPPED_MESSAGE)
    load_s = time.monotonic() - t0
    logger.info("%s on %s is hot at %s after %.1f s", spec.instance_name, cl.name, status.get("base_url"), load_s)
    await publish_state(cl.name, spec.instance_name, "hot", status.get("base_url"))
    row = [
        cl.name,
        spec.instance_name,
        status.get("host"),
        job,
        status.get("pid"),
        f"{queue_wait_s:.1f} s",
        f"{load_s:.1f} s",
    ]
    await create_markdown_artifact(
        key=artifact_key("warm-up", spec.instance_name),
        markdown=f"### Warm-up of `{spec.instance_name}` on `{cl.name}`\n\n"
        + md_table(["cluster", "model", "host", "batch job", "pid", "queue wait", "load time (total)"], [row]),
        description=f"warm-up of {spec.instance_name} on {cl.name}",
    )
    return {**status, "cluster": cl.name, "load_s": load_s, "queue_wait_s": queue_wait_s}


@flow(name="scale-down", log_prints=True)
async def scale_down(model: str = "tiny", cluster: str = "all") -> dict[str, Any]:
    """Stop a model's vLLM server on one cluster or on all of its clusters, and cancel the batch job that held
    the node (clusters with a login endpoint).

    Args:
        model: Model name or alias (every instance of it), or one instance ("m@1": its second one).
        cluster: Cluster to stop it on; "all" stops it on every cluster of the model.
    """
    logger = get_run_logger()
    registry, spec = await resolve_model(model)
    targets = [c for c in spec.clusters if c in registry.clusters] if cluster == "all" else [cluster]
    clusters = [resolve_cluster(registry, spec, c) for c in targets]
    one_instance = "@" in model
    pairs = [(cl, spec if one_instance else spec.as_replica(n)) for cl in clusters
             for n in ([spec.replica] if one_instance else range(spec.instance_bounds(cl.name)[1]))]  # fmt: skip
    logger.info("stopping %s on %s", spec.instance_name if one_instance else f"every instance of {spec.name}",
                ", ".join(c.name for c in clusters))  # fmt: skip

    async def one(cl: ClusterSpec, instance: ModelSpec) -> dict[str, Any]:
        try:
            return await stop_model(instance, cl, f"scale-down by {source()}")
        except Exception as exc:
            logger.error("%s on %s: stop failed: %s", instance.instance_name, cl.name, exc)
            return {"stopped": False, "result": f"stop failed: {exc}", "error": str(exc)}

    done = await asyncio.gather(*(one(cl, inst) for cl, inst in pairs))
    results = {}
    for (cl, inst), r in zip(pairs, done, strict=True):
        key = cl.name if inst.replica == 0 else f"{cl.name} ({inst.instance_name})"
        if inst.replica == 0 or r.get("stopped") or "error" in r:  # further instances that were not running: quiet
            results[key] = r
    await create_markdown_artifact(
        key=artifact_key("scale-down", spec.instance_name),
        markdown=f"### Scale-down of `{spec.instance_name}`\n\n"
        + md_table(["cluster", "result"], [[c, r["result"]] for c, r in results.items()]),
        description=f"scale-down of {spec.instance_name}",
    )
    failed = [c for c, r in results.items() if "error" in r]
    if failed:
        raise RuntimeError(f"could not stop {spec.instance_name} on {', '.join(failed)}: see the log")
    return {
        "model": spec.instance_name,
        "stopped": any(r.get("stopped") for r in results.values()),
        "clusters": results,
    }


@flow(name="refresh-status", log_prints=True)
async def refresh_status(timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Check every model on every one of its clusters and publish what is there, so that gateways and the
    "fleet-status" artifact show the truth (a server that died, one started by hand, a batch job still queued).

    Args:
        timeout_s: Bound on each status check in seconds; a cluster that does not answer in time counts as
            failed, with the reason as its detail.
    """
    logger = get_run_logger()
    registry = await fleet().current_registry()
    try:  # the lifecycle deployments' drop-downs follow registry edits made in the UI
        await offer_choices(registry)
    except Exception as exc:
        logger.warning("could not update the deployments' model and cluster choices: %s", exc)
    pairs = fleet_pairs(registry)
    logger.info("checking %d model/cluster pair(s)", len(pairs))
    previous = {(o.cluster, o.model): o for o in await bus.observations()}
    probes = await probe_fleet(pairs, timeout_s)
    observed = await publish_observations(probes, previous)
    for o in observed:
        logger.info("%s on %s: %s%s", o.model, o.cluster, o.state, f" ({cell(o.detail, 200)})" if o.detail else "")
    await create_markdown_artifact(
        key="fleet-status",
        markdown=f"### Fleet status at {utc()}\n\n"
        + md_table(
            ["cluster", "model", "state", "base_url", "detail", "since"],
            [[o.cluster, o.model, o.state, o.base_url, o.detail, utc(o.since) if o.since else None] for o in observed],
        ),
        description="each model on each cluster, as refresh-status saw it",
    )
    return [o.model_dump(mode="json") for o in observed]


@flow(name="scale-down-idle", log_prints=True)
async def scale_down_idle(dry_run: bool = False) -> list[dict[str, Any]]:
    """Stop every model server that nobody used for longer than its model's idle_timeout_s (0: never) and has
    no request in flight, judging by what the live gateways report.

    Args:
        dry_run: Only decide and report; stop nothing.
    """
    logger = get_run_logger()
    registry = await fleet().current_registry()
    previous = {(o.cluster, o.model): o for o in await bus.observations()}
    probes = await probe_fleet(fleet_pairs(registry), 30.0)
    observed = {(o.cluster, o.model): o for o in await publish_observations(probes, previous)}
    hot = [
        p
        for p in probes
        if p.status["state"] == "hot"
        or (p.error and getattr(previous.get((p.cluster.name, p.model.instance_name)), "state", None) == "hot")
    ]
    reports = await bus.gateway_reports(IDLE_REPORT_AGE_S)
    logger.info("%d hot model server(s); %d live gateway report(s)", len(hot), len(reports))
    try:  # a model in a busy hour its usage history predicts stays up (flows/predictive.py)
        busy = await busy_models(registry, probes)
    except Exception as exc:
        logger.warning("no forecast of busy hours (%s): idle time alone decides", exc)
        busy = set()
    decisions: list[IdleDecision] = []
    for p in hot:
        o = observed.get((p.cluster.name, p.model.instance_name))
        since = o.since if o is not None and o.state == "hot" else None
        d = idle_decision(p.cluster.name, p.model.instance_name, p.model.idle_timeout_s, reports, since, time.time())
        if d.stop and not backend_of(p.cluster).manages_lifecycle:
            d.stop, d.action = False, "keep: managed outside FIRST"
        if d.stop and p.model.replica < p.model.instance_bounds(p.cluster.name)[0]:
            d.stop, d.action = False, "keep: within the model's min_instances (the always-hot tier)"
        if d.stop and p.model.name in busy:
            d.stop, d.action = False, "keep: a busy hour is predicted (predictive-warm-up)"
        if d.stop and not dry_run:
            # Reports are a few seconds old: look again right before stopping, in case a request came in.
            d = idle_decision(p.cluster.name, p.model.instance_name, p.model.idle_timeout_s,
                              await bus.gateway_reports(IDLE_REPORT_AGE_S), since, time.time())  # fmt: skip
            if d.stop:
                try:
                    result = await stop_model(p.model, p.cluster, f"idle {d.idle_s:.0f} s > {d.limit_s} s")
                    d.action = result["result"]
                except Exception as exc:
                    logger.error("%s on %s: stop failed: %s", p.model.instance_name, p.cluster.name, exc)
                    d.action = f"stop failed: {exc}"
        elif d.stop:
            d.action = "would stop (dry run)"
        logger.info("%s on %s: idle %s (%s), limit %s s, %d in flight: %s", d.model, d.cluster,
                    "?" if d.idle_s is None else f"{d.idle_s:.0f} s", d.reference, d.limit_s, d.inflight,
                    d.action)  # fmt: skip
        decisions.append(d)
    rows = [[d.cluster, d.model, "?" if d.idle_s is None else round(d.idle_s), d.limit_s, d.action] for d in decisions]
    await create_markdown_artifact(
        key="scale-down-idle",
        markdown=f"### Scale-down of idle models at {utc()}{' (dry run)' if dry_run else ''}\n\n"
        + md_table(["cluster", "model", "idle s", "limit s", "action"], rows)
        + ("\nNo hot model servers.\n" if not decisions else "")
        + f"\nIdle time counts from the last request a live gateway reports ({len(reports)} report(s)).\n",
        description="idle model servers and what scale-down-idle did with them",
    )
    return [d.__dict__ for d in decisions]


@task(name="enter-maintenance", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
async def enter_maintenance(cluster: str) -> ClusterSpec:
    """Set ``maintenance`` in the cluster's block: gateways stop routing new requests to it within seconds."""
    from blocks.registry import ClusterBlock

    slug = _slug(cluster)
    try:
        block = await ClusterBlock.aload(slug)
    except ValueError as exc:
        raise ValueError(f"no FIRST Cluster block {slug!r} for cluster {cluster!r}: {exc}") from exc
    spec: ClusterSpec = block.spec  # type: ignore[attr-defined]
    spec.maintenance = True
    spec.maintenance_message = f"drained by {source()} at {utc()}"
    await block.asave(slug, overwrite=True)
    return spec


@task(name="wait-for-drain", cache_policy=NO_CACHE)
async def wait_for_drain(cluster: str) -> float:
    """Wait until every live gateway routes nothing to the cluster and nothing is in flight there; seconds waited.
    Its bound is the task's timeout, set by the flow (``timeout_s``)."""
    logger = get_run_logger()
    t0 = time.monotonic()
    last_log = -1e9
    last_seen: tuple[list[str], int] | None = None
    while True:
        reports = await bus.gateway_reports(DRAIN_REPORT_AGE_S)
        if not reports:
            logger.info("no live gateway reports (none in the last %.0f s): nothing routes to %s; proceeding",
                        DRAIN_REPORT_AGE_S, cluster)  # fmt: skip
            return time.monotonic() - t0
        waiting, inflight = drain_progress(reports, cluster)
        if not waiting and inflight == 0:
            logger.info("all %d live gateway(s) route nothing to %s and nothing is in flight there",
                        len(reports), cluster)  # fmt: skip
            return time.monotonic() - t0
        if (waiting, inflight) != last_seen or time.monotonic() - last_log >= 10:
            pending = f"; waiting for gateway(s) {', '.join(waiting)} to see the maintenance" if waiting else ""
            logger.info("%d requests still in flight on cluster %s%s", inflight, cluster, pending)
            last_seen, last_log = (waiting, inflight), time.monotonic()
        await asyncio.sleep(1)


@flow(name="drain-cluster", log_prints=True)
async def drain_cluster(cluster: str, timeout_s: float = 600, scale_down: bool = True) -> dict[str, Any]:
    """Put a cluster in maintenance: gateways stop routing new requests to it, the run waits until the requests
    in flight there have finished, then (by default) stops every model server on it. To bring it back, clear
    `maintenance` in its FIRST Cluster block.

    Args:
        cluster: Name of the cluster to drain (as in its FIRST Cluster block).
        timeout_s: How long to wait for requests in flight to finish, in seconds; past it the run fails and the
            cluster stays in maintenance.
        scale_down: Stop every model server on the cluster once it is drained.
    """
    logger = get_run_logger()
    spec = await enter_maintenance(cluster)
    slug = _slug(cluster)
    back = f"to bring it back, clear `maintenance` in the FIRST Cluster block `{slug}` (Prefect UI: Blocks)"
    logger.info("cluster %s is in maintenance (%s); %s", cluster, spec.maintenance_message, back)
    try:
        waited = await wait_for_drain.with_options(timeout_seconds=timeout_s)(cluster)
    except TimeoutError:
        waiting, inflight = drain_progress(await bus.gateway_reports(DRAIN_REPORT_AGE_S), cluster)
        await create_markdown_artifact(
            key=artifact_key("drain", cluster),
            markdown=f"### Drain of `{cluster}` timed out after {timeout_s:g} s\n\n"
            f"{inflight} request(s) still in flight; gateways not yet routing around it: "
            f"{', '.join(waiting) or 'none'}. The cluster stays in maintenance; {back}.\n",
            description=f"drain of cluster {cluster}",
        )
        raise TimeoutError(
            f"{inflight} request(s) still in flight on cluster {cluster} after {timeout_s:g} s "
            f"(gateways not yet in maintenance: {waiting or 'none'}); it stays in maintenance"
        ) from None

    stopped: dict[str, str] = {}
    if scale_down:
        registry = await Registry.load(fleet().settings)
        cl = registry.clusters.get(cluster, spec)
        models = [m for _, m in fleet_pairs(registry, cluster)]  # every instance of every model there
        logger.info("stopping %d model instance(s) on %s: %s", len(models), cluster,
                    ", ".join(m.instance_name for m in models))  # fmt: skip

        async def one(m: ModelSpec) -> str:
            try:
                return (await stop_model(m, cl, f"drain by {source()}"))["result"]
            except Exception as exc:
                logger.error("%s on %s: stop failed: %s", m.instance_name, cluster, exc)
                return f"stop failed: {exc}"

        results = await asyncio.gather(*(one(m) for m in models))
        stopped = {m.instance_name: r for m, r in zip(models, results, strict=True)}
    await create_markdown_artifact(
        key=artifact_key("drain", cluster),
        markdown=f"### Drain of `{cluster}`\n\n"
        f"In maintenance ({spec.maintenance_message}); the drain waited {waited:.1f} s for the requests in flight "
        "to finish.\n\n"
        + (md_table(["model", "result"], stopped.items()) if scale_down else "Model servers left running.\n")
        + f"\nThe cluster stays in maintenance: {back}.\n",
        description=f"drain of cluster {cluster}",
    )
    failed = [m for m, r in stopped.items() if r.startswith("stop failed")]
    if failed:
        raise RuntimeError(f"drained {cluster} but could not stop {', '.join(failed)}: see the log")
    return {"cluster": cluster, "maintenance": True, "waited_s": waited, "stopped": stopped}


@flow(name="model-status", log_prints=True)
async def model_status(model: str = "tiny", cluster: str = "best") -> dict[str, Any]:
    """Report whether a model is cold, queued, starting, hot or failed on a cluster, with its compute endpoint
    and batch job where it has them.

    Args:
        model: Model name or alias.
        cluster: Cluster to look at; "best" is the one a warm-up would pick.
    """
    registry, spec = await resolve_model(model)
    seen = await bus.observations()
    if cluster in ("", "best"):
        cluster, _ = pick_best_cluster(spec, registry, seen)
    cl = resolve_cluster(registry, spec, cluster)
    backend = backend_of(cl)
    status = await check_status(cl, spec)
    if hasattr(backend, "endpoint_status"):  # clusters reached through a compute endpoint
        status["endpoint"] = await backend.endpoint_status()
    job = status.get("job_id")
    if job and cl.scheduler != "none" and cl.login_endpoint_id:  # what the batch scheduler says of its job
        from compute.scheduler import model_job_state

        report = await login_backend(cl).call("scheduler_status", cl.scheduler, [job], timeout=60)
        status["job"] = {"id": job, "state": model_job_state(report["jobs"].get(job)), "error": report["error"]}
    previous = {(o.cluster, o.model): o for o in seen}
    [obs] = await publish_observations([Probe(cl, spec, status, False)], previous)
    status["cluster"] = cl.name
    get_run_logger().info("%s on %s: %s (endpoint: %s)", spec.instance_name, cl.name, obs.state, status.get("endpoint"))
    endpoint, job_state = (status.get("endpoint") or {}).get("status"), (status.get("job") or {}).get("state") or job
    row = [cl.name, spec.instance_name, obs.state, obs.base_url, endpoint, job_state, obs.detail]
    await create_markdown_artifact(
        key=artifact_key("model-status", spec.instance_name),
        markdown=f"### `{spec.instance_name}` on `{cl.name}` at {utc()}\n\n"
        + md_table(["cluster", "model", "state", "base_url", "endpoint", "batch job", "detail"], [row]),
        description=f"status of {spec.instance_name} on {cl.name}",
    )
    return status
