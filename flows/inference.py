"""The inference flow: authorize -> select cluster -> ensure warm -> execute -> record usage.

The API runs ``run_inference`` for every request. The steps are Prefect tasks; whether a request
becomes a recorded Prefect flow run is a setting (design decision 1, ``FIRST_FLOW_TRACKING``):

- ``all``: the request runs inside the real ``infer`` flow, each step a task run. Costly (see
  docs/benchmarks.md).
- ``sample`` (default): the steps run as plain coroutines (``task.fn``), the same code, and the
  request's trace is recorded afterwards as an ``infer-record`` flow run, off the serving loop, when it
  failed, waited for a warm-up, or was sampled.
- ``off``: nothing is recorded but the lifecycle flows.

Events flow to the API handler through a ``Sink`` (a queue): a response, stream chunks, or an error.
Usage is spooled before the final event, so a response never completes without its usage record.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from analytics import audit
from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from api.auth import Principal
from api.errors import APIError
from api.limits import Limit, RateLimiter, Reservation
from api.protocol import ChatCompletionRequest, CompletionRequest, backend_body, token_estimate
from blocks.registry import ModelSpec, RateLimits, Registry
from compute.backends import Backends
from first.settings import FlowTracking, Settings
from flows.state import Instance, LiveState

# Failures before the first byte that another cluster (or a fresh start of the same one) may not have.
# Not a warm-up that is merely slow (the caller's wait bound is spent), nor a timeout (it would double the wait).
FAILOVER_CODES = frozenset({"backend_unreachable", "backend_error", "task_failed", "endpoint_unreachable",
                            "cluster_unreachable", "model_start_failed"})  # fmt: skip

log = logging.getLogger("first.inference")


@dataclass
class InferenceRequest:
    request_id: str
    endpoint: str  # "chat.completions" | "completions"
    path: str  # backend path, e.g. "/v1/chat/completions"
    body: ChatCompletionRequest | CompletionRequest
    principal: Principal
    warm_wait_s: float | None = None  # the caller's bound on waiting for a cold model (X-First-Warm-Wait)
    pinned: str | None = None  # a cluster the caller chose (X-First-Cluster, or a "cluster/model" name)
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)

    @property
    def stream(self) -> bool:
        return bool(self.body.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)


@dataclass
class Outcome:
    """What happened to one request; becomes its usage record and, if recorded, its flow-run trace."""

    model: str
    cluster: str | None = None
    status: int = 200
    error_type: str | None = None
    error_message: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    ttft_ms: float | None = None
    cold_start: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)
    tokens_reserved: int = 0
    reservation: Reservation = field(default_factory=Reservation)
    streamed: bool = False  # stream chunks reached the caller (so tokens were spent, usage or not)
    tried: list[str] = field(default_factory=list)  # clusters tried, in order (more than one: a failover)
    completion: dict[int, list[str]] | None = None  # audit mode only: generated text per choice index


class Sink:
    """Events from the pipeline to the HTTP handler: ("response", body) | ("chunk", chunk) |
    ("error", APIError) | ("end", None)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.started = False  # a stream's first byte went out: failures can no longer become HTTP errors
        self.cluster: str | None = None  # where it runs (the X-First-Cluster response header)
        self.finished = False  # the terminal event (end or error) was sent

    def put(self, kind: str, value: Any = None) -> None:
        self.finished = self.finished or kind in ("end", "error")
        self.queue.put_nowait((kind, value))

    async def get(self) -> tuple[str, Any]:
        return await self.queue.get()


@dataclass
class Services:
    """What the steps need; built once by the API at startup."""

    settings: Settings
    registry: Registry
    live: LiveState
    backends: Backends
    spool: UsageSpool
    limiter: RateLimiter
    recorder: Any = None  # flows.recorder.FlowRecorder | None


# ---- the steps ----


def not_found(name: str) -> APIError:
    """The one answer for an unknown model and a hidden one, so the message can't tell them apart."""
    return APIError(
        404, f"The model '{name}' does not exist or you do not have access to it.", param="model",
        code="model_not_found",
    )  # fmt: skip


@task(name="authorize", cache_policy=NO_CACHE)
async def authorize(req: InferenceRequest, svc: Services, out: Outcome) -> ModelSpec:
    """The caller may use this model and is within its limits: one request and the request's tokens are
    reserved from the caller's buckets (settled with the real usage in ``record_usage``)."""
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
    if not model.allows(p.groups, p.identity_providers):
        if model.hidden:
            raise not_found(req.body.model)
        raise APIError(
            403,
            f"You do not have access to the model '{model.name}'. It is limited to certain groups or "
            "identity providers; ask the gateway's operators for access.",
            param="model",
            code="model_access_denied",
        )
    out.tokens_reserved = token_estimate(req.body, model.context_length)
    limits = [Limit(f"model:{model.name}:{p.user}", model.limits_for(p.groups), f"model {model.name}")]
    if p.rpm:
        limits.append(Limit(f"key:{p.key_id or p.user}", RateLimits(rpm=p.rpm), "your API key"))
    svc.limiter.reserve(p.user, limits, out.tokens_reserved, out.reservation)
    return model


@task(name="select-cluster", cache_policy=NO_CACHE)
async def select_cluster(req: InferenceRequest, model: ModelSpec, svc: Services, out: Outcome) -> list[Instance]:
    """Where the request may run, best first (``flows.routing``): the model's clusters the caller may use,
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
        if not cluster.allows(p.groups, p.identity_providers):
            denied.append(name)
        elif cluster.maintenance:
            maintenance.append(f"{name}: {cluster.maintenance_message or 'in maintenance'}")
        else:
            candidates.append(svc.live.instance(cluster, model))
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
    plan = svc.live.route(candidates)
    if not plan:
        raise _nothing_routable(model.name, candidates, svc)
    return plan


def _nothing_routable(model: str, candidates: list[Instance], svc: Services) -> APIError:
    """The 503 when routing left every candidate out: each cluster's reason (an open breaker, or cold with
    the cluster already running its ``max_instances`` models), and a Retry-After from the breakers."""
    now = time.time()
    reasons, waits = [], []
    for inst in candidates:
        breaker = svc.live.breaker(inst.cluster.name)
        if breaker.state(now) == "open":
            waits.append(breaker.open_until - now)
            reasons.append(f"{inst.cluster.name}: failing, circuit breaker open")
        elif not breaker.allows(now):  # half-open, its one probe request still running
            waits.append(min(breaker.cooldown_s, 5.0))
            reasons.append(f"{inst.cluster.name}: failing, one probe request under way")
        else:
            reasons.append(f"{inst.cluster.name}: cold, and already running its max_instances "
                           f"({inst.cluster.max_instances}) models")  # fmt: skip
    wait = max(1, round(min(waits))) if waits else 30
    failing = len(waits) == len(candidates)
    return APIError(
        503, f"No cluster can serve '{model}' now ({'; '.join(reasons)}); retry in {wait} s.",
        code="clusters_failing" if failing else "no_capacity", headers={"Retry-After": str(wait)},
    )  # fmt: skip


def _reserve_cluster(req: InferenceRequest, inst: Instance, svc: Services, out: Outcome) -> None:
    """The caller's share of this cluster's limits (a 429 here sends the request to the next cluster)."""
    c = inst.cluster
    limits = c.limits_for(req.principal.groups)
    if limits.rpm or limits.tpm:
        svc.limiter.reserve(req.principal.user, [Limit(f"cluster:{c.name}:{req.principal.user}", limits,
                            f"cluster {c.name}")], out.tokens_reserved, out.reservation)  # fmt: skip


@task(name="ensure-warm", cache_policy=NO_CACHE)
async def ensure_warm(req: InferenceRequest, inst: Instance, svc: Services) -> bool:
    """Wait for the model to be hot on the cluster, starting (or joining) a warm-up if it is cold."""
    return await svc.live.ensure_warm(inst, req.warm_wait_s)


@task(name="execute", cache_policy=NO_CACHE)
async def execute(req: InferenceRequest, inst: Instance, svc: Services, sink: Sink, out: Outcome) -> None:
    """Run the request on one cluster; fills ``out`` with usage. The instance's load, latency and errors (and
    its cluster's breaker) follow the outcome."""
    backend = svc.backends.get(inst.cluster)
    body = backend_body(req.body, inst.model.served)
    sink.cluster = inst.cluster.name
    svc.live.begin(inst)
    t0, fault, error = time.perf_counter(), False, None
    out.completion = {} if svc.settings.audit_mode else None
    try:
        if req.stream:
            await _stream(req, backend.stream(inst.base_url or "", req.path, body, req.request_id), sink, out)
        else:
            response = await backend.complete(inst.base_url or "", req.path, body)
            response["model"] = req.body.model
            out.usage = dict(response.get("usage") or {})
            if out.completion is not None:
                out.completion = audit.response_texts(response)
            sink.put("response", response)  # held by the handler until usage is recorded
    except APIError as exc:
        fault, error = exc.status >= 500, exc.message  # a 4xx is the caller's to fix, not the cluster's fault
        raise
    except Exception as exc:
        fault, error = True, repr(exc)
        raise
    finally:
        svc.live.end(inst, fault, (time.perf_counter() - t0) * 1000, error)


async def _stream(req: InferenceRequest, chunks: Any, sink: Sink, out: Outcome) -> None:
    async for chunk in chunks:
        if chunk.get("usage") and not chunk.get("choices"):
            out.usage = dict(chunk["usage"])
            if not req.include_usage:
                continue  # we asked for usage for metering; the caller did not
        chunk["model"] = req.body.model
        if out.completion is not None:
            audit.chunk_texts(chunk, out.completion)
        if out.ttft_ms is None and any(
            (c.get("delta") or {}).get("content") or c.get("text") for c in chunk.get("choices") or []
        ):
            out.ttft_ms = (time.perf_counter() - req.t0) * 1000
        if not req.include_usage and chunk.get("usage"):
            chunk.pop("usage", None)
        sink.started = out.streamed = True
        sink.put("chunk", chunk)


async def _run_on_clusters(
    req: InferenceRequest, plan: list[Instance], svc: Services, sink: Sink, out: Outcome, run: StepRunner
) -> None:
    """Try the plan's clusters in order until one answers, at most ``max_tries`` of them. A failure before the
    first byte moves on (failover); after it, the stream ends with an error event: never a silent replay.
    If the server of the only candidate vanished (scaled down, crashed), it is warmed up again once."""
    queue, tries, last = list(plan), 0, None
    rewarmed: set[Instance] = set()
    while queue and tries < svc.settings.max_tries:
        inst = queue.pop(0)
        if tries and not svc.live.breaker(inst.cluster.name).allows(time.time()):
            continue  # opened while this request was on another cluster
        try:
            _reserve_cluster(req, inst, svc, out)
        except APIError as exc:  # the caller's share of this cluster is used up: another cluster may take it
            last = exc
            continue
        tries += 1
        out.cluster = inst.cluster.name
        out.tried.append(inst.cluster.name)
        warmed = False
        try:
            out.cold_start = await run(ensure_warm, req, inst, svc) or out.cold_start
            warmed = True
            await run(execute, req, inst, svc, sink, out)
            return
        except APIError as exc:
            if sink.started or exc.code not in FAILOVER_CODES:
                raise
            last = exc
            if not warmed:
                svc.live.start_failed(inst, exc.message)
            if exc.code == "backend_unreachable":
                svc.live.mark_unreachable(inst, exc.message)
                if not queue and inst not in rewarmed:
                    rewarmed.add(inst)
                    queue.append(inst)
            if queue and tries < svc.settings.max_tries:
                svc.live.failovers += 1
                log.warning("request %s failed on %s before its first byte (%s); trying %s", req.request_id,
                            inst.cluster.name, exc.code, queue[0].cluster.name)  # fmt: skip
    raise last or APIError(503, "No cluster could take the request", code="no_cluster")


@task(name="record-usage", cache_policy=NO_CACHE)
async def record_usage(req: InferenceRequest, out: Outcome, svc: Services) -> UsageRecord:
    """Settle the caller's token reservation with the real usage, and append the request's usage record to
    the spool (durable before the response completes)."""
    u = out.usage
    # No usage reported: nothing was spent, unless a stream broke after tokens flowed (then charge it all).
    used = int(u.get("total_tokens") or 0) if u else (out.tokens_reserved if out.streamed else 0)
    svc.limiter.settle(out.reservation, used)
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
    )
    svc.spool.append(record)
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


# ---- the pipeline: one body, run with or without Prefect tracking ----

StepRunner = Callable[..., Awaitable[Any]]


async def _pipeline(req: InferenceRequest, svc: Services, sink: Sink, run: StepRunner) -> Outcome:
    out = Outcome(model=req.body.model)
    try:
        model = await run(authorize, req, svc, out)
        out.model = model.name
        plan = await run(select_cluster, req, model, svc, out)
        await _run_on_clusters(req, plan, svc, sink, out, run)
    except APIError as exc:
        out.status, out.error_type, out.error_message = exc.status, exc.type, exc.message
        error: APIError | None = exc
    except Exception as exc:  # a bug or an unexpected failure: still an OpenAI-shaped answer and a usage row
        log.exception("request %s failed unexpectedly", req.request_id)
        out.status, out.error_type, out.error_message = 500, "server_error", repr(exc)
        error = APIError(500, "The gateway hit an internal error; it has been logged.", type="server_error")
    else:
        error = None
    try:
        await run(record_usage, req, out, svc)
    except Exception:  # no usage record, no response: the caller gets an error instead of unmetered output
        log.exception("could not record usage for request %s", req.request_id)
        error = APIError(503, "The gateway could not record this request's usage; try again.", code="usage_spool")
    if error is not None:
        sink.put("error", error)
    else:
        sink.put("end")
    return out


def _plain_runner(out_steps: list[dict[str, Any]]) -> StepRunner:
    async def run(step: Any, *args: Any) -> Any:
        t = time.perf_counter()
        ok = False
        try:
            result = await step.fn(*args)
            ok = True
            return result
        finally:
            out_steps.append({"step": step.name, "ms": round((time.perf_counter() - t) * 1000, 3), "ok": ok})

    return run


async def _task_runner(step: Any, *args: Any) -> Any:
    return await step(*args)


@flow(name="infer", flow_run_name="{endpoint} {model} for {user}", log_prints=False)
async def infer(request_id: str, endpoint: str, model: str, user: str) -> dict[str, Any]:
    """One inference as a recorded Prefect flow run (tracking ``all``)."""
    req, svc, sink = _inflight[request_id]
    out = await _pipeline(req, svc, sink, _task_runner)
    if out.status >= 400:
        raise RuntimeError(f"{out.status} {out.error_type}: {out.error_message}")
    return {"status": out.status, "cluster": out.cluster, "usage": out.usage}


_inflight: dict[str, tuple[InferenceRequest, Services, Sink]] = {}


async def _run_tracked(req: InferenceRequest, svc: Services, sink: Sink) -> None:
    _inflight[req.request_id] = (req, svc, sink)
    try:
        await infer(request_id=req.request_id, endpoint=req.endpoint, model=req.body.model, user=req.principal.user)
    except Exception as exc:
        if sink.finished:
            return  # the request failed inside the flow: the run's state says so, the caller has its error
        # Prefect itself failed (API unreachable, ...) before the pipeline answered: serve the request anyway.
        log.warning("could not run request %s as a flow run (%s); serving it untracked", req.request_id, exc)
        if not sink.started:
            await _pipeline(req, svc, sink, _plain_runner([]))
        else:
            sink.put("error", APIError(502, "The request's flow run failed mid-stream", code="flow_failed"))
    finally:
        _inflight.pop(req.request_id, None)


async def _run_sampled(req: InferenceRequest, svc: Services, sink: Sink) -> None:
    steps: list[dict[str, Any]] = []
    out = await _pipeline(req, svc, sink, _plain_runner(steps))
    out.steps = steps
    recorder = svc.recorder
    if recorder is None or svc.settings.flow_tracking is FlowTracking.off:
        return
    if out.status >= 400 or out.cold_start or random.random() < svc.settings.flow_sample_rate:
        recorder.submit(req, out)


def run_inference(req: InferenceRequest, svc: Services) -> tuple[Sink, asyncio.Task[None]]:
    """Start the pipeline for one request; the caller reads events from the returned sink."""
    sink = Sink()
    runner = _run_tracked if svc.settings.flow_tracking is FlowTracking.all else _run_sampled
    task = asyncio.create_task(runner(req, svc, sink))
    _running.add(task)  # the loop keeps only weak references: a disconnected caller's pipeline must finish
    task.add_done_callback(_running.discard)
    return sink, task


_running: set[asyncio.Task[None]] = set()
