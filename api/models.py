"""GET /v1/models and /v1/models/{id}: the models the caller may use, what each can do, where it runs and its live
state there."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get

from api.errors import GUARDED, error_responses
from api.guards import DEPENDENCIES, authenticate, principal_of
from blocks.registry import ModelSpec
from serving.request import Services
from serving.steps import not_found
from serving.visibility import usable_models


def _describe(m: ModelSpec, services: Services) -> dict[str, Any]:
    states = {i.cluster.name: i.shown_state for i in services.live.all() if i.model.name == m.name}
    return {
        "id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by,
        "max_model_len": m.context_length, "clusters": m.clusters, "aliases": m.aliases, "state": states,
        "capabilities": m.capabilities(),
    }  # fmt: skip


class ModelsController(Controller):
    guards = [authenticate]
    dependencies = DEPENDENCIES

    @get("/v1/models", summary="List the models you may use", responses=error_responses(*GUARDED))
    async def list_models(self, request: Request, services: Services) -> dict[str, Any]:
        """Each model with its capabilities (kind, endpoints, context length, tools, structured output) and its state
        on each of its clusters (hot, starting, queued, cold, ...)."""
        principal = principal_of(request)
        return {"object": "list", "data": [_describe(m, services) for m in usable_models(services.registry, principal)]}

    @get(
        "/v1/models/{model_id:path}",
        summary="Retrieve one model you may use",
        responses=error_responses(*GUARDED, 404),
    )
    async def retrieve_model(self, request: Request, model_id: str, services: Services) -> dict[str, Any]:
        """One model, by its name or an alias (what `client.models.retrieve(id)` asks); 404 for a model you may not
        use, as for one that does not exist."""
        name = model_id.lstrip("/")
        model = services.registry.resolve(name)
        usable = {m.name for m in usable_models(services.registry, principal_of(request))}
        if model is None or model.name not in usable:
            raise not_found(name)
        return _describe(model, services)
