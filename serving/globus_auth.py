"""Globus mode: a caller's bearer token is a Globus access token, checked with Globus Auth and cached.

A new token costs three calls through the real ``globus-sdk`` (run on a small thread pool, never on the
serving loop): introspection with ``include=session_info,identity_set_detail`` (and the configured
authentication policies), a dependent token for Groups, and ``my_groups``. The result is a ``Principal``,
cached under the SHA-256 of the token (the token itself is never stored) until the smaller of
``cache_ttl_s`` and the token's own expiry. So the hot path is a hash and a dict lookup.

- Single-flight: concurrent requests carrying one unknown token share one check.
- Rejections are cached for ``negative_cache_ttl_s`` (a client retrying a bad token costs Globus nothing).
- Globus down or slow: fail closed with 503 after ``timeout_s``, but a token already checked keeps working
  until the token itself expires, even when its cache entry is due for a re-check.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import globus_sdk
from globus_sdk.transport import RequestsTransport, RetryConfig

from blocks.globus import SERVICE_ACCOUNT_DOMAIN, GlobusAuthBlock
from core.clock import SYSTEM_CLOCK, Clock
from core.errors import APIError
from serving.auth import Principal

log = logging.getLogger("first.auth.globus")

GROUPS_SCOPE = str(globus_sdk.GroupsClient.scopes.view_my_groups_and_memberships)
GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
OUTAGE_RETRY_S = 5  # Retry-After on a 503 while Globus is unreachable
OUTAGE_CACHE_S = 1.0  # an outage answer is shared for this long, so a retry storm doesn't pile up threads
STALE_GRACE_S = 30.0  # while Globus is down, a known-good token is re-checked at most this often
MAX_ENTRIES = 100_000


class GlobusUnavailable(Exception):
    """Globus Auth or Groups could not give an answer (down, 5xx, slow, or refusing our client)."""


@dataclass
class _Entry:
    fresh_until: float  # monotonic: re-check with Globus after this
    principal: Principal | None = None
    error: APIError | None = None


def _token_key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _missing() -> APIError:
    return APIError(
        401,
        "Missing credential. Send 'Authorization: Bearer <Globus access token>' (get one with `first token`).",
        code="missing_api_key",
    )


class GlobusAuthenticator:
    """Resolves Globus access tokens to principals (see the module docstring)."""

    def __init__(self, config: GlobusAuthBlock, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="globus-auth")
        self._cache: dict[bytes, _Entry] = {}
        self._inflight: dict[bytes, asyncio.Future[Principal]] = {}
        self.checks = 0  # tokens checked with Globus (cache misses), shown in /health
        self.configure(config)

    def configure(self, config: GlobusAuthBlock) -> None:
        """Adopt new settings (an operator edited the block). Cached answers made under other rules are dropped."""
        old = getattr(self, "config", None)
        self.config = config
        transport = RequestsTransport(http_timeout=config.timeout_s)
        retry = RetryConfig(max_retries=0)  # one bounded try: a retry loop would blow the timeout
        self._auth = globus_sdk.ConfidentialAppAuthClient(
            config.client_id, config.client_secret.get_secret_value(), base_url=config.auth_base_url,
            transport=transport, retry_config=retry,
        )  # fmt: skip
        self._transport, self._retry = transport, retry
        if old is not None and old.model_dump() != config.model_dump():
            self._cache.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the request path ----

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise _missing()
        key = _token_key(token)
        entry = self._cache.get(key)
        if entry is not None and entry.fresh_until > self.clock.monotonic():
            if entry.error is not None:
                raise entry.error.fresh()
            return entry.principal  # type: ignore[return-value]
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._check(token, key, entry))
            self._inflight[key] = future
            future.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    def known(self, token: str | None) -> Principal | None:
        """The principal of a token checked earlier and still cached as valid (no call to Globus), else None."""
        entry = self._cache.get(_token_key(token)) if token else None
        if entry is None or entry.principal is None or entry.fresh_until <= self.clock.monotonic():
            return None
        return entry.principal

    async def _check(self, token: str, key: bytes, stale: _Entry | None) -> Principal:
        cfg = self.config
        loop = asyncio.get_running_loop()
        try:
            self.checks += 1
            principal = await asyncio.wait_for(loop.run_in_executor(self._pool, self._resolve, token), cfg.timeout_s)
        except APIError as exc:  # Globus answered: the token is not acceptable
            self._store(key, _Entry(self.clock.monotonic() + cfg.negative_cache_ttl_s, error=exc))
            raise
        except (GlobusUnavailable, TimeoutError) as exc:
            why = f"no answer within {cfg.timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            if (
                stale is not None
                and stale.principal is not None
                and (stale.principal.expires_at or 0) > self.clock.time()
            ):
                log.warning("Globus Auth unavailable (%s); serving a token checked earlier", why)
                stale.fresh_until = self.clock.monotonic() + min(
                    STALE_GRACE_S, stale.principal.expires_at - self.clock.time()
                )
                return stale.principal
            log.error("Globus Auth unavailable (%s); refusing a token it has not checked", why)
            error = APIError(
                503,
                f"Globus Auth is unavailable ({why}), so your token could not be checked. Retry shortly.",
                code="auth_unavailable",
                headers={"Retry-After": str(OUTAGE_RETRY_S)},
            )
            self._store(key, _Entry(self.clock.monotonic() + OUTAGE_CACHE_S, error=error))
            raise error from None
        ttl = min(cfg.cache_ttl_s, (principal.expires_at or 0) - self.clock.time())
        self._store(key, _Entry(self.clock.monotonic() + ttl, principal=principal))
        return principal

    def _store(self, key: bytes, entry: _Entry) -> None:
        cache = self._cache
        if len(cache) >= MAX_ENTRIES and key not in cache:
            now = self.clock.monotonic()
            for k in [k for k, e in cache.items() if e.fresh_until <= now]:
                del cache[k]
            while len(cache) >= MAX_ENTRIES:  # still full of live entries: drop the oldest
                del cache[next(iter(cache))]
        cache[key] = entry

    # ---- one check with Globus (runs on the pool) ----

    def _resolve(self, token: str) -> Principal:
        cfg = self.config
        query = {"authentication_policies": ",".join(cfg.policies)} if cfg.policies else None
        info = self._call(
            "introspection",
            lambda: (
                self._auth.oauth2_token_introspect(
                    token, include="session_info,identity_set_detail", query_params=query
                ).data
            ),
        )
        principal = self._judge(info)
        groups = self._groups(token)
        if cfg.required_groups and not set(cfg.required_groups) & set(groups):
            raise APIError(
                403,
                f"{principal.user} is not a member of any group allowed to use this gateway. "
                "Ask the gateway's operators to add you.",
                code="group_required",
            )
        return Principal(
            user=principal.user, groups=groups, identities=principal.identities,
            identity_providers=principal.identity_providers, expires_at=principal.expires_at,
            is_admin=bool(set(cfg.admin_groups) & set(groups)), auth="globus",
        )  # fmt: skip

    def _judge(self, info: dict[str, Any]) -> Principal:
        """Everything introspection alone decides: active, unexpired, for us, and from an allowed sign-in."""
        cfg = self.config
        if not info.get("active"):
            raise APIError(
                401, "Your Globus token is not active (expired or revoked). Get a new one with `first token`.",
                code="invalid_api_key",
            )  # fmt: skip
        exp = float(info.get("exp") or 0)
        if exp <= self.clock.time():
            raise APIError(
                401, "Your Globus token has expired. Get a new one with `first token`.", code="token_expired"
            )
        if cfg.client_id not in (info.get("aud") or []) or cfg.required_scope not in str(info.get("scope", "")).split():
            raise APIError(
                401,
                f"This Globus token was issued for another service. Log in for this gateway's scope "
                f"({cfg.required_scope}) with `first login`.",
                code="wrong_audience",
            )
        username = str(info.get("username") or "")
        details = info.get("identity_set_detail") or []
        identities = tuple(str(d.get("username")) for d in details if d.get("username")) or (username,)
        if username.endswith("@" + SERVICE_ACCOUNT_DOMAIN):
            client = str(info.get("sub") or username.partition("@")[0])
            if client not in cfg.service_accounts:
                raise APIError(
                    403, f"The service account {client} is not allowed to use this gateway.", code="service_account"
                )  # fmt: skip
            return Principal(user=username, identities=identities, expires_at=exp, auth="globus")
        by_id = {str(d.get("sub") or d.get("id")): str(d.get("username") or "") for d in details}
        session = ((info.get("session_info") or {}).get("authentications")) or {}
        domains = tuple(sorted({by_id[i].rpartition("@")[2].lower() for i in session if by_id.get(i)}))
        if cfg.allowed_domains and not {d.lower() for d in cfg.allowed_domains} & set(domains):
            signed = ", ".join(domains) or "no identity"
            raise APIError(
                403,
                f"This gateway accepts sign-ins from {', '.join(cfg.allowed_domains)}; this session used {signed}. "
                "Log in again with `first login`, choosing your institution's identity.",
                code="identity_provider_not_allowed",
            )
        evaluations = info.get("policy_evaluations") or {}
        failed = [p for p in cfg.policies if not (evaluations.get(p) or {}).get("evaluation")]
        if failed:
            raise APIError(
                401,
                f"Your Globus session does not meet this gateway's authentication policy ({', '.join(failed)}): "
                "it may require a recent sign-in or a specific identity. Log in again with `first login`.",
                code="authentication_policy_failed",
            )
        return Principal(
            user=username, identities=identities, identity_providers=domains, expires_at=exp, auth="globus"
        )

    def _groups(self, token: str) -> tuple[str, ...]:
        """Ids of the groups the caller is an active member of (a dependent Groups token, then my_groups)."""
        deps = self._call("dependent token", lambda: self._auth.oauth2_get_dependent_tokens(token, scope=GROUPS_SCOPE))
        groups_token = deps.by_resource_server.get(GROUPS_RESOURCE_SERVER, {}).get("access_token")
        if not groups_token:
            raise GlobusUnavailable("Globus Auth gave no Groups token")
        client = globus_sdk.GroupsClient(
            authorizer=globus_sdk.AccessTokenAuthorizer(groups_token), base_url=self.config.groups_base_url,
            transport=self._transport, retry_config=self._retry,
        )  # fmt: skip
        data = self._call("my_groups", lambda: client.get_my_groups().data)
        out = []
        for group in data or []:
            if any(m.get("status") == "active" for m in group.get("my_memberships") or []):
                out.append(str(group["id"]))
        return tuple(sorted(out))

    def _call(self, what: str, fn: Any) -> Any:
        """One Globus call: its own refusals of the token become 401; everything else means unavailable."""
        try:
            return fn()
        except globus_sdk.GlobusAPIError as exc:
            if what == "dependent token" and exc.http_status == 400:  # invalid_grant: the token can't be used
                raise APIError(
                    401, "Globus refused to act on your token's behalf; log in again with `first login`.",
                    code="invalid_api_key",
                ) from None  # fmt: skip
            if exc.http_status in (401, 403) and what != "my_groups":
                log.error("Globus Auth rejected the gateway's client credentials (%s): check the block", exc)
                raise GlobusUnavailable("the gateway's Globus client was refused (operators: check it)") from None
            raise GlobusUnavailable(f"{what}: HTTP {exc.http_status}") from None
        except globus_sdk.GlobusTimeoutError:  # the SDK's bound and ours race: both say the same thing
            raise GlobusUnavailable(f"{what}: no answer within {self.config.timeout_s:g} s") from None
        except globus_sdk.NetworkError as exc:
            raise GlobusUnavailable(f"{what}: {type(exc).__name__}") from None
