"""The hot path of one inference, by plain calls: authorize -> select cluster -> (ensure warm -> wait for a
slot -> execute, with failover) -> record usage. The HTTP handler calls ``serve`` and gets a typed result
(``serving/results.py``).

Whether a request becomes a recorded Prefect flow run is a setting (design decision 1, ``FIRST_FLOW_TRACKING``):

- ``all``: the pipeline runs inside the ``infer`` flow (``flows/control_plane.py``), each step a task run. Costly
  (see docs/benchmarks.md).
- ``sample`` (default): the steps run as plain coroutines and the request's trace is recorded afterwards as an
  ``infer-record`` flow run, off the serving loop, when it failed, waited for a warm-up, or was sampled.
- ``off``: nothing is recorded but the lifecycle flows.

Usage is spooled before the terminal item, so a response never completes without its usage record.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from core.errors import APIError
from core.settings import FlowTracking
from core.stopping import STOPPING, stopping_error
from serving.live_state import Instance
from serving.request import InferenceRequest, Outcome, Services
from serving.results import Result, ResultChannel
from serving.steps import (
    authorize,
    ensure_warm,
    execute,
    record_usage,
    reserve_cluster,
    select_cluster,
    wait_for_slot,
)
from serving.tracing import step_trace

# Failures before the first byte that another cluster (or a fresh start of the same one) may not have.
# Not a warm-up that is merely slow (the caller's wait bound is spent), nor a timeout (it would double the wait).
FAILOVER_CODES = frozenset({"backend_unreachable", "backend_error", "task_failed", "endpoint_unreachable",
                            "cluster_unreachable", "model_start_failed"})  # fmt: skip

log = logging.getLogger("first.inference")


async def serve(req: InferenceRequest, svc: Services) -> tuple[Result, ResultChannel]:
    """Run one request and wait for its answer. The pipeline is a task of its own: a caller who disconnects
    does not stop it, so its usage row is always written."""
    channel = ResultChannel()
    tracked = svc.settings.flow_tracking is FlowTracking.all and svc.control is not None
    task = asyncio.create_task(_run_tracked(req, svc, channel) if tracked else _run_sampled(req, svc, channel))
    _running.add(task)  # the loop keeps only weak references: a disconnected caller's pipeline must finish
    task.add_done_callback(_running.discard)
    return await channel.result(), channel


_running: set[asyncio.Task[None]] = set()


async def run_pipeline(req: InferenceRequest, svc: Services, channel: ResultChannel) -> Outcome:
    """The request, start to end. Every outcome (an answer, a caller's mistake, a bug) ends in a usage row and
    one terminal item on the channel."""
    out = Outcome(model=req.body.model)
    error: APIError | None = None
    try:
        if not svc.spool.healthy and not svc.spool.retry():  # no cluster work that could not be metered
            raise APIError(503, "The gateway cannot record usage right now (its disk may be full); retry later.",
                           code="usage_spool", headers={"Retry-After": "30"})  # fmt: skip
        if STOPPING.is_set():  # SIGTERM came: requests under way finish, new ones go elsewhere (core/stopping.py)
            raise stopping_error()
        model = await authorize(req, svc, out)
        out.model = model.name
        plan = await select_cluster(req, model, svc, out)
        await _run_on_clusters(req, plan, svc, channel, out)
    except APIError as exc:
        if STOPPING.is_set() and exc.status >= 500 and exc.code != "gateway_stopping":  # cut by the stop
            exc = stopping_error(" and cut this request", detail=exc.internal)
        out.status, out.error_type, out.error_message, out.error_code = exc.status, exc.type, exc.internal, exc.code
        error = exc
    except Exception as exc:  # a bug or an unexpected failure: still an OpenAI-shaped answer and a usage row
        log.exception("request %s failed unexpectedly", req.request_id)
        out.status, out.error_type, out.error_message = 500, "server_error", repr(exc)
        error = APIError(500, "The gateway hit an internal error; it has been logged.", type="server_error")
    try:
        await record_usage(req, out, svc)
    except Exception:  # no usage record, no response: the caller gets an error instead of unmetered output
        log.exception("could not record usage for request %s", req.request_id)
        error = APIError(503, "The gateway could not record this request's usage; try again.", code="usage_spool")
    if error is not None:
        channel.fail(error)
    else:
        channel.finish()
    return out


async def _run_on_clusters(
    req: InferenceRequest, plan: list[Instance], svc: Services, channel: ResultChannel, out: Outcome
) -> None:
    """Try the plan's clusters in order until one answers, at most ``max_tries`` of them. A failure before the
    first byte moves on (failover); after it, the stream ends with an error event: never a silent replay.
    If the server of the only candidate vanished (scaled down, crashed), it is warmed up again once."""
    queue, tries, last = list(plan), 0, None
    rewarmed: set[Instance] = set()
    while queue and tries < svc.settings.max_tries:
        inst = queue.pop(0)
        if tries and not svc.live.allows(inst, time.time()):
            continue  # opened while this request was on another cluster
        try:
            await reserve_cluster(req, inst, svc, out)
        except APIError as exc:  # the caller's share of this cluster is used up: another cluster may take it
            last = exc
            continue
        tries += 1
        out.cluster = inst.cluster.name
        out.tried.append(inst.cluster.name)
        warmed = False
        try:
            out.cold_start = await ensure_warm(req, inst, svc) or out.cold_start
            warmed = True
            if req.principal.batch_id is None:
                await _execute_in_slot(req, inst, svc, channel, out)
            else:  # a batch's line waits for one of the instance's batch slots; interactive requests never do
                async with inst.batch_lane(svc.settings.batch_share):
                    await _execute_in_slot(req, inst, svc, channel, out)
            return
        except APIError as exc:
            if channel.started or exc.code not in FAILOVER_CODES:
                raise
            last = exc
            if not warmed:
                svc.live.start_failed(inst, exc.code, exc.internal)
            if exc.code == "backend_unreachable":
                svc.live.mark_unreachable(inst, exc.internal)
                if not queue and inst not in rewarmed:
                    rewarmed.add(inst)
                    queue.append(inst)
            if queue and tries < svc.settings.max_tries:
                svc.live.failovers += 1
                log.warning("request %s failed on %s before its first byte (%s); trying %s", req.request_id,
                            inst.cluster.name, exc.code, queue[0].cluster.name)  # fmt: skip
    raise last or APIError(503, "No cluster could take the request", code="no_cluster")


async def _execute_in_slot(
    req: InferenceRequest, inst: Instance, svc: Services, channel: ResultChannel, out: Outcome
) -> None:
    slot = await wait_for_slot(req, inst, svc, out)
    try:
        await execute(req, inst, svc, channel, out)
    finally:
        if slot is not None:
            slot.release()


async def _run_sampled(req: InferenceRequest, svc: Services, channel: ResultChannel) -> None:
    steps: list[dict[str, object]] = []
    step_trace.set(steps)  # this task's own context: the steps time themselves into it
    out = await run_pipeline(req, svc, channel)
    out.steps = steps
    if svc.control is None:
        return
    svc.control.observe(req, out)
    if svc.settings.flow_tracking is FlowTracking.off:
        return
    if out.status >= 400 or out.cold_start or random.random() < svc.settings.flow_sample_rate:
        svc.control.record(req, out)


async def _run_tracked(req: InferenceRequest, svc: Services, channel: ResultChannel) -> None:
    control = svc.control
    assert control is not None

    async def run_and_observe() -> Outcome:
        out = await run_pipeline(req, svc, channel)
        control.observe(req, out)
        return out

    try:
        await control.run_tracked(req, svc, run_and_observe)
    except Exception as exc:
        if channel.finished:
            return  # the request failed inside the flow: the run's state says so, the caller has its error
        # Prefect itself failed (API unreachable, ...) before the pipeline answered: serve the request anyway.
        log.warning("could not run request %s as a flow run (%s); serving it untracked", req.request_id, exc)
        if not channel.started:
            await run_pipeline(req, svc, channel)
        else:
            channel.fail(APIError(502, "The request's flow run failed mid-stream", code="flow_failed"))
