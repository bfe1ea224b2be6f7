"""Executors per compute endpoint: the local endpoint process, or a Globus Compute ``Executor``."""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import Executor

from blocks.registry import ClusterSpec
from compute import functions
from compute.failures import task_failed
from core.settings import Settings


class ExecutorPool:
    """Executors per endpoint and credential, shared by the clusters that use them.

    After a failure of the executor itself (not of a function), the next request gets a new one; the old one
    is kept until ``close`` so that requests in flight on it still finish. Building one runs off the event
    loop (a local endpoint is a process start; a Globus Compute executor a client and a login check)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._live: dict[tuple[str, ...], tuple[Executor, dict[str, str]]] = {}
        self._retired: list[Executor] = []
        self._building: dict[tuple[str, ...], asyncio.Future[tuple[Executor, dict[str, str]]]] = {}
        self.built = 0  # executors built so far (first use and rebuilds)

    @staticmethod
    def key(cluster: ClusterSpec) -> tuple[str, ...]:
        if cluster.transport == "local":
            return ("local", cluster.name)
        credential = os.environ.get("GLOBUS_COMPUTE_CLIENT_ID") or "user-login"
        # A multi-user endpoint runs one user endpoint per config: clusters with other values get their own.
        config = json.dumps(cluster.user_endpoint_config, sort_keys=True)
        functions = json.dumps(cluster.function_ids, sort_keys=True)  # kept with the executor: new ids, new entry
        return ("globus-compute", str(cluster.endpoint_id), credential, config, functions)

    async def get(self, cluster: ClusterSpec) -> tuple[Executor, dict[str, str]]:
        key = self.key(cluster)
        live = self._live.get(key)
        if live is not None:
            return live
        building = self._building.get(key)
        if building is None:  # single-flight: concurrent first requests build one executor
            building = asyncio.ensure_future(asyncio.to_thread(self._build, cluster))
            self._building[key] = building
        try:
            live = await asyncio.shield(building)
        except Exception as exc:
            raise task_failed(exc, f"Cluster '{cluster.name}'") from exc
        finally:
            if building.done():
                self._building.pop(key, None)
        self._live[key] = live
        return live

    def _build(self, cluster: ClusterSpec) -> tuple[Executor, dict[str, str]]:
        self.built += 1
        if cluster.transport == "local":
            from compute.local import LocalComputeExecutor

            local = LocalComputeExecutor(workers=self.settings.local_workers)
            # Registered by id, as `first functions register` does with Globus Compute: one code path for both.
            return local, {name: local.register_function(fn) for name, fn in functions.CLUSTER_FUNCTIONS.items()}
        from compute.globus_compute import globus_compute_executor

        return globus_compute_executor(cluster), dict(cluster.function_ids)

    def retire(self, cluster: ClusterSpec, executor: Executor) -> None:
        """Stop handing out ``executor`` for the cluster, if it is still the live one (not already replaced)."""
        key = self.key(cluster)
        live = self._live.get(key)
        if live is not None and live[0] is executor:
            del self._live[key]
            self._retired.append(live[0])

    def close(self) -> None:
        for executor in [*(e for e, _ in self._live.values()), *self._retired]:
            executor.shutdown(wait=False, cancel_futures=True)
        self._live.clear()
        self._retired.clear()
