"""The Redis that gateway replicas share (``FIRST_REDIS_URL``), and whether it answers.

Every shared call goes through ``SharedStore.run``: a call that fails or takes longer than ``FIRST_REDIS_TIMEOUT_S``
marks Redis down, and for ``FIRST_REDIS_RETRY_S`` the replica uses its own state without trying Redis (a request
does not wait on a dead Redis each time); then the next call tries again. ``/v1/status`` and ``/metrics`` show the
state. What each piece of shared state does while Redis is down is said where it lives (docs/admin/production.md
lists it).
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("first.replicas")
T = TypeVar("T")


class SharedStateDown(ConnectionError):
    """Redis did not answer (or is resting after it failed): use this replica's own state."""


class SharedStore:
    def __init__(
        self, url: str, prefix: str = "first", timeout_s: float = 1.0, retry_s: float = 2.0,
        clock: Clock = SYSTEM_CLOCK, replica_id: str | None = None,
    ) -> None:  # fmt: skip
        self.url, self.prefix, self.retry_s, self.clock = url, prefix, retry_s, clock
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
            health_check_interval=30,
        )  # fmt: skip
        # For calls that wait by design (a relay post's answer, the relay subscription): no read timeout.
        self.blocking = aioredis.Redis.from_url(url, socket_timeout=None, socket_connect_timeout=timeout_s)
        self.replica_id = replica_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.down_since: float | None = None  # wall time Redis was last found down; None while it answers
        self._retry_at = 0.0
        self.errors = 0  # calls that failed (metrics)
        self.fallbacks = 0  # times a replica used its own state because Redis was down (metrics)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def up(self) -> bool:
        return self.down_since is None

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call; raise ``SharedStateDown`` (at once while resting) if Redis does not answer."""
        if self.down_since is not None and self.clock.monotonic() < self._retry_at:
            self.fallbacks += 1
            raise SharedStateDown("Redis is down")
        try:
            result = await call()
        except (RedisError, OSError) as exc:
            self.errors += 1
            self.fallbacks += 1
            if self.down_since is None:
                self.down_since = self.clock.time()
                log.warning("Redis at %s is unreachable (%r): this replica uses its own state (local limits, "
                            "local relay and warm-ups) until it answers again", self.url, exc)  # fmt: skip
            self._retry_at = self.clock.monotonic() + self.retry_s
            raise SharedStateDown(str(exc)) from exc
        if self.down_since is not None:
            log.warning("Redis at %s answers again: shared state resumed", self.url)
            self.down_since = None
        return result

    def status(self) -> dict[str, Any]:
        return {"url": _without_password(self.url), "up": self.up, "down_since": self.down_since,
                "errors": self.errors, "fallbacks": self.fallbacks, "replica": self.replica_id}  # fmt: skip

    async def close(self) -> None:
        await self.redis.aclose()
        await self.blocking.aclose()


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
