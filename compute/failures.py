"""How a failure on the way to a model server becomes an answer: the cluster and the kind of failure for the
caller, the cause (URLs, a remote traceback's last line, vLLM's own text) as ``detail`` for operators."""

from __future__ import annotations

from typing import Any

from globus_compute_sdk.errors import TaskExecutionFailed

from core.errors import APIError

_KIND_WORDS = {"unreachable": "is unreachable", "timeout": "timed out"}


def backend_error(result: dict[str, Any], where: str) -> APIError:
    """Turn a failed backend answer into an OpenAI-shaped error that names the cluster and the kind of failure.
    What only operators should see (the model server's URL, its error text) goes into ``detail``."""
    status = int(result.get("status") or 502)
    if "kind" in result:  # the function could not reach vLLM
        what = _KIND_WORDS.get(result["kind"], "failed")
        return APIError(status, f"{where}: the model server {what}", code=f"backend_{result['kind']}",
                        detail=result.get("message"))  # fmt: skip
    err = (result.get("body") or {}).get("error") or {}
    message = err.get("message") if isinstance(err, dict) else str(err)
    if 400 <= status < 500:  # the model server rejected the request: the caller's to fix, in its own words
        return APIError(status, message or "The model server rejected the request", param=err.get("param"))
    return APIError(502, f"{where}: the model server failed ({status})", code="backend_error", detail=message)


def task_failed(exc: BaseException, where: str) -> APIError:
    """TaskExecutionFailed: the function ran and raised (502; the remote cause is the detail). Anything else
    (Globus API or connection errors, a lost endpoint, an executor that shut itself down): the route failed (503)."""
    if isinstance(exc, TaskExecutionFailed):
        text = str(exc).strip()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # The remote traceback ends with "ExcType: message"; the first line may be only a header.
        cause = next(
            (ln for ln in reversed(lines) if ": " in ln and not ln.startswith("File ")),
            lines[0] if lines else "unknown",
        )
        return APIError(502, f"{where}: the cluster function failed", code="task_failed", detail=cause)
    return APIError(
        503, f"{where}: the compute endpoint is unreachable", code="endpoint_unreachable",
        headers={"Retry-After": "10"}, detail=f"{type(exc).__name__}: {exc}",
    )  # fmt: skip
