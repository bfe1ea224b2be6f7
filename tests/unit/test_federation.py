"""Federation through the real gateway: three clusters, each an OpenAISimulatorDouble (many model servers that
can be made slow or broken on demand, which vLLM CPU can't): routing by state and load, failover before the
first byte, circuit breakers, maintenance, pinning, /v1/status and /metrics; and the routing policy itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from blocks.registry import ClusterSpec, ModelSpec, Registry
from core.settings import Settings
from first.gateway import create_gateway
from serving.auth import KeyStore
from serving.live_state import Instance, LiveState
from serving.routing import Breaker, rank
from tests.fakes.openai_simulator import OpenAISimulatorDouble

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def sims() -> Iterator[dict[str, OpenAISimulatorDouble]]:
    with (
        OpenAISimulatorDouble(latency_s=0.05, capacity=8, name="a") as a,
        OpenAISimulatorDouble(latency_s=0.05, capacity=8, name="b") as b,
        OpenAISimulatorDouble(latency_s=0.05, capacity=8, name="c") as c,
    ):
        yield {"a": a, "b": b, "c": c}


def _registry(sims: dict[str, OpenAISimulatorDouble], **cluster_kw: dict[str, Any]) -> Registry:
    clusters = {
        n: ClusterSpec(name=n, transport="http", base_url=s.base_url, **cluster_kw.get(n, {})) for n, s in sims.items()
    }
    return Registry(
        clusters=clusters,
        models={
            "m": ModelSpec(name="m", clusters=list(sims), path="-"),
            "staff-model": ModelSpec(name="staff-model", clusters=["a"], path="-", allowed_groups=["staff"]),
        },
    )


@pytest.fixture
def fed_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"breaker_failures": 2, "breaker_cooldown_s": 0.5})


@pytest.fixture
def keys(fed_settings: Settings) -> dict[str, str]:
    store = KeyStore(fed_settings.keys_db)
    return {"alice": store.create("alice")[0], "root": store.create("root", ["admin", "staff"])[0]}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _chat(client: AsyncTestClient, key: str, body: dict | None = None, **headers: str) -> Any:
    return await client.post("/v1/chat/completions", json=body or CHAT, headers={**_auth(key), **headers})


async def test_routing_spreads_load_over_hot_clusters(fed_settings, sims, keys) -> None:
    async with AsyncTestClient(app=create_gateway(fed_settings, _registry(sims))) as client:
        # c=1: equal instances take turns (least loaded, then least recently used)
        served = [(await _chat(client, keys["alice"])).headers["x-first-cluster"] for _ in range(6)]
        assert sorted(served) == ["a", "a", "b", "b", "c", "c"], served
        # c=24 with 0.05 s each: least loaded first keeps the three busy alike
        for s in sims.values():
            s.latency_s = 0.2
        rs = await asyncio.gather(*(_chat(client, keys["alice"]) for _ in range(24)))
        assert all(r.status_code == 200 for r in rs)
        counts = {n: sum(r.headers["x-first-cluster"] == n for r in rs) for n in sims}
        assert min(counts.values()) >= 6, counts


async def test_a_hot_cluster_is_preferred_over_one_that_is_not(fed_settings, sims, keys) -> None:
    sims["a"].healthy = sims["c"].healthy = False  # /health 503: the server is there but not ready ("starting")
    async with AsyncTestClient(app=create_gateway(fed_settings, _registry(sims))) as client:
        served = {(await _chat(client, keys["alice"])).headers["x-first-cluster"] for _ in range(5)}
        assert served == {"b"}
        status = (await client.get("/v1/status", headers=_auth(keys["root"]))).json()
        states = {i["cluster"]: i["state"] for i in status["instances"] if i["model"] == "m"}
        assert states == {"a": "starting", "b": "hot", "c": "starting"}


async def test_failover_before_the_first_byte_and_the_breaker(fed_settings, sims, keys) -> None:
    sims["a"].fail_mode = "500"
    app = create_gateway(fed_settings, _registry(sims))
    async with AsyncTestClient(app=app) as client:
        rs = [await _chat(client, keys["alice"]) for _ in range(6)]
        assert [r.status_code for r in rs] == [200] * 6, "a failing cluster must cost callers nothing"
        assert all(r.headers["x-first-cluster"] in ("b", "c") for r in rs)
        live = app.state.services.live
        assert live.failovers == 2 and sims["a"].requests == 2, "two failures open a's breaker: no more tries"
        status = (await client.get("/v1/status", headers=_auth(keys["root"]))).json()
        # What failed is the model's server on a, not a: that model is closed off there, the cluster is not.
        assert {(i["cluster"], i["model"]): i["breaker"] for i in status["instances"]}[("a", "m")] == "open"
        assert {c["name"]: c["breaker"] for c in status["clusters"]}["a"] == "closed"
        # a recovers; after the cool-down one probe goes to it (half-open), and its success closes the breaker
        sims["a"].fail_mode = None
        await asyncio.sleep(0.6)
        inst = next(i for i in live.all() if i.cluster.name == "a")
        assert inst.breaker is not None and inst.breaker.state(time.time()) == "half-open"
        served = [(await _chat(client, keys["alice"])).headers["x-first-cluster"] for _ in range(3)]
        assert "a" in served and inst.breaker.state(time.time()) == "closed"


async def test_a_dropped_connection_fails_over_and_breaks_nothing_else(fed_settings, sims, keys) -> None:
    sims["b"].fail_mode = "close"
    async with AsyncTestClient(app=create_gateway(fed_settings, _registry(sims))) as client:
        rs = await asyncio.gather(*(_chat(client, keys["alice"]) for _ in range(12)))
        assert [r.status_code for r in rs] == [200] * 12
        assert {r.headers["x-first-cluster"] for r in rs} <= {"a", "c"}
        assert sims["a"].served + sims["c"].served == 12


async def test_every_cluster_failing_gives_503_with_retry_after(fed_settings, sims, keys) -> None:
    for s in sims.values():
        s.fail_mode = "500"
    async with AsyncTestClient(app=create_gateway(fed_settings, _registry(sims))) as client:
        r = await _chat(client, keys["alice"])
        assert r.status_code == 502 and r.json()["error"]["code"] == "backend_error"
        assert sum(s.requests for s in sims.values()) == 3, "max_tries clusters, each once"
        for _ in range(3):
            r = await _chat(client, keys["alice"])
        assert r.status_code == 503 and r.json()["error"]["code"] == "clusters_failing"
        assert int(r.headers["retry-after"]) >= 1 and "circuit breaker open" in r.json()["error"]["message"]


async def test_maintenance_is_skipped(fed_settings, sims, keys) -> None:
    reg = _registry(sims, a={"maintenance": True, "maintenance_message": "PBS upgrade"})
    async with AsyncTestClient(app=create_gateway(fed_settings, reg)) as client:
        served = {(await _chat(client, keys["alice"])).headers["x-first-cluster"] for _ in range(6)}
        assert served == {"b", "c"} and sims["a"].requests == 0
        r = await _chat(client, keys["alice"], {**CHAT, "model": "staff-model"})
        assert r.status_code == 403  # alice isn't staff: access is checked before maintenance
        r = await _chat(client, keys["alice"], **{"X-First-Cluster": "a"})
        assert r.status_code == 503 and "PBS upgrade" in r.json()["error"]["message"]


async def test_pinning_a_cluster(fed_settings, sims, keys) -> None:
    async with AsyncTestClient(app=create_gateway(fed_settings, _registry(sims))) as client:
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=CHAT, headers={**_auth(keys["alice"]),
                                  "X-First-Cluster": "c"})  # fmt: skip
            assert r.status_code == 200 and r.headers["x-first-cluster"] == "c"
        r = await _chat(client, keys["alice"], {**CHAT, "model": "b/m"})
        assert r.status_code == 200 and r.headers["x-first-cluster"] == "b" and r.json()["model"] == "b/m"
        r = await _chat(client, keys["alice"], {**CHAT, "model": "nowhere/m"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "b/m"},
                              headers={**_auth(keys["alice"]), "X-First-Cluster": "c"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["code"] == "cluster_conflict"
        r = await _chat(client, keys["root"], {**CHAT, "model": "b/staff-model"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "cluster_not_serving"
        # pinned to a failing cluster: no failover elsewhere, the caller asked for that one
        sims["c"].fail_mode = "500"
        r = await client.post("/v1/chat/completions", json=CHAT, headers={**_auth(keys["alice"]),
                              "X-First-Cluster": "c"})  # fmt: skip
        assert r.status_code == 502 and sims["a"].served + sims["b"].served == 1


async def test_status_and_metrics_show_each_caller_what_they_may_see(fed_settings, sims, keys) -> None:
    async with AsyncTestClient(app=create_gateway(fed_settings, _registry(sims))) as client:
        assert (await _chat(client, keys["alice"])).status_code == 200
        mine = (await client.get("/v1/status", headers=_auth(keys["alice"]))).json()
        assert {i["model"] for i in mine["instances"]} == {"m"}, "alice may not use staff-model"
        assert all("base_url" not in i for i in mine["instances"]) and "gateway" not in mine
        hot = [i for i in mine["instances"] if i["state"] == "hot"]
        assert len(hot) == 3 and sum(i["requests"] for i in hot) == 1
        assert all(set(i["recent"]) == {"requests", "latency_ms_p50", "errors"} for i in hot)
        root = (await client.get("/v1/status", headers=_auth(keys["root"]))).json()
        assert {i["model"] for i in root["instances"]} == {"m", "staff-model"}
        assert all(i["base_url"] for i in root["instances"]) and root["failovers"] == 0
        r = await client.get("/metrics", headers=_auth(keys["alice"]))
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
        text = (await client.get("/metrics", headers=_auth(keys["root"]))).text
        assert 'first_instance_state{cluster="a",model="m",state="hot"} 1.0' in text
        assert 'first_instance_requests_total{cluster="' in text and "first_failovers_total 0.0" in text


# ---- the policy and the cold-start queue, without HTTP ----


def _instances(states: dict[str, tuple[str, int]], **kw: Any) -> list[Instance]:
    model = ModelSpec(name="m", path="-", clusters=list(states))
    out = []
    for name, (state, inflight) in states.items():
        inst = Instance(ClusterSpec(name=name, transport="http", base_url="-", **kw.get(name, {})), model, state=state)
        inst.inflight = inflight
        out.append(inst)
    return out


def test_rank_follows_the_documented_order() -> None:
    insts = _instances(
        {"cold-slow": ("cold", 0), "queued": ("queued", 0), "hot-busy": ("hot", 5), "failed": ("failed", 0),
         "starting": ("starting", 0), "hot-idle": ("hot", 1), "hot-full": ("hot", 4), "cold-fast": ("cold", 0)},
        **{"hot-full": {"max_concurrency": 4}, "cold-slow": {"expected_start_s": 600},
           "cold-fast": {"expected_start_s": 30}},
    )  # fmt: skip
    order = [i.cluster.name for i in rank(insts, {}, {}, time.time())]
    assert order == ["hot-idle", "hot-busy", "hot-full", "starting", "queued", "cold-fast", "cold-slow", "failed"]
    # what a cluster's warm-ups really took (learned) outranks its declared expectation
    assert [i.cluster.name for i in rank(insts[-1:] + insts[:1], {}, {"cold-slow": 5.0}, time.time())] == [
        "cold-slow", "cold-fast"
    ]  # fmt: skip


def test_rank_skips_maintenance_open_breakers_and_full_clusters() -> None:
    insts = _instances(
        {"down": ("hot", 0), "open": ("hot", 0), "busy": ("cold", 0), "ok": ("cold", 0)},
        down={"maintenance": True}, busy={"max_instances": 1},
    )  # fmt: skip
    other = Instance(insts[2].cluster, ModelSpec(name="other", path="-"), state="hot")  # busy runs another model
    now = time.time()
    breaker = Breaker(threshold=1, cooldown_s=60)
    breaker.failure(now)
    ranked = [(i.cluster.name, i.model.name) for i in rank([*insts, other], {"open": breaker}, {}, now)]
    assert ranked == [("busy", "other"), ("ok", "m")]


def test_breaker_opens_half_opens_and_closes() -> None:
    b = Breaker(threshold=2, cooldown_s=10)
    b.failure(100)
    assert b.state(100) == "closed" and b.allows(100)
    b.failure(101)
    assert b.state(105) == "open" and not b.allows(105) and b.opened == 1
    assert b.state(111) == "half-open" and b.allows(111)
    b.attempt(111)
    assert not b.allows(112), "one probe at a time"
    b.failure(112)
    assert b.state(115) == "open" and b.opened == 2
    b.attempt(123)
    b.success()
    assert b.state(123) == "closed" and b.failures == 0


class ColdClusterDouble:
    """Stands in for a compute backend whose model is cold and can be started (a local cluster would start a
    real vLLM, a minute per test); the warm-up itself is the injected runner below."""

    manages_lifecycle = True

    async def status(self, model: ModelSpec) -> dict[str, Any]:
        return {"state": "cold"}


class BackendsDouble:
    def get(self, cluster: ClusterSpec) -> ColdClusterDouble:
        return ColdClusterDouble()


async def test_concurrent_cold_requests_share_one_warm_up_and_resume_in_arrival_order(settings) -> None:
    warm_ups: list[str] = []

    async def warm_up_double(model: ModelSpec, cluster: ClusterSpec) -> dict[str, Any]:
        warm_ups.append(cluster.name)
        await asyncio.sleep(0.2)
        return {"state": "hot", "base_url": "http://x"}

    live = LiveState(BackendsDouble(), settings, warm_runner=warm_up_double)  # type: ignore[arg-type]
    inst = live.instance(ClusterSpec(name="c", transport="local"), ModelSpec(name="m", path="-"))
    resumed: list[int] = []

    async def request(n: int) -> None:
        await live.ensure_warm(inst)
        resumed.append(n)

    tasks = []
    for n in range(20):
        tasks.append(asyncio.create_task(request(n)))
        await asyncio.sleep(0.001)  # arrival order
    await asyncio.gather(*tasks)
    assert warm_ups == ["c"] and inst.state == "hot" and inst.warm_ups == 1
    assert resumed == list(range(20))
    assert live.estimates["c"] >= 0.2


async def test_past_the_bound_a_cold_request_gets_503_naming_the_cluster(settings) -> None:
    async def slow_warm_up_double(model: ModelSpec, cluster: ClusterSpec) -> dict[str, Any]:
        await asyncio.sleep(5)
        return {"state": "hot"}

    live = LiveState(BackendsDouble(), settings, warm_runner=slow_warm_up_double)  # type: ignore[arg-type]
    inst = live.instance(ClusterSpec(name="polaris", transport="local"), ModelSpec(name="m", path="-"))
    from core.errors import APIError

    with pytest.raises(APIError) as err:
        await live.ensure_warm(inst, wait_s=0.1)
    assert err.value.status == 503 and err.value.code == "model_warming_up"
    assert "warming up on cluster 'polaris'" in err.value.message and int(err.value.headers["Retry-After"]) >= 5
    assert inst.state == "starting"
    inst.warm.cancel()  # type: ignore[union-attr]


def test_max_instances_counts_every_model_the_cluster_runs(settings) -> None:
    """A cold model on a cluster already running its max_instances models (of other models) is not routed to,
    and the 503 says why instead of blaming a breaker."""
    from types import SimpleNamespace

    from serving.steps import nothing_routable

    live = LiveState(BackendsDouble(), settings)  # type: ignore[arg-type]
    busy = ClusterSpec(name="busy", transport="local", max_instances=1)
    free = ClusterSpec(name="free", transport="local", max_instances=2)
    live.instance(busy, ModelSpec(name="other", path="-")).state = "hot"
    model = ModelSpec(name="m", path="-")
    on_busy, on_free = live.instance(busy, model), live.instance(free, model)
    on_busy.state = on_free.state = "cold"
    assert live.route([on_busy, on_free]) == [on_free]
    assert live.route([on_busy]) == []
    err = nothing_routable("m", [on_busy], SimpleNamespace(live=live))  # type: ignore[arg-type]
    assert err.status == 503 and err.code == "no_capacity" and int(err.headers["Retry-After"]) == 30
    assert "busy: cold, and already running its max_instances (1) models" in err.message
    assert "breaker" not in err.message
    # a half-open breaker whose one probe is still running: failing, not full
    probing = live.breaker("free")
    for _ in range(probing.threshold):
        probing.failure(time.time() - probing.cooldown_s - 1)
    probing.attempt(time.time())
    assert probing.state(time.time()) == "half-open" and not probing.allows(time.time())
    err = nothing_routable("m", [on_free], SimpleNamespace(live=live))  # type: ignore[arg-type]
    assert err.code == "clusters_failing" and "free: failing, one probe request under way" in err.message


async def test_a_burst_for_an_unknown_instance_makes_one_status_call(settings) -> None:
    """Status probes are single-flight per instance: 50 requests arriving for an instance the gateway does not
    know yet make one status call to its cluster, not 50."""
    calls: list[str] = []

    class CountingBackendDouble:
        async def status(self, model: ModelSpec) -> dict[str, Any]:
            calls.append(model.name)
            await asyncio.sleep(0.1)
            return {"state": "hot", "base_url": "http://127.0.0.1:8100"}

    class BackendsDouble2:
        def get(self, cluster: ClusterSpec) -> CountingBackendDouble:
            return CountingBackendDouble()

    live = LiveState(BackendsDouble2(), settings)  # type: ignore[arg-type]
    inst = live.instance(ClusterSpec(name="c", transport="local"), ModelSpec(name="m", clusters=["c"], path="-"))
    await asyncio.gather(*(live.probe([inst]) for _ in range(50)))
    assert calls == ["m"] and inst.state == "hot"
    await live.probe([inst])  # a later probe asks again
    assert calls == ["m", "m"]


async def test_one_models_failing_server_closes_that_model_there_not_the_cluster(fed_settings, sims, keys) -> None:
    """The breaker is per instance where that is what failed: 'staff-model' on a keeps serving while m's server
    on a fails (and its breaker opens)."""
    sims["a"].fail_mode, sims["a"].failing_models = "500", {"m"}
    app = create_gateway(fed_settings, _registry(sims))
    async with AsyncTestClient(app=app) as client:
        for _ in range(4):
            assert (await _chat(client, keys["alice"])).status_code == 200  # m fails over to b or c
        r = await _chat(client, keys["root"], {**CHAT, "model": "staff-model"})
        assert r.status_code == 200 and r.headers["x-first-cluster"] == "a"
        live = app.state.services.live
        assert live.breaker("a").state(time.time()) == "closed"
        m_on_a = next(i for i in live.all() if (i.cluster.name, i.model.name) == ("a", "m"))
        assert m_on_a.breaker is not None and m_on_a.breaker.state(time.time()) == "open"
        metrics = (await client.get("/metrics", headers=_auth(keys["root"]))).text
        assert 'first_instance_breaker_open{cluster="a",model="m"} 1.0' in metrics


async def test_timeouts_of_requests_sized_to_time_out_are_not_cluster_faults(fed_settings, sims, keys) -> None:
    """Three requests asking for more tokens than a healthy server makes within the timeout (max_tokens near the
    context) time out: that is their size, not a failing cluster, so nothing closes for anyone else. Small
    requests that time out are faults as before."""
    settings = fed_settings.model_copy(update={"request_timeout_s": 0.5, "max_tries": 1, "slowest_tokens_per_s": 20})
    sims["a"].fail_mode = "hang"
    reg = Registry(
        clusters={"a": ClusterSpec(name="a", transport="http", base_url=sims["a"].base_url)},
        models={"m": ModelSpec(name="m", clusters=["a"], path="-", context_length=4096)},
    )
    app = create_gateway(settings, reg)
    async with AsyncTestClient(app=app) as client:
        live = app.state.services.live
        for _ in range(3):  # 4000 tokens / 20 per s = 200 s > 0.5 s: its own size explains the timeout
            r = await _chat(client, keys["alice"], {**CHAT, "max_tokens": 4000})
            assert r.status_code == 504 and r.json()["error"]["code"] == "backend_timeout"
        inst = live.all()[0]
        assert live.breaker("a").state(time.time()) == "closed" and inst.breaker.state(time.time()) == "closed"
        for _ in range(2):  # 4 tokens should never take 0.5 s: the server is at fault
            assert (await _chat(client, keys["alice"])).status_code == 504
        assert inst.breaker.state(time.time()) == "open"
        r = await _chat(client, keys["alice"])
        assert r.status_code == 503 and "m's server" in r.json()["error"]["message"]
