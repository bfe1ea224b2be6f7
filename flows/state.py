"""Live state of each model on each cluster, held by the gateway in memory.

``ensure_warm`` is single-flight: the first request for a cold model starts one warm-up; concurrent
requests join it and wait up to a bound, then get 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from api.errors import APIError
from blocks.registry import ClusterSpec, ModelSpec
from compute.backends import Backends

log = logging.getLogger("first.state")

WarmRunner = Callable[[ModelSpec, ClusterSpec], Awaitable[dict[str, Any]]]


@dataclass
class Instance:
    cluster: ClusterSpec
    model: ModelSpec
    state: str = "unknown"  # unknown | cold | starting | hot | failed
    base_url: str | None = None
    inflight: int = 0
    last_error: str | None = None
    since: float = field(default_factory=time.time)
    warm_started: float | None = None
    warm: asyncio.Future[None] | None = None

    def set(self, state: str, base_url: str | None = None, error: str | None = None) -> None:
        if state != self.state:
            log.info("%s on %s: %s -> %s", self.model.name, self.cluster.name, self.state, state)
            self.since = time.time()
        self.state = state
        self.base_url = base_url or self.base_url
        self.last_error = error

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.model.name, "cluster": self.cluster.name, "state": self.state, "inflight": self.inflight,
            "base_url": self.base_url, "last_error": self.last_error, "since": self.since,
        }  # fmt: skip


async def run_warm_up_flow(model: ModelSpec, cluster: ClusterSpec) -> dict[str, Any]:
    """Run the ``warm-up`` Prefect flow (a recorded run) on its own thread and loop, off the serving loop."""
    from flows.lifecycle import warm_up

    return await asyncio.to_thread(asyncio.run, warm_up(model=model.name, cluster=cluster.name))


class LiveState:
    def __init__(self, backends: Backends, warm_wait_s: float, warm_runner: WarmRunner = run_warm_up_flow) -> None:
        self.backends = backends
        self.warm_wait_s = warm_wait_s
        self.warm_runner = warm_runner
        self._instances: dict[tuple[str, str], Instance] = {}

    def instance(self, cluster: ClusterSpec, model: ModelSpec) -> Instance:
        key = (cluster.name, model.name)
        inst = self._instances.get(key)
        if inst is None or inst.model is not model or inst.cluster is not cluster:
            fresh = Instance(cluster, model)
            if inst is not None:  # registry refreshed: keep what we know
                fresh.state, fresh.base_url, fresh.inflight = inst.state, inst.base_url, inst.inflight
            inst = self._instances[key] = fresh
        return inst

    def all(self) -> list[Instance]:
        return list(self._instances.values())

    async def ensure_warm(self, inst: Instance, wait_s: float | None = None) -> bool:
        """Return once the instance is hot. True if this request had to wait for a warm-up.

        ``wait_s`` (a caller's ``X-First-Warm-Wait``) can shorten the configured bound, not extend it."""
        if inst.state == "hot":
            return False
        if inst.warm is None or inst.warm.done():
            inst.warm = asyncio.ensure_future(self._warm(inst))
        try:
            bound = self.warm_wait_s if wait_s is None else max(0.0, min(wait_s, self.warm_wait_s))
            await asyncio.wait_for(asyncio.shield(inst.warm), timeout=bound)
        except TimeoutError:
            waited = time.monotonic() - (inst.warm_started or time.monotonic())
            raise APIError(
                503,
                f"Model '{inst.model.name}' is warming up on cluster '{inst.cluster.name}' "
                f"(for {waited:.0f} s so far). Retry shortly.",
                code="model_warming_up",
                headers={"Retry-After": "10"},
            ) from None
        except APIError:
            raise
        except Exception as exc:
            raise APIError(
                503,
                f"Model '{inst.model.name}' failed to start on cluster '{inst.cluster.name}': {exc}",
                code="model_start_failed",
                headers={"Retry-After": "30"},
            ) from exc
        return inst.state == "hot" and inst.warm_started is not None

    async def _warm(self, inst: Instance) -> None:
        backend = self.backends.get(inst.cluster)
        status = await backend.status(inst.model)
        if status["state"] == "hot":  # already up (an operator's warm-up, or a gateway restart)
            inst.warm_started = None
            inst.set("hot", status.get("base_url"))
            return
        if not backend.manages_lifecycle:  # nothing FIRST can start: the cluster is simply unreachable
            inst.set("failed", error=status.get("detail"))
            raise APIError(
                503,
                f"Cluster '{inst.cluster.name}' is unreachable: {status.get('detail') or status['state']}",
                code="cluster_unreachable",
                headers={"Retry-After": "30"},
            )
        inst.warm_started = time.monotonic()
        inst.set("starting")
        try:
            status = await self.warm_runner(inst.model, inst.cluster)
        except BaseException as exc:
            inst.set("failed", error=str(exc))
            raise
        inst.set("hot", status.get("base_url"))

    def mark_unreachable(self, inst: Instance, error: str) -> None:
        """The server stopped answering (scaled down, crashed): re-check before the next request."""
        inst.set("unknown", error=error)
