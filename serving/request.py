"""One inference as the serving side sees it: the request, what happened to it, and the services it uses."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from analytics.spool import UsageSpool
from blocks.registry import ClusterSpec, ModelSpec, Registry
from compute.backends import Backends
from core.principal import Principal
from core.settings import Settings
from serving.batches.files import FileStore
from serving.batches.store import BatchStore
from serving.budgets import Budgets
from serving.limits import Reservation
from serving.live_state import LiveState
from serving.protocol import InferenceBody
from serving.replicas.limits import Admission
from serving.replicas.store import SharedStore


@dataclass
class InferenceRequest:
    request_id: str
    endpoint: str  # "chat.completions" | "completions" | "embeddings"
    path: str  # backend path, e.g. "/v1/chat/completions"
    body: InferenceBody
    principal: Principal
    warm_wait_s: float | None = None  # the caller's bound on waiting for a cold model (X-First-Warm-Wait)
    pinned: str | None = None  # a cluster the caller chose (X-First-Cluster, or a "cluster/model" name)
    session: str | None = None  # the caller's session key (FIRST_SESSION_HEADER, or the `user` field): affinity
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
    error_code: str | None = None  # the APIError's code (model_start_failed, backend_unreachable, ...)
    usage: dict[str, int] = field(default_factory=dict)
    ttft_ms: float | None = None
    latency_ms: float = 0.0  # start to usage record (set by record_usage)
    cold_start: bool = False
    queue_ms: float = 0.0  # waited for a slot at a full instance (serving/fair_queue.py)
    steps: list[dict[str, Any]] = field(default_factory=list)
    tokens_reserved: int = 0
    reservation: Reservation = field(default_factory=Reservation)
    streamed: bool = False  # stream chunks reached the caller (so tokens were spent, usage or not)
    tried: list[str] = field(default_factory=list)  # clusters tried, in order (more than one: a failover)
    completion: dict[int, list[str]] | None = None  # audit mode only: generated text per choice index


class ControlPlane(Protocol):
    """What the Prefect side lends the serving side. The entry point (``first/gateway.py``) builds the
    Prefect one (``flows.control_plane.PrefectControlPlane``); without it a gateway serves untracked and starts
    nothing itself."""

    def warm_runner(self, services: Services) -> Callable[[ModelSpec, ClusterSpec], Awaitable[dict[str, Any]]]:
        """The coroutine that warms a cold model up (the ``warm-up`` flow, a recorded run)."""
        ...

    async def run_tracked(
        self, req: InferenceRequest, services: Services, run: Callable[[], Awaitable[Outcome]]
    ) -> None:
        """Run one request's pipeline (``run``) as a recorded ``infer`` flow run, its steps task runs."""
        ...

    def record(self, req: InferenceRequest, out: Outcome) -> None:
        """Record a served request's trace as an ``infer-record`` flow run, off the serving loop."""
        ...

    def start(self, gateway: str) -> None:
        """The gateway is serving as ``gateway`` (its id): start what reports on it (inference events)."""
        ...

    def observe(self, req: InferenceRequest, out: Outcome) -> None:
        """Every finished request, on the serving loop: hand it to the inference events (no I/O here)."""
        ...

    def stats(self) -> dict[str, Any] | None:
        """Flow records written and dropped so far, and what became of the inference events (on /health)."""
        ...

    async def start_batch(self, batch_id: str, run_name: str, gateway_url: str) -> str:
        """Start the batch's ``run-batch`` flow run (a deployment run a worker picks up), which sends its lines to
        ``gateway_url``; return the run's id."""
        ...

    def close(self) -> None: ...


@dataclass
class Services:
    """What the steps need; built once by the API at startup."""

    settings: Settings
    registry: Registry
    live: LiveState
    backends: Backends
    spool: UsageSpool
    limiter: Admission
    control: ControlPlane | None = None
    files: FileStore | None = None  # /v1/files and /v1/batches (made by the API at startup)
    batches: BatchStore | None = None
    shared: SharedStore | None = None  # the replicas' Redis (FIRST_REDIS_URL), None for one gateway
    budgets: Budgets = field(default_factory=Budgets)  # projects whose GPU-hours are spent (serving/budgets.py)
