"""Live state of each model on each cluster, held by the gateway in memory.

An instance is one model on one cluster: cold, queued, starting, hot, draining (its cluster is in maintenance
and requests are still running on it) or failed, plus its in-flight requests, recent latency and errors, and
when it was last observed. Three things move it:

- requests: each one counts in and out, records its latency, and reports failures to the cluster's breaker;
- lifecycle runs (warm-up, scale-down, refresh-status, ... from the Prefect UI or the schedule), whose
  observations the gateway adopts through ``serving.bus`` within ``FIRST_STATE_SYNC_S``;
- status checks the gateway makes itself when it does not know an instance yet.

``ensure_warm`` is single-flight: the first request for a cold instance starts one warm-up (the ``warm-up``
flow, a recorded run, through the
``warm_runner`` the entry point lends); concurrent requests join it and resume in arrival order once it is hot.
Past the bound
they get 503 with Retry-After, naming the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from blocks.registry import ClusterSpec, ModelSpec
from compute.backends import Backends
from core.errors import APIError
from core.settings import Settings
from serving.bus import GatewayReport, InstanceUse, Observation
from serving.fair_queue import FairQueue
from serving.replicas.store import SharedStateDown
from serving.replicas.warmups import WarmLocks
from serving.routing import RUNNING, Breaker, count_running, rank

log = logging.getLogger("first.state")

WarmRunner = Callable[[ModelSpec, ClusterSpec], Awaitable[dict[str, Any]]]
STATES = ("unknown", "cold", "queued", "starting", "hot", "draining", "failed")
RECENT_S = 300.0  # the window of "recent" latency and errors
LOAD_WINDOW_S = 60.0  # the window of the load a gateway reports for autoscale


@dataclass(eq=False)
class Instance:
    cluster: ClusterSpec
    model: ModelSpec  # this instance's spec: ``model.replica`` says which of the model's instances there it is
    state: str = "unknown"  # unknown | cold | queued | starting | hot | failed (draining is derived: shown_state)
    base_url: str | None = None
    inflight: int = 0
    others_inflight: int = 0  # other gateway replicas' requests here, as they last said (serving/replicas/fleet.py)
    last_error: str | None = None
    since: float = field(default_factory=time.time)  # when it entered its state
    last_status: float | None = None  # when a status check or a lifecycle run last said what it is
    last_used: float | None = None
    hot_since: float | None = None
    requests: int = 0
    errors: int = 0
    latencies_ms: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=200))
    error_times: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    warm: asyncio.Future[None] | None = None
    probing: asyncio.Future[None] | None = None  # a status check under way (single-flight)
    warm_started: float | None = None
    warm_ups: int = 0
    breaker: Breaker | None = None  # this model's server on this cluster (LiveState.instance_breaker)
    batch_slots: asyncio.Semaphore | None = None  # batch lines in flight here (made on the first one)
    admission: FairQueue | None = None  # waiting requests once it is full (serving/fair_queue.py)
    queue_waits: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=500))  # (when, ms)
    refusals: deque[float] = field(default_factory=lambda: deque(maxlen=500))  # turned away after waiting

    def batch_lane(self, share: float) -> asyncio.Semaphore:
        """The slots batch lines share on this instance: ``share`` of its cluster's ``max_concurrency`` (at least
        one). Interactive requests never wait for them; batch lines wait here instead of crowding them out."""
        if self.batch_slots is None:
            self.batch_slots = asyncio.Semaphore(max(1, int(share * self.cluster.max_concurrency)))
        return self.batch_slots

    def fair_queue(self) -> FairQueue:
        """This instance's admission gate: its cluster's ``max_concurrency`` less the other replicas' share."""
        if self.admission is None:
            self.admission = FairQueue(lambda: self.cluster.max_concurrency - self.others_inflight)
        return self.admission

    @property
    def key(self) -> str:
        return f"{self.cluster.name}/{self.model.instance_name}"

    def set(self, state: str, base_url: str | None = None, error: str | None = None, at: float | None = None) -> None:
        now = time.time()
        if state != self.state:
            log.info("%s on %s: %s -> %s", self.model.name, self.cluster.name, self.state, state)
            self.since = now
            if state == "hot":
                self.hot_since = now
        self.state = state
        self.base_url = base_url or self.base_url
        self.last_error = error
        self.last_status = at or now

    @property
    def shown_state(self) -> str:
        if self.cluster.maintenance and self.state in RUNNING and self.inflight:
            return "draining"
        return self.state

    def recent(self, now: float) -> dict[str, Any]:
        lat = [ms for t, ms in self.latencies_ms if now - t <= RECENT_S]
        return {
            "requests": len(lat),
            "latency_ms_p50": round(statistics.median(lat), 1) if lat else None,
            "errors": sum(1 for t in self.error_times if now - t <= RECENT_S),
        }

    def use(self, now: float) -> InstanceUse:
        """What this gateway tells the lifecycle flows about the instance (its last LOAD_WINDOW_S)."""
        waits = [ms for t, ms in self.queue_waits if now - t <= LOAD_WINDOW_S]
        return InstanceUse(
            state=self.shown_state, inflight=self.inflight, last_used=self.last_used, hot_since=self.hot_since,
            waiting=self.admission.queued if self.admission else 0,
            requests_1m=sum(1 for t, _ in self.latencies_ms if now - t <= LOAD_WINDOW_S),
            refused_1m=sum(1 for t in self.refusals if now - t <= LOAD_WINDOW_S),
            queue_ms_p50=round(statistics.median(waits), 1) if waits else None,
        )  # fmt: skip

    def snapshot(self, detail: bool = True) -> dict[str, Any]:
        now = time.time()
        doc = {
            "model": self.model.name, "cluster": self.cluster.name, "instance": self.model.replica,
            "state": self.shown_state,
            "inflight": self.inflight, "capacity": self.cluster.max_concurrency, "since": self.since,
            "last_status": self.last_status, "last_used": self.last_used, "recent": self.recent(now),
            "requests": self.requests, "errors": self.errors, "warm_ups": self.warm_ups,
            "breaker": self.breaker.state(now) if self.breaker else "closed",
            "waiting": self.admission.queued if self.admission else 0,
        }  # fmt: skip
        if detail:
            doc.update(base_url=self.base_url, last_error=self.last_error)
        return doc


CLOCK_SKEW_S = 5.0  # how far ahead of this gateway's clock an observation may be dated
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def allowed_base_url(cluster: ClusterSpec, model: ModelSpec, url: str) -> bool:
    """Whether a lifecycle run may point routing at ``url``: the block's own URL for a direct-HTTP cluster;
    loopback and the model's port for a local one; http(s) on the model's port for a Globus Compute cluster
    (its node is whatever host the batch job got: the port and scheme are what the spec fixes). A model's further
    instances (autoscale's ``m@1``...) take a free port where they start: any unprivileged one."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return False
    if u.scheme not in ("http", "https") or u.username or u.password or u.query or u.fragment or not u.hostname:
        return False
    if cluster.transport == "http":
        return cluster.base_url is not None and url.rstrip("/") == cluster.base_url.rstrip("/")
    expected_port = model.on(cluster.name).port
    port_ok = port == expected_port if model.replica == 0 else port is not None and port >= 1024
    if cluster.transport == "local":
        return (u.hostname in _LOOPBACK or u.hostname == cluster.direct_host) and port_ok
    return port_ok


# Failures of the way to a cluster (its endpoint, its functions): they close the cluster to every model.
# Anything else that fails on a cluster is the one model server's, and closes only that model there.
CLUSTER_FAULTS = frozenset({"endpoint_unreachable", "cluster_unreachable", "task_failed", "no_relay"})


def fault_scope(code: str | None) -> str:
    return "cluster" if code in CLUSTER_FAULTS else "instance"


class LiveState:
    def __init__(
        self, backends: Backends, settings: Settings, warm_runner: WarmRunner | None = None,
        warm_locks: WarmLocks | None = None,
    ) -> None:  # fmt: skip
        self.backends = backends
        self.warm_locks = warm_locks  # several replicas: one warm-up among them (serving/replicas/warmups.py)
        self.settings = settings
        self.warm_wait_s = settings.warm_wait_s
        self.warm_runner = warm_runner
        self._instances: dict[tuple[str, str, int], Instance] = {}  # (cluster, model, replica)
        self._bases: dict[tuple[str, str, int], ModelSpec] = {}  # the registry's spec each instance was made from
        self.breakers: dict[str, Breaker] = {}
        self.estimates: dict[str, float] = {}  # learned cold-to-hot seconds per cluster
        self.failovers = 0
        self.audit_failures = 0  # audit-mode entries that could not be written (the answers were still served)

    # ---- instances ----

    def instance(self, cluster: ClusterSpec, model: ModelSpec, replica: int = 0) -> Instance:
        """The model's instance ``replica`` on the cluster (0: the one requests warm up; autoscale starts more)."""
        key = (cluster.name, model.name, replica)
        inst = self._instances.get(key)
        if inst is None:
            inst = self._instances[key] = Instance(cluster, model.as_replica(replica))
            self._bases[key] = model
        elif self._bases.get(key) is not model or inst.cluster is not cluster:  # the registry was refreshed
            inst.model, inst.cluster, self._bases[key] = model.as_replica(replica), cluster, model
        return inst

    def instances_of(self, cluster: ClusterSpec, model: ModelSpec, routable: bool = True) -> list[Instance]:
        """The instances a request may use: the first always; further ones (autoscale's) once they are hot. A
        request never waits for a further instance's start: a full hot one's queue is seconds, a start minutes.
        ``routable=False``: every instance known, whatever its state (for the status page)."""
        first = self.instance(cluster, model)
        more = [self.instance(cluster, model, r) for (c, m, r), i in list(self._instances.items())
                if c == cluster.name and m == model.name and r > 0 and (i.state == "hot" or not routable)]  # fmt: skip
        return [first, *more]

    def all(self) -> list[Instance]:
        return list(self._instances.values())

    def breaker(self, cluster: str) -> Breaker:
        """The cluster's breaker: its endpoint or its functions failed, whatever the model."""
        b = self.breakers.get(cluster)
        if b is None:
            b = self.breakers[cluster] = Breaker(self.settings.breaker_failures, self.settings.breaker_cooldown_s)
        return b

    def instance_breaker(self, inst: Instance) -> Breaker:
        """One model's breaker on one cluster: its server failed. It closes that model there, not the cluster."""
        if inst.breaker is None:
            inst.breaker = Breaker(self.settings.breaker_failures, self.settings.breaker_cooldown_s)
        return inst.breaker

    def allows(self, inst: Instance, now: float) -> bool:
        return self.breaker(inst.cluster.name).allows(now) and (inst.breaker is None or inst.breaker.allows(now))

    # ---- routing ----

    def route(self, candidates: list[Instance], session: str | None = None) -> list[Instance]:
        """``candidates`` best first; clusters in maintenance or with an open breaker left out; a session's own
        instance first while it is hot and has room."""
        running = count_running(self._instances.values())
        return rank(candidates, self.breakers, self.estimates, time.time(), running, session)

    async def probe(self, instances: list[Instance], timeout_s: float = 10.0) -> None:
        """Ask the clusters what state these instances are in (the first time the gateway routes to them).
        Single-flight per instance: a burst of requests for an unknown instance makes one status call."""

        async def one(inst: Instance) -> None:
            if inst.probing is None or inst.probing.done():
                inst.probing = asyncio.ensure_future(self._probe_one(inst, timeout_s))
            await asyncio.shield(inst.probing)

        await asyncio.gather(*(one(i) for i in instances))

    async def _probe_one(self, inst: Instance, timeout_s: float) -> None:
        try:
            status = await asyncio.wait_for(self.backends.get(inst.cluster).status(inst.model), timeout_s)
        except Exception as exc:
            status = {"state": "unknown", "detail": f"status check failed: {exc!r}"}
        if inst.warm is None or inst.warm.done():  # a warm-up in progress knows better
            inst.set(status["state"], status.get("base_url"), status.get("detail"))

    # ---- a request's life on an instance ----

    def begin(self, inst: Instance) -> None:
        inst.inflight += 1
        now = time.time()
        self.breaker(inst.cluster.name).attempt(now)
        self.instance_breaker(inst).attempt(now)

    def end(self, inst: Instance, fault: str | None, latency_ms: float, error: str | None = None) -> None:
        """``fault``: None when the cluster served the request (a caller's 4xx, or a timeout the request's own
        size explains, is not its fault), else what failed: the model's server ("instance") or the way to the
        cluster ("cluster"). Each feeds its own breaker."""
        now = time.time()
        inst.inflight -= 1
        inst.requests += 1
        inst.last_used = now
        if fault is None:
            inst.latencies_ms.append((now, latency_ms))
            self.breaker(inst.cluster.name).success()
            self.instance_breaker(inst).success()
            return
        inst.last_error = error
        self._failed(inst, fault, now, error)

    def start_failed(self, inst: Instance, code: str | None, error: str) -> None:
        """A warm-up failed (that model's fault) or the cluster could not be reached (the cluster's)."""
        self._failed(inst, fault_scope(code), time.time(), error)

    def _failed(self, inst: Instance, scope: str, now: float, error: str | None) -> None:
        inst.errors += 1
        inst.error_times.append(now)
        breaker = self.breaker(inst.cluster.name) if scope == "cluster" else self.instance_breaker(inst)
        before = breaker.state(now)
        breaker.failure(now)
        if breaker.state(now) == "open" and before != "open":
            what = f"cluster {inst.cluster.name}" if scope == "cluster" else f"{inst.model.name} on {inst.cluster.name}"
            log.warning("%s: circuit breaker open for %.0f s after %d failures in a row (last: %s)",
                        what, breaker.cooldown_s, breaker.failures, error)  # fmt: skip

    def mark_unreachable(self, inst: Instance, error: str) -> None:
        """The server stopped answering (scaled down, crashed): re-check before the next request."""
        inst.set("unknown", error=error)

    # ---- cold starts ----

    async def ensure_warm(self, inst: Instance, wait_s: float | None = None) -> bool:
        """Return once the instance is hot. True if this request had to wait for a warm-up.

        ``wait_s`` (a caller's ``X-First-Warm-Wait``) can shorten the configured bound, not extend it. Waiters
        resume in arrival order: they wait on one future, whose callbacks run in the order they were added."""
        if inst.state == "hot":
            return False
        if inst.warm is None or inst.warm.done():
            inst.warm = asyncio.ensure_future(self._warm(inst))
        try:
            bound = self.warm_wait_s if wait_s is None else max(0.0, min(wait_s, self.warm_wait_s))
            await asyncio.wait_for(asyncio.shield(inst.warm), timeout=bound)
        except TimeoutError:
            if inst.warm_started is None:
                where = "its warm-up is beginning"
            else:
                where = f"{inst.state} for {time.monotonic() - inst.warm_started:.0f} s so far"
            raise APIError(
                503,
                f"Model '{inst.model.name}' is warming up on cluster '{inst.cluster.name}' ({where}). Retry shortly.",
                code="model_warming_up",
                headers={"Retry-After": str(max(5, round(self._remaining(inst))))},
            ) from None
        except APIError:
            raise
        except Exception as exc:
            raise APIError(
                503,
                f"Model '{inst.model.name}' failed to start on cluster '{inst.cluster.name}'; the gateway's "
                "operators can see why in its warm-up run.",
                code="model_start_failed",
                headers={"Retry-After": "30"},
                detail=str(exc),
            ) from exc
        return inst.state == "hot" and inst.warm_started is not None

    def _remaining(self, inst: Instance) -> float:
        expected = self.estimates.get(inst.cluster.name, inst.cluster.expected_start_s)
        return expected - (time.monotonic() - (inst.warm_started or time.monotonic()))

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
                f"Cluster '{inst.cluster.name}' is unreachable ({status['state']}); retry later.",
                code="cluster_unreachable",
                headers={"Retry-After": "30"},
                detail=status.get("detail"),
            )
        holder = await self._warm_lock(inst)
        if holder is not None:  # another replica is warming it up: wait for it, then see
            await self._join_warm_up(inst, backend, holder)
            return
        inst.warm_started = time.monotonic()
        inst.warm_ups += 1
        queued = inst.cluster.scheduler != "none" and status["state"] != "starting"
        inst.set("queued" if queued else "starting")
        try:
            if self.warm_runner is None:  # a gateway built without the Prefect side (create_app alone)
                raise APIError(503, f"This gateway cannot start '{inst.model.name}' on '{inst.cluster.name}': it "
                               "runs without a control plane (start it with `first run` or first.gateway).",
                               code="model_start_failed", headers={"Retry-After": "30"})  # fmt: skip
            status = await self.warm_runner(inst.model, inst.cluster)
        except BaseException as exc:
            inst.set("failed", error=str(exc))
            raise
        finally:
            if self.warm_locks is not None:
                with contextlib.suppress(SharedStateDown):
                    await self.warm_locks.release(inst.key)
        took = time.monotonic() - inst.warm_started
        old = self.estimates.get(inst.cluster.name)
        self.estimates[inst.cluster.name] = took if old is None else 0.5 * old + 0.5 * took
        inst.set("hot", status.get("base_url"))

    async def _warm_lock(self, inst: Instance) -> str | None:
        """The replica that is warming this instance up, or None when this one takes it on (or runs alone)."""
        if self.warm_locks is None:
            return None
        try:
            return await self.warm_locks.acquire(inst.key, self.settings.warm_up_timeout_s)
        except SharedStateDown:
            return None  # Redis down: warm up here; the cluster's start is idempotent

    async def _join_warm_up(self, inst: Instance, backend: Any, holder: str) -> None:
        inst.warm_started = time.monotonic()
        inst.set("starting")
        with contextlib.suppress(SharedStateDown):
            await self.warm_locks.wait_released(inst.key, self.settings.warm_up_timeout_s)  # type: ignore[union-attr]
        status = await backend.status(inst.model)
        if status["state"] != "hot":
            inst.set("failed", error=status.get("detail"))
            where = holder or "another replica"
            raise APIError(503, f"Model '{inst.model.name}' did not start on cluster '{inst.cluster.name}' (its "
                           f"warm-up ran on gateway replica {where}).", code="model_start_failed",
                           headers={"Retry-After": "30"}, detail=status.get("detail"))  # fmt: skip
        inst.set("hot", status.get("base_url"))

    # ---- what lifecycle runs saw, and what this gateway reports ----

    def adopt(self, obs: Observation, registry_clusters: dict[str, ClusterSpec], models: dict[str, ModelSpec]) -> bool:
        """Take a lifecycle run's observation if it is newer than what this gateway knows. True if adopted."""
        name, at, n = obs.model.partition("@")  # "m@1": the model's second instance on the cluster
        cluster, model = registry_clusters.get(obs.cluster), models.get(name)
        if cluster is None or model is None or (at and not n.isdigit()):
            return False
        if obs.ts > time.time() + CLOCK_SKEW_S:  # a future time would shadow every genuine observation after it
            log.warning("ignored an observation of %s on %s dated in the future (%.0f s ahead)", model.name,
                        cluster.name, obs.ts - time.time())  # fmt: skip
            return False
        replica = int(n) if at else 0
        if obs.base_url is not None and not allowed_base_url(cluster, model.as_replica(replica), obs.base_url):
            log.warning("ignored an observation of %s on %s: its server URL %r is not one the cluster's spec allows",
                        obs.model, cluster.name, obs.base_url[:200])  # fmt: skip
            return False
        inst = self.instance(cluster, model, replica)
        if inst.last_status is not None and obs.ts <= inst.last_status:
            return False
        if inst.warm is not None and not inst.warm.done() and obs.state not in ("queued", "starting", "hot"):
            return False  # our own warm-up is under way; it will say how it ended
        if obs.state == inst.state and obs.base_url in (None, inst.base_url):
            inst.last_status = obs.ts
            return False
        inst.set(obs.state, obs.base_url, obs.detail, at=obs.ts)
        return True

    def report(self, gateway: str, maintenance: list[str]) -> GatewayReport:
        now = time.time()
        return GatewayReport(
            gateway=gateway,
            instances={i.key: i.use(now) for i in self._instances.values()},
            maintenance=maintenance,
        )
