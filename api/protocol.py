"""OpenAI request models. Known fields are validated; unknown (vendor) fields pass through to vLLM."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Passthrough):
    include_usage: bool | None = None


class ChatMessage(_Passthrough):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _SamplingParams(_Passthrough):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None


class ChatCompletionRequest(_SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_SamplingParams):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)


def requested_max_tokens(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def backend_body(req: ChatCompletionRequest | CompletionRequest, served_name: str) -> dict[str, Any]:
    """The body sent to vLLM: what the caller sent (vendor fields included), always asking for usage."""
    body = req.model_dump(exclude_unset=True, exclude_none=True)
    body["model"] = served_name
    if req.stream:
        opts = dict(body.get("stream_options") or {})
        opts["include_usage"] = True
        body["stream_options"] = opts
    return body


def token_estimate(req: ChatCompletionRequest | CompletionRequest, context_length: int) -> int:
    """Tokens to reserve against a tokens-per-minute limit before the request runs.

    Prompt: a byte count over 3 (tokenizers average 3-4 bytes a token on English, so this errs high) or, for
    token-id prompts, their count. Completion: ``max_tokens`` times ``n``, or what the context leaves. Settled
    with the real usage afterwards, so erring high only delays, never overcharges."""
    if isinstance(req, ChatCompletionRequest):
        text = sum(len(str(m.content or "").encode()) + 4 for m in req.messages)
        prompt = math.ceil(text / 3)
    elif isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], str):
        prompt = sum(len(p) if isinstance(p, list) else 1 for p in req.prompt)  # token ids
    else:
        texts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
        prompt = math.ceil(sum(len(str(t).encode()) for t in texts) / 3)
    prompt = min(prompt, context_length)
    completion = requested_max_tokens(req) or max(context_length - prompt, 1)
    return prompt + completion * (req.n or 1)
