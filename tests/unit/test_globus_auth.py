"""Globus mode, against FakeGlobusServer on 127.0.0.1 through the real globus-sdk clients: who gets in, what
they may use, how checks are cached and shared, and what callers see when Globus Auth is down or slow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from litestar.testing import AsyncTestClient

from analytics.store import UsageStore
from api.metrics import render
from blocks.globus import GlobusAuthBlock
from blocks.registry import ClusterSpec, ModelSpec, Registry
from core.clock import ManualClock
from core.errors import APIError
from core.settings import FlowTracking, Settings
from first.gateway import create_gateway
from serving.globus_auth import GlobusAuthenticator
from tests.fakes.globus_server import FakeGlobusServer

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def fake() -> Iterator[FakeGlobusServer]:
    with FakeGlobusServer() as f:
        yield f


def block(fake: FakeGlobusServer, **kw) -> GlobusAuthBlock:
    base = {
        "client_id": fake.client_id, "client_secret": fake.client_secret, "auth_base_url": fake.url,
        "groups_base_url": fake.url, "timeout_s": 1.0,
    }  # fmt: skip
    return GlobusAuthBlock(**{**base, **kw})


async def check(auth: GlobusAuthenticator, token: str) -> APIError:
    with pytest.raises(APIError) as e:
        await auth.authenticate(token)
    return e.value


# ---- who gets in ----


async def test_an_active_token_becomes_a_principal(fake):
    auth = GlobusAuthenticator(block(fake, admin_groups=[fake.group_id("ops")]))
    token = fake.user_token("alice@uchicago.edu", groups=["staff", "ops"], linked=["alice@anl.gov"])
    p = await auth.authenticate(token)
    assert p.user == "alice@uchicago.edu" and p.auth == "globus"
    assert p.groups == tuple(sorted([fake.group_id("staff"), fake.group_id("ops")]))
    assert p.identities == ("alice@uchicago.edu", "alice@anl.gov")
    assert p.identity_providers == ("uchicago.edu",)  # only the identity signed in this session
    assert p.is_admin and p.expires_at == fake.tokens[token].exp
    assert fake.calls == {"introspect": 1, "dependent_token": 1, "my_groups": 1}


async def test_inactive_expired_and_foreign_tokens_are_401(fake):
    auth = GlobusAuthenticator(block(fake))
    cases = {
        "invalid_api_key": fake.user_token(active=False),
        "token_expired": fake.user_token(expires_in=-5),  # Auth still says active: we check exp ourselves
        "wrong_audience": fake.user_token(aud=["another-service"]),
    }
    cases["wrong_audience_scope"] = fake.user_token(scope="urn:globus:auth:scope:transfer.api.globus.org:all")
    for code, token in cases.items():
        err = await check(auth, token)
        assert err.status == 401 and err.type == "authentication_error", code
        assert err.code == code.removesuffix("_scope"), (code, err.message)
    assert (await check(auth, "not-a-token")).code == "invalid_api_key"
    assert (await check(auth, "")).code == "missing_api_key"
    assert fake.calls["dependent_token"] == 0  # rejected on introspection alone


async def test_identity_provider_allowlist_uses_the_session_sign_in(fake):
    auth = GlobusAuthenticator(block(fake, allowed_domains=["anl.gov"]))
    err = await check(auth, fake.user_token("alice@uchicago.edu"))
    assert err.status == 403 and err.code == "identity_provider_not_allowed" and "anl.gov" in err.message
    # A linked anl.gov identity that was not used to sign in this session does not count...
    err = await check(auth, fake.user_token("alice@uchicago.edu", linked=["alice@anl.gov"]))
    assert err.status == 403
    # ...one that was, does.
    signed_in_at_anl = fake.user_token("alice@uchicago.edu", linked=["alice@anl.gov"], session=["alice@anl.gov"])
    p = await auth.authenticate(signed_in_at_anl)
    assert p.identity_providers == ("anl.gov",)


async def test_every_configured_policy_must_pass(fake):
    auth = GlobusAuthenticator(block(fake, policies=["high-assurance", "mfa"]))
    err = await check(auth, fake.user_token(policies={"high-assurance": True, "mfa": False}))
    assert err.status == 401 and err.code == "authentication_policy_failed" and "mfa" in err.message
    assert "high-assurance" not in err.message
    p = await auth.authenticate(fake.user_token(policies={"high-assurance": True, "mfa": True}))
    assert p.user == "alice@uchicago.edu"


async def test_required_groups(fake):
    auth = GlobusAuthenticator(block(fake, required_groups=[fake.group_id("first-users")]))
    err = await check(auth, fake.user_token(groups=["other"]))
    assert err.status == 403 and err.code == "group_required" and err.type == "permission_error"
    assert (await auth.authenticate(fake.user_token(groups=["first-users"]))).groups == (fake.group_id("first-users"),)


async def test_service_accounts_need_the_allowlist(fake):
    token, client_id = fake.service_token(groups=["pipelines"])
    err = await check(GlobusAuthenticator(block(fake, allowed_domains=["anl.gov"])), token)
    assert err.status == 403 and err.code == "service_account" and client_id in err.message
    auth = GlobusAuthenticator(block(fake, allowed_domains=["anl.gov"], service_accounts=[client_id]))
    p = await auth.authenticate(token)  # no sign-in session, no domain: the allowlist is what admits it
    assert p.user == f"{client_id}@clients.auth.globus.org" and p.groups == (fake.group_id("pipelines"),)


async def test_wrong_gateway_credentials_are_503_for_the_caller(fake):
    auth = GlobusAuthenticator(block(fake, client_secret="wrong"))
    err = await check(auth, fake.user_token())
    assert err.status == 503 and err.code == "auth_unavailable" and "operators" in err.message


# ---- Globus down or slow ----


async def test_auth_returning_500_fails_closed_with_503(fake):
    clock = ManualClock()
    auth = GlobusAuthenticator(block(fake), clock=clock)
    fake.mode = "error500"
    token = fake.user_token()
    err = await check(auth, token)
    assert err.status == 503 and err.type == "service_unavailable" and err.headers["Retry-After"] == "5"
    assert "Globus Auth is unavailable" in err.message
    fake.mode = "ok"
    assert (await check(auth, token)).status == 503  # an outage answer is shared, briefly
    clock.advance(1.1)
    assert (await auth.authenticate(token)).user == "alice@uchicago.edu"


async def test_auth_hanging_past_the_timeout_is_503_after_the_bound(fake):
    auth = GlobusAuthenticator(block(fake, timeout_s=0.3))
    fake.mode, fake.hang_s = "hang", 3.0
    t = time.monotonic()
    err = await check(auth, fake.user_token())
    waited = time.monotonic() - t
    assert err.status == 503 and "no answer within 0.3 s" in err.message
    assert waited < fake.hang_s  # the caller did not wait for Globus to answer


async def test_a_token_checked_before_an_outage_keeps_working(fake):
    clock = ManualClock()
    auth = GlobusAuthenticator(block(fake, cache_ttl_s=0.2), clock=clock)
    token = fake.user_token()
    assert (await auth.authenticate(token)).user == "alice@uchicago.edu"
    fake.mode = "error500"
    clock.advance(0.3)  # the entry is due for a re-check, which fails
    assert (await auth.authenticate(token)).user == "alice@uchicago.edu"
    assert fake.calls["introspect"] == 2
    assert (await check(auth, fake.user_token("bob@uchicago.edu"))).status == 503  # a new token can't get in


# ---- caching ----


async def test_one_introspection_for_100_concurrent_requests_with_one_new_token(fake):
    auth = GlobusAuthenticator(block(fake, timeout_s=10))  # 3 slow calls must fit, even on a loaded machine
    fake.mode, fake.hang_s = "hang", 0.2  # a slow Globus: all 100 arrive while the first check is out
    token = fake.user_token()
    principals = await asyncio.gather(*(auth.authenticate(token) for _ in range(100)))
    assert {p.user for p in principals} == {"alice@uchicago.edu"}
    assert fake.calls["introspect"] == 1 and fake.calls["my_groups"] == 1
    bad = await asyncio.gather(*(auth.authenticate("forged") for _ in range(100)), return_exceptions=True)
    assert all(isinstance(e, APIError) and e.status == 401 for e in bad)
    assert fake.calls["introspect"] == 2  # rejections are shared and cached too


async def test_a_cached_rejection_is_raised_afresh_each_time(fake):
    """Re-raising one cached exception object grows its traceback on every request (a leak a flood of bad tokens
    would feed): each caller gets a new error with the same answer."""
    auth = GlobusAuthenticator(block(fake))
    errors = [await check(auth, "forged") for _ in range(50)]
    assert fake.calls["introspect"] == 1  # answered from the cache after the first
    assert len({id(e) for e in errors}) == 50 and {(e.status, e.code) for e in errors} == {(401, "invalid_api_key")}
    depth = [len(__import__("traceback").extract_tb(e.__traceback__)) for e in errors]
    assert set(depth[1:]) == {depth[1]}, depth  # cached answers: the same short traceback every time


async def test_cache_entry_ends_at_token_expiry(fake):
    clock = ManualClock()
    auth = GlobusAuthenticator(block(fake, cache_ttl_s=300), clock=clock)
    token = fake.user_token(expires_in=2)
    await auth.authenticate(token)
    await auth.authenticate(token)
    assert fake.calls["introspect"] == 1  # cached
    clock.advance(fake.tokens[token].exp - clock.time() + 0.1)
    err = await check(auth, token)  # not served from cache past its expiry: checked again, and refused
    assert err.code == "token_expired" and fake.calls["introspect"] == 2


async def test_the_cache_holds_hashes_not_tokens(fake):
    auth = GlobusAuthenticator(block(fake))
    token = fake.user_token()
    await auth.authenticate(token)
    assert all(isinstance(k, bytes) and len(k) == 32 for k in auth._cache)
    assert token not in repr(auth._cache) and token.encode() not in b"".join(auth._cache)


async def test_changing_the_block_drops_cached_answers(fake):
    auth = GlobusAuthenticator(block(fake))
    token = fake.user_token("alice@uchicago.edu")
    await auth.authenticate(token)
    auth.configure(block(fake, allowed_domains=["anl.gov"]))
    assert (await check(auth, token)).status == 403


# ---- through the gateway ----


@pytest.fixture
def registry() -> Registry:
    down = ClusterSpec(name="down", transport="http", base_url="http://127.0.0.1:9")
    staff = [FakeGlobusServer.group_id("staff")]
    return Registry(clusters={"down": down}, models={
        "open": ModelSpec(name="open", clusters=["down"], path="-"),
        "staff": ModelSpec(name="staff", clusters=["down"], path="-", allowed_groups=staff),
        "anl": ModelSpec(name="anl", clusters=["down"], path="-", allowed_domains=["anl.gov"]),
        "secret": ModelSpec(name="secret", clusters=["down"], path="-", allowed_groups=["nobody"], hidden=True),
    })  # fmt: skip


@pytest.fixture
async def gateway(tmp_path, fake, registry):
    s = Settings(home=tmp_path / "home", auth_mode="globus", flow_tracking=FlowTracking.off, request_timeout_s=2)
    app = create_gateway(s, registry, globus=block(fake, timeout_s=10))
    async with AsyncTestClient(app=app) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_gateway_lists_only_models_the_caller_may_use(gateway, fake):
    alice = fake.user_token("alice@uchicago.edu", groups=["staff"])
    bob = fake.user_token("bob@anl.gov")
    ids = lambda r: sorted(m["id"] for m in r.json()["data"])  # noqa: E731
    assert ids(await gateway.get("/v1/models", headers=bearer(alice))) == ["open", "staff"]
    assert ids(await gateway.get("/v1/models", headers=bearer(bob))) == ["anl", "open"]


async def test_gateway_403_for_a_visible_model_404_for_hidden_or_unknown(gateway, fake):
    bob = bearer(fake.user_token("bob@anl.gov"))
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "model": "staff"}, headers=bob)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_access_denied"
    unknown = await gateway.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=bob)
    hidden = await gateway.post("/v1/chat/completions", json={**CHAT, "model": "secret"}, headers=bob)
    assert unknown.status_code == hidden.status_code == 404
    assert hidden.json()["error"]["message"].replace("secret", "nope") == unknown.json()["error"]["message"]
    allowed = await gateway.post("/v1/chat/completions", json={**CHAT, "model": "anl"}, headers=bob)
    assert allowed.status_code == 503 and allowed.json()["error"]["code"] == "cluster_unreachable"


async def test_gateway_errors_are_openai_shaped(gateway, fake):
    r = await gateway.get("/v1/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "first token" in r.json()["error"]["message"]
    r = await gateway.get("/v1/models", headers=bearer(fake.user_token(expires_in=-1)))
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
    fake.mode = "error500"
    r = await gateway.get("/v1/models", headers=bearer(fake.user_token()))
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["type"] == "service_unavailable"


async def test_gateway_single_flight_under_100_concurrent_requests(gateway, fake):
    fake.mode, fake.hang_s = "hang", 0.2
    h = bearer(fake.user_token(groups=["staff"]))
    responses = await asyncio.gather(*(gateway.get("/v1/models", headers=h) for _ in range(100)))
    assert {r.status_code for r in responses} == {200}
    assert fake.calls["introspect"] == 1
    assert (await gateway.get("/health")).json()["auth_checks"] == 1


async def test_a_flood_of_bogus_tokens_from_one_address_is_throttled_before_globus(tmp_path, fake, registry):
    """Past FIRST_AUTH_FAILURES_PER_MIN failures, an address gets 429 for tokens the gateway does not know, without
    asking Globus and without a usage row; a real caller's token checked earlier still works from there."""
    s = Settings(home=tmp_path / "home", auth_mode="globus", flow_tracking=FlowTracking.off, auth_failures_per_min=5)
    app = create_gateway(s, registry, globus=block(fake, timeout_s=10))
    alice = fake.user_token("alice@uchicago.edu")
    async with AsyncTestClient(app=app) as gateway:
        assert (await gateway.get("/v1/models", headers=bearer(alice))).status_code == 200
        statuses = [
            (await gateway.post("/v1/chat/completions", json={**CHAT, "model": "open"}, headers=bearer(f"bogus-{i}")))
            for i in range(40)
        ]
        assert [r.status_code for r in statuses[:5]] == [401] * 5
        assert {r.status_code for r in statuses[5:]} == {429}
        refused = statuses[-1].json()["error"]
        assert refused["code"] == "auth_throttled" and int(statuses[-1].headers["retry-after"]) >= 1
        assert fake.calls["introspect"] == 1 + 5  # alice's, and the five that failed: none for the throttled
        assert (await gateway.get("/v1/models", headers=bearer(alice))).status_code == 200  # known: still served
        text = render(app.state.metrics).decode()
        assert "first_auth_failures_total 5.0" in text and "first_auth_throttled_total 35.0" in text
    store = UsageStore(s.usage_db)
    store.ingest(s.spool_dir)
    statuses = store.query("SELECT status FROM usage WHERE endpoint = 'chat.completions'").to_series().to_list()
    assert statuses == []  # nobody was identified: the 401s and the 429s are in the metrics above, not rows
