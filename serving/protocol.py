"""OpenAI request models. Known fields are validated; unknown (vendor) fields pass through to vLLM."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Passthrough):
    include_usage: bool | None = None


class ChatMessage(_Passthrough):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _SamplingParams(_Passthrough):
    model: str = Field(min_length=1, description="A model you may use (`GET /v1/models`), or one of its aliases")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate; at most the model's max_output_tokens (400 past it)"
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = Field(default=False, description="Server-sent events, chunk by chunk as vLLM makes them")
    stream_options: StreamOptions | None = Field(
        default=None, description="`include_usage: true` adds a last chunk with the usage"
    )
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = Field(default=None, description="Your end user's id (the session key where operators say so)")


class ChatCompletionRequest(_SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation: system, user, assistant, tool")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="Functions the model may call (models whose capabilities list tools)"
    )
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = Field(
        default=None, description="`json_object`, or `json_schema`: the answer follows the schema (guided decoding)"
    )


class CompletionRequest(_SamplingParams):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)


class EmbeddingRequest(_Passthrough):
    """OpenAI embeddings: ``input`` as a string, a list of strings, token ids, or lists of token ids."""

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    # What the pipeline asks of every request: an embedding never streams and generates nothing.
    stream: Literal[False] | None = None
    stream_options: None = None
    n: None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value == "" or value == []:
            raise ValueError("input must not be empty")
        if isinstance(value, list) and any(v == [] or v == "" for v in value):
            raise ValueError("input must not contain empty items")
        return value


class ResponsesRequest(_Passthrough):
    """OpenAI's Responses API (vLLM serves it). ``input`` a string or a list of items; ``instructions``; tools;
    streaming as typed events. Not offered: ``previous_response_id`` and ``background`` (see ``unsupported``)."""

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    stream: bool | None = False
    previous_response_id: str | None = None
    store: bool | None = None
    background: bool | None = None
    user: str | None = None

    stream_options: None = None
    n: None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) for a feature the gateway does not offer, else None."""
        if self.previous_response_id:
            return "previous_response_id", (
                "The gateway does not keep responses: a follow-up may run on another server than the one that "
                "answered. Send the conversation so far as `input` items instead (with `store: false`)."
            )
        if self.background:
            return "background", "Background responses are not offered; stream the response instead."
        return None


class AnthropicMessage(_Passthrough):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Passthrough):
    """Anthropic's Messages API (vLLM serves it): ``max_tokens`` is required, as Anthropic requires it."""

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stream: bool | None = False

    stream_options: None = None
    n: None = None


InferenceBody = ChatCompletionRequest | CompletionRequest | EmbeddingRequest | ResponsesRequest | MessagesRequest


def requested_max_tokens(req: InferenceBody) -> int | None:
    if isinstance(req, EmbeddingRequest):
        return None
    if isinstance(req, ResponsesRequest):
        return req.max_output_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def backend_body(req: InferenceBody, served_name: str) -> dict[str, Any]:
    """The body sent to vLLM: what the caller sent (vendor fields included), always asking for usage."""
    body = req.model_dump(exclude_unset=True, exclude_none=True)
    body["model"] = served_name
    if isinstance(req, ResponsesRequest):
        body["store"] = False  # a stored response would live in one server's memory: the gateway keeps none
    if req.stream and isinstance(req, ChatCompletionRequest | CompletionRequest):
        opts = dict(body.get("stream_options") or {})
        opts["include_usage"] = True
        body["stream_options"] = opts
    return body


TEMPLATE_TOKENS_PER_MESSAGE = 32  # what a chat template may add around each message (role markers, headers)


def token_estimate(req: InferenceBody, context_length: int) -> int:
    """Tokens to reserve against a tokens-per-minute limit before the request runs: an upper bound, so that
    the requests a limit admits together can never use more than it.

    Prompt: its UTF-8 bytes (a byte-level BPE tokenizer never makes more tokens than bytes) plus
    ``TEMPLATE_TOKENS_PER_MESSAGE`` per message, or the count of token-id prompts; capped by the context.
    Completion: ``max_tokens`` (or what the context leaves) times ``n``. The reservation is settled with the
    real usage as soon as the request ends, so erring high only narrows a burst; it never overcharges."""
    if isinstance(req, EmbeddingRequest):  # the inputs only: an embedding generates nothing
        items = req.input if isinstance(req.input, list) else [req.input]
        if items and isinstance(items[0], int):
            return len(items)  # one list of token ids
        return sum(len(i) if isinstance(i, list) else len(str(i).encode()) + 2 for i in items)
    if isinstance(req, ChatCompletionRequest):
        # Every message's text, and what else it carries (tool_calls, tool results); the tools and the response
        # format are in the prompt too.
        prompt = sum(len(_text(m.content).encode()) + _json_len(m.model_extra) + TEMPLATE_TOKENS_PER_MESSAGE
                     for m in req.messages) + _json_len(req.tools) + _json_len(req.response_format)  # fmt: skip
    elif isinstance(req, ResponsesRequest):
        items = [req.input] if isinstance(req.input, str) else req.input
        prompt = sum(_json_len(i) + TEMPLATE_TOKENS_PER_MESSAGE for i in items)
        prompt += _json_len(req.instructions) + _json_len(req.tools) + _json_len(req.text)
    elif isinstance(req, MessagesRequest):
        prompt = sum(_json_len(m.content) + TEMPLATE_TOKENS_PER_MESSAGE for m in req.messages)
        prompt += _json_len(req.system) + _json_len(req.tools)
    elif isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], str):
        prompt = sum(len(p) if isinstance(p, list) else 1 for p in req.prompt)  # token ids
    else:
        texts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
        prompt = sum(len(str(t).encode()) + TEMPLATE_TOKENS_PER_MESSAGE for t in texts)
    prompt = min(prompt, context_length)
    completion = requested_max_tokens(req) or max(context_length - prompt, 1)
    return prompt + completion * (req.n or 1)


def _json_len(value: Any) -> int:
    """Bytes of a value as the model's prompt may carry it (a string as it is, anything else as JSON)."""
    if not value:
        return 0
    return len(value.encode()) if isinstance(value, str) else len(json.dumps(value, ensure_ascii=False).encode())


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text: a string, or the text parts of a content list (images etc. count as their JSON)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(str(part.get("text", "")) if part.get("type") == "text" else str(part) for part in content)
