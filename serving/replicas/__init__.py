"""What gateway replicas share through Redis (``FIRST_REDIS_URL``): limits and caps (``limits.py``), the streaming
relay (``relay.py``), warm-ups (``warmups.py``), load and breakers (``fleet.py``), over one client that knows
whether Redis answers (``store.py``). ``join`` wires them for one replica; without FIRST_REDIS_URL a gateway keeps
all of it in its own process. docs/admin/production.md has the table of what is shared and how each piece degrades."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from compute.relay import RelayHub
from core.settings import Settings
from serving.replicas.limits import Admission, SharedLimits
from serving.replicas.relay import RelayForwarder, shared_relay_secret
from serving.replicas.store import SharedStateDown, SharedStore
from serving.replicas.warmups import WarmLocks

log = logging.getLogger("first.replicas")


@dataclass
class Replica:
    store: SharedStore
    limits: SharedLimits
    forwarder: RelayForwarder
    warm_locks: WarmLocks

    def background(self, live: Any) -> list[Coroutine[Any, Any, None]]:
        """What runs while the replica serves: slot renewals, the relay subscription, the load and breaker sync."""
        from serving.replicas.fleet import ReplicaSync  # fleet reads LiveState, which reads warmups: import late

        return [
            self.limits.renew_forever(),
            self.forwarder.listen_forever(),
            ReplicaSync(self.store, live).run_forever(),
        ]

    async def leave(self, admission: Admission) -> None:
        await admission.settled()
        await self.store.close()


async def join(settings: Settings, relay: RelayHub, relay_wait_s: float) -> Replica | None:
    """This gateway as one of several replicas (FIRST_REDIS_URL), or None when it runs alone."""
    if not settings.redis_url:
        return None
    store = SharedStore(settings.redis_url, settings.redis_prefix, settings.redis_timeout_s, settings.redis_retry_s,
                        replica_id=settings.replica)  # fmt: skip
    relay.replica = store.replica_id
    try:
        relay.use_secret(await shared_relay_secret(store))
    except SharedStateDown:
        log.warning("Redis is down at start: this replica's streams are relayed only when their cluster's posts "
                    "reach it, until it restarts with Redis up")  # fmt: skip
    return Replica(store, SharedLimits(store), RelayForwarder(store, relay, relay_wait_s), WarmLocks(store))


def tasks(coroutines: list[Coroutine[Any, Any, None]]) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(c) for c in coroutines]
