"""The HTTP edge of errors: any exception becomes an OpenAI-shaped response (``core.errors.APIError``), never a
stack trace."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from core.errors import APIError

log = logging.getLogger("first.api")


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(msgspec.Struct):
    """Every error the gateway answers with, on every route but /v1/messages."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(msgspec.Struct):
    type: str
    message: str


class AnthropicErrorBody(msgspec.Struct):
    """An error on /v1/messages, in Anthropic's shape."""

    type: str
    error: AnthropicErrorDetail


# What each status means to a caller, as the OpenAPI document says it.
_STATUS_MEANS = {
    400: "The request is invalid (bad JSON, an unknown or out-of-range parameter); `param` names the field",
    401: "No credential, or one the gateway does not accept (send 'Authorization: Bearer <key>')",
    403: "Your credential is good but may not use this (the model's or cluster's access rules, an admin-only "
    "report, a spent project allocation)",
    404: "No such model (or one hidden from you), file or batch",
    409: "The batch cannot do that in its present state",
    413: "The body is larger than the gateway's limit, or past your file quota",
    429: "Over a rate limit (yours, the model's, or failed authentications from your address); Retry-After says "
    "when to try again",
    500: "An internal error; it is logged with the X-Request-Id of the response",
    502: "The cluster answered with something that is not a valid response",
    503: "No cluster can serve the model now (down, in maintenance, still starting, or full); Retry-After says "
    "when to try again where the gateway knows",
    504: "The model did not answer within the gateway's timeout",
}
# The statuses each kind of route can return, for its OpenAPI responses.
GUARDED = (400, 401, 429, 500)  # 400: a bad path or query parameter, on any route
INFERENCE = (400, 401, 403, 404, 413, 429, 500, 502, 503, 504)


def error_responses(*statuses: int, anthropic: bool = False) -> dict[int, ResponseSpec]:
    """OpenAPI ``responses`` for these error statuses, each with the error body it carries."""
    body = AnthropicErrorBody if anthropic else OpenAIErrorBody
    return {
        status: ResponseSpec(data_container=body, description=_STATUS_MEANS[status], generate_examples=False)
        for status in sorted(set(statuses))
    }


# Routes whose errors take Anthropic's shape ({"type": "error", "error": {"type", "message"}}), not OpenAI's.
ANTHROPIC_PATHS = frozenset({"/v1/messages"})


def error_response(error: APIError, headers: dict[str, str] | None = None, anthropic: bool = False) -> Response:
    """The response for an error: its status, OpenAI's body (or Anthropic's), and its headers (plus ``headers``)."""
    body = error.anthropic_body() if anthropic else error.body()
    return Response(content=body, status_code=error.status, headers={**error.headers, **(headers or {})})


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
    through the app's ``on_rejected`` hook. The handler itself never raises: a bug in it still answers 500 in
    OpenAI's shape (uvicorn would answer a plain-text one, with no usage row)."""
    try:
        error = to_api_error(request, exc)
        hook = getattr(request.app.state, "on_rejected", None)
        if hook is not None:
            try:
                hook(request, error)
            except Exception:  # no usage record, no answer but this one: as the pipeline does (``usage_spool``)
                log.exception("could not record the usage of a rejected request to %s", request.scope.get("path"))
                error = APIError(
                    503, "The gateway could not record this request's usage; try again.", code="usage_spool"
                )
        return error_response(error, anthropic=request.scope.get("path") in ANTHROPIC_PATHS)
    except Exception:
        log.exception("the error handler failed on %r", exc)
        return Response(content=_INTERNAL.body(), status_code=500)


_INTERNAL = APIError(500, "The gateway hit an internal error; it has been logged.", type="server_error")


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
    if isinstance(exc, RecursionError):  # a body nested deeper than any parser or model should follow
        return APIError(400, "The JSON body of your request is nested too deeply.")
    if isinstance(exc, UnicodeError):
        return APIError(400, f"Your request is not valid UTF-8: {exc.reason}" if hasattr(exc, "reason") else
                        "Your request is not valid UTF-8.")  # fmt: skip
    if isinstance(exc, NotFoundException):
        return APIError(404, f"Unknown path {request.method} {request.url.path}", code="unknown_url")
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status >= 500:
            status = HTTP_500_INTERNAL_SERVER_ERROR
        return APIError(status, exc.detail or "Request failed")
    log.exception("unhandled error on %s", request.scope.get("path"))
    return _INTERNAL
