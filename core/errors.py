"""Errors the gateway answers with on purpose, free of any web framework.

Raised anywhere below the HTTP edge (serving, compute, flows); ``api/errors.py`` turns them into responses.
Every failure a caller sees has OpenAI's shape, `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

from typing import Any

# OpenAI's error types by status.
OPENAI_ERROR_TYPES = {
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
    """An error the gateway answers with on purpose: an HTTP status, OpenAI's fields, extra headers, and an
    internal ``detail`` that only operators see."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or OPENAI_ERROR_TYPES.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = headers or {}
        # What happened inside (internal URLs, a remote traceback's last line): for logs, the live state that
        # admins see on /v1/status and flow-run traces; never in the caller's answer.
        self.detail = detail

    @property
    def internal(self) -> str:
        """The fullest account: the detail when there is one, else the message."""
        return f"{self.message} ({self.detail})" if self.detail else self.message

    def fresh(self) -> APIError:
        """A new error with the same fields. A cached answer is raised as a copy: raising one object again and
        again would grow its traceback on every request."""
        return APIError(self.status, self.message, type=self.type, param=self.param, code=self.code,
                        headers=dict(self.headers), detail=self.detail)  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        """The same error in Anthropic's shape (the Messages API route)."""
        return {
            "type": "error",
            "error": {"type": ANTHROPIC_TYPES.get(self.status, "api_error"), "message": self.message},
        }


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error",
}  # fmt: skip
