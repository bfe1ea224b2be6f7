"""The direct data path: inference straight from the gateway to a compute node's vLLM, for a cluster whose nodes
the gateway can reach (``ClusterSpec.direct_host``).

The lifecycle (start the batch job, start vLLM, status, stop) still goes through the cluster's endpoint. So does
the first thing the gateway needs: the instance's URL and API key, from the cluster function ``vllm_access``,
asked once per instance and kept until the instance changes. A request then costs one HTTP(S) call, where the
compute path costs a task through the endpoint (seconds through the Globus cloud) and, for a stream, the relay.

When the node cannot be reached (refused, reset, a timeout before any answer), or no key could be had, the
instance falls back to the compute path for ``retry_s``, and the request that found out is served there: no
caller sees the fallback. ``describe`` says which path an instance uses now, and why (``/v1/status``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from blocks.registry import ClusterSpec, ModelSpec

log = logging.getLogger("first.direct_path")

RETRY_S = 60.0  # how long an instance whose node could not be reached stays on the compute path


@dataclass
class Access:
    base_url: str | None = None
    headers: dict[str, str] | None = None
    down_until: float = 0.0  # on the compute path until then
    reason: str | None = None  # why it is on the compute path


class DirectPath:
    def __init__(
        self,
        cluster: ClusterSpec,
        fetch: Callable[[ModelSpec], Awaitable[dict[str, Any]]],
        retry_s: float = RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self._fetch = fetch  # the cluster function vllm_access, through the endpoint
        self.retry_s = retry_s
        self.clock = clock
        self._access: dict[str, Access] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.cluster.direct_host)

    async def access(self, model: ModelSpec, base_url: str) -> Access | None:
        """How to reach the instance at ``base_url`` directly, or None: use the compute path."""
        if not self.enabled:
            return None
        a = self._access.get(model.instance_name)
        if a is not None and a.base_url == base_url and a.headers is not None:
            return a
        if a is not None and a.down_until > self.clock():
            return None
        lock = self._locks.setdefault(model.instance_name, asyncio.Lock())
        async with lock:  # one vllm_access call per instance, however many requests arrive meanwhile
            a = self._access.get(model.instance_name)
            if a is not None and a.base_url == base_url and a.headers is not None:
                return a
            if a is not None and a.down_until > self.clock():
                return None
            try:
                found = await self._fetch(model)
            except Exception as exc:  # an endpoint without the function (registered before it), or a failure
                self.down(model, f"the instance's key could not be fetched through the endpoint: {exc}")
                return None
            if found.get("state") != "hot" or not found.get("base_url"):
                self.down(model, f"vllm_access answered {found.get('state')}: {found.get('detail') or ''}".strip())
                return None
            if found["base_url"].rstrip("/") != base_url.rstrip("/"):  # the instance changed meanwhile
                self.down(model, f"the instance moved to {found['base_url']}: its status is behind", quiet=True)
                return None
            key = found.get("api_key")
            a = Access(base_url=found["base_url"], headers={"Authorization": f"Bearer {key}"} if key else {})
            self._access[model.instance_name] = a
            log.info("%s on %s: direct data path to %s", model.instance_name, self.cluster.name, a.base_url)
            return a

    def down(self, model: ModelSpec, reason: str, quiet: bool = False) -> None:
        """Serve this instance through the endpoint for ``retry_s``, then try the node again."""
        self._access[model.instance_name] = Access(down_until=self.clock() + self.retry_s, reason=reason)
        if not quiet:
            log.warning("%s on %s: compute path for %.0f s (%s)", model.instance_name, self.cluster.name,
                        self.retry_s, reason)  # fmt: skip

    def forget(self, model: ModelSpec) -> None:
        """The key was refused (the instance restarted with a new one): ask again on the next request."""
        self._access.pop(model.instance_name, None)

    def describe(self, model: ModelSpec) -> dict[str, Any]:
        """``{"data_path": "direct" | "compute", "why": ...}`` for /v1/status."""
        if not self.enabled:
            return {"data_path": "compute"}
        a = self._access.get(model.instance_name)
        if a is None:
            return {"data_path": "direct", "why": "not used yet"}
        if a.headers is not None:
            return {"data_path": "direct"}
        if a.down_until > self.clock():
            return {"data_path": "compute", "why": a.reason, "retry_in_s": round(a.down_until - self.clock(), 1)}
        return {"data_path": "direct", "why": f"retrying the node (last: {a.reason})"}
