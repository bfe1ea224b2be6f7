"""One compute interface, three transports (design decision 2).

``ExecutorBackend`` submits the cluster functions in ``compute.functions`` to a
``concurrent.futures.Executor``: the local endpoint (``compute.local``) here, a
``globus_compute_sdk.Executor`` in production. Streams come back through the relay.
``DirectHTTPBackend`` talks to an OpenAI-compatible URL that the gateway can reach itself.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from concurrent.futures import Executor, Future
from typing import Any

import httpx
from globus_compute_sdk.errors import TaskExecutionFailed

from api.errors import APIError
from blocks.registry import ClusterSpec, ModelSpec
from compute import functions
from compute.relay import RelayHub
from first.settings import Settings


def backend_error(result: dict[str, Any], where: str) -> APIError:
    """Turn a failed backend answer into an OpenAI-shaped error that names the cause."""
    status = int(result.get("status") or 502)
    if "kind" in result:  # the function could not reach vLLM
        return APIError(status, f"{where}: {result['message']}", code=f"backend_{result['kind']}")
    err = (result.get("body") or {}).get("error") or {}
    message = err.get("message") if isinstance(err, dict) else str(err)
    if 400 <= status < 500:  # the model server rejected the request: the caller's to fix
        return APIError(status, message or "The model server rejected the request", param=err.get("param"))
    return APIError(502, f"{where}: the model server failed ({status}): {message}", code="backend_error")


def _task_failed(exc: BaseException, where: str) -> APIError:
    if isinstance(exc, TaskExecutionFailed):
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown"
        return APIError(502, f"{where}: the cluster function failed: {cause}", code="task_failed")
    return APIError(503, f"{where}: the compute endpoint is unreachable: {exc!r}", code="endpoint_unreachable")


class ComputeBackend(ABC):
    """How the gateway runs work on one cluster."""

    manages_lifecycle = True  # can start and stop model servers (warm-up flows apply)

    def __init__(self, cluster: ClusterSpec, settings: Settings) -> None:
        self.cluster = cluster
        self.settings = settings

    @abstractmethod
    async def status(self, model: ModelSpec) -> dict[str, Any]:
        """{"state": cold|starting|hot|failed, "base_url": ..., "detail": ...}"""

    @abstractmethod
    async def start(self, model: ModelSpec) -> dict[str, Any]: ...

    @abstractmethod
    async def stop(self, model: ModelSpec) -> dict[str, Any]: ...

    @abstractmethod
    async def complete(self, base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming call; returns the OpenAI response body or raises APIError."""

    @abstractmethod
    def stream(self, base_url: str, path: str, body: dict[str, Any], request_id: str) -> AsyncIterator[dict]:
        """A streaming call; yields OpenAI chunks, raises APIError."""

    async def close(self) -> None:
        return None


class ExecutorBackend(ComputeBackend):
    def __init__(self, cluster: ClusterSpec, settings: Settings, executor: Executor, relay: RelayHub | None) -> None:
        super().__init__(cluster, settings)
        self.executor = executor
        self.relay = relay

    async def call(self, fn: Any, *args: Any, timeout: float | None = None) -> Any:
        """Submit one cluster function and await its result; a timeout cancels only this call."""
        fut: Future[Any] = self.executor.submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout or self.settings.request_timeout_s)
        except TimeoutError:
            fut.cancel()
            raise APIError(
                504, f"Cluster '{self.cluster.name}' did not answer within {timeout} s", code="backend_timeout"
            ) from None
        except APIError:
            raise
        except Exception as exc:
            raise _task_failed(exc, f"Cluster '{self.cluster.name}'") from exc

    @staticmethod
    def _spec_for(model: ModelSpec, cluster: ClusterSpec, settings: Settings) -> dict[str, Any]:
        """What the lifecycle functions need to start, probe or stop the model's vLLM on this cluster."""
        return {
            "model": model.name,
            "served_name": model.served,
            "model_path": model.path,
            "port": model.port,
            "args": model.vllm_args,
            "env": model.vllm_env,
            "nice": model.nice,
            "python": str(settings.vllm_python),
            "state_dir": str(settings.instances_dir / cluster.name),
        }

    def _spec(self, model: ModelSpec) -> dict[str, Any]:
        return self._spec_for(model, self.cluster, self.settings)

    async def status(self, model: ModelSpec) -> dict[str, Any]:
        return await self.call(functions.vllm_status, self._spec(model), timeout=30)

    async def start(self, model: ModelSpec) -> dict[str, Any]:
        return await self.call(functions.start_vllm, self._spec(model), timeout=60)

    async def stop(self, model: ModelSpec) -> dict[str, Any]:
        return await self.call(functions.stop_vllm, self._spec(model), timeout=60)

    async def complete(self, base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        timeout = self.settings.request_timeout_s
        result = await self.call(functions.openai_request, base_url, path, body, timeout, timeout=timeout + 5)
        if result.get("status") != 200:
            raise backend_error(result, f"Cluster '{self.cluster.name}'")
        return result["body"]

    async def stream(self, base_url: str, path: str, body: dict[str, Any], request_id: str) -> AsyncIterator[dict]:
        if self.relay is None:
            raise APIError(503, "Streaming needs the gateway's relay, which is not configured", code="no_relay")
        relay = self.relay
        where = f"Cluster '{self.cluster.name}'"
        channel = relay.open(request_id)
        try:
            fut = self.executor.submit(
                functions.openai_stream, base_url, path, body, self.settings.request_timeout_s,
                f"{self.settings.gateway_url}/internal/relay/{request_id}", relay.token_for(request_id),
                self.settings.relay_batch_chunks, self.settings.relay_batch_ms,
            )  # fmt: skip

            def on_done(f: Future[Any]) -> None:
                exc = f.exception() if not f.cancelled() else None
                if exc is not None:
                    err = _task_failed(exc, where)
                    relay.fail_threadsafe(request_id, {"status": err.status, "message": err.message})

            fut.add_done_callback(on_done)
            while True:
                try:
                    batch = await asyncio.wait_for(channel.queue.get(), self.settings.relay_idle_timeout_s)
                except TimeoutError:
                    fut.cancel()
                    raise APIError(
                        504,
                        f"{where}: the stream was silent for {self.settings.relay_idle_timeout_s:.0f} s",
                        code="stream_idle_timeout",
                    ) from None
                for chunk in batch.chunks:
                    yield chunk
                if batch.error is not None:
                    if "kind" in batch.error or "body" in batch.error:  # vLLM unreachable, or its error answer
                        raise backend_error(batch.error, where)
                    raise APIError(int(batch.error.get("status", 502)), batch.error["message"])
                if batch.done:
                    return
        finally:
            relay.close(request_id)


def _unreachable(base_url: str, exc: httpx.HTTPError) -> dict[str, Any]:
    return functions.backend_unreachable(base_url, exc, isinstance(exc, httpx.TimeoutException))


class DirectHTTPBackend(ComputeBackend):
    """A cluster that exposes an OpenAI-compatible URL the gateway can reach (no lifecycle control)."""

    manages_lifecycle = False

    def __init__(self, cluster: ClusterSpec, settings: Settings) -> None:
        super().__init__(cluster, settings)
        if not cluster.base_url:
            raise ValueError(f"cluster {cluster.name} has transport 'http' but no base_url")
        self.base_url = cluster.base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            timeout=settings.request_timeout_s, limits=httpx.Limits(max_connections=512, max_keepalive_connections=128)
        )

    async def status(self, model: ModelSpec) -> dict[str, Any]:
        try:
            ok = (await self.client.get(self.base_url + "/health", timeout=5)).status_code == 200
        except httpx.HTTPError as exc:
            return {"state": "failed", "base_url": self.base_url, "detail": repr(exc)}
        return {"state": "hot" if ok else "starting", "base_url": self.base_url}

    async def start(self, model: ModelSpec) -> dict[str, Any]:
        return await self.status(model)

    async def stop(self, model: ModelSpec) -> dict[str, Any]:
        return {"state": "hot", "detail": "a direct-HTTP cluster is managed outside FIRST"}

    async def complete(self, base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self.client.post(base_url + path, json=body)
        except httpx.HTTPError as exc:
            raise backend_error(
                functions.backend_unreachable(base_url, exc, isinstance(exc, httpx.TimeoutException)),
                f"Cluster '{self.cluster.name}'",
            ) from exc
        try:
            payload = r.json()
        except ValueError:
            payload = {"error": {"message": r.text[:500]}}
        if r.status_code != 200:
            raise backend_error({"status": r.status_code, "body": payload}, f"Cluster '{self.cluster.name}'")
        return payload

    async def stream(self, base_url: str, path: str, body: dict[str, Any], request_id: str) -> AsyncIterator[dict]:
        where = f"Cluster '{self.cluster.name}'"
        try:
            async with self.client.stream("POST", base_url + path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    try:
                        payload = r.json()
                    except ValueError:
                        payload = {"error": {"message": r.text[:500]}}
                    raise backend_error({"status": r.status_code, "body": payload}, where)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.HTTPError as exc:
            raise backend_error(
                functions.backend_unreachable(base_url, exc, isinstance(exc, httpx.TimeoutException)), where
            ) from exc

    async def close(self) -> None:
        await self.client.aclose()


class Backends:
    """One backend per cluster, created on first use and shared by the whole process."""

    def __init__(self, settings: Settings, relay: RelayHub | None = None) -> None:
        self.settings = settings
        self.relay = relay
        self._backends: dict[str, ComputeBackend] = {}
        self._executors: list[Executor] = []

    def get(self, cluster: ClusterSpec) -> ComputeBackend:
        backend = self._backends.get(cluster.name)
        if backend is None:
            backend = self._backends[cluster.name] = self._create(cluster)
        return backend

    def _create(self, cluster: ClusterSpec) -> ComputeBackend:
        if cluster.transport == "http":
            return DirectHTTPBackend(cluster, self.settings)
        if cluster.transport == "local":
            from compute.local import LocalComputeExecutor

            executor: Executor = LocalComputeExecutor(workers=self.settings.local_workers)
        else:
            from globus_compute_sdk import Executor as GlobusExecutor

            executor = GlobusExecutor(endpoint_id=cluster.endpoint_id)
        self._executors.append(executor)
        return ExecutorBackend(cluster, self.settings, executor, self.relay)

    async def close(self) -> None:
        for b in self._backends.values():
            await b.close()
        for ex in self._executors:
            ex.shutdown(wait=False, cancel_futures=True)
        self._backends.clear()
        self._executors.clear()
