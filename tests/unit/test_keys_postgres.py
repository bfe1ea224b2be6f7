"""API keys in PostgreSQL (FIRST_KEYS_URL), which every gateway replica reads, against a real PostgreSQL server
(tests/services.py): keys made with the CLI's store are accepted by two replicas' authenticators, a revocation
reaches both within the refresh bound, and a key store that cannot be read keeps the last keys only for
FIRST_KEYS_MAX_STALE_S, then refuses every key (503): never open."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.clock import ManualClock
from core.errors import APIError
from serving.auth import KeyStore, LocalKeyAuthenticator
from tests.services import PostgresServer


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(Path(tmp_path_factory.mktemp("pg"))).start()
    try:
        yield server
    finally:
        server.stop()


async def test_two_replicas_see_keys_made_and_revoked_within_the_bound(postgres: PostgresServer) -> None:
    store = KeyStore(postgres.sync_url("first_keys"))
    assert store.shared
    alice, info = store.create("alice", ["physics"], rpm=30)
    replicas = [LocalKeyAuthenticator(KeyStore(postgres.sync_url("first_keys"))) for _ in range(2)]
    for r in replicas:
        await r.load()
        p = await r.authenticate(alice)
        assert (p.user, p.groups, p.rpm, p.key_id) == ("alice", ("physics",), 30, info.key_id)
    followers = [asyncio.create_task(r.follow(every_s=0.1, max_stale_s=60)) for r in replicas]
    try:
        bob, _ = store.create("bob")
        store.revoke(info.key_id)
        t0 = asyncio.get_running_loop().time()
        while not all([await _refuses(r, alice) for r in replicas]):  # refreshes every 0.1 s here (1 s by default)
            assert asyncio.get_running_loop().time() - t0 < 5, "a replica still accepts the revoked key"
            await asyncio.sleep(0.05)
        for r in replicas:
            assert (await r.authenticate(bob)).user == "bob"
    finally:
        for f in followers:
            f.cancel()
    assert [k.revoked for k in store.list() if k.user == "alice"] == [True]


async def _refuses(auth: LocalKeyAuthenticator, key: str) -> bool:
    try:
        await auth.authenticate(key)
    except APIError as exc:
        return exc.status == 401
    return False


async def test_an_unreadable_key_store_keeps_the_last_keys_for_a_bound_then_refuses_all(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path / "pg").start()
    clock = ManualClock()
    url = server.sync_url("first_keys")
    key, _ = KeyStore(url).create("carol")
    auth = LocalKeyAuthenticator(KeyStore(url), clock=clock)
    await auth.load()
    follower = asyncio.create_task(auth.follow(every_s=0.05, max_stale_s=300))
    try:
        server.stop()
        t0 = asyncio.get_running_loop().time()
        while auth.stale_since is None:  # a refresh fails
            assert asyncio.get_running_loop().time() - t0 < 10
            await asyncio.sleep(0.05)
        assert (await auth.authenticate(key)).user == "carol"  # within the bound: the keys last read still hold
        clock.advance(301)
        t0 = asyncio.get_running_loop().time()
        while not auth.unreadable:  # the next failed refresh, past the bound
            assert asyncio.get_running_loop().time() - t0 < 10
            await asyncio.sleep(0.05)
        with pytest.raises(APIError) as e:
            await auth.authenticate(key)
        assert e.value.status == 503 and e.value.code == "key_store_unreachable"
        server.start()  # readable again: keys are back within a refresh
        deadline = asyncio.get_running_loop().time() + 10
        while auth.unreadable and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert (await auth.authenticate(key)).user == "carol"
    finally:
        follower.cancel()
        with contextlib.suppress(Exception):
            server.stop()
