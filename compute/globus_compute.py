"""Globus Compute specifics: the gateway's executor for a cluster endpoint, registering the cluster functions
once (`first functions register`), and the endpoint's status.

The gateway authenticates to Globus Compute as its own confidential client (GLOBUS_COMPUTE_CLIENT_ID and
GLOBUS_COMPUTE_CLIENT_SECRET), never with an interactive login: the SDK's default would print a URL and
wait on a terminal nobody watches.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Executor
from typing import Any, Protocol

from blocks.registry import ClusterSpec
from compute import functions

STATUS_TTL_S = 10.0  # endpoint status is cached this long (the service rate-limits, and it changes slowly)


class ComputeCredentialsMissing(ConnectionError):
    """The gateway has no Globus Compute credentials."""


class FunctionRegistrar(Protocol):
    """What registers a function and returns its id: ``globus_compute_sdk.Client`` or ``Executor``, or the
    local endpoint (``compute.local.LocalComputeExecutor``)."""

    def register_function(self, fn: Any, /, **kwargs: Any) -> str: ...


def compute_client() -> Any:
    """A ``globus_compute_sdk.Client`` as the gateway's confidential client."""
    import globus_sdk
    from globus_compute_sdk import Client

    client_id, secret = os.environ.get("GLOBUS_COMPUTE_CLIENT_ID"), os.environ.get("GLOBUS_COMPUTE_CLIENT_SECRET")
    if not client_id or not secret:
        raise ComputeCredentialsMissing(
            "the gateway has no Globus Compute credentials: set GLOBUS_COMPUTE_CLIENT_ID and "
            "GLOBUS_COMPUTE_CLIENT_SECRET (a confidential client allowed to use the endpoint)"
        )
    return Client(app=globus_sdk.ClientApp("first-gateway", client_id=client_id, client_secret=secret))


def globus_compute_executor(cluster: ClusterSpec, client: Any = None) -> Executor:
    """The executor for the cluster's endpoint (``user_endpoint_config`` for a multi-user endpoint)."""
    from globus_compute_sdk import Executor as GlobusExecutor

    if not cluster.endpoint_id:
        raise ValueError(f"cluster {cluster.name} has transport 'globus-compute' but no endpoint_id")
    return GlobusExecutor(
        endpoint_id=cluster.endpoint_id, client=client or compute_client(),
        user_endpoint_config=cluster.user_endpoint_config or None,
    )  # fmt: skip


def register_functions(registrar: FunctionRegistrar, **kwargs: Any) -> dict[str, str]:
    """Register every cluster function once; returns name -> function id, for the cluster's block."""
    return {
        name: registrar.register_function(fn, description=f"FIRST cluster function {name}", **kwargs)
        for name, fn in functions.CLUSTER_FUNCTIONS.items()
    }


_status_cache: dict[str, tuple[float, dict[str, Any]]] = {}


def endpoint_status(endpoint_id: str, client: Any = None) -> dict[str, Any]:
    """``{"status": online|offline, "ready": bool, "managers", "idle_workers", "outstanding_tasks", ...}``, cached
    for ``STATUS_TTL_S``. An endpoint with no manager is not ready: a task sent to it waits for a block to
    start (a batch job in the queue). Network or API errors come back as ``{"status": "unknown", "error"}``."""
    cached = _status_cache.get(endpoint_id)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    try:
        raw = (client or compute_client()).get_endpoint_status(endpoint_id)
    except Exception as exc:  # the caller decides; status is advice, not a request path
        return {"status": "unknown", "ready": False, "error": f"{type(exc).__name__}: {exc}"}
    status = summarize_endpoint_status(raw)
    _status_cache[endpoint_id] = (time.monotonic() + STATUS_TTL_S, status)
    return status


def summarize_endpoint_status(raw: dict[str, Any]) -> dict[str, Any]:
    """The parts of the service's answer routing needs (the shape of ``Client.get_endpoint_status``)."""
    details = raw.get("details") or {}
    managers = int(details.get("managers") or 0)
    online = raw.get("status") == "online"
    return {
        "status": raw.get("status", "unknown"),
        "ready": online and managers > 0,
        "managers": managers,
        "idle_workers": int(details.get("idle_workers") or 0),
        "total_workers": int(details.get("total_workers") or 0),
        "outstanding_tasks": int(details.get("outstanding_tasks") or 0),
        "pending_tasks": int(details.get("pending_tasks") or 0),
    }
