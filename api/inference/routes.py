"""POST /v1/chat/completions and /v1/completions: validate, hand the request to the serving pipeline, answer
with JSON or SSE. The pipeline is ``serving/pipeline.py``; the request models are ``serving/protocol.py``."""

from __future__ import annotations

from litestar import Controller, Request, Response, post

from api.errors import INFERENCE, error_responses
from api.guards import DEPENDENCIES, authenticate, principal_of
from api.inference.sse import to_response
from api.request_ids import request_id, set_request_id
from core.errors import APIError
from core.principal import Principal
from serving.pipeline import serve
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    InferenceBody,
    MessagesRequest,
    ResponsesRequest,
)
from serving.request import InferenceRequest, Services
from serving.shapes import SHAPES

# Inference routes and their endpoint names (usage rows, flow runs); rejections on them are metered too.
INFERENCE_PATHS = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}

_ERRORS = error_responses(*INFERENCE)


class InferenceController(Controller):
    guards = [authenticate]
    dependencies = DEPENDENCIES

    @post("/v1/chat/completions", status_code=200, summary="Create a chat completion", responses=_ERRORS)
    async def chat_completions(self, request: Request, data: ChatCompletionRequest, services: Services) -> Response:
        """OpenAI chat completions, streaming (SSE) or not. Unknown fields pass through to vLLM."""
        return await _serve(request, data, "chat.completions", services, principal_of(request))

    @post("/v1/completions", status_code=200, summary="Create a completion", responses=_ERRORS)
    async def completions(self, request: Request, data: CompletionRequest, services: Services) -> Response:
        """OpenAI (legacy) text completions, streaming (SSE) or not."""
        return await _serve(request, data, "completions", services, principal_of(request))

    @post("/v1/responses", status_code=200, summary="Create a response (OpenAI's Responses API)", responses=_ERRORS)
    async def responses(self, request: Request, data: ResponsesRequest, services: Services) -> Response:
        """OpenAI's Responses API, streaming (typed events) or not: `input` as a string or a list of items,
        `instructions`, `tools`. The gateway keeps no responses: `previous_response_id` and `background` are 400
        (send the conversation as `input` items); `store` is always false on the model server."""
        unsupported = data.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported_parameter")
        return await _serve(request, data, "responses", services, principal_of(request))

    @post(
        "/v1/messages",
        status_code=200,
        summary="Create a message (Anthropic's Messages API)",
        responses=error_responses(*INFERENCE, anthropic=True),
    )
    async def messages(self, request: Request, data: MessagesRequest, services: Services) -> Response:
        """Anthropic's Messages API, streaming (Anthropic's event names) or not. The credential may come as
        `x-api-key` (what the anthropic client sends) or `Authorization: Bearer`; `anthropic-version` is accepted.
        Errors on this route are in Anthropic's shape."""
        return await _serve(request, data, "messages", services, principal_of(request))

    @post("/v1/embeddings", status_code=200, summary="Create embeddings", responses=_ERRORS)
    async def embeddings(self, request: Request, data: EmbeddingRequest, services: Services) -> Response:
        """OpenAI embeddings from an embedding model (``kind: embed``): input as a string, a list of strings or
        token ids; ``encoding_format`` float or base64; ``dimensions`` where the model supports it. Metered by its
        prompt tokens."""
        return await _serve(request, data, "embeddings", services, principal_of(request))


async def _serve(request: Request, body: InferenceBody, endpoint: str, svc: Services, who: Principal) -> Response:
    wait = request.headers.get("x-first-warm-wait")
    try:
        warm_wait_s = float(wait) if wait is not None else None
    except ValueError:
        raise APIError(400, "X-First-Warm-Wait must be a number of seconds", param="X-First-Warm-Wait") from None
    line = request.headers.get("x-first-batch-line")
    if who.batch_id is not None and line is not None and line.isdigit():
        set_request_id(request.scope, f"{who.batch_id}-{int(line)}")
    session = request.headers.get(svc.settings.session_header) or None
    if session is None and svc.settings.session_from_user:
        session = getattr(body, "user", None) or None
    req = InferenceRequest(
        request_id=request_id(request.scope), endpoint=endpoint, path=f"/v1/{endpoint.replace('.', '/')}",
        body=body, principal=who, warm_wait_s=warm_wait_s, pinned=request.headers.get("x-first-cluster") or None,
        session=session[:256] if session else None,
    )  # fmt: skip
    result, channel = await serve(req, svc)
    headers = {"X-Request-Id": req.request_id}
    if channel.cluster:
        headers["X-First-Cluster"] = channel.cluster
    return to_response(result, headers, SHAPES[endpoint], anthropic=endpoint == "messages")
