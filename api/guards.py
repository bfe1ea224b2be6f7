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


def _principal(request: Request) -> Principal:
    return request.state.principal


# What a guarded controller's handlers may ask for by name.
DEPENDENCIES = {
    "services": Provide(_services, sync_to_thread=False),
    "principal": Provide(_principal, sync_to_thread=False),
}
