"""Executors per compute endpoint: the local endpoint process, or a Globus Compute ``Executor``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from concurrent.futures import Executor, Future
from typing import Any

from blocks.registry import ClusterSpec
from compute import functions
from compute.failures import task_failed
from core.settings import Settings

log = logging.getLogger("first.compute")


class ExecutorPool:
    """Executors per endpoint and credential, shared by the clusters that use them.

    After a failure of the executor itself (not of a function), the next request gets a new one; the old one
    is shut down once the requests in flight on it have finished (``track``), not kept until exit. Building one
    runs off the event loop (a local endpoint is a process start; a Globus Compute executor a client and a login
    check)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._live: dict[tuple[str, ...], tuple[Executor, dict[str, str]]] = {}
        self._retired: list[Executor] = []
        self._outstanding: dict[int, int] = {}  # id(executor) -> its futures not done yet
        self._lock = threading.Lock()  # futures finish on other threads
        self.shut_down = 0  # retired executors shut down so far
        self._building: dict[tuple[str, ...], asyncio.Future[tuple[Executor, dict[str, str]]]] = {}
        self.built = 0  # executors built so far (first use and rebuilds)
        # The gateway's serving loop (set by its lifespan): local endpoints read their results on it directly.
        self.serving_loop: asyncio.AbstractEventLoop | None = None

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

            local = LocalComputeExecutor(workers=self.settings.local_workers, loop=self.serving_loop)
            # Registered by id, as `first functions register` does with Globus Compute: one code path for both.
            return local, {name: local.register_function(fn) for name, fn in functions.CLUSTER_FUNCTIONS.items()}
        from compute.globus_compute import globus_compute_executor

        return globus_compute_executor(cluster), dict(cluster.function_ids)

    def track(self, executor: Executor, future: Future[Any]) -> None:
        """Count ``future`` as in flight on ``executor`` until it is done (a retired executor waits for these)."""
        with self._lock:
            self._outstanding[id(executor)] = self._outstanding.get(id(executor), 0) + 1

        def done(_f: Future[Any]) -> None:
            with self._lock:
                left = self._outstanding[id(executor)] = self._outstanding[id(executor)] - 1
                last = left == 0 and executor in self._retired
                if last:
                    self._retired.remove(executor)
                    del self._outstanding[id(executor)]
            if last:
                self._shutdown(executor)

        future.add_done_callback(done)

    def retire(self, cluster: ClusterSpec, executor: Executor) -> None:
        """Stop handing out ``executor`` for the cluster, if it is still the live one (not already replaced); shut
        it down now if nothing runs on it, else when its last request in flight ends."""
        live = self._live.get(self.key(cluster))
        if live is not None and live[0] is executor:
            self.retire_key(self.key(cluster))

    def retire_key(self, key: tuple[str, ...]) -> None:
        """Retire whatever executor serves ``key`` (a cluster's connection changed, and no other cluster uses it)."""
        live = self._live.pop(key, None)
        if live is None:
            return
        executor = live[0]
        with self._lock:
            idle = not self._outstanding.get(id(executor))
            if idle:
                self._outstanding.pop(id(executor), None)
            else:
                self._retired.append(executor)
        if idle:
            self._shutdown(executor)

    def _shutdown(self, executor: Executor) -> None:
        self.shut_down += 1
        try:
            executor.shutdown(wait=False, cancel_futures=True)
        except Exception as exc:  # a broken executor may fail to stop cleanly: it is dropped either way
            log.warning("shutting down a retired executor failed: %r", exc)

    def close(self) -> None:
        for executor in [*(e for e, _ in self._live.values()), *self._retired]:
            executor.shutdown(wait=False, cancel_futures=True)
        self._live.clear()
        self._retired.clear()
