"""One warm-up per model and cluster across gateway replicas: the replica that takes the lock in Redis runs the
warm-up; the others wait for the lock to go, then ask the cluster once whether the model is hot.

The lock expires by itself after the warm-up's own bound (a replica that dies mid warm-up does not block the
others for longer), and is released only by its holder (compare and delete). While Redis is down, each replica
warms up on its own, as one gateway does: the cluster's own start is idempotent (``start_vllm`` takes a file lock
and starts nothing when a server runs), so the cost is a second warm-up run, not a second server.
"""

from __future__ import annotations

import asyncio
import time

from serving.replicas.store import SharedStore

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
POLL_S = 0.5


class WarmLocks:
    def __init__(self, store: SharedStore) -> None:
        self.store = store
        self._release = store.redis.register_script(RELEASE)

    def _key(self, instance: str) -> str:
        return self.store.key("warm", instance)

    async def acquire(self, instance: str, ttl_s: float) -> str | None:
        """None when this replica holds the lock now (it runs the warm-up); else the replica that holds it.
        Raises ``SharedStateDown`` when Redis does not answer."""
        key, me = self._key(instance), self.store.replica_id

        async def take() -> str | None:
            if await self.store.redis.set(key, me, nx=True, px=max(1, int(ttl_s * 1000))):
                return None
            holder = await self.store.redis.get(key)
            return holder.decode() if holder else ""

        return await self.store.run(take)

    async def release(self, instance: str) -> None:
        await self.store.run(lambda: self._release(keys=[self._key(instance)], args=[self.store.replica_id]))

    async def wait_released(self, instance: str, timeout_s: float) -> bool:
        """Wait until no replica holds the lock (True), or ``timeout_s`` passes (False)."""
        key = self._key(instance)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not await self.store.run(lambda: self.store.redis.exists(key)):
                return True
            await asyncio.sleep(POLL_S)
        return False
