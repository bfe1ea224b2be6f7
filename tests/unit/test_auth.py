import sqlite3

import pytest

from core.clock import ManualClock
from core.errors import APIError
from serving.auth import KeyStore, LocalKeyAuthenticator, bearer_token


def test_keys_are_stored_only_as_hashes(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, info = store.create("alice", ["staff", "staff", "admin"])
    assert key.startswith("first-") and len(key) > 40
    assert info.groups == ["admin", "staff"]
    raw = (tmp_path / "keys.sqlite").read_bytes()
    assert key.encode() not in raw
    rows = sqlite3.connect(tmp_path / "keys.sqlite").execute("SELECT key_hash FROM api_keys").fetchall()
    assert len(rows) == 1 and len(rows[0][0]) == 64  # a SHA-256 hex digest, not the key


def test_authenticate_resolves_principal_and_rejects_bad_keys(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, info = store.create("alice", ["staff"], rpm=7)
    auth = LocalKeyAuthenticator(store)
    p = auth.check(key)
    assert (p.user, p.groups, p.key_id, p.rpm, p.is_admin) == ("alice", ("staff",), info.key_id, 7, False)
    with pytest.raises(APIError) as e:
        auth.check(key + "x")
    assert e.value.status == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(APIError) as e:
        auth.check(None)
    assert e.value.status == 401 and e.value.code == "missing_api_key"


def test_revoked_key_stops_working(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, info = store.create("bob")
    clock = ManualClock()
    auth = LocalKeyAuthenticator(store, clock=clock)
    assert auth.check(key).user == "bob"
    assert store.revoke(info.key_id) == 1
    assert auth.check(key).user == "bob"  # the authenticator re-reads the store at most once a second
    clock.advance(1.1)
    with pytest.raises(APIError):
        auth.check(key)
    assert [k.revoked for k in store.list()] == [True]
    assert store.revoke(info.key_id) == 0


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
