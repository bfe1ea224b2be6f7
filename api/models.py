"""GET /v1/models: the models the caller may use, with where each runs and its live state."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get

from api.guards import DEPENDENCIES, authenticate, principal_of
from serving.request import Services
from serving.visibility import usable_models


class ModelsController(Controller):
    guards = [authenticate]
    dependencies = DEPENDENCIES

    @get("/v1/models", summary="List the models you may use")
    async def list_models(self, request: Request, services: Services) -> dict[str, Any]:
        principal = principal_of(request)
        data = []
        for m in usable_models(services.registry, principal):
            states = {i.cluster.name: i.state for i in services.live.all() if i.model.name == m.name}
            data.append({
                "id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by,
                "max_model_len": m.context_length, "clusters": m.clusters, "aliases": m.aliases, "state": states,
            })  # fmt: skip
        return {"object": "list", "data": data}
