"""The Litestar app: one controller per endpoint family, errors in OpenAI's shape, X-Request-Id on everything.

Hot path of a request (docs/architecture.md): ``api/inference/routes.py`` -> ``serving/pipeline.py`` (``serve``,
``run_pipeline``) -> ``serving/steps.py`` -> ``compute/backends.py`` -> cluster function -> vLLM; the result
comes back typed (``serving/results.py``) and leaves as JSON or SSE (``api/inference/sse.py``).

``create_app`` builds the gateway without the Prefect side; the entry point (``first/gateway.py``) lends it
one (warm-ups, flow-run tracking) as a ``ControlPlane``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from litestar import Litestar, Request
from litestar.openapi import OpenAPIConfig

from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from api.batches import BatchesController
from api.errors import handle_exception
from api.files import FilesController
from api.inference.routes import INFERENCE_PATHS, InferenceController
from api.metrics import metrics_registry
from api.models import ModelsController
from api.relay import RELAY_ROOM_WAIT_S, relay_post
from api.request_ids import request_id, stamp_request_id
from api.status import StatusController, health
from api.usage import UsageController, UsageReports
from blocks.globus import GlobusAuthBlock
from blocks.registry import Registry
from compute.backends import Backends
from compute.relay import RelayHub
from core.errors import APIError
from core.principal import Principal
from core.settings import Settings
from core.stopping import watch_stop_signals
from serving import replicas
from serving.auth import LocalKeyAuthenticator
from serving.auth_setup import build_authenticator, follow_globus_block
from serving.batches.files import FileStore
from serving.batches.store import BatchStore
from serving.batches.tokens import BatchTokens, WithBatchCredentials
from serving.budgets import follow_budgets
from serving.fleet_sync import follow_fleet
from serving.globus_auth import GlobusAuthenticator
from serving.limits import FailedAuthThrottle, RateLimiter
from serving.live_state import LiveState
from serving.replicas.limits import Admission
from serving.replicas.workers import for_this_worker
from serving.request import ControlPlane, Services

log = logging.getLogger("first.api")


def _record_rejected(request: Request, error: APIError) -> None:
    """A request to an inference route that failed before the pipeline ran still gets its usage record, with
    the id its response carries. One refused before anyone was identified (401, or 429 for an address that
    failed too often) is nobody's usage: it is counted in the metrics (``first_auth_failures``,
    ``first_auth_throttled``), not as rows for a user ``-`` that would open every report."""
    endpoint = INFERENCE_PATHS.get(request.url.path)
    svc: Services | None = getattr(request.app.state, "services", None)
    principal: Principal | None = getattr(request.state, "principal", None)
    if endpoint is None or svc is None or principal is None:
        return
    record = UsageRecord(
        request_id=request_id(request.scope), ts=time.time(), user=principal.user,
        groups=list(principal.groups), model="", endpoint=endpoint,
        status=error.status, error_type=error.type,
    )  # fmt: skip
    try:
        svc.spool.append(record)
    except OSError:  # the caller will get 503 usage_spool instead: the row held in memory says so
        svc.spool.hold(msgspec.structs.replace(record, status=503, error_type="usage_spool"))
        raise


def settle_garbage_collector() -> None:
    """After startup: what was built so far (modules, the app, the registry) lives as long as the process, so it
    leaves the collector's view (``gc.freeze``), and young collections run less often. A full collection over
    every object then took the odd request 10-20 ms at concurrency 1 (docs/benchmarks.md, issue 18)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (Python's default: 700)


def create_app(
    configured: Settings,
    registry: Registry | None = None,
    globus: GlobusAuthBlock | None = None,
    control: ControlPlane | None = None,
) -> Litestar:
    """The gateway. ``registry`` and ``globus`` are normally read from Prefect Blocks at startup; tests pass them.
    Without ``control`` it starts no models and records no flow runs."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per backend call costs ~35% throughput

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        settings = for_this_worker(configured)  # one of FIRST_WORKERS processes: a replica name of its own
        settings.make_home()
        prefect = bool(os.environ.get("PREFECT_API_URL"))
        reg = registry or (await Registry.load(settings) if prefect else Registry.embedded_default(settings))
        relay = RelayHub()
        replica = await replicas.join(settings, relay, RELAY_ROOM_WAIT_S)  # one of several (docs/admin/production.md)
        backends = Backends(settings, relay)
        backends.pool.serving_loop = asyncio.get_running_loop()  # lives as long as the executors (closed below)
        live = LiveState(backends, settings, warm_locks=replica.warm_locks if replica else None)
        svc = Services(
            settings=settings, registry=reg, live=live, backends=backends, spool=UsageSpool(settings.spool_dir),
            limiter=Admission(RateLimiter(), replica.limits if replica else None), control=control,
            files=FileStore(settings.batches_root, settings.max_file_bytes, settings.file_quota_bytes),
            batches=BatchStore(settings.batches_root), shared=replica.store if replica else None,
        )  # fmt: skip
        if control is not None:
            live.warm_runner = control.warm_runner(svc)
        throttle = FailedAuthThrottle(settings.auth_failures_per_min)
        app.state.services, app.state.relay, app.state.metrics = (
            svc,
            relay,
            metrics_registry(live, throttle, svc.shared, control),
        )
        app.state.usage_reports = reports = UsageReports()
        app.state.gateway_id = settings.gateway_id or f"{socket.gethostname()}_{settings.port}"
        if control is not None:
            control.start(app.state.gateway_id)
        background = [asyncio.create_task(live.probe([live.instance(reg.clusters[c], m) for m in reg.models.values()
                                                      for c in m.clusters if c in reg.clusters]))]  # fmt: skip
        if registry is None and prefect:
            background.append(asyncio.create_task(follow_fleet(svc, app.state.gateway_id)))
        background.append(asyncio.create_task(follow_budgets(svc)))
        if replica is not None:
            background += replicas.tasks(replica.background(live))
        app.state.relay_forwarder = replica.forwarder if replica else None
        auth = await build_authenticator(settings, globus)
        app.state.authenticator = WithBatchCredentials(auth, BatchTokens(settings.batch_secret_path), svc.batches)
        app.state.on_rejected = _record_rejected
        app.state.auth_throttle = throttle
        if isinstance(auth, GlobusAuthenticator) and globus is None:
            background.append(asyncio.create_task(follow_globus_block(settings, auth)))
        if isinstance(auth, LocalKeyAuthenticator) and auth.store.shared:
            background.append(asyncio.create_task(auth.follow(settings.keys_refresh_s, settings.keys_max_stale_s)))
        settle_garbage_collector()
        try:
            with watch_stop_signals():  # a SIGTERM ends warm-ups under way at once (core/stopping.py)
                yield
        finally:
            for task in background:
                task.cancel()
            if isinstance(auth, GlobusAuthenticator):
                auth.close()
            if control is not None:
                control.close()
            svc.spool.close()
            reports.close()
            await backends.close()
            if replica is not None:
                await replica.leave(svc.limiter)

    return Litestar(
        route_handlers=[
            InferenceController,
            ModelsController,
            StatusController,
            UsageController,
            FilesController,
            BatchesController,
            health,
            relay_post,
        ],
        lifespan=[lifespan],
        exception_handlers={Exception: handle_exception},
        before_send=[stamp_request_id],
        openapi_config=OpenAPIConfig(
            title="FIRST inference gateway",
            version="0.1.0",
            description="OpenAI-compatible inference across HPC clusters. Authenticate with 'Bearer <key>'.",
            path="/docs",
            use_handler_docstrings=True,  # each route's docstring is its description there and in the docs site
        ),
        logging_config=None,
    )
