"""One compute interface, three transports (design decision 2).

``ExecutorBackend`` runs the cluster functions of ``compute.functions`` through an executor with the
``globus_compute_sdk.Executor`` interface: a ``globus_compute_sdk.Executor(endpoint_id=...)`` for a cluster
with transport ``globus-compute``, the local endpoint (``compute.local``) for transport ``local``. Both run
functions registered once, by id (``submit_to_registered_function``); the same code path either way.
Streams come back through the relay. A compute cluster whose nodes the gateway can reach (``direct_host``) keeps
its lifecycle there but sends inference straight to the node (``compute/direct_path.py``). ``DirectHTTPBackend``
talks to an OpenAI-compatible URL that the gateway can reach itself. Both direct kinds use ``compute/model_http.py``.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from concurrent.futures import Executor, Future
from typing import Any

from globus_compute_sdk.errors import TaskExecutionFailed

from blocks.registry import ClusterSpec, ModelSpec
from blocks.secrets import read_secret
from compute import functions
from compute.direct_path import DirectPath
from compute.executors import ExecutorPool
from compute.failures import backend_error, task_failed
from compute.model_http import ModelServerClient, ModelServerError, ModelServerUnreachable, http_complete, http_stream
from compute.relay import RelayHub
from core.errors import APIError
from core.settings import Settings


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
    async def complete(self, model: ModelSpec, base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming call to ``model``'s server at ``base_url``; returns the OpenAI response body or raises
        APIError."""

    @abstractmethod
    def stream(
        self, model: ModelSpec, base_url: str, path: str, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict]:
        """A streaming call; yields OpenAI chunks, raises APIError."""

    runs_vllm_batches = False  # can run chunks of a batch with vLLM's own batch runner (compute/cluster_batch.py)

    async def run_batch_chunk(self, model: ModelSpec, tag: str, lines_gz: str, timeout_s: float) -> dict[str, Any]:
        """Run a chunk of batch lines (gzip + base64) with vLLM's batch runner on the cluster; see
        ``compute.cluster_batch.run_vllm_batch`` for the answer."""
        raise APIError(400, f"Cluster '{self.cluster.name}' cannot run vLLM's batch runner", code="unsupported")

    async def cancel_batch_chunk(self, model: ModelSpec, tag: str) -> dict[str, Any]:
        return {"cancelled": False}

    async def close(self) -> None:
        return None

    def data_path(self, model: ModelSpec) -> dict[str, Any]:
        """How requests reach the model's server: ``compute`` (through the endpoint), ``direct`` or ``http``."""
        return {"data_path": "compute"}


class ExecutorBackend(ComputeBackend):
    """A cluster reached through a compute endpoint (Globus Compute, or the local endpoint)."""

    def __init__(self, cluster: ClusterSpec, settings: Settings, pool: ExecutorPool, relay: RelayHub | None) -> None:
        super().__init__(cluster, settings)
        self.pool = pool
        self.relay = relay
        self.direct = DirectPath(cluster, self._fetch_access)
        self.http = None if not self.direct.enabled else ModelServerClient(settings.request_timeout_s,
                                                                           cluster.direct_ca_file)  # fmt: skip

    async def _fetch_access(self, model: ModelSpec) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("vllm_access", self._spec(model), timeout=30, replica=model.replica)
        return result

    def data_path(self, model: ModelSpec) -> dict[str, Any]:
        return self.direct.describe(model)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    def route(self, replica: int) -> ClusterSpec:
        """Where an instance's tasks go. A model's further instances (autoscale's ``m@1``...) on a multi-user
        Globus Compute endpoint get a user endpoint of their own (``INSTANCE`` in its user_endpoint_config),
        hence their own batch job or block: vLLM listens on its node's loopback, so every later task of an
        instance must land where it started."""
        if replica == 0 or self.cluster.transport != "globus-compute":
            return self.cluster
        config = {**self.cluster.user_endpoint_config, "INSTANCE": replica}
        return self.cluster.model_copy(update={"user_endpoint_config": config})

    async def submit(self, name: str, *args: Any, replica: int = 0) -> tuple[Executor, Future[Any]]:
        """Send one cluster function (by its registered id when there is one) to the cluster's endpoint (the
        instance's own, see ``route``); returns the executor it went to, and its future."""
        where = self.route(replica)
        executor, function_ids = await self.pool.get(where)
        try:
            function_id = function_ids.get(name)
            if function_id:
                fut = executor.submit_to_registered_function(function_id, args=args)  # type: ignore[attr-defined]
            else:
                fut = executor.submit(functions.CLUSTER_FUNCTIONS[name], *args)
        except Exception as exc:  # the executor itself is broken: build a new one for the next request
            self.pool.retire(where, executor)
            raise task_failed(exc, f"Cluster '{self.cluster.name}'") from exc
        self.pool.track(executor, fut)
        return executor, fut

    async def call(self, name: str, *args: Any, timeout: float | None = None, replica: int = 0) -> Any:
        """Run one cluster function and await its result. The timeout cancels only this request's future,
        never the shared executor."""
        timeout = timeout or self.settings.request_timeout_s
        executor, fut = await self.submit(name, *args, replica=replica)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError:
            fut.cancel()
            raise APIError(
                504, f"Cluster '{self.cluster.name}' did not answer within {timeout:g} s", code="backend_timeout"
            ) from None
        except Exception as exc:
            if not isinstance(exc, TaskExecutionFailed):  # the route failed, not the function: a new executor
                self.pool.retire(self.route(replica), executor)
            raise task_failed(exc, f"Cluster '{self.cluster.name}'") from exc

    async def endpoint_status(self) -> dict[str, Any]:
        """Is the cluster's endpoint online, and does it have a manager (a running block) to take work?"""
        if self.cluster.transport == "local":
            executor, _ = await self.pool.get(self.cluster)
            alive = executor._proc.poll() is None  # type: ignore[attr-defined]
            workers = self.settings.local_workers
            return {
                "status": "online" if alive else "offline", "ready": alive, "managers": int(alive),
                "idle_workers": workers, "total_workers": workers, "outstanding_tasks": 0, "pending_tasks": 0,
            }  # fmt: skip
        from compute.globus_compute import endpoint_status

        return await asyncio.to_thread(endpoint_status, str(self.cluster.endpoint_id))

    @staticmethod
    def instance_spec(model: ModelSpec, cluster: ClusterSpec, settings: Settings) -> dict[str, Any]:
        """What the lifecycle functions need to start, probe or stop the model's vLLM on this cluster."""
        here = model.on(cluster.name)
        return {
            "model": model.instance_name,  # "m", or "m@2" for the model's third instance there
            "served_name": model.served,
            "model_path": here.path,
            "port": here.port if model.replica == 0 else 0,  # further instances take a free port
            "args": model.vllm_args_on(cluster.name),
            "env": here.vllm_env,
            "nice": model.nice,
            # Paths on the cluster: the gateway's own for the local cluster; for a remote one, what its endpoint's
            # worker_init exports (deployments/endpoints/), expanded there.
            "python": str(settings.vllm_python) if cluster.transport == "local" else cluster.vllm_python,
            "state_dir": str(settings.instances_dir / cluster.name)
            if cluster.transport == "local"
            else f"{cluster.first_home}/instances/{cluster.name}",
            # The direct data path: vLLM listens where the gateway reaches it, not on the node's loopback.
            "host": cluster.direct_host or "127.0.0.1",
            "scheme": cluster.direct_scheme if cluster.direct_host else "http",
        }

    def _spec(self, model: ModelSpec) -> dict[str, Any]:
        return self.instance_spec(model, self.cluster, self.settings)

    async def status(self, model: ModelSpec) -> dict[str, Any]:
        return await self.call("vllm_status", self._spec(model), timeout=30, replica=model.replica)

    async def start(self, model: ModelSpec) -> dict[str, Any]:
        # A remote start may wait in the batch queue for a block to run it: bounded by the warm-up, not 60 s.
        timeout = 60 if self.cluster.transport == "local" else self.settings.warm_up_timeout_s
        return await self.call("start_vllm", self._spec(model), timeout=timeout, replica=model.replica)

    async def stop(self, model: ModelSpec) -> dict[str, Any]:
        return await self.call("stop_vllm", self._spec(model), timeout=60, replica=model.replica)

    runs_vllm_batches = True

    async def run_batch_chunk(self, model: ModelSpec, tag: str, lines_gz: str, timeout_s: float) -> dict[str, Any]:
        # The wait includes the cluster's queue when the endpoint has no block running: bounded by timeout_s.
        return await self.call("run_vllm_batch", self._spec(model), tag, lines_gz, timeout_s, timeout=timeout_s + 60)

    async def cancel_batch_chunk(self, model: ModelSpec, tag: str) -> dict[str, Any]:
        return await self.call("cancel_vllm_batch", self._spec(model), tag, timeout=60)

    def _key_ref(self, model: ModelSpec) -> dict[str, str]:
        """Where, on the cluster, the function finds the model's vLLM API key (its state file)."""
        spec = self._spec(model)
        return {"state_dir": spec["state_dir"], "model": spec["model"]}

    async def complete(self, model: ModelSpec, base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        access = await self.direct.access(model, base_url)
        if access is not None and self.http is not None:  # the direct data path
            try:
                status, payload = await self.http.post(base_url, path, body, access.headers or {})
            except ModelServerUnreachable as exc:
                if not exc.not_sent:  # the node may have it: never sent twice
                    raise backend_error(exc.result, f"Cluster '{self.cluster.name}'") from exc
                self.direct.down(model, exc.result["message"])  # served below, through the endpoint
            else:
                if status == 401:  # a new key (the instance restarted at the same URL): ask again, serve below
                    self.direct.forget(model)
                elif status != 200:
                    raise backend_error({"status": status, "body": payload}, f"Cluster '{self.cluster.name}'")
                else:
                    return payload  # type: ignore[no-any-return]
        timeout = self.settings.request_timeout_s
        result = await self.call(
            "openai_request", base_url, path, body, timeout, self._key_ref(model), timeout=timeout + 5,
            replica=model.replica,
        )  # fmt: skip
        if result.get("status") != 200:
            raise backend_error(result, f"Cluster '{self.cluster.name}'")
        return result["body"]

    async def stream(
        self, model: ModelSpec, base_url: str, path: str, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict]:
        access = await self.direct.access(model, base_url)
        if access is not None and self.http is not None:  # the direct data path; before any chunk, a fallback
            started = False
            try:
                async for chunk in self.http.stream(base_url, path, body, access.headers or {}):
                    started = True
                    yield chunk
                return
            except ModelServerUnreachable as exc:
                if started or not exc.not_sent:
                    raise backend_error(exc.result, f"Cluster '{self.cluster.name}'") from exc
                self.direct.down(model, exc.result["message"])
            except ModelServerError as exc:
                if exc.status != 401:
                    where = f"Cluster '{self.cluster.name}'"
                    raise backend_error({"status": exc.status, "body": exc.body}, where) from exc
                self.direct.forget(model)
        async for chunk in self._relayed(model, base_url, path, body, request_id):
            yield chunk

    async def _relayed(
        self, model: ModelSpec, base_url: str, path: str, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict]:
        """A stream through the compute path: the function posts its chunks to the gateway's relay."""
        if self.relay is None:
            raise APIError(503, "Streaming needs the gateway's relay, which is not configured", code="no_relay")
        relay = self.relay
        where = f"Cluster '{self.cluster.name}'"
        channel = relay.open(request_id)
        try:
            executor, fut = await self.submit(
                "openai_stream", base_url, path, body, self.settings.request_timeout_s,
                relay.post_url(self.settings.gateway_url, request_id), relay.token_for(request_id),
                self.settings.relay_batch_chunks, self.settings.relay_batch_ms, self._key_ref(model),
                replica=model.replica,
            )  # fmt: skip
            pool, cluster = self.pool, self.route(model.replica)

            def on_done(f: Future[Any]) -> None:  # the function failed or its endpoint died: end the stream now
                exc = f.exception() if not f.cancelled() else None
                if exc is not None:
                    if not isinstance(exc, TaskExecutionFailed):
                        pool.retire(cluster, executor)
                    err = task_failed(exc, where)
                    relay.fail_threadsafe(request_id, {"status": err.status, "message": err.message, "code": err.code,
                                                       "detail": err.detail, "headers": err.headers})  # fmt: skip

            fut.add_done_callback(on_done)
            while True:
                try:
                    batch = await asyncio.wait_for(channel.get(), self.settings.relay_idle_timeout_s)
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
                    e = batch.error
                    if "code" in e:  # the gateway's own account of a function that failed or an endpoint that died
                        raise APIError(int(e["status"]), e["message"], code=e["code"], detail=e.get("detail"),
                                       headers=e.get("headers"))  # fmt: skip
                    status = int(e.get("status", 502))
                    if status >= 500:  # the function's own failure: its text is for operators
                        raise APIError(status, f"{where}: the stream failed", detail=e["message"])
                    raise APIError(status, e["message"])
                if batch.done:
                    return
        finally:
            relay.close(request_id)


class DirectHTTPBackend(ComputeBackend):
    """A cluster that exposes an OpenAI-compatible URL the gateway can reach: a vLLM someone else runs, or a hosted
    OpenAI-compatible API (its key from a Prefect Secret block, extra headers, readiness at ``health_path``). No
    lifecycle control: FIRST neither starts nor stops what is behind the URL."""

    manages_lifecycle = False

    def __init__(self, cluster: ClusterSpec, settings: Settings) -> None:
        super().__init__(cluster, settings)
        if not cluster.base_url:
            raise ValueError(f"cluster {cluster.name} has transport 'http' but no base_url")
        self.base_url = cluster.base_url.rstrip("/")
        self.http = ModelServerClient(settings.request_timeout_s)

    async def headers(self) -> dict[str, str]:
        """What every upstream call carries: the block's extra headers and, if it names one, the API key."""
        if not self.cluster.api_key_secret:
            return self.cluster.headers
        headers = dict(self.cluster.headers)
        try:
            headers["Authorization"] = f"Bearer {await read_secret(self.cluster.api_key_secret)}"
        except Exception as exc:  # no such block, or Prefect unreachable: the cluster cannot be used now
            raise APIError(503, f"Cluster '{self.cluster.name}': its API key could not be read",
                           code="cluster_unreachable", detail=repr(exc)) from exc  # fmt: skip
        return headers

    async def status(self, model: ModelSpec) -> dict[str, Any]:
        try:
            code = await self.http.get_status(self.base_url + self.cluster.health_path, await self.headers())
        except (ModelServerUnreachable, APIError) as exc:
            return {"state": "failed", "base_url": self.base_url, "detail": repr(exc)}
        if code in (401, 403):
            why = f"{self.cluster.health_path} answered {code}: check the cluster's API key"
            return {"state": "failed", "base_url": self.base_url, "detail": why}
        return {"state": "hot" if code == 200 else "starting", "base_url": self.base_url}

    async def start(self, model: ModelSpec) -> dict[str, Any]:
        return await self.status(model)

    async def stop(self, model: ModelSpec) -> dict[str, Any]:
        return {"state": "hot", "detail": "a direct-HTTP cluster (its own vLLM, or a hosted API) is run outside FIRST: "
                "FIRST neither starts nor stops it"}  # fmt: skip

    async def complete(self, model: ModelSpec, base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await http_complete(self.http, base_url, path, body, await self.headers(), self.cluster.name)

    def stream(
        self, model: ModelSpec, base_url: str, path: str, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict]:
        return self._stream(base_url, path, body)

    async def _stream(self, base_url: str, path: str, body: dict[str, Any]) -> AsyncIterator[dict]:
        async for chunk in http_stream(self.http, base_url, path, body, await self.headers(), self.cluster.name):
            yield chunk

    async def close(self) -> None:
        await self.http.close()

    def data_path(self, model: ModelSpec) -> dict[str, Any]:
        return {"data_path": "http"}


# What a backend is built from: an edit to any of these (an operator cutting off a compromised endpoint, new
# function ids) must reach running gateways, so the backend is rebuilt.
CONNECTION_FIELDS = (
    "transport",
    "base_url",
    "endpoint_id",
    "login_endpoint_id",
    "function_ids",
    "user_endpoint_config",
    "api_key_secret",
    "headers",
    "health_path",
)


def connection_of(cluster: ClusterSpec) -> str:
    return json.dumps({f: getattr(cluster, f, None) for f in CONNECTION_FIELDS}, sort_keys=True, default=str)


class Backends:
    """One backend per cluster, created on first use and shared by the whole process; rebuilt when the cluster's
    connection fields change (the registry is re-read from its blocks while the gateway runs)."""

    def __init__(self, settings: Settings, relay: RelayHub | None = None) -> None:
        self.settings = settings
        self.relay = relay
        self.pool = ExecutorPool(settings)
        self._backends: dict[str, tuple[ComputeBackend, ClusterSpec, str]] = {}
        self._retired: list[ComputeBackend] = []  # requests in flight may still use them: closed at the end

    def get(self, cluster: ClusterSpec) -> ComputeBackend:
        entry = self._backends.get(cluster.name)
        if entry is not None and entry[1] is cluster:  # the same spec object: the hot path, no comparison
            return entry[0]
        connection = connection_of(cluster)
        if entry is not None and entry[2] == connection:
            self._backends[cluster.name] = (entry[0], cluster, connection)
            return entry[0]
        if entry is not None:
            self._retired.append(entry[0])
            old_key = ExecutorPool.key(entry[1])
            if old_key != ExecutorPool.key(cluster) and not any(
                ExecutorPool.key(c) == old_key for name, (_, c, _) in self._backends.items() if name != cluster.name
            ):  # its executor (the old endpoint) serves no cluster now: shut it down once its requests end
                self.pool.retire_key(old_key)
        backend = self._create(cluster)
        self._backends[cluster.name] = (backend, cluster, connection)
        return backend

    def _create(self, cluster: ClusterSpec) -> ComputeBackend:
        if cluster.transport == "http":
            return DirectHTTPBackend(cluster, self.settings)
        return ExecutorBackend(cluster, self.settings, self.pool, self.relay)

    async def close(self) -> None:
        for b in [*(e[0] for e in self._backends.values()), *self._retired]:
            await b.close()
        self.pool.close()
        self._backends.clear()
        self._retired.clear()
