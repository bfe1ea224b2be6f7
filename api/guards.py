"""Who may call: the guard every /v1 controller declares once, and the dependencies it feeds."""

from __future__ import annotations

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers.base import BaseRouteHandler

from core.principal import Principal
from serving.auth import Authenticator, bearer_token
from serving.request import Services


async def authenticate(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: the request carries a credential that resolves to a principal."""
    auth: Authenticator = connection.app.state.authenticator
    connection.state.principal = await auth.authenticate(bearer_token(connection.headers.get("authorization")))


def _services(state: State) -> Services:
    return state.services


def principal_of(request: Request) -> Principal:
    """Who is calling, as the guard found."""
    return request.state.principal


# What a guarded controller's handlers may ask for by name. (The principal is read from the request, not
# injected: a second dependency costs a signature parse per request, and two independent ones an anyio task group,
# ~100 µs in all. Not `use_cache`: the cache would live in this module-level Provide, shared by every app.)
DEPENDENCIES = {"services": Provide(_services, sync_to_thread=False)}
