"""What replicas tell each other about the fleet, once a second through Redis: each instance's requests in flight
on every replica (routing ranks by the sum, so two replicas do not both send their next request to the instance
that looks idle to each), and each cluster's open circuit breaker (a cluster one replica found failing is passed
over by all, until its cool-down ends).

Eventually consistent by design: a second of lag on load and breakers, against a Redis round trip per request
on the hot path. While Redis is down each replica routes on what it sees itself, as one gateway does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from serving.live_state import LiveState
from serving.replicas.store import SharedStateDown, SharedStore

INTERVAL_S = 1.0
LOAD_TTL_MS = 5_000  # a replica that stops reporting (dead) stops counting after this


class ReplicaSync:
    def __init__(self, store: SharedStore, live: LiveState, interval_s: float = INTERVAL_S) -> None:
        self.store, self.live, self.interval_s = store, live, interval_s

    async def run_forever(self) -> None:
        while True:
            with contextlib.suppress(SharedStateDown):
                await self.store.run(self.sync_once)
            await asyncio.sleep(self.interval_s)

    async def sync_once(self) -> None:
        """Publish this replica's load and open breakers; take the others'."""
        me, now = self.store.replica_id, time.time()
        instances = self.live.all()
        clusters = sorted({i.cluster.name for i in instances})
        pipe = self.store.redis.pipeline(transaction=False)
        for inst in instances:
            key = self.store.key("load", inst.key)
            pipe.hset(key, me, inst.inflight)
            pipe.pexpire(key, LOAD_TTL_MS)
        for name in clusters:
            breaker = self.live.breakers.get(name)
            if breaker is not None and breaker.state(now) == "open":
                ms = max(1, int((breaker.open_until - now) * 1000))
                pipe.set(self.store.key("breaker", name), repr(breaker.open_until), px=ms)
        for inst in instances:
            pipe.hgetall(self.store.key("load", inst.key))
        for name in clusters:
            pipe.get(self.store.key("breaker", name))
        answers = await pipe.execute()
        loads = answers[len(answers) - len(instances) - len(clusters) : len(answers) - len(clusters)]
        for inst, load in zip(instances, loads, strict=True):
            inst.others_inflight = sum(int(v) for r, v in load.items() if r.decode() != me)
        for name, until in zip(clusters, answers[len(answers) - len(clusters) :], strict=True):
            if until is not None and float(until) > now:
                self.live.breaker(name).open_elsewhere(float(until))
