"""The Prefect side a gateway runs with (``serving.request.ControlPlane``): warm-ups as ``warm-up`` flow runs,
requests as ``infer`` flow runs (tracking ``all``) or ``infer-record`` traces (``sample``).

The entry point (``first/gateway.py``) lends it to the app; the serving side never imports Prefect flows.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.exceptions import CancelledRun

from blocks.registry import ClusterSpec, ModelSpec
from core.errors import APIError
from core.settings import FlowTracking, Settings
from core.stopping import STOPPING, stopping_error
from flows.inference_events import InferenceEvents, Observed, request_resource
from flows.lifecycle import warm_up
from flows.lifecycle_tasks import FleetContext, use_gateway
from flows.recorder import FlowRecorder
from serving.request import InferenceRequest, Outcome, Services
from serving.tracing import step_runner

BATCH_DEPLOYMENT = "run-batch/run-batch"

_tasks: dict[str, Any] = {}


async def _as_task_run(name: str, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> Any:
    """Inside an ``infer`` run: each pipeline step becomes a task run of that name."""
    t = _tasks.get(name)
    if t is None:
        t = _tasks[name] = task(fn, name=name, cache_policy=NO_CACHE)
    return await t(*args)


_inflight: dict[str, Callable[[], Awaitable[Outcome]]] = {}


@flow(name="infer", flow_run_name="{endpoint} {model} for {user}", log_prints=False)
async def infer(request_id: str, endpoint: str, model: str, user: str) -> dict[str, Any]:
    """One inference as a recorded Prefect flow run (tracking ``all``), each step a task run."""
    step_runner.set(_as_task_run)
    out = await _inflight[request_id]()
    if out.status >= 400:
        raise RuntimeError(f"{out.status} {out.error_type}: {out.error_message}")
    return {"status": out.status, "cluster": out.cluster, "usage": out.usage}


def _stopping(model: ModelSpec, cluster: ClusterSpec) -> APIError:
    return stopping_error(f"; the warm-up of '{model.name}' on cluster '{cluster.name}' was cancelled")


class PrefectControlPlane:
    def __init__(self, settings: Settings) -> None:
        # Traces of sampled requests go to a Prefect server, never to an ephemeral one started on the hot path.
        sample = settings.flow_tracking is FlowTracking.sample and bool(os.environ.get("PREFECT_API_URL"))
        self.settings = settings
        self.recorder = FlowRecorder() if sample else None
        self.events: InferenceEvents | None = None

    def start(self, gateway: str) -> None:
        s = self.settings
        if s.inference_events and os.environ.get("PREFECT_API_URL") and self.events is None:
            self.events = InferenceEvents.from_environment(gateway, s.event_budget_per_s, s.event_summary_s,
                                                           s.event_slow_s)  # fmt: skip

    def observe(self, req: InferenceRequest, out: Outcome) -> None:
        if self.events is None:
            return
        u = out.usage
        self.events.observe(Observed(
            request_id=req.request_id, endpoint=req.endpoint, model=out.model, cluster=out.cluster,
            user=req.principal.user, groups=list(req.principal.groups), status=out.status,
            error_type=out.error_type, error_code=out.error_code, error=out.error_message,
            prompt_tokens=int(u.get("prompt_tokens") or 0),
            completion_tokens=int(u.get("completion_tokens") or 0), latency_ms=out.latency_ms, ttft_ms=out.ttft_ms,
            cold_start=out.cold_start, tried=list(out.tried), stream=req.stream, batch_id=req.principal.batch_id,
        ))  # fmt: skip

    def warm_runner(self, services: Services) -> Callable[[ModelSpec, ClusterSpec], Awaitable[dict[str, Any]]]:
        async def run_warm_up(model: ModelSpec, cluster: ClusterSpec) -> dict[str, Any]:
            """The ``warm-up`` flow (a recorded run) on its own thread and loop, off the serving loop, with the
            gateway's settings, backends and registry."""
            if STOPPING.is_set():
                raise _stopping(model, cluster)
            ctx = FleetContext(services.settings, services.backends, services.registry)

            def in_thread() -> dict[str, Any]:
                use_gateway(ctx)
                return asyncio.run(warm_up(model=model.instance_name, cluster=cluster.name))

            try:
                return await asyncio.to_thread(in_thread)
            except CancelledRun:  # the run ended Cancelled: this gateway is stopping (core.stopping)
                raise _stopping(model, cluster) from None

        return run_warm_up

    async def run_tracked(
        self, req: InferenceRequest, services: Services, run: Callable[[], Awaitable[Outcome]]
    ) -> None:
        _inflight[req.request_id] = run
        try:
            await infer(request_id=req.request_id, endpoint=req.endpoint, model=req.body.model,
                        user=req.principal.user)  # fmt: skip
        finally:
            _inflight.pop(req.request_id, None)

    def record(self, req: InferenceRequest, out: Outcome) -> None:
        if self.recorder is not None:  # linked to its event (failures and cold starts always have one of their own)
            self.recorder.submit(req, out, request_resource(req.request_id) if self.events is not None else None)

    async def start_batch(self, batch_id: str, run_name: str, gateway_url: str) -> str:
        if not os.environ.get("PREFECT_API_URL"):  # never an ephemeral server: no worker would ever run it
            raise RuntimeError("this gateway has no Prefect server (PREFECT_API_URL is not set)")
        parameters = {"batch_id": batch_id, "gateway_url": gateway_url}
        run = await run_deployment(BATCH_DEPLOYMENT, parameters=parameters, timeout=0, flow_run_name=run_name,
                                   tags=["batch"])  # fmt: skip
        return str(run.id)

    def stats(self) -> dict[str, Any] | None:
        if self.recorder is None and self.events is None:
            return None
        got: dict[str, Any] = {}
        if self.recorder is not None:
            got |= {"recorded": self.recorder.recorded, "dropped": self.recorder.dropped}
        if self.events is not None:
            got["events"] = self.events.counts.public()
        return got

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        if self.recorder is not None:
            self.recorder.close()
