"""Model lifecycle as Prefect flows: operators run them from the UI (deployments in prefect.yaml),
and the gateway runs ``warm_up`` itself when a request finds its model cold.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from blocks.registry import ClusterSpec, ModelSpec, Registry
from compute.backends import Backends
from first.settings import Settings, get_settings

# The process's backends: the gateway installs its own (sharing its local endpoint); a worker process
# running a deployment creates them on first use.
_backends: Backends | None = None
_registry: Registry | None = None


def install(backends: Backends, registry: Registry) -> None:
    """Let flows run inside the gateway reuse its backends and registry snapshot."""
    global _backends, _registry
    _backends, _registry = backends, registry


async def _context(model: str, cluster: str) -> tuple[Settings, ModelSpec, ClusterSpec, Any]:
    global _backends
    settings = get_settings()
    registry = _registry or await Registry.load(settings)
    spec = registry.resolve(model)
    if spec is None:
        raise ValueError(f"unknown model {model!r}; known: {sorted(registry.models)}")
    if cluster in ("", "best"):
        cluster = spec.clusters[0]
    if cluster not in registry.clusters or cluster not in spec.clusters:
        raise ValueError(f"model {spec.name!r} is not served on cluster {cluster!r}; it is on {spec.clusters}")
    if _backends is None:
        _backends = Backends(settings)
    return settings, spec, registry.clusters[cluster], _backends.get(registry.clusters[cluster])


def _login_backend(cl: ClusterSpec) -> Any:
    """The cluster's login-node endpoint (reads and cancels batch jobs), as a backend of its own."""
    login = cl.model_copy(update={"name": f"{cl.name}-login", "endpoint_id": cl.login_endpoint_id})
    return _backends.get(login)  # type: ignore[union-attr]


@flow(name="warm-up", log_prints=True)
async def warm_up(model: str = "tiny", cluster: str = "best", timeout_s: float | None = None) -> dict[str, Any]:
    """Start the model's vLLM server on a cluster and wait until it answers /health."""
    logger = get_run_logger()
    settings, spec, cl, backend = await _context(model, cluster)
    bound = timeout_s or settings.warm_up_timeout_s
    t0 = time.monotonic()
    status = await backend.status(spec)
    if status["state"] == "hot":
        logger.info("%s on %s is already hot at %s", spec.name, cl.name, status.get("base_url"))
        return status
    logger.info("starting %s on %s (bound %.0f s)", spec.name, cl.name, bound)
    start = asyncio.create_task(backend.start(spec))
    # On a batch cluster the start function waits for a block (a batch job) to run it: say what the endpoint
    # reports meanwhile, so the run shows the queue wait.
    while not start.done():
        await asyncio.wait({start}, timeout=15)
        if not start.done() and hasattr(backend, "endpoint_status"):
            ep = await backend.endpoint_status()
            logger.info("%s on %s: waiting for the endpoint to run the start (endpoint %s, managers %s, "
                        "outstanding tasks %s)", spec.name, cl.name, ep.get("status"), ep.get("managers"),
                        ep.get("outstanding_tasks"))  # fmt: skip
    status = start.result()
    queue_wait_s = time.monotonic() - t0
    job = status.get("job_id")
    logger.info("%s on %s: vLLM process started on %s%s after %.1f s", spec.name, cl.name,
                status.get("host", "?"), f" in job {job}" if job else "", queue_wait_s)  # fmt: skip
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
    await create_markdown_artifact(
        key=f"warm-up-{spec.name}".replace("_", "-").lower(),
        markdown=(
            f"### Warm-up of `{spec.name}` on `{cl.name}`\n\n"
            "| cluster | model | host | batch job | pid | queue wait | load time (total) |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {cl.name} | {spec.name} | {status.get('host', '-')} | {job or '-'} | {status.get('pid')} "
            f"| {queue_wait_s:.1f} s | {load_s:.1f} s |\n"
        ),
        description=f"warm-up of {spec.name} on {cl.name}",
    )
    return {**status, "load_s": load_s, "queue_wait_s": queue_wait_s}


@flow(name="scale-down", log_prints=True)
async def scale_down(model: str = "tiny", cluster: str = "best") -> dict[str, Any]:
    """Stop the model's vLLM server on a cluster."""
    logger = get_run_logger()
    _, spec, cl, backend = await _context(model, cluster)
    before = await backend.status(spec)
    result = await backend.stop(spec)
    logger.info("%s on %s: %s", spec.name, cl.name, "stopped" if result.get("stopped") else "was not running")
    job = before.get("job_id")
    if job and cl.scheduler != "none" and cl.login_endpoint_id:
        # Release the node now rather than after the endpoint's idle time: cancel the batch job that held it.
        cancelled = await _login_backend(cl).call("cancel_job", cl.scheduler, job, timeout=60)
        logger.info("%s: batch job %s %s", cl.name, job,
                    "cancelled" if cancelled["cancelled"] else f"not cancelled: {cancelled['error']}")  # fmt: skip
        result["job_cancelled"] = cancelled
    elif job:
        logger.info(
            "%s: batch job %s stays until the endpoint's idle time ends it (no login_endpoint_id)", cl.name, job
        )
    return result


@flow(name="model-status")
async def model_status(model: str = "tiny", cluster: str = "best") -> dict[str, Any]:
    """Report whether the model is cold, starting, hot or failed on a cluster."""
    _, spec, cl, backend = await _context(model, cluster)
    status = await backend.status(spec)
    if hasattr(backend, "endpoint_status"):  # clusters reached through a compute endpoint
        status["endpoint"] = await backend.endpoint_status()
    job = status.get("job_id")
    if job and cl.scheduler != "none" and cl.login_endpoint_id:  # what the batch scheduler says of its job
        from compute.scheduler import model_job_state

        report = await _login_backend(cl).call("scheduler_status", cl.scheduler, [job], timeout=60)
        status["job"] = {"id": job, "state": model_job_state(report["jobs"].get(job)), "error": report["error"]}
    get_run_logger().info("%s on %s: %s (endpoint: %s)", spec.name, cl.name, status["state"], status.get("endpoint"))
    return status
