"""The fair queue at a full instance: weighted shares between groups, interactive before batch, a bounded wait
with a Retry-After from the queue, and its wiring into the gateway's pipeline."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from core.errors import APIError
from core.settings import Settings
from serving.auth import KeyStore
from serving.fair_queue import BATCH, INTERACTIVE, FairQueue, Slot, enter
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess


def _order_of_admission(queue: FairQueue, arrivals: list[tuple[str, float, int]]) -> list[str]:
    """Fill the queue's one slot, queue ``arrivals`` (flow, weight, priority) in that order, then release
    slots one by one: the flows in the order they got in."""

    async def run() -> list[str]:
        first = await enter(queue, "holder", 1.0, INTERACTIVE, 1.0, "m")
        order: list[str] = []

        async def one(flow: str, weight: float, priority: int) -> None:
            slot = await enter(queue, flow, weight, priority, 30.0, "m")
            order.append(flow)
            await asyncio.sleep(0)
            slot.release()

        tasks = []
        for flow, weight, priority in arrivals:
            tasks.append(asyncio.ensure_future(one(flow, weight, priority)))
            await asyncio.sleep(0)  # each enqueues in arrival order
        first.release()
        await asyncio.gather(*tasks)
        return order

    return asyncio.run(run())


def test_room_admits_at_once_and_a_full_instance_queues():
    async def run() -> None:
        q = FairQueue(lambda: 2)
        a = await enter(q, "g", 1.0, INTERACTIVE, 1.0, "m")
        b = await enter(q, "g", 1.0, INTERACTIVE, 1.0, "m")
        assert (a.waited_s, b.waited_s, q.admitted) == (0.0, 0.0, 2)
        waiting = asyncio.ensure_future(enter(q, "g", 1.0, INTERACTIVE, 5.0, "m"))
        await asyncio.sleep(0.01)
        assert not waiting.done() and q.queued == 1
        a.release()
        c = await asyncio.wait_for(waiting, 1.0)
        assert isinstance(c, Slot) and c.waited_s > 0 and q.admitted == 2 and q.queued == 0

    asyncio.run(run())


def test_a_flood_does_not_starve_another_group():
    """Group 'flood' queues 8 before 'quiet' queues 2: quiet's requests are served within the first four."""
    arrivals = [("flood", 1.0, INTERACTIVE)] * 8 + [("quiet", 1.0, INTERACTIVE)] * 2
    order = _order_of_admission(FairQueue(lambda: 1), arrivals)
    assert len(order) == 10
    assert [i for i, f in enumerate(order) if f == "quiet"] == [1, 3], order  # alternating, not after the flood


def test_weights_share_slots_in_proportion():
    arrivals = [("heavy", 2.0, INTERACTIVE)] * 8 + [("light", 1.0, INTERACTIVE)] * 8
    order = _order_of_admission(FairQueue(lambda: 1), arrivals)
    first_nine = order[:9]
    assert first_nine.count("heavy") == 6 and first_nine.count("light") == 3, order


def test_interactive_requests_go_before_batch_lines():
    arrivals = [("batch-owner", 1.0, BATCH)] * 5 + [("someone", 1.0, INTERACTIVE)] * 2
    order = _order_of_admission(FairQueue(lambda: 1), arrivals)
    assert order[:2] == ["someone", "someone"] and order[2:] == ["batch-owner"] * 5


def test_bounded_wait_is_503_with_a_retry_after_from_the_queue():
    async def run() -> APIError:
        q = FairQueue(lambda: 1)
        q.hold_s = 4.0  # slots are held about 4 s each
        held = await enter(q, "a", 1.0, INTERACTIVE, 1.0, "m")
        ahead = asyncio.ensure_future(enter(q, "b", 1.0, INTERACTIVE, 5.0, "m"))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as e:
            await enter(q, "c", 1.0, INTERACTIVE, 0.05, "Model 'm' on cluster 'x'")
        held.release()
        (await ahead).release()
        assert q.timeouts == 1 and q.queued == 0 and q.admitted == 0
        return e.value

    err = asyncio.run(run())
    assert err.status == 503 and err.code == "model_busy"
    assert err.headers["Retry-After"] == "8", "one ahead + itself, one slot, 4 s each"
    assert "Model 'm' on cluster 'x' is at capacity" in err.message and "1 waiting ahead" in err.message


def test_the_flooding_group_gets_429_and_the_others_503():
    async def run() -> tuple[APIError, APIError]:
        q = FairQueue(lambda: 1)
        held = await enter(q, "x", 1.0, INTERACTIVE, 1.0, "m")
        flood = [asyncio.ensure_future(enter(q, "flood", 1.0, INTERACTIVE, 0.05, "m")) for _ in range(4)]
        quiet = asyncio.ensure_future(enter(q, "quiet", 1.0, INTERACTIVE, 0.05, "m"))
        results = await asyncio.gather(*flood, quiet, return_exceptions=True)
        held.release()
        return results[0], results[-1]  # type: ignore[return-value]

    flood_err, quiet_err = asyncio.run(run())
    assert flood_err.status == 429 and flood_err.code == "fair_share_exceeded" and "'flood'" in flood_err.message
    assert quiet_err.status == 503 and quiet_err.code == "model_busy"


def test_capacity_follows_the_other_replicas_load():
    """Room freed elsewhere (another replica's requests ended) admits a waiter without a release here."""

    async def run() -> None:
        others = {"n": 1}
        q = FairQueue(lambda: 2 - others["n"])
        held = await enter(q, "a", 1.0, INTERACTIVE, 1.0, "m")
        waiting = asyncio.ensure_future(enter(q, "b", 1.0, INTERACTIVE, 5.0, "m"))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        others["n"] = 0
        (await asyncio.wait_for(waiting, 3.0)).release()  # re-checked within RECHECK_S
        held.release()

    asyncio.run(run())


def test_a_waiter_that_gave_up_does_not_take_a_slot():
    async def run() -> None:
        q = FairQueue(lambda: 1)
        held = await enter(q, "a", 1.0, INTERACTIVE, 1.0, "m")
        with pytest.raises(APIError):
            await enter(q, "b", 1.0, INTERACTIVE, 0.01, "m")
        held.release()
        assert q.admitted == 0
        again = await enter(q, "c", 1.0, INTERACTIVE, 1.0, "m")
        assert again.waited_s == 0.0 and q.admitted == 1

    asyncio.run(run())


def test_a_cancelled_waiter_gives_its_place_back():
    async def run() -> None:
        q = FairQueue(lambda: 1)
        held = await enter(q, "a", 1.0, INTERACTIVE, 1.0, "m")
        waiting = asyncio.ensure_future(enter(q, "b", 1.0, INTERACTIVE, 5.0, "m"))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert q.queued == 0
        held.release()
        assert q.admitted == 0

    asyncio.run(run())


def test_through_a_gateway_a_quiet_group_passes_a_flood(tmp_path: Path) -> None:
    """One instance of 2 slots; group 'flood' sends 12 at once, then group 'quiet' sends 2: the quiet ones are
    served alternately with the flood instead of after it, and the cluster never sees more than its 2."""
    home = tmp_path / "home"
    home.mkdir()
    with OpenAISimulatorDouble(latency_s=0.4, capacity=64) as sim:
        registry = home / "registry.yaml"
        registry.write_text(yaml.safe_dump({
            "clusters": [{"name": "a", "transport": "http", "base_url": sim.base_url, "max_concurrency": 2}],
            "models": [{"name": "m", "path": "-", "clusters": ["a"]}],
        }))  # fmt: skip
        keys = KeyStore(Settings(home=home).keys_db)
        flood_key, quiet_key = keys.create("f", ["flood"])[0], keys.create("q", ["quiet"])[0]
        gw = GatewayProcess(home, registry, env={"FIRST_QUEUE_WAIT_S": "30"}).start()
        try:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            done: list[tuple[str, int]] = []

            def call(who: str, key: str) -> None:
                r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60,
                               headers={"Authorization": f"Bearer {key}"})  # fmt: skip
                done.append((who, r.status_code))

            with ThreadPoolExecutor(14) as pool:
                futures = [pool.submit(call, "flood", flood_key) for _ in range(12)]
                deadline = time.monotonic() + 10
                while sim.active < 2:  # the flood holds both slots; the rest of it waits in the gateway
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                futures += [pool.submit(call, "quiet", quiet_key) for _ in range(2)]
                for f in futures:
                    f.result()
            assert [s for _, s in done] == [200] * 14
            order = [who for who, _ in done]
            assert max(i for i, who in enumerate(order) if who == "quiet") < 8, order
            assert sim.max_active_seen == 2
        finally:
            gw.stop()
