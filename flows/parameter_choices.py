"""The lifecycle deployments' ``model`` and ``cluster`` parameters as choices in the Prefect UI.

Prefect builds a deployment's parameter form from its flow's signature, where ``model`` and ``cluster`` are
strings: the operator would have to know each name, and the special values ``best`` and ``all``. This writes the
registry's names into each deployment's parameter schema as an ``enum``, which the UI shows as a drop-down.

Registry edits reach the choices at the next ``first apply`` or ``first run``, and within a minute otherwise
(``refresh-status`` offers them again on each run). So that a model added a moment ago can still be run (by
autoscale, or by the API) before its name is in the list, these deployments do not enforce their schema: the
flow itself refuses a name the registry does not know, and says which names it does.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blocks.registry import Registry

log = logging.getLogger("first.flows")

# deployment -> parameter -> what it offers: "instances" (each model, and each extra instance "m@1" autoscale may
# start), or the cluster names plus these special values.
CHOICES: dict[str, dict[str, str | tuple[str, ...]]] = {
    "warm-up/warm-up": {"model": "instances", "cluster": ("best",)},
    "scale-down/scale-down": {"model": "instances", "cluster": ("all",)},
    "model-status/model-status": {"model": "instances", "cluster": ("best",)},
    "retire-instance/retire-instance": {"model": "instances", "cluster": ()},
    "drain-cluster/drain-cluster": {"cluster": ()},
}
_SPECIAL = {
    "best": "'best': where the model is hot, else starting, else the quickest to start",
    "all": "'all': every cluster the model runs on",
}
_FOLLOWS = (
    "Choices are the registry's as of the last `first apply`, `first run` or refresh-status run (every minute); "
    "a name added since can be typed through the API: it is not enforced here, the flow checks it."
)


def instance_names(registry: Registry) -> list[str]:
    """Each model, then each extra instance of it that autoscale may start ("m@1" up to its max_instances)."""
    names: list[str] = []
    for name, spec in sorted(registry.models.items()):
        most = max([spec.max_instances, *(a.max_instances or 0 for a in spec.per_cluster.values())])
        names += [name, *(f"{name}@{i}" for i in range(1, most))]
    return names


def with_choices(schema: dict[str, Any], deployment: str, registry: Registry) -> dict[str, Any]:
    """``schema`` (a deployment's parameter schema) with its ``model``/``cluster`` parameters as choices."""
    out = copy.deepcopy(schema)
    props = out.setdefault("properties", {})
    for param, offer in CHOICES[deployment].items():
        if offer == "instances":
            values = instance_names(registry)
            why = "The model (or one instance of it, 'm@1' its second)."
        else:
            values = [*offer, *sorted(registry.clusters)]
            why = "The cluster. " + "; ".join(_SPECIAL[s] for s in offer) + ("." if offer else "")
        prop = props.setdefault(param, {"title": param, "position": len(props)})
        prop.update(type="string", enum=values, description=f"{why} {_FOLLOWS}")
    return out


async def offer_choices(registry: Registry) -> list[str]:
    """Write the registry's names into each lifecycle deployment's parameter form; the deployments changed.
    A deployment not registered yet is skipped."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    changed: list[str] = []
    async with get_client() as client:
        for name in CHOICES:
            try:
                deployment = await client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            schema = with_choices(deployment.parameter_openapi_schema or {}, name, registry)
            if schema == deployment.parameter_openapi_schema and not deployment.enforce_parameter_schema:
                continue
            update = DeploymentUpdate(parameter_openapi_schema=schema, enforce_parameter_schema=False)
            await client.update_deployment(deployment.id, update)
            changed.append(name)
    if changed:
        log.info("offered the registry's models and clusters as choices in %s", ", ".join(changed))
    return changed


def main() -> int:
    """``python -m flows.parameter_choices``: offer the registry's names now (deployments.register runs it)."""
    import asyncio

    from blocks.registry import Registry
    from core.settings import get_settings

    changed = asyncio.run(offer_choices(asyncio.run(Registry.load(get_settings()))))
    print(f"parameter choices offered in {len(changed)} deployment(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
