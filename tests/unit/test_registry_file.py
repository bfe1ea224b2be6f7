"""`first apply`: a registry declared in YAML, validated as a whole, and the plan of what applying it does."""

from __future__ import annotations

import pytest

from blocks.registry import ClusterSpec, ModelSpec, Registry

FILE = """
clusters:
  - name: local
  - name: polaris
    transport: globus-compute
    endpoint_id: 4b116d3c-1703-4f8f-9f6f-39921e5864df
    scheduler: pbs
    login_endpoint_id: 0e4a5d3f-0000-4000-8000-000000000001
    allowed_domains: [anl.gov]
models:
  - name: tiny
    path: /models/tiny
    clusters: [local]
  - name: llama-70b
    aliases: [llama]
    path: /eagle/models/llama-70b
    clusters: [polaris]
    context_length: 8192
    limits: {rpm: 60, tpm: 200000}
"""


def test_a_declared_registry_is_read_whole():
    reg = Registry.from_yaml(FILE)
    assert sorted(reg.clusters) == ["local", "polaris"] and sorted(reg.models) == ["llama-70b", "tiny"]
    polaris = reg.clusters["polaris"]
    assert (polaris.transport, polaris.scheduler, polaris.allowed_domains) == ("globus-compute", "pbs", ["anl.gov"])
    assert reg.resolve("llama").name == "llama-70b" and reg.models["llama-70b"].limits.tpm == 200_000


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "clusters: []\nmodels:\n  - name: m\n    path: x\n    clusters: [nowhere]\n",
            "undeclared cluster(s) ['nowhere']",
        ),
        ("clusters:\n  - name: a\n  - name: a\n", "'a' is declared twice"),
        ("clusters:\n  - name: a\n    transport: carrier-pigeon\n", "clusters[0] (a): transport"),
        ("models:\n  - name: m\n", "models[0] (m): path: Field required"),
        ("servers: []\n", "found ['servers']"),
    ],
)
def test_problems_are_named(text, problem):
    with pytest.raises(ValueError) as e:
        Registry.from_yaml(text)
    assert problem in str(e.value)


def test_plan_says_what_applying_changes():
    current = Registry(
        clusters={"local": ClusterSpec(name="local"), "old": ClusterSpec(name="old")},
        models={"tiny": ModelSpec(name="tiny", path="/models/tiny", clusters=["local"], context_length=256)},
    )
    desired = Registry.from_yaml(FILE)
    plan = current.plan(desired)
    assert ("unchanged", "cluster", "local") in plan and ("create", "cluster", "polaris") in plan
    assert ("update", "model", "tiny") in plan and ("create", "model", "llama-70b") in plan
    assert ("keep", "cluster", "old") in plan  # not in the file: kept unless pruned
    assert ("delete", "cluster", "old") in current.plan(desired, prune=True)


def test_unknown_keys_anywhere_in_the_file_are_refused_and_each_is_named():
    """A misspelled key is not silently dropped (issue 19): at the top of a spec, inside its limits, inside a
    group's limits and inside a model's per-cluster settings, each is named with its path and the key it is
    close to; the specs with no stray key still count (no knock-on 'undeclared cluster' for them)."""
    text = """
clusters:
  - name: a
    max_instance: 4
    limits: {rpm: 3, tmp: 4}
    group_limits: {staff: {rpn: 1}}
  - name: b
models:
  - name: m
    path: /x
    clusters: [a, b]
    per_cluster: {a: {gpu: 2}}
    colour: red
projects:
  - name: p
    groups: [staff]
    gpu_hour: 10
"""
    with pytest.raises(ValueError) as e:
        Registry.from_yaml(text)
    lines = str(e.value).splitlines()[1:]
    assert [line.strip() for line in lines] == [
        "clusters[0] (a): max_instance: unknown key (did you mean 'max_instances'?)",
        "clusters[0] (a): limits.tmp: unknown key (did you mean 'tpm'?)",
        "clusters[0] (a): group_limits.staff.rpn: unknown key (did you mean 'rpm'?)",
        "models[0] (m): per_cluster.a.gpu: unknown key (did you mean 'gpus'?)",
        "models[0] (m): colour: unknown key",
        "projects[0] (p): gpu_hour: unknown key (did you mean 'gpu_hours'?)",
        "projects[0] (p): gpu_hours: Field required",
    ]


def test_free_form_maps_take_any_key():
    """headers, vllm_env and user_endpoint_config are the operator's own maps: their keys are not checked."""
    reg = Registry.from_yaml(
        "clusters:\n  - name: a\n    headers: {X-Org: o}\n    user_endpoint_config: {account: x, queue: debug}\n"
        "models:\n  - name: m\n    path: /x\n    clusters: [a]\n    vllm_env: {ANY_THING: '1'}\n"
    )
    assert reg.clusters["a"].user_endpoint_config == {"account": "x", "queue": "debug"}
