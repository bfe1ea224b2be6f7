"""The steps of one inference: authorize -> select cluster -> ensure warm -> execute -> record usage.

Each is a plain coroutine the pipeline (``serving/pipeline.py``) calls in turn; ``@step`` times it into the
request's trace and lets a tracked ``infer`` flow run show it as a task run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from analytics import audit
from analytics.records import UsageRecord
from blocks.registry import ModelSpec, RateLimits
from core.errors import APIError
from core.principal import Principal
from core.settings import Settings
from serving.fair_queue import BATCH, DEMOTED, INTERACTIVE, QueueFull, Slot, enter
from serving.limits import Limit
from serving.live_state import Instance, fault_scope
from serving.protocol import backend_body, requested_max_tokens, token_estimate
from serving.request import InferenceRequest, Outcome, Services
from serving.results import ResultChannel
from serving.shapes import SHAPES, merge_usage
from serving.tracing import step
from serving.visibility import allowed

log = logging.getLogger("first.inference")


KIND_WORDS = {"generate": "a text generation model", "embed": "an embedding model"}


def not_found(name: str) -> APIError:
    """The one answer for an unknown model and a hidden one, so the message can't tell them apart."""
    return APIError(
        404, f"The model '{name}' does not exist or you do not have access to it.", param="model",
        code="model_not_found",
    )  # fmt: skip


@step("authorize")
async def authorize(req: InferenceRequest, svc: Services, out: Outcome) -> ModelSpec:
    """The caller may use this model, asks for no more than its ``max_tokens`` cap, and is within its limits: a
    concurrency slot, one request and the request's tokens are reserved (given back, and settled with the real
    usage, in ``record_usage``)."""
    p = req.principal
    model = svc.registry.resolve(req.body.model)
    if model is None and "/" in req.body.model:  # "cluster/model" pins a cluster, as FIRST's direct mode does
        cluster, _, name = req.body.model.partition("/")
        model = svc.registry.resolve(name) if cluster in svc.registry.clusters else None
        if model is not None:
            if req.pinned not in (None, cluster):
                raise APIError(400, f"X-First-Cluster says '{req.pinned}' but the model name says '{cluster}'",
                               param="model", code="cluster_conflict")  # fmt: skip
            req.pinned = cluster
    if model is None:
        raise not_found(req.body.model)
    if not allowed(p, model):
        if model.hidden:
            raise not_found(req.body.model)
        raise APIError(
            403,
            f"You do not have access to the model '{model.name}'. It is limited to certain groups or "
            "identity providers; ask the gateway's operators for access.",
            param="model",
            code="model_access_denied",
        )
    if req.endpoint not in model.endpoints:  # a chat request to an embedding model, or the other way round
        raise APIError(400, f"The model '{model.name}' is {KIND_WORDS[model.kind]}: it serves "
                       f"{', '.join('/v1/' + e.replace('.', '/') for e in model.endpoints)}, not /v1/"
                       f"{req.endpoint.replace('.', '/')}.", param="model", code="unsupported_endpoint")  # fmt: skip
    asked, cap = requested_max_tokens(req.body), model.max_output_tokens or model.context_length
    if asked is not None and asked > cap:
        param = "max_completion_tokens" if getattr(req.body, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"'{param}' may be at most {cap} for model '{model.name}'; this request asks for {asked}.",
                       param=param, code="max_tokens_too_large")  # fmt: skip
    svc.budgets.check(p, svc.registry.project_of(p.groups))
    out.tokens_reserved = token_estimate(req.body, model.context_length)
    if p.batch_id is not None:
        return model  # a batch's line: paced by its batch lane (``execute``), never by its owner's interactive limits
    limits = [Limit(f"model:{model.name}:{p.user}", model.limits_for(p.groups), f"model {model.name}")]
    if p.rpm:
        limits.append(Limit(f"key:{p.key_id or p.user}", RateLimits(rpm=p.rpm), "your API key"))
    caller = p.key_id or p.user  # the cap on requests in flight, then the limits: a refused request takes nothing
    await svc.limiter.admit(f"{caller}:{model.name}", svc.settings.max_inflight_per_caller,
                            f"model {model.name} for one caller", p.user, limits, out.tokens_reserved,
                            out.reservation)  # fmt: skip
    return model


@step("select-cluster")
async def select_cluster(req: InferenceRequest, model: ModelSpec, svc: Services, out: Outcome) -> list[Instance]:
    """Where the request may run, best first (``serving.routing``): the model's clusters the caller may use,
    less those in maintenance or with an open circuit breaker; or only the cluster the caller pinned."""
    p = req.principal
    names = model.clusters
    if req.pinned is not None:
        if req.pinned not in model.clusters:
            raise APIError(
                400, f"Model '{model.name}' is not served on cluster '{req.pinned}'; it runs on "
                f"{', '.join(model.clusters)}.", param="model", code="cluster_not_serving",
            )  # fmt: skip
        names = [req.pinned]
    candidates, maintenance, denied = [], [], []
    for name in names:
        cluster = svc.registry.clusters.get(name)
        if cluster is None:
            continue
        if not allowed(p, cluster):
            denied.append(name)
        elif cluster.maintenance:
            maintenance.append(f"{name}: {cluster.maintenance_message or 'in maintenance'}")
        else:
            candidates.extend(svc.live.instances_of(cluster, model))
    if not candidates:
        if maintenance:
            raise APIError(
                503, f"No cluster can serve '{model.name}' right now ({'; '.join(maintenance)}).", code="no_cluster",
                headers={"Retry-After": "60"},
            )  # fmt: skip
        raise APIError(
            403, f"None of the clusters that serve '{model.name}' ({', '.join(denied) or 'none configured'}) "
            "is open to you; ask the gateway's operators for access.", param="model", code="cluster_access_denied",
        )  # fmt: skip
    unknown = [i for i in candidates if i.state == "unknown"]
    if unknown:  # first contact since the gateway started (or since a server vanished): ask the clusters
        await svc.live.probe(unknown)
    plan = svc.live.route(candidates, req.session)
    if not plan:
        raise nothing_routable(model.name, candidates, svc)
    return plan


def nothing_routable(model: str, candidates: list[Instance], svc: Services) -> APIError:
    """The 503 when routing left every candidate out: each cluster's reason (an open breaker, or cold with
    the cluster already running its ``max_instances`` models), and a Retry-After from the breakers."""
    now = time.time()
    reasons, waits = [], []
    for inst in candidates:
        cluster_breaker = svc.live.breaker(inst.cluster.name)
        failing = not cluster_breaker.allows(now)
        breaker = cluster_breaker if failing or inst.breaker is None else inst.breaker
        what = inst.cluster.name if breaker is cluster_breaker else f"{inst.cluster.name} ({model}'s server)"
        if breaker.state(now) == "open":
            waits.append(breaker.open_until - now)
            reasons.append(f"{what}: failing, circuit breaker open")
        elif not breaker.allows(now):  # half-open, its one probe request still running
            waits.append(min(breaker.cooldown_s, 5.0))
            reasons.append(f"{what}: failing, one probe request under way")
        else:
            reasons.append(f"{inst.cluster.name}: cold, and already running its max_instances "
                           f"({inst.cluster.max_instances}) models")  # fmt: skip
    wait = max(1, round(min(waits))) if waits else 30
    failing = len(waits) == len(candidates)
    return APIError(
        503, f"No cluster can serve '{model}' now ({'; '.join(reasons)}); retry in {wait} s.",
        code="clusters_failing" if failing else "no_capacity", headers={"Retry-After": str(wait)},
    )  # fmt: skip


async def reserve_cluster(req: InferenceRequest, inst: Instance, svc: Services, out: Outcome) -> None:
    """The caller's share of this cluster's limits (a 429 here sends the request to the next cluster)."""
    c = inst.cluster
    limits = c.limits_for(req.principal.groups)
    if limits.rpm or limits.tpm:
        await svc.limiter.reserve(req.principal.user, [Limit(f"cluster:{c.name}:{req.principal.user}", limits,
                                  f"cluster {c.name}")], out.tokens_reserved, out.reservation)  # fmt: skip


@step("ensure-warm")
async def ensure_warm(req: InferenceRequest, inst: Instance, svc: Services) -> bool:
    """Wait for the model to be hot on the cluster, starting (or joining) a warm-up if it is cold."""
    return await svc.live.ensure_warm(inst, req.warm_wait_s)


@step("wait-for-slot")
async def wait_for_slot(req: InferenceRequest, inst: Instance, svc: Services, out: Outcome) -> Slot | None:
    """A slot on the instance: at once while it has room; once it is full, a place in its fair queue (per caller
    group, interactive first), for at most ``queue_wait_s``. None when the fair queue is off."""
    if not svc.settings.fair_queue:
        return None
    flow = fair_flow(req.principal, inst.model)
    priority = INTERACTIVE if req.principal.batch_id is None else BATCH
    if svc.budgets.demoted(svc.registry.project_of(req.principal.groups)):
        priority = DEMOTED
    where = f"Model '{inst.model.name}' on cluster '{inst.cluster.name}'"
    try:
        slot = await enter(inst.fair_queue(), flow, inst.model.group_weights.get(flow, 1.0), priority,
                           svc.settings.queue_wait_s, where)  # fmt: skip
    except QueueFull:
        inst.refusals.append(time.time())
        raise
    out.queue_ms = slot.waited_s * 1000
    inst.queue_waits.append((time.time(), out.queue_ms))
    return slot


def fair_flow(principal: Principal, model: ModelSpec) -> str:
    """Whom fair queuing shares between: the caller's group that the model weighs (else its first group), or
    the user when it has no group."""
    for group in principal.groups:
        if group in model.group_weights:
            return group
    return principal.groups[0] if principal.groups else f"user:{principal.user}"


def sized_to_time_out(req: InferenceRequest, inst: Instance, settings: Settings) -> bool:
    """Whether the request asks for so many tokens that a healthy server at ``slowest_tokens_per_s`` would not
    finish within the request timeout (no max_tokens: as many as the context holds)."""
    tokens = (requested_max_tokens(req.body) or inst.model.context_length) * max(1, getattr(req.body, "n", None) or 1)
    return tokens / settings.slowest_tokens_per_s >= settings.request_timeout_s


@step("execute")
async def execute(req: InferenceRequest, inst: Instance, svc: Services, channel: ResultChannel, out: Outcome) -> None:
    """Run the request on one cluster; fills ``out`` with usage. The instance's load, latency and errors (and
    its cluster's breaker) follow the outcome."""
    backend = svc.backends.get(inst.cluster)
    body = backend_body(req.body, inst.model.served)
    channel.cluster = inst.cluster.name
    svc.live.begin(inst)
    t0, fault, error = time.perf_counter(), None, None
    out.completion = {} if svc.settings.audit_mode else None
    try:
        if req.stream:
            chunks = backend.stream(inst.model, inst.base_url or "", req.path, body, req.request_id)
            await _stream(req, chunks, channel, out, svc.settings.relay_idle_timeout_s)
        else:
            response = await backend.complete(inst.model, inst.base_url or "", req.path, body)
            shape = SHAPES[req.endpoint]
            shape.rename(response, req.body.model)
            out.usage = shape.usage(response) or {}
            if out.completion is not None:
                out.completion = audit.response_texts(response)
            channel.respond(response)  # held by the handler until usage is recorded
    except APIError as exc:
        error = exc.internal
        # A 4xx is the caller's to fix; a timeout the request's own size explains is the caller's choice. Neither
        # is the cluster's fault (else three oversized requests could close it to everyone).
        if exc.status >= 500 and not (exc.code == "backend_timeout" and sized_to_time_out(req, inst, svc.settings)):
            fault = fault_scope(exc.code)
        raise
    except Exception as exc:
        fault, error = "instance", repr(exc)
        raise
    finally:
        svc.live.end(inst, fault, (time.perf_counter() - t0) * 1000, error)


async def _stream(req: InferenceRequest, chunks: Any, channel: ResultChannel, out: Outcome, stall_s: float) -> None:
    try:
        await _forward(req, chunks, channel, out, stall_s)
    finally:
        await chunks.aclose()  # the backend lets go of the cluster: its relay channel closes, its HTTP stream ends


async def _forward(req: InferenceRequest, chunks: Any, channel: ResultChannel, out: Outcome, stall_s: float) -> None:
    shape = SHAPES[req.endpoint]
    for_caller = req.include_usage or not shape.gateway_asks_usage  # usage the caller sees, not only the meter
    async for chunk in chunks:
        if channel.abandoned:  # the caller is gone: stop here, and the cluster stops generating
            out.status, out.error_type = 499, "client_disconnected"
            log.info("request %s: the caller left mid-stream; stopping it on the cluster", req.request_id)
            return
        usage = shape.usage(chunk)
        if usage:
            out.usage = merge_usage(out.usage, usage)
        if not for_caller and shape.usage_only(chunk):
            continue  # we asked for usage for metering; the caller did not
        shape.rename(chunk, req.body.model)
        if out.completion is not None:
            audit.chunk_texts(chunk, out.completion)
        if out.ttft_ms is None and shape.has_content(chunk):
            out.ttft_ms = (time.perf_counter() - req.t0) * 1000
        if not for_caller and chunk.get("usage"):
            chunk.pop("usage", None)
        out.streamed = True
        await channel.chunk(chunk, stall_s)
        if channel.stalled:  # its buffer stayed full: the caller stopped reading (or its connection hangs)
            out.status, out.error_type = 499, "client_stalled"
            log.info("request %s: the caller stopped reading; stopping it on the cluster", req.request_id)
            return


@step("record-usage")
async def record_usage(req: InferenceRequest, out: Outcome, svc: Services) -> UsageRecord:
    """Settle the caller's token reservation with the real usage, and append the request's usage record to
    the spool (durable before the response completes)."""
    u = out.usage
    # No usage reported: nothing was spent, unless a stream broke after tokens flowed (then charge it all).
    used = int(u.get("total_tokens") or 0) if u else (out.tokens_reserved if out.streamed else 0)
    await svc.limiter.settle(out.reservation, used)
    record = UsageRecord(
        request_id=req.request_id,
        ts=req.started,
        user=req.principal.user,
        groups=list(req.principal.groups),
        model=out.model,
        cluster=out.cluster,
        endpoint=req.endpoint,
        stream=req.stream,
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
        total_tokens=int(u.get("total_tokens") or 0),
        latency_ms=(time.perf_counter() - req.t0) * 1000,
        ttft_ms=out.ttft_ms,
        status=out.status,
        error_type=out.error_type,
        cold_start=out.cold_start,
        batch_id=req.principal.batch_id,
    )
    out.latency_ms = record.latency_ms
    try:  # a stream's answer is already out: if the disk is full its row is held in memory, never lost
        svc.spool.append(record, hold=out.streamed)
    except OSError:
        if not out.streamed:  # the answer will be withheld (503 usage_spool): the row held says so
            svc.spool.hold(msgspec.structs.replace(record, status=503, error_type="usage_spool"))
        raise
    if svc.settings.audit_mode:  # the text goes to the audit log, never to the usage record
        try:
            audit.audit_log(svc.settings.audit_dir).append(audit.AuditEntry(
                request_id=req.request_id, ts=req.started, user=req.principal.user, model=out.model,
                cluster=out.cluster, endpoint=req.endpoint, status=out.status, prompt=audit.prompt_of(req.body),
                completion=audit.completion_of(out.completion),
            ))  # fmt: skip
        except Exception:  # fail open: the answer exists and is metered; /metrics counts what was lost
            svc.live.audit_failures += 1
            log.exception("could not write the audit entry of request %s", req.request_id)
    return record
