"""Autoscale's decisions (pure), the loads it reads from gateway reports, and several instances of a model on
one cluster through the gateway's routing."""

from __future__ import annotations

import pytest

from blocks.registry import ClusterModelArgs, ClusterSpec, ModelSpec, Registry
from core.settings import Settings
from flows.autoscale import fleet_loads
from flows.autoscale_decisions import InstanceLoad, Memory, Policy, decide_model
from flows.fleet_decisions import observed_state
from serving.bus import GatewayReport, InstanceUse, Observation
from serving.live_state import LiveState

POLICY = Policy(high=0.8, low=0.3, scale_in_after_s=300, out_cooldown_s=120, in_cooldown_s=300)


def registry(max_instances: int = 2, min_instances: int = 0, b_maintenance: bool = False) -> Registry:
    return Registry(
        clusters={
            "a": ClusterSpec(name="a", max_concurrency=10, expected_start_s=60),
            "b": ClusterSpec(name="b", max_concurrency=10, expected_start_s=300, maintenance=b_maintenance),
        },
        models={
            "m": ModelSpec(
                name="m", path="-", clusters=["a", "b"], max_instances=max_instances, min_instances=min_instances
            )
        },
    )


def hot(cluster: str, replica: int, inflight: int, waiting: int = 0, **kw: object) -> InstanceLoad:
    return InstanceLoad(cluster, replica, "hot", inflight, waiting, **kw)  # type: ignore[arg-type]


def test_pressure_scales_out_on_the_same_cluster_then_cools_down():
    mem = Memory()
    d = decide_model(registry(), "m", [hot("a", 0, 9)], mem, 1000.0, POLICY)
    assert (d.action, d.cluster, d.instance) == ("out", "a", "m@1") and "utilization 0.90" in d.reason
    again = decide_model(registry(), "m", [hot("a", 0, 9), hot("a", 1, 9)], mem, 1060.0, POLICY)
    assert again.action == "keep" and "cooldown 120 s" in again.reason


def test_refusals_or_long_waits_are_pressure_too():
    d = decide_model(registry(), "m", [hot("a", 0, 5, refused_1m=3)], Memory(), 0.0, POLICY)
    assert d.action == "out" and "3 request(s) refused" in d.reason
    d = decide_model(registry(), "m", [hot("a", 0, 5, queue_ms_p50=4000.0)], Memory(), 0.0, POLICY)
    assert d.action == "out" and "median wait for a slot 4000 ms" in d.reason
    after = decide_model(registry(), "m", [hot("a", 0, 0, queue_ms_p50=4000.0)], Memory(), 0.0, POLICY)
    assert after.action == "keep", "the last minute's waits are no pressure once the load is gone"


def test_at_the_bound_it_scales_to_the_next_cluster_or_says_which_bound():
    d = decide_model(registry(max_instances=1), "m", [hot("a", 0, 10)], Memory(), 0.0, POLICY)
    assert (d.action, d.cluster, d.instance) == ("out", "b", "m")  # the model's first instance on b
    d = decide_model(registry(max_instances=1, b_maintenance=True), "m", [hot("a", 0, 10)], Memory(), 0.0, POLICY)
    assert d.action == "keep" and "a at the model's max_instances (1)" in d.reason and "b in maintenance" in d.reason
    full = {"a": 4, "b": 4}  # every cluster already runs its max_instances (4) of all models together
    d = decide_model(registry(), "m", [hot("a", 0, 10)], Memory(), 0.0, POLICY, cluster_running=full)
    assert d.action == "keep" and "cluster's max_instances (4)" in d.reason


def test_a_start_under_way_holds_further_decisions():
    loads = [hot("a", 0, 10), InstanceLoad("a", 1, "starting")]
    d = decide_model(registry(), "m", loads, Memory(), 0.0, POLICY)
    assert d.action == "keep" and "starting" in d.reason


def test_scale_in_needs_a_sustained_quiet_spell_and_retires_the_newest():
    mem = Memory(last_out=0.0)
    loads = [hot("a", 0, 1), hot("a", 1, 0)]
    first = decide_model(registry(), "m", loads, mem, 1000.0, POLICY)
    assert first.action == "keep" and "for 0 s of 300 s" in first.reason
    mid = decide_model(registry(), "m", loads, mem, 1200.0, POLICY)
    assert mid.action == "keep"
    busy = decide_model(registry(), "m", [hot("a", 0, 5), hot("a", 1, 4)], mem, 1250.0, POLICY)
    assert busy.action == "keep" and mem.low_since is None, "a busy moment restarts the quiet clock"
    decide_model(registry(), "m", loads, mem, 1300.0, POLICY)
    d = decide_model(registry(), "m", loads, mem, 1600.0, POLICY)
    assert (d.action, d.cluster, d.instance) == ("in", "a", "m@1")


def test_no_scale_in_that_would_overload_the_rest_or_drop_below_min_instances():
    loads = [hot("a", 0, 3), hot("a", 1, 3), hot("a", 2, 0)]  # 6 of 30: low; without one, 6 of 20 is fine
    d = decide_model(registry(max_instances=3), "m", loads, Memory(low_since=0.0, last_out=0.0), 1000.0, POLICY)
    assert d.action == "in" and d.instance == "m@2"
    tight = Policy(high=0.25, low=0.21)
    d = decide_model(registry(max_instances=3), "m", loads, Memory(), 1000.0, tight)
    assert d.action == "keep" and "one instance fewer would make it 0.30" in d.reason
    reg = registry()
    reg.models["m"].per_cluster["a"] = ClusterModelArgs(min_instances=2)  # two always hot on a, none on b
    kept = decide_model(reg, "m", [hot("a", 0, 0), hot("a", 1, 0)], Memory(low_since=0.0, last_out=0.0), 1000.0,
                        POLICY)  # fmt: skip
    assert kept.action == "keep" and "min_instances" in kept.reason


def test_min_instances_keeps_the_always_hot_tier_up():
    d = decide_model(registry(min_instances=1), "m", [InstanceLoad("a", 0, "cold"), InstanceLoad("b", 0, "cold")],
                     Memory(), 0.0, POLICY)  # fmt: skip
    assert (d.action, d.cluster, d.instance) == ("out", "a", "m") and "below min_instances" in d.reason
    d = decide_model(registry(), "m", [InstanceLoad("a", 0, "cold")], Memory(), 0.0, POLICY)
    assert d.action == "keep" and "cold" in d.reason  # no min_instances: from zero is a request's job


def test_loads_come_from_observations_and_every_gateways_report():
    reg = registry()
    obs = [Observation(cluster="a", model="m", state="hot"), Observation(cluster="a", model="m@1", state="starting")]
    reports = [
        GatewayReport(gateway="g1", instances={"a/m": InstanceUse(state="hot", inflight=4, waiting=2, refused_1m=1)}),
        GatewayReport(gateway="g2", instances={"a/m": InstanceUse(state="hot", inflight=3, queue_ms_p50=900.0)}),
    ]
    loads = {(i.cluster, i.replica): i for i in fleet_loads(reg, obs, reports)["m"]}
    assert set(loads) == {("a", 0), ("a", 1), ("b", 0), ("b", 1)}
    a0 = loads[("a", 0)]
    assert (a0.state, a0.inflight, a0.waiting, a0.refused_1m, a0.queue_ms_p50) == ("hot", 7, 2, 1, 900.0)
    assert loads[("a", 1)].state == "starting" and loads[("b", 0)].state == "cold"


def test_a_retiring_instance_stays_draining_while_it_is_up():
    prev = Observation(cluster="a", model="m@1", state="draining")
    assert observed_state("hot", prev, ClusterSpec(name="a"), 0.0) == "draining"
    assert observed_state("cold", prev, ClusterSpec(name="a"), 0.0) == "cold"


def test_the_gateway_routes_over_every_running_instance_and_never_to_a_draining_one():
    reg = registry(max_instances=3)
    live = LiveState(None, Settings())  # type: ignore[arg-type]  # routing and adoption only: no backends
    a, m = reg.clusters["a"], reg.models["m"]
    for name, state in (("m", "hot"), ("m@1", "hot"), ("m@2", "starting")):
        assert live.adopt(Observation(cluster="a", model=name, state=state, base_url=None), reg.clusters, reg.models)
    insts = live.instances_of(a, m)
    assert [i.key for i in insts] == ["a/m", "a/m@1"], "a further instance that is still starting is not routed to"
    assert insts[1].model.instance_name == "m@1" and insts[1].model.replica == 1
    insts[0].inflight = 5
    assert live.route(insts)[0].key == "a/m@1", "least loaded first"
    live.adopt(Observation(cluster="a", model="m@1", state="draining"), reg.clusters, reg.models)
    assert "a/m@1" not in [i.key for i in live.route(live.instances_of(a, m))]
    assert not live.adopt(Observation(cluster="a", model="m@x", state="hot"), reg.clusters, reg.models)


@pytest.mark.parametrize("bad", ["m@", "m@one"])
def test_an_instance_name_is_a_model_and_a_number(bad: str):
    reg = registry()
    assert not LiveState(None, Settings()).adopt(  # type: ignore[arg-type]
        Observation(cluster="a", model=bad, state="hot"), reg.clusters, reg.models
    )


def test_further_instances_take_their_own_state_file_and_a_free_port():
    from compute.backends import ExecutorBackend
    from core.settings import Settings

    m = ModelSpec(name="m", path="-", port=8100, per_cluster={"a": ClusterModelArgs(max_instances=3)})
    s = Settings()
    first = ExecutorBackend.instance_spec(m, ClusterSpec(name="a"), s)
    third = ExecutorBackend.instance_spec(m.as_replica(2), ClusterSpec(name="a"), s)
    assert (first["model"], first["port"]) == ("m", 8100) and (third["model"], third["port"]) == ("m@2", 0)
    assert m.instance_bounds("a") == (0, 3) and m.instance_bounds("b") == (0, 1)
    assert "replica" not in m.as_replica(2).model_dump(), "the replica number is never stored in the block"


def test_a_further_instance_gets_a_user_endpoint_and_a_job_of_its_own() -> None:
    """A model's further instance on a multi-user Globus Compute endpoint: another user_endpoint_config (INSTANCE),
    so another user endpoint with its own job (deployments/endpoints/multi-user), and another executor here."""
    from compute.backends import ExecutorBackend
    from compute.executors import ExecutorPool

    options = {"ACCOUNT": "myproject", "QUEUE": "debug"}
    cluster = ClusterSpec(name="polaris", transport="globus-compute", endpoint_id="e", user_endpoint_config=options)
    backend = ExecutorBackend(cluster, Settings(), ExecutorPool(Settings()), None)
    first, second = backend.route(0), backend.route(2)
    assert first is cluster and second.user_endpoint_config == {**options, "INSTANCE": 2}
    assert ExecutorPool.key(first) != ExecutorPool.key(second)
    local = ClusterSpec(name="lab", transport="local")
    assert ExecutorBackend(local, Settings(), ExecutorPool(Settings()), None).route(3) is local
