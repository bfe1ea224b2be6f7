"""Where a request runs: the routing policy, a pure function of the live state (no I/O, no await).

Among the instances of the model on the clusters the caller may use, in this order:

0. **hot** with spare capacity (in-flight below the cluster's ``max_concurrency``; with several gateway replicas,
   the in-flight requests of all of them): a request with a session key goes to its session's own instance
   (``affinity``), others least loaded first; on equal
   load, the one used least recently, so that equal instances take turns;
1. **hot but full**: wait behind its requests (in the gateway's fair queue, seconds) rather than for a start
   (minutes on a batch cluster) or start another instance;
2. **starting**: a warm-up is under way; shortest remaining expected wait first;
3. **queued**: its start waits in a batch queue;
4. **cold** (or not yet known): the one with the shortest expected start gets warmed up; a cluster already at
   ``max_instances`` running models is passed over;
5. **failed**: a new start may work; last resort.

Clusters in maintenance are skipped, and so are clusters whose circuit breaker is open. A breaker opens after
``breaker_failures`` consecutive failures, and half-opens after ``breaker_cooldown_s``: one request probes the
cluster, and its outcome closes the breaker or opens it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.live_state import Instance

RUNNING = ("hot", "starting", "queued")


@dataclass
class Breaker:
    """A cluster's circuit breaker: closed -> open (after ``threshold`` failures in a row) -> half-open (after
    ``cooldown_s``: one probe) -> closed on success, open again on failure."""

    threshold: int = 3
    cooldown_s: float = 30.0
    failures: int = 0
    open_until: float = 0.0
    probe_started: float | None = None
    opened: int = 0  # times it opened, for /v1/status and metrics

    def state(self, now: float) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "open" if now < self.open_until else "half-open"

    def allows(self, now: float) -> bool:
        state = self.state(now)
        if state == "closed":
            return True
        # half-open: one probe at a time (a probe that never reported back frees the slot after a cool-down)
        return state == "half-open" and (self.probe_started is None or now - self.probe_started > self.cooldown_s)

    def attempt(self, now: float) -> None:
        if self.state(now) == "half-open":
            self.probe_started = now

    def success(self) -> None:
        self.failures, self.open_until, self.probe_started = 0, 0.0, None

    def open_elsewhere(self, until: float) -> None:
        """Another gateway replica found the cluster failing: open until ``until`` here too (not counted as an
        opening of this replica's own)."""
        if until > self.open_until:
            self.failures, self.open_until, self.probe_started = max(self.failures, self.threshold), until, None

    def failure(self, now: float) -> None:
        self.failures += 1
        self.probe_started = None
        if self.failures >= self.threshold:
            if now >= self.open_until:
                self.opened += 1
            self.open_until = now + self.cooldown_s


def count_running(instances: Iterable[Instance]) -> dict[str, int]:
    """Instances in a RUNNING state per cluster."""
    running: dict[str, int] = {}
    for inst in instances:
        if inst.state in RUNNING:
            running[inst.cluster.name] = running.get(inst.cluster.name, 0) + 1
    return running


def affinity(session: str, inst: Instance) -> int:
    """Rendezvous hashing: the instance with the highest score for a session is its own. Every gateway replica
    computes the same, with nothing shared, and only that session's requests move when an instance comes or goes."""
    return int.from_bytes(hashlib.blake2b(f"{session}|{inst.key}".encode(), digest_size=8).digest(), "big")


def rank(
    instances: Iterable[Instance],
    breakers: dict[str, Breaker],
    estimates: dict[str, float],
    now: float,
    running: dict[str, int] | None = None,
    session: str | None = None,
) -> list[Instance]:
    """The usable instances, best first (see the module docstring). ``estimates``: expected cold-to-hot
    seconds per cluster; ``running``: models running (hot, starting, queued) per cluster, of every model,
    for ``max_instances`` (default: counted among ``instances``). ``session`` (a caller's session key): among the
    hot instances with room, the session's own goes first, so that its prompts meet vLLM's prefix cache."""
    pool = []
    for inst in instances:
        name = inst.cluster.name
        breaker = breakers.get(name)
        if inst.cluster.maintenance or (breaker is not None and not breaker.allows(now)):
            continue
        if inst.breaker is not None and not inst.breaker.allows(now):  # this model's server there is failing
            continue
        pool.append(inst)
    if running is None:
        running = count_running(pool)

    def with_room(inst: Instance) -> bool:
        return inst.state == "hot" and inst.inflight + inst.others_inflight < inst.cluster.max_concurrency

    roomy = [i for i in pool if with_room(i)] if session else []
    own = max(roomy, key=lambda i: affinity(session or "", i)) if roomy else None

    def key(inst: Instance) -> tuple[int, int, float, float]:
        state, cluster = inst.state, inst.cluster
        expected = estimates.get(cluster.name, cluster.expected_start_s)
        if state == "hot":
            inflight = inst.inflight + inst.others_inflight  # every replica's requests there (serving/replicas)
            load = inflight / cluster.max_concurrency
            return (0 if inflight < cluster.max_concurrency else 1, inst is not own, load, inst.last_used or 0.0)
        if state in ("starting", "queued"):
            remaining = expected - (now - inst.since)
            return (2 if state == "starting" else 3, True, remaining, 0.0)
        if state == "draining":  # autoscale is retiring it (flows/autoscale.py): nothing new goes there
            return (6, True, 0.0, 0.0)
        if state in ("cold", "unknown"):
            full = running.get(cluster.name, 0) >= cluster.max_instances
            return (6 if full else 4, True, expected, 0.0)
        return (5, True, expected, 0.0)  # failed

    keyed = sorted((key(inst), n, inst) for n, inst in enumerate(pool))
    return [inst for k, _, inst in keyed if k[0] != 6]
