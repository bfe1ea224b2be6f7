"""OpenAI-shaped errors: every failure the caller sees is `{"error": {message, type, param, code}}`."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

# OpenAI's error types by status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    """An error the gateway answers with on purpose. Raised anywhere on the request path."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(content=self.body(), status_code=self.status, headers=self.headers)


def _validation_param(detail: Any) -> tuple[str | None, str]:
    """Turn Litestar/pydantic validation details into (param, message)."""
    if isinstance(detail, list) and detail:
        first = detail[0] if isinstance(detail[0], dict) else {}
        key = first.get("key") or None
        msg = first.get("message") or "Invalid request"
        return key, f"Invalid value for '{key}': {msg}" if key else msg
    return None, "Invalid request body"


def handle_exception(request: Request, exc: Exception) -> Response:
    """Litestar exception handler: map everything to an OpenAI-shaped error, never a stack trace.

    Requests rejected before the inference flow (bad credential, invalid body) still get a usage record,
    through the app's ``on_rejected`` hook."""
    error = to_api_error(request, exc)
    hook = getattr(request.app.state, "on_rejected", None)
    if hook is not None:
        hook(request, error)
    return error.response()


def to_api_error(request: Request, exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationException):
        text = str(exc.detail or "")
        if "JSON" in text or "decode" in text.lower() or "malformed" in text.lower():
            return APIError(400, f"We could not parse the JSON body of your request: {text}")
        param, message = _validation_param(exc.extra)
        return APIError(400, message, param=param)
    if isinstance(exc, msgspec.DecodeError):
        return APIError(400, f"We could not parse the JSON body of your request: {exc}")
    if isinstance(exc, NotFoundException):
        return APIError(404, f"Unknown path {request.method} {request.url.path}", code="unknown_url")
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status >= 500:
            status = HTTP_500_INTERNAL_SERVER_ERROR
        return APIError(status, exc.detail or "Request failed")
    request.logger.exception("unhandled error on %s", request.url.path)
    return APIError(500, "The gateway hit an internal error; it has been logged.", type="server_error")
