"""The lifecycle deployments' model and cluster parameters as drop-downs of the registry's names (issue 19)."""

from __future__ import annotations

from blocks.registry import ClusterModelArgs, ClusterSpec, ModelSpec, Registry
from flows.parameter_choices import CHOICES, instance_names, with_choices

REGISTRY = Registry(
    clusters={"polaris": ClusterSpec(name="polaris"), "local": ClusterSpec(name="local")},
    models={
        "tiny": ModelSpec(name="tiny", path="/m", clusters=["local"]),
        "llama": ModelSpec(
            name="llama", path="/l", clusters=["polaris", "local"], max_instances=2,
            per_cluster={"polaris": ClusterModelArgs(max_instances=3)},
        ),
    },
)  # fmt: skip

# What Prefect generates from warm_up's signature.
WARM_UP_SCHEMA = {
    "title": "Parameters",
    "type": "object",
    "properties": {
        "model": {"default": "tiny", "position": 0, "title": "model", "type": "string"},
        "cluster": {"default": "best", "position": 1, "title": "cluster", "type": "string"},
        "timeout_s": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None, "position": 2},
    },
}


def test_models_come_with_each_instance_autoscale_may_start():
    assert instance_names(REGISTRY) == ["llama", "llama@1", "llama@2", "tiny"]


def test_warm_up_offers_models_and_best_plus_the_clusters():
    schema = with_choices(WARM_UP_SCHEMA, "warm-up/warm-up", REGISTRY)
    props = schema["properties"]
    assert props["model"]["enum"] == ["llama", "llama@1", "llama@2", "tiny"]
    assert props["cluster"]["enum"] == ["best", "local", "polaris"]
    assert props["model"]["default"] == "tiny" and props["cluster"]["position"] == 1  # the rest is kept
    assert "'best'" in props["cluster"]["description"] and "first apply" in props["cluster"]["description"]
    assert props["timeout_s"] == WARM_UP_SCHEMA["properties"]["timeout_s"]
    assert WARM_UP_SCHEMA["properties"]["model"].get("enum") is None  # the input is not changed


def test_each_deployment_offers_its_own_special_values():
    empty = {"properties": {}}
    clusters = {name: with_choices(empty, name, REGISTRY)["properties"]["cluster"]["enum"] for name in CHOICES}
    assert clusters["scale-down/scale-down"] == ["all", "local", "polaris"]
    assert clusters["drain-cluster/drain-cluster"] == ["local", "polaris"]
    assert clusters["retire-instance/retire-instance"] == ["local", "polaris"]
    assert "model" not in with_choices(empty, "drain-cluster/drain-cluster", REGISTRY)["properties"]
