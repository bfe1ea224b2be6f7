"""The lifecycle flows' decisions (which cluster a warm-up picks, what is idle, when a drain is done) and the
deployments declared in prefect.yaml, without a Prefect server."""

from __future__ import annotations

import pytest
import yaml

from blocks.registry import ClusterSpec, ModelSpec, Registry
from core.settings import REPO_ROOT
from deployments.local import DEPLOYMENTS, SCHEDULED
from flows import autoscale, batch, batch_retention, fleet_decisions, lifecycle, predictive, usage
from flows.fleet_decisions import (
    QUEUED_FRESH_S,
    drain_progress,
    idle_decision,
    observed_state,
    pick_best_cluster,
)
from serving.bus import GatewayReport, InstanceUse, Observation

NOW = 1_000_000.0


def registry(**expected_start: float) -> Registry:
    clusters = {name: ClusterSpec(name=name, expected_start_s=s) for name, s in expected_start.items()}
    model = ModelSpec(name="m", path="-", clusters=list(expected_start))
    return Registry(clusters=clusters, models={"m": model})


def obs(cluster: str, state: str, model: str = "m", ts: float = NOW, since: float | None = None) -> Observation:
    return Observation(cluster=cluster, model=model, state=state, ts=ts, since=since)


# ---- pick_best_cluster ----


def test_best_is_the_smallest_expected_start_when_nothing_runs() -> None:
    reg = registry(a=120, b=30, c=30)
    assert pick_best_cluster(reg.models["m"], reg, [], NOW)[0] == "b"  # ties: the model's cluster order


def test_best_prefers_hot_then_starting_then_queued() -> None:
    reg = registry(a=10, b=500, c=600, d=700)
    m = reg.models["m"]
    seen = [obs("b", "queued"), obs("c", "starting"), obs("d", "hot")]
    assert pick_best_cluster(m, reg, seen, NOW) == ("d", "already hot there")
    assert pick_best_cluster(m, reg, seen[:2], NOW)[0] == "c"
    assert pick_best_cluster(m, reg, seen[:1], NOW)[0] == "b"


def test_best_ignores_stale_queued_other_models_and_cold() -> None:
    reg = registry(a=10, b=500)
    m = reg.models["m"]
    stale = obs("b", "queued", ts=NOW - QUEUED_FRESH_S - 1)
    assert pick_best_cluster(m, reg, [stale], NOW)[0] == "a"
    assert pick_best_cluster(m, reg, [obs("b", "hot", model="other"), obs("b", "cold")], NOW)[0] == "a"


def test_best_skips_maintenance_and_avoids_failed() -> None:
    reg = registry(a=10, b=500, c=900)
    reg.clusters["a"].maintenance = True
    m = reg.models["m"]
    assert pick_best_cluster(m, reg, [obs("a", "hot")], NOW)[0] == "b"  # hot, but in maintenance
    assert pick_best_cluster(m, reg, [obs("b", "failed")], NOW)[0] == "c"
    reg.clusters["c"].maintenance = True
    assert pick_best_cluster(m, reg, [obs("b", "failed")], NOW)[0] == "b"  # the only one left
    reg.clusters["b"].maintenance = True
    with pytest.raises(ValueError, match="maintenance"):
        pick_best_cluster(m, reg, [], NOW)


# ---- observed_state ----


def test_a_status_check_wins_except_over_a_fresh_batch_queue() -> None:
    local = ClusterSpec(name="local")
    batch = ClusterSpec(name="polaris", transport="globus-compute", scheduler="pbs")
    assert observed_state("cold", obs("local", "starting"), local, NOW) == "cold"
    assert observed_state("cold", obs("local", "queued"), local, NOW) == "cold"
    assert observed_state("cold", obs("polaris", "queued"), batch, NOW) == "queued"
    assert observed_state("cold", obs("polaris", "queued", ts=NOW - QUEUED_FRESH_S - 1), batch, NOW) == "cold"
    assert observed_state("hot", obs("polaris", "queued"), batch, NOW) == "hot"
    assert observed_state("failed", None, batch, NOW) == "failed"


# ---- idle_decision ----


def report(gw: str, ts: float = NOW, maintenance: tuple[str, ...] = (), **uses: InstanceUse) -> GatewayReport:
    return GatewayReport(
        gateway=gw, ts=ts, instances={k.replace("__", "/"): u for k, u in uses.items()}, maintenance=list(maintenance)
    )


def test_idle_counts_from_the_latest_request_of_any_gateway() -> None:
    reports = [
        report("g1", a__m=InstanceUse(state="hot", last_used=NOW - 900, hot_since=NOW - 5000)),
        report("g2", a__m=InstanceUse(state="hot", last_used=NOW - 100, hot_since=NOW - 5000)),
    ]
    d = idle_decision("a", "m", 600, reports, NOW - 9999, NOW)
    assert (d.stop, d.idle_s, d.reference) == (False, 100, "last request")
    d = idle_decision("a", "m", 60, reports, None, NOW)
    assert d.stop and d.action == "stop"


def test_idle_falls_back_to_hot_since_then_to_the_observation() -> None:
    never_used = [report("g1", a__m=InstanceUse(state="hot", hot_since=NOW - 700))]
    d = idle_decision("a", "m", 600, never_used, NOW - 50, NOW)
    assert (d.stop, d.idle_s, d.reference) == (True, 700, "hot since (gateway)")
    d = idle_decision("a", "m", 600, [], NOW - 50, NOW)
    assert (d.stop, d.idle_s, d.reference) == (False, 50, "hot since (observed)")
    d = idle_decision("a", "m", 600, [report("g1", b__m=InstanceUse(state="hot", last_used=NOW))], NOW - 601, NOW)
    assert d.stop and d.reference == "hot since (observed)"  # other instances' use does not count
    d = idle_decision("a", "m", 600, [], None, NOW)
    assert not d.stop and d.idle_s is None and "no idle reference" in d.action


def test_a_restart_after_the_last_request_counts_from_the_restart() -> None:
    reports = [report("g1", a__m=InstanceUse(state="hot", last_used=NOW - 5000, hot_since=NOW - 30))]
    d = idle_decision("a", "m", 600, reports, None, NOW)
    assert (d.stop, d.idle_s, d.reference) == (False, 30, "hot since (gateway)")


def test_in_flight_requests_and_zero_timeout_keep_it() -> None:
    reports = [
        report("g1", a__m=InstanceUse(state="hot", inflight=0, last_used=NOW - 5000)),
        report("g2", a__m=InstanceUse(state="hot", inflight=2, last_used=NOW - 5000)),
    ]
    d = idle_decision("a", "m", 600, reports, None, NOW)
    assert (d.stop, d.inflight) == (False, 2) and "2 request(s) in flight" in d.action
    d = idle_decision("a", "m", 0, reports[:1], None, NOW)
    assert not d.stop and "never" in d.action


# ---- drain_progress ----


def test_drain_waits_for_every_gateway_and_every_request() -> None:
    use = InstanceUse(state="hot", inflight=3)
    reports = [
        report("g1", maintenance=("a",), a__m=use, b__m=InstanceUse(state="hot", inflight=7)),
        report("g2", **{"a__org/big-model": InstanceUse(state="hot", inflight=1)}),
    ]
    assert drain_progress(reports, "a") == (["g2"], 4)
    assert drain_progress(reports, "b") == (["g1", "g2"], 7)
    done = [report("g1", maintenance=("a",), a__m=InstanceUse(state="hot")), report("g2", maintenance=("a", "b"))]
    assert drain_progress(done, "a") == ([], 0)
    assert drain_progress([], "a") == ([], 0)


# ---- helpers ----


def test_artifact_keys_and_table_cells_are_safe() -> None:
    assert fleet_decisions.artifact_key("warm-up", "Meta-Llama/Llama_3.1 8B") == "warm-up-meta-llama-llama-3-1-8b"
    table = fleet_decisions.md_table(["a", "b"], [["x|y", "line1\nline2"], [None, 3]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | line1 line2 |", "| - | 3 |"]
    assert len(fleet_decisions.cell("x" * 500)) == 80


# ---- deployments ----


def test_prefect_yaml_declares_the_deployments_the_runner_names() -> None:
    doc = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    declared = {}
    modules = {
        "flows/lifecycle.py": lifecycle,
        "flows/usage.py": usage,
        "flows/batch.py": batch,
        "flows/batch_retention.py": batch_retention,
        "flows/predictive.py": predictive,
        "flows/autoscale.py": autoscale,
    }
    for d in doc["deployments"]:
        path, fn = d["entrypoint"].split(":")
        assert path in modules
        declared[f"{getattr(modules[path], fn).name}/{d['name']}"] = d
        assert d["work_pool"]["name"] == "first-local" and d["description"].strip()
    assert sorted(declared) == sorted(DEPLOYMENTS)
    assert sorted(name for name, d in declared.items() if d.get("schedules")) == sorted(SCHEDULED)
    assert declared["refresh-status/refresh-status"]["schedules"] == [{"interval": 60}]
    assert declared["scale-down-idle/scale-down-idle"]["schedules"] == [{"interval": 300}]
    assert declared["scale-down/scale-down"]["parameters"] == {"model": "tiny", "cluster": "all"}
    assert "parameters" not in declared["drain-cluster/drain-cluster"]
    assert declared["batch-retention/batch-retention"]["schedules"] == [{"interval": 300}]
    assert "parameters" not in declared["run-batch/run-batch"]  # POST /v1/batches gives its batch_id


@pytest.mark.parametrize(
    "fn", [lifecycle.warm_up, lifecycle.scale_down, lifecycle.refresh_status, lifecycle.scale_down_idle,
           lifecycle.drain_cluster, lifecycle.model_status],
)  # fmt: skip
def test_every_parameter_has_a_description_for_the_ui(fn) -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(fn.fn)
    for name, prop in schema.properties.items():
        assert prop.get("description"), f"{fn.name}: parameter {name} has no description"
    if fn is lifecycle.drain_cluster:
        assert schema.required == ["cluster"]
