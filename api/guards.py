"""Who may call: the guard every /v1 controller declares once, and the dependencies it feeds."""

from __future__ import annotations

import math

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers.base import BaseRouteHandler

from core.errors import APIError
from core.principal import Principal
from serving.auth import Authenticator, bearer_token
from serving.limits import FailedAuthThrottle
from serving.request import Services

# The 429 of an address over its failed-authentication budget. It gets no usage row: a flood of them must not
# fill the spool (they are counted in the metrics, first_auth_throttled).
AUTH_THROTTLED = "auth_throttled"


async def authenticate(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: the request carries a credential that resolves to a principal. An address that failed too often
    lately is refused (429, no usage row) unless its credential is already known to be good."""
    auth: Authenticator = connection.app.state.authenticator
    throttle: FailedAuthThrottle = connection.app.state.auth_throttle
    # The anthropic client sends its key as x-api-key; every other client as a bearer token.
    token = bearer_token(connection.headers.get("authorization")) or connection.headers.get("x-api-key") or None
    address = connection.client.host if connection.client else "-"
    wait = throttle.retry_after(address)
    if wait:
        principal = auth.known(token)
        if principal is None:
            throttle.refused += 1
            seconds = max(1, math.ceil(wait))
            raise APIError(
                429, f"Too many failed authentications from your address; retry in {seconds} s with a valid "
                "credential.", code=AUTH_THROTTLED, headers={"Retry-After": str(seconds)},
            )  # fmt: skip
        connection.state.principal = principal
        return
    try:
        connection.state.principal = await auth.authenticate(token)
    except APIError as exc:
        if exc.status == 401:
            throttle.failed(address)
        raise


def _services(state: State) -> Services:
    return state.services


def principal_of(request: Request) -> Principal:
    """Who is calling, as the guard found."""
    return request.state.principal


# What a guarded controller's handlers may ask for by name. (The principal is read from the request, not
# injected: a second dependency costs a signature parse per request, and two independent ones an anyio task group,
# ~100 µs in all. Not `use_cache`: the cache would live in this module-level Provide, shared by every app.)
DEPENDENCIES = {"services": Provide(_services, sync_to_thread=False)}
