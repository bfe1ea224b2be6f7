"""Every response carries ``X-Request-Id``: the handlers', the guard's and validator's rejections, unknown
paths and the usage-spool 503 alike. The id is made once per request and kept in the ASGI scope, so the
usage row of a rejected request carries the same id as the response."""

from __future__ import annotations

from typing import Any

from core.ids import new_request_id

_KEY = "first_request_id"
_HEADER = b"x-request-id"


def request_id(scope: Any) -> str:
    """This request's id, made on first use."""
    state = scope.setdefault("state", {})
    rid = state.get(_KEY)
    if rid is None:
        rid = state[_KEY] = new_request_id()
    return rid


def set_request_id(scope: Any, rid: str) -> None:
    """Give the request a chosen id (a batch's line: its batch and line, so a line sent twice has one usage row)."""
    scope.setdefault("state", {})[_KEY] = rid


async def stamp_request_id(message: Any, scope: Any) -> None:
    """Litestar ``before_send`` hook: add the header to the start of every HTTP response."""
    if message["type"] != "http.response.start":
        return
    headers = message.setdefault("headers", [])
    if not any(name.lower() == _HEADER for name, _ in headers):
        headers.append((_HEADER, request_id(scope).encode()))
