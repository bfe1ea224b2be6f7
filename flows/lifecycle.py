"""Model lifecycle as Prefect flows: operators run them from the UI (deployments in prefect.yaml), two run on a
schedule (refresh-status, scale-down-idle), and the gateway runs ``warm_up`` itself when a request finds its
model cold.

Every flow publishes what it causes or sees through ``flows.bus`` (gateways adopt it within a few seconds),
logs each step, and leaves a markdown summary artifact on its run. The decisions (which cluster is best, what
is idle, when a drain is complete) are small pure functions, tested without Prefect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from blocks.registry import ClusterSpec, ModelSpec, Registry
from compute.backends import Backends
from first.settings import Settings, get_settings
from flows import bus
from flows.bus import GatewayReport, Observation

# The process's backends: the gateway installs its own (sharing its local endpoint); a worker process
# running a deployment creates them on first use.
_backends: Backends | None = None
_registry: Registry | None = None

QUEUED_FRESH_S = 90.0  # a "queued" observation not renewed for this long is stale (its warm-up is gone)
QUEUED_RENEW_S = 15.0  # how often a warm-up waiting in a batch queue renews its "queued" observation
IDLE_REPORT_AGE_S = 60.0  # gateway reports older than this are ignored by scale-down-idle
DRAIN_REPORT_AGE_S = 30.0  # ... and by drain-cluster


def install(backends: Backends, registry: Registry) -> None:
    """Let flows run inside the gateway reuse its backends and registry snapshot."""
    global _backends, _registry
    _backends, _registry = backends, registry


# ---- decisions (pure: no Prefect, no I/O) ----


def pick_best_cluster(
    spec: ModelSpec, registry: Registry, observations: Iterable[Observation], now: float | None = None
) -> tuple[str, str]:
    """Where a warm-up with cluster "best" goes: ``(cluster, why)``.

    Among the model's clusters that are declared and not in maintenance: one where it is already hot, else one
    where it is starting or queued (a fresh observation), else the one with the smallest ``expected_start_s``
    (one whose last observation is "failed" only if nothing else is left). Ties go to the model's cluster order.
    Raises ``ValueError`` when every cluster of the model is in maintenance or undeclared.
    """
    now = time.time() if now is None else now
    candidates = [c for c in spec.clusters if c in registry.clusters and not registry.clusters[c].maintenance]
    if not candidates:
        raise ValueError(
            f"model {spec.name!r} has no cluster to run on: its clusters {spec.clusters} are in maintenance or "
            "undeclared"
        )
    seen = {o.cluster: o for o in observations if o.model == spec.name and o.cluster in candidates}
    for state in ("hot", "starting", "queued"):
        for c in candidates:
            o = seen.get(c)
            if o is not None and o.state == state and (state != "queued" or now - o.ts <= QUEUED_FRESH_S):
                return c, f"already {state} there"
    best = min(
        candidates,
        key=lambda c: (getattr(seen.get(c), "state", None) == "failed", registry.clusters[c].expected_start_s),
    )
    return best, f"smallest expected start ({registry.clusters[best].expected_start_s:g} s) out of maintenance"


def observed_state(status_state: str, previous: Observation | None, cluster: ClusterSpec, now: float) -> str:
    """The state to publish for what a status check saw. The check wins (a local "cold" replaces a stale
    "starting"), except on a batch cluster while a warm-up still renews its "queued": the vLLM process does not
    exist until the batch job runs, so "cold" is exactly what queued looks like from outside."""
    if (
        status_state == "cold"
        and previous is not None
        and previous.state == "queued"
        and cluster.scheduler != "none"
        and now - previous.ts <= QUEUED_FRESH_S
    ):
        return "queued"
    return status_state


@dataclass
class IdleDecision:
    cluster: str
    model: str
    idle_s: float | None
    limit_s: int
    inflight: int
    reference: str  # what idle_s counts from
    stop: bool
    action: str


def idle_decision(
    cluster: str,
    model: str,
    limit_s: int,
    reports: Iterable[GatewayReport],
    observed_since: float | None,
    now: float,
) -> IdleDecision:
    """Should scale-down-idle stop ``model`` on ``cluster`` (known to be hot)?

    Idle time counts from the latest request any live gateway reports (``last_used``); else from when a gateway
    saw it become hot (``hot_since``); else from when a lifecycle run saw it become hot (``observed_since``).
    If a gateway saw it become hot after its last request (a restart), from then. In-flight requests are summed
    over the gateways; any keeps it. ``limit_s`` 0 means never.
    """
    key = f"{cluster}/{model}"
    uses = [r.instances[key] for r in reports if key in r.instances]
    inflight = sum(u.inflight for u in uses)
    last_used = max((u.last_used for u in uses if u.last_used), default=None)
    hot_since = max((u.hot_since for u in uses if u.hot_since), default=None)
    if last_used is not None and (hot_since is None or last_used >= hot_since):
        ref, reference = last_used, "last request"
    elif hot_since is not None:
        ref, reference = hot_since, "hot since (gateway)"
    elif observed_since is not None:
        ref, reference = observed_since, "hot since (observed)"
    else:
        ref, reference = None, "unknown"
    idle_s = None if ref is None else max(0.0, now - ref)

    def decide(stop: bool, action: str) -> IdleDecision:
        return IdleDecision(cluster, model, idle_s, limit_s, inflight, reference, stop, action)

    if limit_s == 0:
        return decide(False, "keep: idle_timeout_s is 0 (never scaled down)")
    if inflight > 0:
        return decide(False, f"keep: {inflight} request(s) in flight")
    if idle_s is None:
        return decide(False, "keep: no idle reference")
    if idle_s <= limit_s:
        return decide(False, f"keep: idle {idle_s:.0f} s of {limit_s} s")
    return decide(True, "stop")


def drain_progress(reports: Iterable[GatewayReport], cluster: str) -> tuple[list[str], int]:
    """``(gateways that still route to the cluster, requests in flight on it)`` from live gateway reports."""
    reports = list(reports)
    waiting = [r.gateway for r in reports if cluster not in r.maintenance]
    inflight = sum(u.inflight for r in reports for key, u in r.instances.items() if key.partition("/")[0] == cluster)
    return waiting, inflight


# ---- helpers ----


def _source() -> str:
    from prefect.runtime import flow_run

    return flow_run.name or "lifecycle"


def _utc(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits and dashes)."""
    raw = "-".join(parts).lower()
    return "-".join(p for p in "".join(c if c.isalnum() else "-" for c in raw).split("-") if p)


def _cell(value: Any, width: int = 80) -> str:
    """One markdown table cell."""
    if value is None or value == "":
        return "-"
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(detail: Any, width: int = 500) -> str | None:
    if not detail:
        return None
    text = str(detail)
    return text if len(text) <= width else "…" + text[-width:]


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


async def _registry_now(settings: Settings) -> Registry:
    return _registry or await Registry.load(settings)


async def _model(model: str) -> tuple[Settings, Registry, ModelSpec]:
    settings = get_settings()
    registry = await _registry_now(settings)
    spec = registry.resolve(model)
    if spec is None:
        raise ValueError(f"unknown model {model!r}; known: {sorted(registry.models)}")
    return settings, registry, spec


def _cluster(registry: Registry, spec: ModelSpec, cluster: str) -> ClusterSpec:
    if cluster not in registry.clusters or cluster not in spec.clusters:
        raise ValueError(f"model {spec.name!r} is not served on cluster {cluster!r}; it is on {spec.clusters}")
    return registry.clusters[cluster]


def _backend(settings: Settings, cl: ClusterSpec) -> Any:
    global _backends
    if _backends is None:
        _backends = Backends(settings)
    return _backends.get(cl)


def _login_backend(cl: ClusterSpec) -> Any:
    """The cluster's login-node endpoint (reads and cancels batch jobs), as a backend of its own."""
    login = cl.model_copy(update={"name": f"{cl.name}-login", "endpoint_id": cl.login_endpoint_id})
    return _backends.get(login)  # type: ignore[union-attr]


async def _publish(cl: str, model: str, state: str, base_url: str | None = None, detail: Any = None) -> Observation:
    obs = Observation(cluster=cl, model=model, state=state, base_url=base_url, detail=_short(detail), source=_source())
    await bus.publish(obs)
    return obs


async def _stop(settings: Settings, spec: ModelSpec, cl: ClusterSpec, why: str) -> dict[str, Any]:
    """Stop the model on a cluster, cancel the batch job that held its node (when the cluster has a login
    endpoint), and publish "cold". Returns the backend's answer plus ``result`` (a word for the artifact)."""
    logger = get_run_logger()
    backend = _backend(settings, cl)
    if not backend.manages_lifecycle:
        logger.info("%s on %s: not stopped, the cluster's server is managed outside FIRST", spec.name, cl.name)
        return {"stopped": False, "result": "managed outside FIRST"}
    try:
        before = await backend.status(spec)
    except Exception as exc:  # stop anyway: the status check is only for the batch job's id
        logger.warning("%s on %s: status before stopping failed (%s)", spec.name, cl.name, exc)
        before = {}
    result = await backend.stop(spec)
    stopped = bool(result.get("stopped"))
    logger.info("%s on %s: %s (%s)", spec.name, cl.name, "stopped" if stopped else "was not running", why)
    result["result"] = "stopped" if stopped else "was not running"
    job = before.get("job_id")
    if job and cl.scheduler != "none" and cl.login_endpoint_id:
        # Release the node now rather than after the endpoint's idle time: cancel the batch job that held it.
        cancelled = await _login_backend(cl).call("cancel_job", cl.scheduler, job, timeout=60)
        logger.info("%s: batch job %s %s", cl.name, job,
                    "cancelled" if cancelled["cancelled"] else f"not cancelled: {cancelled['error']}")  # fmt: skip
        result["job_cancelled"] = cancelled
        result["result"] += f"; job {job} " + ("cancelled" if cancelled["cancelled"] else "not cancelled")
    elif job:
        logger.info(
            "%s: batch job %s stays until the endpoint's idle time ends it (no login_endpoint_id)", cl.name, job
        )
    await _publish(cl.name, spec.name, "cold", detail=f"{result['result']} ({why})")
    return result


@dataclass
class _Probe:
    cluster: ClusterSpec
    model: ModelSpec
    status: dict[str, Any]
    error: bool  # the status check itself failed (timeout, endpoint unreachable)


async def _probe(settings: Settings, pairs: list[tuple[ClusterSpec, ModelSpec]], timeout_s: float) -> list[_Probe]:
    """Status of each (cluster, model), concurrently, each bounded by ``timeout_s``; a failed check is state
    "failed" with the reason as its detail."""

    async def one(cl: ClusterSpec, spec: ModelSpec) -> _Probe:
        try:
            status = await asyncio.wait_for(_backend(settings, cl).status(spec), timeout_s)
            return _Probe(cl, spec, status, False)
        except TimeoutError:
            return _Probe(cl, spec, {"state": "failed", "detail": f"no status within {timeout_s:g} s"}, True)
        except Exception as exc:
            return _Probe(cl, spec, {"state": "failed", "detail": f"status check failed: {exc}"}, True)

    return list(await asyncio.gather(*(one(cl, spec) for cl, spec in pairs)))


async def _publish_probes(probes: list[_Probe], previous: dict[tuple[str, str], Observation]) -> list[Observation]:
    now = time.time()

    async def one(p: _Probe) -> Observation:
        prev = previous.get((p.cluster.name, p.model.name))
        state = observed_state(p.status["state"], prev, p.cluster, now)
        base_url = p.status.get("base_url") if state != "cold" else None
        detail = p.status.get("detail") or (prev.detail if prev is not None and state == prev.state else None)
        return await _publish(p.cluster.name, p.model.name, state, base_url, detail)

    return list(await asyncio.gather(*(one(p) for p in probes)))


def _fleet(registry: Registry, cluster: str | None = None) -> list[tuple[ClusterSpec, ModelSpec]]:
    """Every (cluster, model) the registry declares, optionally on one cluster only."""
    return [
        (registry.clusters[c], m)
        for m in registry.models.values()
        for c in m.clusters
        if c in registry.clusters and (cluster is None or c == cluster)
    ]


# ---- flows ----


@flow(name="warm-up", log_prints=True)
async def warm_up(model: str = "tiny", cluster: str = "best", timeout_s: float | None = None) -> dict[str, Any]:
    """Start a model's vLLM server on a cluster and wait until it answers /health.

    Args:
        model: Model name or alias, as callers of the OpenAI API name it.
        cluster: Cluster to run it on; "best" picks where it is already hot, else where it is already starting
            or queued, else the cluster out of maintenance with the smallest expected start time.
        timeout_s: Bound on the whole warm-up in seconds (default: FIRST_WARM_UP_TIMEOUT_S); past it the server
            is stopped and the run fails.
    """
    logger = get_run_logger()
    settings, registry, spec = await _model(model)
    if cluster in ("", "best"):
        cluster, why = pick_best_cluster(spec, registry, await bus.observations())
        logger.info("best cluster for %s: %s (%s)", spec.name, cluster, why)
    cl = _cluster(registry, spec, cluster)
    bound = timeout_s or settings.warm_up_timeout_s
    try:
        return await _warm(settings, spec, cl, bound)
    except StillQueued:
        raise  # the other run's "queued" stands
    except Exception as exc:
        await _publish(cl.name, spec.name, "failed", detail=f"warm-up failed: {exc}")
        raise


class StillQueued(TimeoutError):
    """Another run's start of the model is still waiting in the cluster's batch queue."""


async def _observation(cluster: str, model: str) -> Observation | None:
    from prefect.variables import Variable

    try:
        doc = await Variable.aget(bus.state_variable(cluster, model))
        return Observation.model_validate(doc) if doc else None
    except Exception:
        return None


async def _follow_queued(spec: ModelSpec, cl: ClusterSpec, t0: float, bound: float) -> None:
    """Another run's start waits in the cluster's batch queue: wait until its observation moves on (or goes
    stale) instead of queueing a second job."""
    logger = get_run_logger()
    logged = False
    while True:
        current = await _observation(cl.name, spec.name)
        if current is None or current.state != "queued" or time.time() - current.ts > QUEUED_FRESH_S:
            return
        if not logged:
            logger.info("%s on %s: following the start queued by %s since %s", spec.name, cl.name,
                        current.source or "another run", _utc(current.since))  # fmt: skip
            logged = True
        if time.monotonic() - t0 > bound:
            raise StillQueued(f"{spec.name} was still queued on {cl.name} (by {current.source}) after {bound:.0f} s")
        await asyncio.sleep(2)


async def _warm(settings: Settings, spec: ModelSpec, cl: ClusterSpec, bound: float) -> dict[str, Any]:
    logger = get_run_logger()
    backend = _backend(settings, cl)
    t0 = time.monotonic()
    if cl.scheduler != "none":
        await _follow_queued(spec, cl, t0, bound)
    status = await backend.status(spec)
    job = status.get("job_id")
    queue_wait_s = 0.0
    if status["state"] == "hot":
        logger.info("%s on %s is already hot at %s", spec.name, cl.name, status.get("base_url"))
        await _publish(cl.name, spec.name, "hot", status.get("base_url"))
        await create_markdown_artifact(
            key=_key("warm-up", spec.name),
            markdown=f"### Warm-up of `{spec.name}` on `{cl.name}`\n\nAlready hot at {status.get('base_url')}.\n",
            description=f"warm-up of {spec.name} on {cl.name}",
        )
        return {**status, "cluster": cl.name, "load_s": 0.0, "queue_wait_s": 0.0}
    if status["state"] == "starting":
        logger.info("%s on %s is already starting; waiting for it (bound %.0f s)", spec.name, cl.name, bound)
        await _publish(cl.name, spec.name, "starting", status.get("base_url"))
    else:
        logger.info("starting %s on %s (bound %.0f s)", spec.name, cl.name, bound)
        start = asyncio.create_task(backend.start(spec))
        # On a batch cluster the start function waits for a block (a batch job) to run it: say so to gateways
        # ("queued", renewed while it waits) and log what the endpoint reports meanwhile.
        while not start.done():
            if cl.scheduler != "none":
                await _publish(cl.name, spec.name, "queued", detail=f"waiting for a {cl.scheduler} batch job")
            await asyncio.wait({start}, timeout=QUEUED_RENEW_S)
            if not start.done() and hasattr(backend, "endpoint_status"):
                ep = await backend.endpoint_status()
                logger.info("%s on %s: waiting for the endpoint to run the start (endpoint %s, managers %s, "
                            "outstanding tasks %s)", spec.name, cl.name, ep.get("status"), ep.get("managers"),
                            ep.get("outstanding_tasks"))  # fmt: skip
            if not start.done() and time.monotonic() - t0 > bound:
                start.cancel()
                raise TimeoutError(f"the start of {spec.name} on {cl.name} was still pending after {bound:.0f} s")
        status = start.result()
        queue_wait_s = time.monotonic() - t0
        job = status.get("job_id")
        logger.info("%s on %s: vLLM process started on %s%s after %.1f s", spec.name, cl.name,
                    status.get("host", "?"), f" in job {job}" if job else "", queue_wait_s)  # fmt: skip
        if status["state"] != "hot":
            await _publish(cl.name, spec.name, "starting", status.get("base_url"))
    last = None
    while status["state"] != "hot":
        if status["state"] != last:
            logger.info("%s on %s: %s", spec.name, cl.name, status["state"])
            last = status["state"]
        if status["state"] in ("failed", "cold"):
            raise RuntimeError(f"{spec.name} failed to start on {cl.name}: {status.get('detail', 'no detail')}")
        if time.monotonic() - t0 > bound:
            await backend.stop(spec)
            raise TimeoutError(f"{spec.name} did not become healthy on {cl.name} within {bound:.0f} s; stopped it")
        await asyncio.sleep(0.5)
        status = await backend.status(spec)
    load_s = time.monotonic() - t0
    logger.info("%s on %s is hot at %s after %.1f s", spec.name, cl.name, status.get("base_url"), load_s)
    await _publish(cl.name, spec.name, "hot", status.get("base_url"))
    row = [cl.name, spec.name, status.get("host"), job, status.get("pid"), f"{queue_wait_s:.1f} s", f"{load_s:.1f} s"]
    await create_markdown_artifact(
        key=_key("warm-up", spec.name),
        markdown=f"### Warm-up of `{spec.name}` on `{cl.name}`\n\n"
        + _table(["cluster", "model", "host", "batch job", "pid", "queue wait", "load time (total)"], [row]),
        description=f"warm-up of {spec.name} on {cl.name}",
    )
    return {**status, "cluster": cl.name, "load_s": load_s, "queue_wait_s": queue_wait_s}


@flow(name="scale-down", log_prints=True)
async def scale_down(model: str = "tiny", cluster: str = "all") -> dict[str, Any]:
    """Stop a model's vLLM server on one cluster or on all of its clusters, and cancel the batch job that held
    the node (clusters with a login endpoint).

    Args:
        model: Model name or alias.
        cluster: Cluster to stop it on; "all" stops it on every cluster of the model.
    """
    logger = get_run_logger()
    settings, registry, spec = await _model(model)
    targets = [c for c in spec.clusters if c in registry.clusters] if cluster == "all" else [cluster]
    clusters = [_cluster(registry, spec, c) for c in targets]
    logger.info("stopping %s on %s", spec.name, ", ".join(c.name for c in clusters))

    async def one(cl: ClusterSpec) -> dict[str, Any]:
        try:
            return await _stop(settings, spec, cl, f"scale-down by {_source()}")
        except Exception as exc:
            logger.error("%s on %s: stop failed: %s", spec.name, cl.name, exc)
            return {"stopped": False, "result": f"stop failed: {exc}", "error": str(exc)}

    results = dict(zip((c.name for c in clusters), await asyncio.gather(*(one(c) for c in clusters)), strict=True))
    await create_markdown_artifact(
        key=_key("scale-down", spec.name),
        markdown=f"### Scale-down of `{spec.name}`\n\n"
        + _table(["cluster", "result"], [[c, r["result"]] for c, r in results.items()]),
        description=f"scale-down of {spec.name}",
    )
    failed = [c for c, r in results.items() if "error" in r]
    if failed:
        raise RuntimeError(f"could not stop {spec.name} on {', '.join(failed)}: see the log")
    return {"model": spec.name, "stopped": any(r.get("stopped") for r in results.values()), "clusters": results}


@flow(name="refresh-status", log_prints=True)
async def refresh_status(timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Check every model on every one of its clusters and publish what is there, so that gateways and the
    "fleet-status" artifact show the truth (a server that died, one started by hand, a batch job still queued).

    Args:
        timeout_s: Bound on each status check in seconds; a cluster that does not answer in time counts as
            failed, with the reason as its detail.
    """
    logger = get_run_logger()
    settings = get_settings()
    registry = await _registry_now(settings)
    pairs = _fleet(registry)
    logger.info("checking %d model/cluster pair(s)", len(pairs))
    previous = {(o.cluster, o.model): o for o in await bus.observations()}
    probes = await _probe(settings, pairs, timeout_s)
    observed = await _publish_probes(probes, previous)
    for o in observed:
        logger.info("%s on %s: %s%s", o.model, o.cluster, o.state, f" ({_cell(o.detail, 200)})" if o.detail else "")
    await create_markdown_artifact(
        key="fleet-status",
        markdown=f"### Fleet status at {_utc()}\n\n"
        + _table(
            ["cluster", "model", "state", "base_url", "detail", "since"],
            [[o.cluster, o.model, o.state, o.base_url, o.detail, _utc(o.since) if o.since else None] for o in observed],
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
    settings = get_settings()
    registry = await _registry_now(settings)
    previous = {(o.cluster, o.model): o for o in await bus.observations()}
    probes = await _probe(settings, _fleet(registry), 30.0)
    observed = {(o.cluster, o.model): o for o in await _publish_probes(probes, previous)}
    hot = [
        p
        for p in probes
        if p.status["state"] == "hot"
        or (p.error and getattr(previous.get((p.cluster.name, p.model.name)), "state", None) == "hot")
    ]
    reports = await bus.gateway_reports(IDLE_REPORT_AGE_S)
    logger.info("%d hot model server(s); %d live gateway report(s)", len(hot), len(reports))
    decisions: list[IdleDecision] = []
    for p in hot:
        o = observed.get((p.cluster.name, p.model.name))
        since = o.since if o is not None and o.state == "hot" else None
        d = idle_decision(p.cluster.name, p.model.name, p.model.idle_timeout_s, reports, since, time.time())
        if d.stop and not _backend(settings, p.cluster).manages_lifecycle:
            d.stop, d.action = False, "keep: managed outside FIRST"
        if d.stop and not dry_run:
            # Reports are a few seconds old: look again right before stopping, in case a request came in.
            d = idle_decision(p.cluster.name, p.model.name, p.model.idle_timeout_s,
                              await bus.gateway_reports(IDLE_REPORT_AGE_S), since, time.time())  # fmt: skip
            if d.stop:
                try:
                    result = await _stop(settings, p.model, p.cluster, f"idle {d.idle_s:.0f} s > {d.limit_s} s")
                    d.action = result["result"]
                except Exception as exc:
                    logger.error("%s on %s: stop failed: %s", p.model.name, p.cluster.name, exc)
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
        markdown=f"### Scale-down of idle models at {_utc()}{' (dry run)' if dry_run else ''}\n\n"
        + _table(["cluster", "model", "idle s", "limit s", "action"], rows)
        + ("\nNo hot model servers.\n" if not decisions else "")
        + f"\nIdle time counts from the last request a live gateway reports ({len(reports)} report(s)).\n",
        description="idle model servers and what scale-down-idle did with them",
    )
    return [d.__dict__ for d in decisions]


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
    from blocks.registry import ClusterBlock, _slug

    logger = get_run_logger()
    settings = get_settings()
    slug = _slug(cluster)
    try:
        block = await ClusterBlock.aload(slug)
    except ValueError as exc:
        raise ValueError(f"no FIRST Cluster block {slug!r} for cluster {cluster!r}: {exc}") from exc
    spec: ClusterSpec = block.spec  # type: ignore[attr-defined]
    spec.maintenance = True
    spec.maintenance_message = f"drained by {_source()} at {_utc()}"
    await block.asave(slug, overwrite=True)
    back = f"to bring it back, clear `maintenance` in the FIRST Cluster block `{slug}` (Prefect UI: Blocks)"
    logger.info("cluster %s is in maintenance (%s); %s", cluster, spec.maintenance_message, back)

    t0 = time.monotonic()
    last_log = -1e9
    last_seen: tuple[list[str], int] | None = None
    while True:
        reports = await bus.gateway_reports(DRAIN_REPORT_AGE_S)
        if not reports:
            logger.info("no live gateway reports (none in the last %.0f s): nothing routes to %s; proceeding",
                        DRAIN_REPORT_AGE_S, cluster)  # fmt: skip
            break
        waiting, inflight = drain_progress(reports, cluster)
        if not waiting and inflight == 0:
            logger.info("all %d live gateway(s) route nothing to %s and nothing is in flight there",
                        len(reports), cluster)  # fmt: skip
            break
        waited = time.monotonic() - t0
        if waited > timeout_s:
            await create_markdown_artifact(
                key=_key("drain", cluster),
                markdown=f"### Drain of `{cluster}` timed out after {waited:.0f} s\n\n"
                f"{inflight} request(s) still in flight; gateways not yet routing around it: "
                f"{', '.join(waiting) or 'none'}. The cluster stays in maintenance; {back}.\n",
                description=f"drain of cluster {cluster}",
            )
            raise TimeoutError(
                f"{inflight} request(s) still in flight on cluster {cluster} after {timeout_s:g} s "
                f"(gateways not yet in maintenance: {waiting or 'none'}); it stays in maintenance"
            )
        if (waiting, inflight) != last_seen or time.monotonic() - last_log >= 10:
            pending = f"; waiting for gateway(s) {', '.join(waiting)} to see the maintenance" if waiting else ""
            logger.info("%d requests still in flight on cluster %s%s", inflight, cluster, pending)
            last_seen, last_log = (waiting, inflight), time.monotonic()
        await asyncio.sleep(1)
    waited = time.monotonic() - t0

    stopped: dict[str, str] = {}
    if scale_down:
        registry = await Registry.load(settings)
        cl = registry.clusters.get(cluster, spec)
        models = [m for m in registry.models.values() if cluster in m.clusters]
        logger.info("stopping %d model(s) on %s: %s", len(models), cluster, ", ".join(m.name for m in models))

        async def one(m: ModelSpec) -> str:
            try:
                return (await _stop(settings, m, cl, f"drain by {_source()}"))["result"]
            except Exception as exc:
                logger.error("%s on %s: stop failed: %s", m.name, cluster, exc)
                return f"stop failed: {exc}"

        stopped = dict(zip((m.name for m in models), await asyncio.gather(*(one(m) for m in models)), strict=True))
    await create_markdown_artifact(
        key=_key("drain", cluster),
        markdown=f"### Drain of `{cluster}`\n\n"
        f"In maintenance ({spec.maintenance_message}); the drain waited {waited:.1f} s for the requests in flight "
        "to finish.\n\n"
        + (_table(["model", "result"], stopped.items()) if scale_down else "Model servers left running.\n")
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
    settings, registry, spec = await _model(model)
    seen = await bus.observations()
    if cluster in ("", "best"):
        cluster, _ = pick_best_cluster(spec, registry, seen)
    cl = _cluster(registry, spec, cluster)
    backend = _backend(settings, cl)
    status = await backend.status(spec)
    if hasattr(backend, "endpoint_status"):  # clusters reached through a compute endpoint
        status["endpoint"] = await backend.endpoint_status()
    job = status.get("job_id")
    if job and cl.scheduler != "none" and cl.login_endpoint_id:  # what the batch scheduler says of its job
        from compute.scheduler import model_job_state

        report = await _login_backend(cl).call("scheduler_status", cl.scheduler, [job], timeout=60)
        status["job"] = {"id": job, "state": model_job_state(report["jobs"].get(job)), "error": report["error"]}
    previous = {(o.cluster, o.model): o for o in seen}
    [obs] = await _publish_probes([_Probe(cl, spec, status, False)], previous)
    status["cluster"] = cl.name
    get_run_logger().info("%s on %s: %s (endpoint: %s)", spec.name, cl.name, obs.state, status.get("endpoint"))
    endpoint, job_state = (status.get("endpoint") or {}).get("status"), (status.get("job") or {}).get("state") or job
    row = [cl.name, spec.name, obs.state, obs.base_url, endpoint, job_state, obs.detail]
    await create_markdown_artifact(
        key=_key("model-status", spec.name),
        markdown=f"### `{spec.name}` on `{cl.name}` at {_utc()}\n\n"
        + _table(["cluster", "model", "state", "base_url", "endpoint", "batch job", "detail"], [row]),
        description=f"status of {spec.name} on {cl.name}",
    )
    return status
