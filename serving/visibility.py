"""Which models and clusters a caller may use: the one rule that /v1/models, /v1/status and routing share."""

from __future__ import annotations

from blocks.registry import ClusterSpec, ModelSpec, Registry
from core.principal import Principal


def allowed(principal: Principal, spec: ModelSpec | ClusterSpec) -> bool:
    """The model's or cluster's group and identity-provider rules let this caller in."""
    return spec.allows(principal.groups, principal.identity_providers)


def usable_pairs(
    registry: Registry, principal: Principal, *, admin_sees_all: bool = False
) -> list[tuple[ModelSpec, ClusterSpec]]:
    """(model, cluster) pairs the caller may use, in registry order; every pair for an admin if ``admin_sees_all``."""
    everything = admin_sees_all and principal.is_admin
    pairs = []
    for model in registry.models.values():
        if not everything and not allowed(principal, model):
            continue
        for name in model.clusters:
            cluster = registry.clusters.get(name)
            if cluster is not None and (everything or allowed(principal, cluster)):
                pairs.append((model, cluster))
    return pairs


def usable_models(registry: Registry, principal: Principal) -> list[ModelSpec]:
    """Models the caller may use on at least one cluster (what /v1/models lists)."""
    seen: dict[str, ModelSpec] = {}
    for model, _ in usable_pairs(registry, principal):
        seen.setdefault(model.name, model)
    return list(seen.values())
