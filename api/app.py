"""The Litestar app: the OpenAI-compatible API, health, and the relay endpoint for cluster streams.

Hot path of a request: ``chat_completions`` -> ``_serve`` -> ``flows.inference.run_inference`` (the
pipeline) -> ``compute.backends`` -> cluster function -> vLLM; events come back through a ``Sink``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.response import Stream

from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from api.auth import Authenticator, KeyStore, LocalKeyAuthenticator, Principal, bearer_token
from api.errors import APIError, handle_exception
from api.globus_auth import GlobusAuthenticator
from api.limits import RateLimiter
from api.metrics import metrics_registry, render
from api.protocol import ChatCompletionRequest, CompletionRequest
from blocks.globus import GlobusAuthBlock
from blocks.registry import Registry
from compute.backends import Backends
from compute.relay import RelayBatch, RelayHub
from first.settings import FlowTracking, Settings, get_settings
from flows import bus, lifecycle
from flows.inference import InferenceRequest, Services, run_inference
from flows.state import LiveState

log = logging.getLogger("first.api")
_encode = msgspec.json.encode


async def _authenticate(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: every /v1 request carries a credential that resolves to a principal."""
    auth: Authenticator = connection.app.state.authenticator
    connection.state.principal = await auth.authenticate(bearer_token(connection.headers.get("authorization")))


def _services(request: Request) -> Services:
    return request.app.state.services


async def _serve(request: Request, body: ChatCompletionRequest | CompletionRequest, endpoint: str) -> Response:
    svc = _services(request)
    principal: Principal = request.state.principal
    wait = request.headers.get("x-first-warm-wait")
    try:
        warm_wait_s = float(wait) if wait is not None else None
    except ValueError:
        raise APIError(400, "X-First-Warm-Wait must be a number of seconds", param="X-First-Warm-Wait") from None
    req = InferenceRequest(
        request_id=uuid.uuid4().hex, endpoint=endpoint, path=f"/v1/{endpoint.replace('.', '/')}", body=body,
        principal=principal, warm_wait_s=warm_wait_s, pinned=request.headers.get("x-first-cluster") or None,
    )  # fmt: skip
    sink, _task = run_inference(req, svc)
    headers = {"X-Request-Id": req.request_id}
    kind, value = await sink.get()
    if sink.cluster:
        headers["X-First-Cluster"] = sink.cluster
    if kind == "error":
        value.headers.update(headers)
        return value.response()
    if kind == "response":  # non-streaming: hold the body until its usage is recorded ("end")
        kind2, value2 = await sink.get()
        if kind2 == "error":
            return value2.response()
        return Response(content=_encode(value), media_type="application/json", headers=headers)
    first = value if kind == "chunk" else None

    async def events() -> AsyncIterator[bytes]:
        """SSE bytes. Chunks that are already waiting go out in one write (a relay batch arrives at once)."""
        if kind == "end":
            yield b"data: [DONE]\n\n"
            return
        parts = [b"data: " + _encode(first) + b"\n\n"]
        while True:
            try:
                k, v = sink.queue.get_nowait()
            except asyncio.QueueEmpty:
                yield b"".join(parts)
                parts = []
                k, v = await sink.get()
            if k == "chunk":
                parts.append(b"data: " + _encode(v) + b"\n\n")
                continue
            if k == "error":  # after the first byte an HTTP status can't change: send an error event
                parts.append(b"data: " + _encode(v.body()) + b"\n\n")
            else:
                parts.append(b"data: [DONE]\n\n")
            yield b"".join(parts)
            return

    return Stream(events(), media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


@post("/v1/chat/completions", status_code=200, guards=[_authenticate], summary="Create a chat completion")
async def chat_completions(request: Request, data: ChatCompletionRequest) -> Response:
    """OpenAI chat completions, streaming (SSE) or not. Unknown fields pass through to vLLM."""
    return await _serve(request, data, "chat.completions")


@post("/v1/completions", status_code=200, guards=[_authenticate], summary="Create a completion")
async def completions(request: Request, data: CompletionRequest) -> Response:
    """OpenAI (legacy) text completions, streaming (SSE) or not."""
    return await _serve(request, data, "completions")


@get("/v1/models", guards=[_authenticate], summary="List the models you may use")
async def list_models(request: Request) -> dict[str, Any]:
    svc = _services(request)
    principal: Principal = request.state.principal
    data = []
    reg = svc.registry
    who = (principal.groups, principal.identity_providers)
    for m in reg.models.values():
        if not m.allows(*who) or not any(c in reg.clusters and reg.clusters[c].allows(*who) for c in m.clusters):
            continue
        states = {i.cluster.name: i.state for i in svc.live.all() if i.model.name == m.name}
        data.append({
            "id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by,
            "max_model_len": m.context_length, "clusters": m.clusters, "aliases": m.aliases, "state": states,
        })  # fmt: skip
    return {"object": "list", "data": data}


def _visible(request: Request) -> tuple[Principal, list[tuple[Any, Any]]]:
    """(model, cluster) pairs the caller may see: all for admins, else those the caller may use."""
    svc = _services(request)
    principal: Principal = request.state.principal
    reg, who = svc.registry, (principal.groups, principal.identity_providers)
    pairs = []
    for m in reg.models.values():
        if not principal.is_admin and not m.allows(*who):
            continue
        for name in m.clusters:
            c = reg.clusters.get(name)
            if c is not None and (principal.is_admin or c.allows(*who)):
                pairs.append((m, c))
    return principal, pairs


@get("/v1/status", guards=[_authenticate], summary="Live state of each model on each cluster")
async def fleet_status(request: Request) -> dict[str, Any]:
    """Per model and cluster: state (cold, queued, starting, hot, draining, failed), in-flight requests, recent
    latency and errors, last status time; per cluster: maintenance and circuit breaker. Admins see everything
    (with server URLs and error text); callers see what they may use."""
    svc = _services(request)
    principal, pairs = _visible(request)
    now = time.time()
    instances = [svc.live.instance(c, m).snapshot(detail=principal.is_admin) for m, c in pairs]
    clusters = {}
    for _, c in pairs:
        b = svc.live.breaker(c.name)
        clusters[c.name] = {
            "name": c.name, "maintenance": c.maintenance, "maintenance_message": c.maintenance_message or None,
            "breaker": b.state(now), "breaker_opened": b.opened,
            "expected_start_s": round(svc.live.estimates.get(c.name, c.expected_start_s), 1),
            "max_instances": c.max_instances, "max_concurrency": c.max_concurrency,
        }  # fmt: skip
    doc: dict[str, Any] = {"object": "status", "instances": instances, "clusters": list(clusters.values())}
    if principal.is_admin:
        doc.update(gateway=request.app.state.gateway_id, failovers=svc.live.failovers)
    return doc


@get("/metrics", guards=[_authenticate], summary="Prometheus metrics (admins)", include_in_schema=False)
async def metrics(request: Request) -> Response:
    if not request.state.principal.is_admin:
        raise APIError(403, "Metrics are for the gateway's admins (a key in the 'admin' group, or an admin group "
                       "in Globus mode).", code="admin_only")  # fmt: skip
    body = render(request.app.state.metrics)
    return Response(content=body, media_type="text/plain; version=0.0.4; charset=utf-8")


_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _when(value: str | None, param: str, now: datetime) -> datetime | None:
    """A time bound: ISO 8601 (naive = UTC; a date is its UTC midnight) or a span before now (30m, 12h, 1d, 2w)."""
    if value is None or not value.strip():
        return None
    m = _AGO.match(value.strip().lower())
    if m:
        return now - timedelta(**{_UNITS[m[2]]: float(m[1])})
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise APIError(400, f"'{param}' must be an ISO 8601 time (2026-01-31T12:00:00Z, 2026-01-31) or a span "
                       f"before now (30m, 12h, 1d, 2w); got {value!r}", param=param) from None  # fmt: skip
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, float) and v != v:  # NaN
        return None
    return v


def _usage_rows(db: Path, report: str, f: Any, limit: int) -> list[dict[str, Any]]:
    """Run one report against the usage table (blocking: DuckDB; called in a thread)."""
    import duckdb

    from analytics.reports import REPORTS
    from analytics.store import UsageStore

    try:
        df = REPORTS[report](UsageStore(db), f, **({"limit": limit} if report == "top-users" else {}))
    except duckdb.Error as exc:  # the file is locked past the store's retries, or unreadable
        log.warning("usage report %s failed: %s", report, exc)
        raise APIError(503, "The usage database is busy or unavailable; try again shortly.", code="usage_unavailable",
                       headers={"Retry-After": "5"}) from None  # fmt: skip
    return [{k: _json_value(v) for k, v in row.items()} for row in df.iter_rows(named=True)]


@get("/v1/usage", guards=[_authenticate], summary="Usage reports: yours, or everyone's for admins")
async def usage_report(
    request: Request,
    report: str = "summary",
    since: str | None = None,
    until: str | None = None,
    model: str | None = None,
    cluster: str | None = None,
    group: str | None = None,
    user: str | None = None,
    limit: int = 10,
) -> dict[str, Any]:
    """One usage report (summary, top-users, by-model, by-cluster, latency, errors, daily) over the usage table,
    filtered by time (since inclusive, until exclusive: ISO 8601 or a span before now such as 12h or 7d), model,
    cluster, group and user. Callers see only their own usage; admins see everyone's and may pick a user.

    The gateway only reads the table: the ingest-usage deployment moves the usage spool into it every minute, so
    the last minute or so of requests may be missing."""
    from analytics.reports import REPORTS, UsageFilter

    principal: Principal = request.state.principal
    name = report.strip().lower().replace("_", "-")
    if name not in REPORTS:
        raise APIError(400, f"Unknown report '{report}'; choose from {', '.join(REPORTS)}.", param="report",
                       code="unknown_report")  # fmt: skip
    if not 1 <= limit <= 1000:
        raise APIError(400, "'limit' must be between 1 and 1000.", param="limit")
    if not principal.is_admin:
        if user not in (None, "", principal.user):
            raise APIError(403, "You may only see your own usage (admins see everyone's).", param="user",
                           code="usage_forbidden")  # fmt: skip
        user = principal.user
    now = datetime.now(UTC)
    f = UsageFilter(
        since=_when(since, "since", now), until=_when(until, "until", now), user=user or None, model=model or None,
        cluster=cluster or None, group=group or None,
    )  # fmt: skip
    rows = await asyncio.to_thread(_usage_rows, _services(request).settings.usage_db, name, f, limit)
    return {"object": "usage.report", "report": name, "data": rows}


@get("/health", summary="Liveness, and the state of each model instance")
async def health(request: Request) -> dict[str, Any]:
    svc = _services(request)
    recorder = svc.recorder
    return {
        "status": "ok",
        "instances": [i.snapshot() for i in svc.live.all()],
        "flow_tracking": svc.settings.flow_tracking.value,
        "auth_mode": svc.settings.auth_mode,
        "auth_checks": getattr(request.app.state.authenticator, "checks", None),  # Globus: cache misses so far
        "flow_records": {"recorded": recorder.recorded, "dropped": recorder.dropped} if recorder else None,
    }


@post("/internal/relay/{request_id:str}", status_code=200, include_in_schema=False)
async def relay_post(request: Request, request_id: str) -> dict[str, str]:
    """Cluster functions post batches of stream chunks here, with the request's relay token."""
    hub: RelayHub = request.app.state.relay
    if not hub.verify(request_id, request.headers.get("x-relay-token")):
        log.warning("rejected a relay post for %s with a bad token from %s", request_id, request.client)
        raise APIError(401, "Invalid relay token", code="invalid_relay_token")
    doc = msgspec.json.decode(await request.body())
    result = hub.deliver(request_id, RelayBatch(**doc))
    if result == "unknown":
        log.warning("rejected a relay post for %s: no open stream (finished, or never opened)", request_id)
        raise APIError(404, f"No open stream {request_id}", code="unknown_stream")
    if result == "duplicate":  # a replay, or the function's repost after a lost answer: delivered once already
        log.warning(
            "rejected a replayed relay post for %s (batch %s was delivered already)", request_id, doc.get("seq")
        )
        raise APIError(409, f"Batch {doc.get('seq')} of {request_id} was delivered already", code="duplicate_batch")
    return {"status": result}


INFERENCE_PATHS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}


def _record_rejected(request: Request, error: APIError) -> None:
    """A request to an inference route that failed before the flow ran still gets its usage record."""
    endpoint = INFERENCE_PATHS.get(request.url.path)
    svc: Services | None = getattr(request.app.state, "services", None)
    if endpoint is None or svc is None:
        return
    principal: Principal | None = getattr(request.state, "principal", None)
    svc.spool.append(
        UsageRecord(
            request_id=uuid.uuid4().hex, ts=time.time(), user=principal.user if principal else "-",
            groups=list(principal.groups) if principal else [], model="", endpoint=endpoint,
            status=error.status, error_type=error.type,
        )
    )  # fmt: skip


async def load_globus_block(settings: Settings) -> GlobusAuthBlock:
    try:
        return await GlobusAuthBlock.aload(settings.globus_block)  # type: ignore[misc]
    except Exception as exc:
        raise SystemExit(
            f"FIRST_AUTH_MODE=globus, but the Globus Auth block {settings.globus_block!r} could not be loaded "
            f"from Prefect ({exc}). Create it with `first globus configure` or in the Prefect UI (Blocks)."
        ) from None


async def build_authenticator(settings: Settings, globus: GlobusAuthBlock | None) -> Authenticator:
    """The gateway's auth mode (FIRST_AUTH_MODE): local API keys, or Globus access tokens."""
    if settings.auth_mode == "local":
        return LocalKeyAuthenticator(KeyStore(settings.keys_db), default_rpm=settings.default_rpm)
    return GlobusAuthenticator(globus or await load_globus_block(settings))


async def _follow_fleet(app: Litestar, settings: Settings) -> None:
    """Keep routing in step with operators: re-read the cluster and model blocks (maintenance, drains, edits),
    adopt what lifecycle runs observed, and publish this gateway's load for scale-down-idle and drain-cluster."""
    svc: Services = app.state.services
    gateway = app.state.gateway_id
    last_registry, last_report, last_doc, failing = 0.0, 0.0, None, False
    while True:
        await asyncio.sleep(settings.state_sync_s)
        now = time.monotonic()
        try:
            if now - last_registry >= settings.registry_refresh_s:
                last_registry = now
                reg = await Registry.load_blocks()
                if reg.models and reg.model_dump() != svc.registry.model_dump():
                    log.info("clusters or models changed in Prefect; routing with the new registry")
                    svc.registry = reg
                    lifecycle.install(svc.backends, reg)
            for obs in await bus.observations():
                if svc.live.adopt(obs, svc.registry.clusters, svc.registry.models):
                    log.info("%s on %s is %s (seen by %s)", obs.model, obs.cluster, obs.state, obs.source or "a flow")
            maintenance = sorted(c.name for c in svc.registry.clusters.values() if c.maintenance)
            report = svc.live.report(gateway, maintenance)
            doc = report.model_dump(exclude={"ts"})
            if doc != last_doc or now - last_report >= 10:  # on change, and a heartbeat
                await bus.publish_gateway(report)
                last_doc, last_report = doc, now
            if failing:
                log.info("exchanging live state with Prefect again")
            failing = False
        except Exception as exc:
            if not failing:
                log.warning("could not exchange live state with Prefect (%s); routing on what this gateway knows", exc)
            failing = True


async def _follow_globus_block(settings: Settings, auth: GlobusAuthenticator) -> None:
    """Operators edit the Globus block in the Prefect UI; adopt their changes within a minute."""
    while True:
        await asyncio.sleep(settings.globus_block_refresh_s)
        try:
            block = await GlobusAuthBlock.aload(settings.globus_block)  # type: ignore[misc]
        except Exception as exc:
            log.warning("could not re-read the Globus Auth block (%s); keeping the settings in use", exc)
            continue
        if block.model_dump() != auth.config.model_dump():
            log.info("the Globus Auth block changed; applying it")
            auth.configure(block)


def create_app(
    settings: Settings | None = None, registry: Registry | None = None, globus: GlobusAuthBlock | None = None
) -> Litestar:
    """The gateway. ``registry`` and ``globus`` are normally read from Prefect Blocks at startup; tests pass them."""
    settings = settings or get_settings()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per backend call costs ~35% throughput

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        reg = registry or (
            await Registry.load(settings) if os.environ.get("PREFECT_API_URL") else Registry.embedded_default(settings)
        )
        relay = RelayHub()
        backends = Backends(settings, relay)
        recorder = None
        if settings.flow_tracking is FlowTracking.sample and os.environ.get("PREFECT_API_URL"):
            from flows.recorder import FlowRecorder

            recorder = FlowRecorder()
        spool = UsageSpool(settings.spool_dir)
        live = LiveState(backends, settings)
        svc = Services(
            settings=settings, registry=reg, live=live, backends=backends, spool=spool, limiter=RateLimiter(),
            recorder=recorder,
        )  # fmt: skip
        lifecycle.install(backends, reg)
        app.state.services, app.state.relay, app.state.metrics = svc, relay, metrics_registry(live)
        app.state.gateway_id = settings.gateway_id or f"{socket.gethostname()}_{settings.port}"
        background = [asyncio.create_task(live.probe([live.instance(reg.clusters[c], m) for m in reg.models.values()
                                                      for c in m.clusters if c in reg.clusters]))]  # fmt: skip
        if registry is None and os.environ.get("PREFECT_API_URL"):
            background.append(asyncio.create_task(_follow_fleet(app, settings)))
        auth = app.state.authenticator = await build_authenticator(settings, globus)
        app.state.on_rejected = _record_rejected
        if isinstance(auth, GlobusAuthenticator) and globus is None:
            background.append(asyncio.create_task(_follow_globus_block(settings, auth)))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            if isinstance(auth, GlobusAuthenticator):
                auth.close()
            if recorder:
                recorder.close()
            spool.close()
            await backends.close()

    return Litestar(
        route_handlers=[
            chat_completions,
            completions,
            list_models,
            fleet_status,
            usage_report,
            metrics,
            health,
            relay_post,
        ],
        lifespan=[lifespan],
        exception_handlers={Exception: handle_exception},
        openapi_config=OpenAPIConfig(
            title="FIRST inference gateway",
            version="0.1.0",
            description="OpenAI-compatible inference across HPC clusters. Authenticate with 'Bearer <key>'.",
            path="/docs",
        ),
        logging_config=None,
    )
