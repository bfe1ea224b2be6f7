"""Session affinity: a caller's session key (X-Session-Id, or the `user` field when FIRST_SESSION_FROM_USER is on)
sends its requests to the same instance while it is hot and has room, so vLLM's prefix cache serves the session;
the choice is rendezvous hashing, the same on every gateway replica. Routing alone, then through a real gateway
process over two stand-in clusters."""

from __future__ import annotations

import collections
from pathlib import Path

import httpx

from blocks.registry import ClusterSpec, ModelSpec
from core.settings import Settings
from serving.auth import KeyStore
from serving.live_state import Instance
from serving.routing import rank
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess, http_registry_yaml

MODEL = ModelSpec(name="m", clusters=["a", "b", "c"], path="-")


def _hot(name: str, inflight: int, capacity: int = 8) -> Instance:
    inst = Instance(ClusterSpec(name=name, max_concurrency=capacity), MODEL)
    inst.state, inst.inflight, inst.last_used = "hot", inflight, 0.0
    return inst


def test_a_session_keeps_its_instance_while_it_has_room_and_sessions_spread() -> None:
    pool = [_hot("a", 0), _hot("b", 3), _hot("c", 5)]
    own = rank(pool, {}, {}, 0.0, session="agent-42")[0]
    for loads in ((7, 0, 0), (0, 7, 0), (0, 0, 7)):  # whatever the others' load, while its own has room
        for inst, n in zip(pool, loads, strict=True):
            inst.inflight = n if inst is not own else min(n, 7)
        assert rank(pool, {}, {}, 0.0, session="agent-42")[0] is own
    own.inflight = 8  # full: the session goes to the least loaded of the rest, as any request does
    others = [i for i in pool if i is not own]
    for i in others:
        i.inflight = 0
    assert rank(pool, {}, {}, 0.0, session="agent-42")[0] in others
    for i in pool:
        i.inflight = 0
    firsts = collections.Counter(rank(pool, {}, {}, 0.0, session=f"s{n}")[0].cluster.name for n in range(300))
    assert set(firsts) == {"a", "b", "c"} and min(firsts.values()) > 50  # sessions spread over the instances
    assert rank(pool, {}, {}, 0.0)[0].cluster.name == "a"  # no session: least loaded, then least recently used


def test_a_gateway_sends_a_session_to_one_cluster_and_spreads_the_rest(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with OpenAISimulatorDouble(latency_s=0.0, name="a") as a, OpenAISimulatorDouble(latency_s=0.0, name="b") as b:
        registry = home / "registry.yaml"
        registry.write_text(http_registry_yaml({"a": a.base_url, "b": b.base_url}, {"m": ["a", "b"]}))
        key = KeyStore(Settings(home=home).keys_db).create("alice")[0]
        gw = GatewayProcess(home, registry).start()
        try:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

            def clusters(headers: dict[str, str]) -> list[str]:
                with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}", **headers}) as c:
                    return [c.post("/v1/chat/completions", json=body).headers["x-first-cluster"] for _ in range(12)]

            assert len(set(clusters({"X-Session-Id": "agent-7"}))) == 1
            assert set(clusters({})) == {"a", "b"}  # no session: requests take turns over equal instances
        finally:
            gw.stop()
