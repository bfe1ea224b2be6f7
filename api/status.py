"""The fleet as operators and callers see it: /v1/status, /metrics (admins) and /health (no credential)."""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Request, Response, get

from api.errors import GUARDED, error_responses
from api.guards import DEPENDENCIES, authenticate, principal_of
from api.metrics import render
from core.errors import APIError
from core.stopping import STOPPING, stopping_error
from serving.request import Services
from serving.visibility import usable_pairs


class StatusController(Controller):
    guards = [authenticate]
    dependencies = DEPENDENCIES

    @get("/v1/status", summary="Live state of each model on each cluster", responses=error_responses(*GUARDED, 403))
    async def fleet_status(self, request: Request, services: Services) -> dict[str, Any]:
        """Per model and cluster: state (cold, queued, starting, hot, draining, failed), in-flight requests,
        recent latency and errors, last status time; per cluster: maintenance and circuit breaker. Admins see
        everything (with server URLs and error text); callers see what they may use."""
        principal = principal_of(request)
        live = services.live
        pairs = usable_pairs(services.registry, principal, admin_sees_all=True)
        now = time.time()
        instances = [
            {**i.snapshot(detail=principal.is_admin), **services.backends.get(c).data_path(i.model)}
            for m, c in pairs
            for i in live.instances_of(c, m, routable=False)
        ]
        clusters = {}
        for _, c in pairs:
            b = live.breaker(c.name)
            clusters[c.name] = {
                "name": c.name, "maintenance": c.maintenance, "maintenance_message": c.maintenance_message or None,
                "breaker": b.state(now), "breaker_opened": b.opened,
                "expected_start_s": round(live.estimates.get(c.name, c.expected_start_s), 1),
                "max_instances": c.max_instances, "max_concurrency": c.max_concurrency,
            }  # fmt: skip
        doc: dict[str, Any] = {"object": "status", "instances": instances, "clusters": list(clusters.values())}
        if services.shared is not None:  # several replicas: is their shared state there (else: each its own)?
            shared = services.shared.status()
            forwarder = getattr(request.app.state, "relay_forwarder", None)
            if forwarder is not None:  # relay posts that reached the other replica than their stream's
                shared.update(relay_forwarded=forwarder.forwarded, relay_received=forwarder.received)
            doc["shared_state"] = shared if principal.is_admin else {"up": shared["up"]}
            if not shared["up"]:
                doc["shared_state"]["degraded"] = (
                    "Redis is unreachable: each gateway replica applies rate limits and caps on its own (up to "
                    "one limit per replica), and relays and warm-ups only its own streams, until it answers again"
                )
        if principal.is_admin:
            doc.update(gateway=request.app.state.gateway_id, failovers=live.failovers)
        return doc

    @get("/metrics", summary="Prometheus metrics (admins)", include_in_schema=False)
    async def metrics(self, request: Request) -> Response:
        if not principal_of(request).is_admin:
            raise APIError(403, "Metrics are for the gateway's admins (a key in the 'admin' group, or an admin "
                           "group in Globus mode).", code="admin_only")  # fmt: skip
        body = render(request.app.state.metrics)
        return Response(content=body, media_type="text/plain; version=0.0.4; charset=utf-8")


@get("/health", summary="Liveness (no credential: nothing about the fleet; that is /v1/status)",
     responses=error_responses(503))  # fmt: skip
async def health(request: Request) -> dict[str, Any]:
    """Liveness and how this gateway runs. Nothing about models, clusters, URLs or errors: without a credential
    those would show hidden model names and internal URLs (they are on /v1/status, per caller). 503
    ``gateway_stopping`` once it has been told to stop, so that a load balancer sends new requests elsewhere."""
    if STOPPING.is_set():
        raise stopping_error()
    svc: Services = request.app.state.services
    return {
        "status": "ok",
        "flow_tracking": svc.settings.flow_tracking.value,
        "auth_mode": svc.settings.auth_mode,
        "auth_checks": getattr(request.app.state.authenticator, "checks", None),  # Globus: cache misses so far
        "flow_records": svc.control.stats() if svc.control else None,
    }
