"""State shared by gateway replicas, against a real Redis (tests/services.py): a burst spread over two replicas
admits no more than the limit, settled with the real usage; the cap on a caller's requests in flight holds across
them and a dead replica's slots lapse; with Redis down each replica falls back to its own limits and says so, and
takes the shared ones up again when Redis answers; cold requests spread over two replicas start one warm-up; each
routes on the others' load and open breakers. (Time in Redis is Redis's own clock: the lapse test waits for it.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from blocks.registry import ClusterSpec, ModelSpec, RateLimits
from core.clock import ManualClock
from core.errors import APIError
from core.settings import Settings
from serving.limits import Limit, Reservation
from serving.live_state import LiveState
from serving.replicas.fleet import ReplicaSync
from serving.replicas.limits import Admission, SharedLimits
from serving.replicas.store import SharedStore
from serving.replicas.warmups import WarmLocks
from tests.services import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def replicas(redis_server: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[list[Admission]]:
    """Two replicas' admissions over one Redis, under a key prefix of this test's own. A generous timeout: these
    tests are about what is shared, not about a loaded machine's connection times (the degraded test is below)."""
    prefix = f"t{abs(hash(request.node.name))}"
    stores = [SharedStore(redis_server.url, prefix, timeout_s=10, replica_id=f"r{i}") for i in range(2)]
    yield [Admission(shared=SharedLimits(s)) for s in stores]
    for s in stores:
        await s.close()


pytestmark = pytest.mark.asyncio(loop_scope="session")
TPM = Limit("model:m:alice", RateLimits(tpm=1000), "model m")


async def _try(adm: Admission, limits: list[Limit], tokens: int) -> Reservation | APIError:
    try:
        return await adm.reserve("alice", limits, tokens)
    except APIError as exc:
        return exc


async def test_a_burst_over_two_replicas_admits_no_more_than_the_limit(replicas: list[Admission]) -> None:
    got = await asyncio.gather(*(_try(replicas[i % 2], [TPM], 100) for i in range(30)))
    admitted = [r for r in got if isinstance(r, Reservation)]
    refused = [r for r in got if isinstance(r, APIError)]
    assert len(admitted) == 10 and len(refused) == 20  # one replica alone would have admitted 10 more
    assert refused[0].status == 429 and "1000 tokens per minute for model m" in refused[0].message
    assert int(refused[0].headers["Retry-After"]) >= 1
    # settled with the real usage (50 of the 100 reserved): the other half comes back, on either replica
    for i, res in enumerate(admitted):
        await replicas[i % 2].settle(res, 50)
    for adm in replicas:
        await adm.settled()  # settlements run after the response, off its path
    again = await asyncio.gather(*(_try(replicas[i % 2], [TPM], 100) for i in range(8)))
    assert sum(isinstance(r, Reservation) for r in again) == 5


async def test_requests_per_minute_and_oversized_requests(replicas: list[Admission]) -> None:
    rpm = Limit("key:k1", RateLimits(rpm=3), "your API key")
    got = [await _try(replicas[i % 2], [rpm], 0) for i in range(4)]
    assert [isinstance(r, Reservation) for r in got] == [True, True, True, False]
    assert "3 requests per minute for your API key" in got[3].message  # type: ignore[union-attr]
    huge = await _try(replicas[0], [TPM], 5000)
    assert isinstance(huge, APIError) and huge.code == "tokens_exceed_limit"


async def test_a_callers_requests_in_flight_are_capped_across_replicas(replicas: list[Admission]) -> None:
    held = []
    for i in range(3):
        res = Reservation()
        await replicas[i % 2].enter("alice:m", 3, "model m for one caller", res)
        held.append((replicas[i % 2], res))
    with pytest.raises(APIError) as e:
        await replicas[1].enter("alice:m", 3, "model m for one caller", Reservation())
    assert e.value.code == "too_many_concurrent_requests"
    adm, res = held[0]
    await adm.settle(res, 0)  # one finishes on replica 0: replica 1 may take its slot
    await adm.settled()
    await replicas[1].enter("alice:m", 3, "model m for one caller", Reservation())


async def test_admission_takes_the_slot_and_the_limits_in_one_step_or_nothing(replicas: list[Admission]) -> None:
    limit = Limit("model:m:dave", RateLimits(rpm=2), "model m")
    first, second = Reservation(), Reservation()
    await replicas[0].admit("dave:m", 5, "m", "dave", [limit], 10, first)
    await replicas[1].admit("dave:m", 5, "m", "dave", [limit], 10, second)
    assert first.shared_slot and second.shared_slot and first.shared_slot != second.shared_slot
    with pytest.raises(APIError) as e:  # the limit refuses: no slot is taken either
        await replicas[0].admit("dave:m", 5, "m", "dave", [limit], 10, Reservation())
    assert e.value.code == "rate_limit_exceeded"
    store = replicas[0].shared.store  # type: ignore[union-attr]
    assert await store.redis.zcard(store.key("inflight", "dave:m")) == 2
    with pytest.raises(APIError) as e:  # and the cap refuses before the limits are looked at
        await replicas[1].admit("dave:m", 2, "m", "dave", [], 10, Reservation())
    assert e.value.code == "too_many_concurrent_requests"


async def test_a_dead_replicas_slots_lapse_and_a_live_ones_do_not(redis_server: RedisServer) -> None:
    live_store, dead_store = (SharedStore(redis_server.url, "lapse", timeout_s=10, replica_id=n)
                              for n in ("live", "dead"))  # fmt: skip
    live = SharedLimits(live_store, stale_s=2.0, renew_s=0.2)  # a renewal may be late on a busy host: 10 chances
    dead = SharedLimits(dead_store, stale_s=2.0, renew_s=0.2)
    renewing = asyncio.create_task(live.renew_forever())  # the dead replica renews nothing
    try:
        await live.enter("bob:m", 2, "m", Reservation())
        await dead.enter("bob:m", 2, "m", Reservation())
        with pytest.raises(APIError):
            await live.enter("bob:m", 2, "m", Reservation())
        await asyncio.sleep(3.0)  # Redis's clock: the dead replica's slot is stale now, the live one renewed
        await live.enter("bob:m", 2, "m", Reservation())
        with pytest.raises(APIError):
            await live.enter("bob:m", 2, "m", Reservation())
    finally:
        renewing.cancel()
        await live_store.close()
        await dead_store.close()


async def test_with_redis_down_a_replica_uses_its_own_limits_until_redis_answers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r").start()
    clock = ManualClock()
    store = SharedStore(server.url, "down", retry_s=2.0, clock=clock, replica_id="r0")
    adm = Admission(shared=SharedLimits(store))
    limit = Limit("model:m:carol", RateLimits(rpm=2), "model m")
    try:
        await adm.reserve("carol", [limit], 0)
        assert store.up
        server.stop()
        # degraded: this replica's own bucket (2 per minute), so one more is admitted, then 429; no 5xx
        await adm.reserve("carol", [limit], 0)
        await adm.reserve("carol", [limit], 0)
        with pytest.raises(APIError) as e:
            await adm.reserve("carol", [limit], 0)
        assert e.value.status == 429
        assert not store.up and store.errors == 1 and store.fallbacks >= 3  # tried once, then rested
        assert store.status()["up"] is False and store.status()["down_since"]
        server.start()
        clock.advance(2.1)  # past its rest: the next call tries Redis again, and the shared bucket is back
        await adm.reserve("carol", [limit], 0)
        assert store.up
        # the restarted Redis kept nothing (no persistence): a fresh shared bucket of 2
        await adm.reserve("carol", [limit], 0)
        with pytest.raises(APIError):
            await adm.reserve("carol", [limit], 0)
    finally:
        await store.close()
        server.stop()


# ---- one warm-up among replicas ----


class SharedClusterDouble:
    """Stands in for one cluster both replicas reach (a local cluster would start a real vLLM): cold until a
    warm-up made it hot."""

    manages_lifecycle = True

    def __init__(self) -> None:
        self.hot = False

    async def status(self, model: ModelSpec) -> dict[str, Any]:
        return {"state": "hot", "base_url": "http://x"} if self.hot else {"state": "cold"}


class OneClusterDouble:
    def __init__(self, cluster: SharedClusterDouble) -> None:
        self.cluster = cluster

    def get(self, cluster: ClusterSpec) -> SharedClusterDouble:
        return self.cluster


async def test_cold_requests_spread_over_two_replicas_start_one_warm_up(redis_server: RedisServer) -> None:
    cluster = SharedClusterDouble()
    warm_ups: list[str] = []

    def runner(replica: str) -> Any:
        async def warm_up_double(model: ModelSpec, c: ClusterSpec) -> dict[str, Any]:
            warm_ups.append(replica)
            await asyncio.sleep(1.0)
            cluster.hot = True
            return {"state": "hot", "base_url": "http://x"}

        return warm_up_double

    stores = [SharedStore(redis_server.url, "warm", timeout_s=10, replica_id=f"r{i}") for i in range(2)]
    settings = Settings(home=Path("/nonexistent"), warm_up_timeout_s=30)
    lives = [LiveState(OneClusterDouble(cluster), settings, warm_runner=runner(f"r{i}"), warm_locks=WarmLocks(s))  # type: ignore[arg-type]
             for i, s in enumerate(stores)]  # fmt: skip
    spec, model = ClusterSpec(name="c", transport="local"), ModelSpec(name="m", path="-")
    try:
        waited = await asyncio.gather(*(lives[i % 2].ensure_warm(lives[i % 2].instance(spec, model))
                                        for i in range(20)))  # fmt: skip
        assert len(warm_ups) == 1  # twenty cold requests, both replicas, one warm-up
        assert all(live.instance(spec, model).state == "hot" for live in lives)
        assert sum(live.instance(spec, model).warm_ups for live in lives) == 1 and all(waited)
        assert not await stores[0].redis.exists("warm:warm:c/m")  # released by its holder
    finally:
        for s in stores:
            await s.close()


async def test_replicas_route_on_each_others_load_and_open_breakers(redis_server: RedisServer) -> None:
    stores = [SharedStore(redis_server.url, "fleet", timeout_s=10, replica_id=f"r{i}") for i in range(2)]
    settings = Settings(home=Path("/nonexistent"))
    lives = [LiveState(None, settings) for _ in stores]  # type: ignore[arg-type]
    syncs = [ReplicaSync(s, live) for s, live in zip(stores, lives, strict=True)]
    a, b = ClusterSpec(name="a", transport="local"), ClusterSpec(name="b", transport="local")
    model = ModelSpec(name="m", clusters=["a", "b"], path="-")
    try:
        for live in lives:
            for c in (a, b):
                inst = live.instance(c, model)
                inst.state, inst.last_used = "hot", 0.0
        for _ in range(5):  # replica 0 is busy on cluster a
            lives[0].begin(lives[0].instance(a, model))
        for sync in (*syncs, *syncs):
            await sync.sync_once()
        assert lives[1].instance(a, model).others_inflight == 5
        assert lives[1].route([lives[1].instance(a, model), lives[1].instance(b, model)])[0].cluster.name == "b"
        # replica 0 finds cluster b failing: replica 1 passes it over too once they have synced
        for _ in range(settings.breaker_failures):
            lives[0].breaker("b").failure(time.time())
        for sync in (*syncs, *syncs):
            await sync.sync_once()
        assert lives[1].breaker("b").state(time.time()) == "open" and lives[1].breaker("b").opened == 0
        assert [i.cluster.name for i in lives[1].route([lives[1].instance(a, model), lives[1].instance(b, model)])] == [
            "a"
        ]
    finally:
        for s in stores:
            await s.close()
