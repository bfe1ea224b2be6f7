"""The steps of the lifecycle flows, as Prefect tasks: the Prefect UI shows each as a task run of its flow, with
its own state, logs and timing; a retry or a timeout is declared where it is right.

Which backends and registry they use comes from the run's ``FleetContext``: a gateway that warms a model up
lends its own (``use_gateway``: the same local endpoint and registry snapshot); a worker process running a
deployment makes its own on first use.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, State

from blocks.registry import ClusterSpec, ModelSpec, Registry
from compute.backends import Backends
from core.settings import Settings, get_settings
from core.stopping import STOPPED_MESSAGE, STOPPING
from flows.fleet_decisions import QUEUED_FRESH_S, observed_state, short, utc
from serving import bus
from serving.bus import Observation

QUEUED_RENEW_S = 15.0  # how often a warm-up waiting in a batch queue renews its "queued" observation


# ---- where the steps run: the gateway's resources, or the worker process's own ----


@dataclass
class FleetContext:
    settings: Settings
    backends: Backends
    registry: Registry | None = None  # a gateway's snapshot; None: read the blocks each time

    async def current_registry(self) -> Registry:
        return self.registry or await Registry.load(self.settings)


_gateway: ContextVar[FleetContext | None] = ContextVar("first_fleet_context", default=None)
_process: list[FleetContext] = []  # a worker process's own, made on first use


def use_gateway(ctx: FleetContext | None) -> None:
    """Lifecycle runs in this context (a gateway's warm-up thread) use the gateway's backends and registry; None:
    the process's own again."""
    _gateway.set(ctx)


def fleet() -> FleetContext:
    ctx = _gateway.get()
    if ctx is not None:
        return ctx
    if not _process:
        settings = get_settings()
        _process.append(FleetContext(settings, Backends(settings)))
    return _process[0]


async def resolve_model(model: str) -> tuple[Registry, ModelSpec]:
    """The model a flow's parameter names: a name or alias, or one instance of it ("m@1": its second instance on
    a cluster, as autoscale starts and the fleet status shows it)."""
    registry = await fleet().current_registry()
    name, at, n = model.partition("@")
    spec = registry.resolve(name if at else model)
    if spec is None:
        raise ValueError(f"unknown model {model!r}; known: {sorted(registry.models)}")
    if at and not n.isdigit():
        raise ValueError(f"{model!r}: after '@' comes the instance number (0 is the first; 'm@1' the second)")
    return registry, spec.as_replica(int(n) if at else 0)


def resolve_cluster(registry: Registry, spec: ModelSpec, cluster: str) -> ClusterSpec:
    if cluster not in registry.clusters or cluster not in spec.clusters:
        raise ValueError(f"model {spec.instance_name!r} is not served on cluster {cluster!r}; it is on {spec.clusters}")
    return registry.clusters[cluster]


def backend_of(cl: ClusterSpec) -> Any:
    return fleet().backends.get(cl)


def login_backend(cl: ClusterSpec) -> Any:
    """The cluster's login-node endpoint (reads and cancels batch jobs), as a backend of its own."""
    return backend_of(cl.model_copy(update={"name": f"{cl.name}-login", "endpoint_id": cl.login_endpoint_id}))


def fleet_pairs(registry: Registry, cluster: str | None = None) -> list[tuple[ClusterSpec, ModelSpec]]:
    """Every (cluster, model instance) the registry declares, optionally on one cluster only: each model's
    first instance, and the further ones autoscale may run there (up to its ``max_instances``)."""
    return [
        (registry.clusters[c], m.as_replica(n))
        for m in registry.models.values()
        for c in m.clusters
        if c in registry.clusters and (cluster is None or c == cluster)
        for n in range(m.instance_bounds(c)[1])
    ]


def source() -> str:
    from prefect.runtime import flow_run

    return flow_run.name or "lifecycle"


# ---- steps ----


@task(name="publish-state", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
async def publish_state(
    cl: str, model: str, state: str, base_url: str | None = None, detail: Any = None
) -> Observation:
    """Tell every gateway what this run caused or saw (a Prefect Variable; retried: SQLite answers 503 under load)."""
    obs = Observation(cluster=cl, model=model, state=state, base_url=base_url, detail=short(detail), source=source())
    await bus.publish(obs)
    return obs


@task(name="check-status", cache_policy=NO_CACHE)
async def check_status(cl: ClusterSpec, spec: ModelSpec) -> dict[str, Any]:
    """What the cluster says of the model: cold, queued, starting, hot or failed, with its server's URL."""
    return await backend_of(cl).status(spec)


@task(name="follow-queued-start", cache_policy=NO_CACHE)
async def follow_queued_start(spec: ModelSpec, cl: ClusterSpec, t0: float, bound: float) -> State | None:
    """Another run's start waits in the cluster's batch queue: wait until its observation moves on (or goes
    stale) instead of queueing a second job. Cancelled when this process stops meanwhile."""
    logger = get_run_logger()
    logged = False
    while not STOPPING.is_set():
        current = await bus.observation(cl.name, spec.instance_name)
        if current is None or current.state != "queued" or time.time() - current.ts > QUEUED_FRESH_S:
            return
        if not logged:
            logger.info("%s on %s: following the start queued by %s since %s", spec.instance_name, cl.name,
                        current.source or "another run", utc(current.since))  # fmt: skip
            logged = True
        if time.monotonic() - t0 > bound:
            raise StillQueued(
                f"{spec.instance_name} was still queued on {cl.name} (by {current.source}) after {bound:.0f} s"
            )
        await asyncio.sleep(2)
    return Cancelled(message=STOPPED_MESSAGE)


class StillQueued(TimeoutError):
    """Another run's start of the model is still waiting in the cluster's batch queue."""


@task(name="submit-start", cache_policy=NO_CACHE)
async def submit_start(spec: ModelSpec, cl: ClusterSpec, t0: float, bound: float) -> dict[str, Any]:
    """Start the model's vLLM server. On a batch cluster the start waits for a block (a batch job) to run it:
    say so to gateways ("queued", renewed while it waits) and log what the endpoint reports meanwhile."""
    logger = get_run_logger()
    backend = backend_of(cl)
    logger.info("starting %s on %s (bound %.0f s)", spec.instance_name, cl.name, bound)
    start = asyncio.create_task(backend.start(spec))
    while not start.done():
        if cl.scheduler != "none":
            await publish_state(cl.name, spec.instance_name, "queued", detail=f"waiting for a {cl.scheduler} batch job")
        await asyncio.wait({start}, timeout=QUEUED_RENEW_S)
        if not start.done() and hasattr(backend, "endpoint_status"):
            ep = await backend.endpoint_status()
            logger.info("%s on %s: waiting for the endpoint to run the start (endpoint %s, managers %s, "
                        "outstanding tasks %s)", spec.instance_name, cl.name, ep.get("status"), ep.get("managers"),
                        ep.get("outstanding_tasks"))  # fmt: skip
        if not start.done() and time.monotonic() - t0 > bound:
            start.cancel()
            raise TimeoutError(f"the start of {spec.instance_name} on {cl.name} was still pending after {bound:.0f} s")
    status = start.result()
    job = status.get("job_id")
    logger.info("%s on %s: vLLM process started on %s%s after %.1f s", spec.instance_name, cl.name,
                status.get("host", "?"), f" in job {job}" if job else "", time.monotonic() - t0)  # fmt: skip
    return status


@task(name="wait-until-healthy", cache_policy=NO_CACHE)
async def wait_until_healthy(spec: ModelSpec, cl: ClusterSpec, status: dict[str, Any]) -> dict[str, Any] | State:
    """Poll the server until it answers /health. Its bound is the task's timeout, set by the flow from what is
    left of the warm-up's (``wait_until_healthy.with_options(timeout_seconds=...)``). Cancelled when this
    process stops meanwhile (``core.stopping``): the stack's stop takes the server down anyway."""
    logger = get_run_logger()
    backend = backend_of(cl)
    last = None
    while status["state"] != "hot":
        if STOPPING.is_set():
            logger.warning("%s on %s: the stack is stopping; this wait ends here", spec.instance_name, cl.name)
            return Cancelled(message=STOPPED_MESSAGE)
        if status["state"] != last:
            logger.info("%s on %s: %s", spec.instance_name, cl.name, status["state"])
            last = status["state"]
        if status["state"] in ("failed", "cold"):
            raise RuntimeError(
                f"{spec.instance_name} failed to start on {cl.name}: {status.get('detail', 'no detail')}"
            )
        await asyncio.sleep(0.5)
        status = await backend.status(spec)
    return status


@task(name="stop-model", cache_policy=NO_CACHE)
async def stop_model(spec: ModelSpec, cl: ClusterSpec, why: str) -> dict[str, Any]:
    """Stop the model on a cluster, cancel the batch job that held its node (when the cluster has a login
    endpoint), and publish "cold". Returns the backend's answer plus ``result`` (a word for the artifact)."""
    logger = get_run_logger()
    backend = backend_of(cl)
    if not backend.manages_lifecycle:
        logger.info("%s on %s: not stopped, the cluster's server is managed outside FIRST", spec.instance_name, cl.name)
        return {"stopped": False, "result": "managed outside FIRST"}
    try:
        before = await backend.status(spec)
    except Exception as exc:  # stop anyway: the status check is only for the batch job's id
        logger.warning("%s on %s: status before stopping failed (%s)", spec.instance_name, cl.name, exc)
        before = {}
    result = await backend.stop(spec)
    stopped = bool(result.get("stopped"))
    logger.info("%s on %s: %s (%s)", spec.instance_name, cl.name, "stopped" if stopped else "was not running", why)
    result["result"] = "stopped" if stopped else "was not running"
    job = before.get("job_id")
    if job and cl.scheduler != "none" and cl.login_endpoint_id:
        # Release the node now rather than after the endpoint's idle time: cancel the batch job that held it.
        cancelled = await login_backend(cl).call("cancel_job", cl.scheduler, job, timeout=60)
        logger.info("%s: batch job %s %s", cl.name, job,
                    "cancelled" if cancelled["cancelled"] else f"not cancelled: {cancelled['error']}")  # fmt: skip
        result["job_cancelled"] = cancelled
        result["result"] += f"; job {job} " + ("cancelled" if cancelled["cancelled"] else "not cancelled")
    elif job:
        logger.info(
            "%s: batch job %s stays until the endpoint's idle time ends it (no login_endpoint_id)", cl.name, job
        )
    await publish_state(cl.name, spec.instance_name, "cold", detail=f"{result['result']} ({why})")
    return result


@dataclass
class Probe:
    cluster: ClusterSpec
    model: ModelSpec
    status: dict[str, Any]
    error: bool  # the status check itself failed (timeout, endpoint unreachable)


@task(name="probe-fleet", cache_policy=NO_CACHE)
async def probe_fleet(pairs: list[tuple[ClusterSpec, ModelSpec]], timeout_s: float) -> list[Probe]:
    """Status of each (cluster, model), concurrently, each bounded by ``timeout_s``; a failed check is state
    "failed" with the reason as its detail."""

    async def one(cl: ClusterSpec, spec: ModelSpec) -> Probe:
        try:
            return Probe(cl, spec, await asyncio.wait_for(backend_of(cl).status(spec), timeout_s), False)
        except TimeoutError:
            return Probe(cl, spec, {"state": "failed", "detail": f"no status within {timeout_s:g} s"}, True)
        except Exception as exc:
            return Probe(cl, spec, {"state": "failed", "detail": f"status check failed: {exc}"}, True)

    return list(await asyncio.gather(*(one(cl, spec) for cl, spec in pairs)))


@task(name="publish-observations", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
async def publish_observations(probes: list[Probe], previous: dict[tuple[str, str], Observation]) -> list[Observation]:
    """What each probe means given what was seen before (a "queued" start stays queued), told to every gateway."""
    now = time.time()

    async def one(p: Probe) -> Observation:
        prev = previous.get((p.cluster.name, p.model.instance_name))
        state = observed_state(p.status["state"], prev, p.cluster, now)
        base_url = p.status.get("base_url") if state != "cold" else None
        detail = p.status.get("detail") or (prev.detail if prev is not None and state == prev.state else None)
        obs = Observation(cluster=p.cluster.name, model=p.model.instance_name, state=state, base_url=base_url,
                          detail=short(detail), source=source())  # fmt: skip
        await bus.publish(obs)
        return obs

    return list(await asyncio.gather(*(one(p) for p in probes)))
