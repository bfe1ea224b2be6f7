"""How each API's answers look, so that one pipeline serves them all: where a response's usage is (normalised to
``prompt_tokens``/``completion_tokens``/``total_tokens`` for the usage row), which stream events carry generated
content (time to first token), where the model's name goes (callers see the name they asked for, not the served
one), and how a stream is framed (OpenAI's ``data:`` lines ending in ``[DONE]``, or named events)."""

from __future__ import annotations

from typing import Any


def _normalised(u: dict[str, Any], prompt_key: str, completion_key: str) -> dict[str, int]:
    prompt, completion = int(u.get(prompt_key) or 0), int(u.get(completion_key) or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": int(u.get("total_tokens") or prompt + completion)}  # fmt: skip


class Shape:
    """OpenAI's chat completions, completions and embeddings."""

    named_events = False  # SSE "event: <type>" before each data line
    done_marker = True  # "data: [DONE]" ends a stream
    gateway_asks_usage = True  # the gateway adds stream_options.include_usage: the caller may not want the usage

    def usage(self, doc: dict[str, Any]) -> dict[str, int] | None:
        """The usage a response or a stream event reports (None: none here), normalised."""
        u = doc.get("usage")
        return _normalised(u, "prompt_tokens", "completion_tokens") if u else None

    def usage_only(self, chunk: dict[str, Any]) -> bool:
        """A stream event that only carries usage (the gateway asked for it; the caller may not have)."""
        return bool(chunk.get("usage")) and not chunk.get("choices")

    def has_content(self, chunk: dict[str, Any]) -> bool:
        return any((c.get("delta") or {}).get("content") or c.get("text") for c in chunk.get("choices") or [])

    def rename(self, doc: dict[str, Any], model: str) -> None:
        doc["model"] = model


class ResponsesShape(Shape):
    """OpenAI's Responses API: ``input_tokens``/``output_tokens``; a stream of typed events (``response.created``,
    ``response.output_text.delta``, ..., ``response.completed`` with the usage)."""

    named_events = True
    done_marker = False
    gateway_asks_usage = False

    def usage(self, doc: dict[str, Any]) -> dict[str, int] | None:
        u = (doc.get("response") or {}).get("usage") if "response" in doc else doc.get("usage")
        return _normalised(u, "input_tokens", "output_tokens") if u else None

    def usage_only(self, chunk: dict[str, Any]) -> bool:
        return False

    def has_content(self, chunk: dict[str, Any]) -> bool:
        return str(chunk.get("type", "")).endswith(".delta") and bool(chunk.get("delta"))

    def rename(self, doc: dict[str, Any], model: str) -> None:
        target = doc.get("response") if isinstance(doc.get("response"), dict) else doc
        if "model" in target:
            target["model"] = model


class MessagesShape(Shape):
    """Anthropic's Messages API: ``input_tokens`` in ``message_start``, the running ``output_tokens`` in
    ``message_delta``; events named by their ``type``, no ``[DONE]``."""

    named_events = True
    done_marker = False
    gateway_asks_usage = False

    def usage(self, doc: dict[str, Any]) -> dict[str, int] | None:
        u = (doc.get("message") or {}).get("usage") if doc.get("type") == "message_start" else doc.get("usage")
        if not u:
            return None
        out = {}
        if "input_tokens" in u:
            out["prompt_tokens"] = int(u["input_tokens"] or 0)
        if "output_tokens" in u:
            out["completion_tokens"] = int(u["output_tokens"] or 0)
        return out or None

    def usage_only(self, chunk: dict[str, Any]) -> bool:
        return False

    def has_content(self, chunk: dict[str, Any]) -> bool:
        delta = chunk.get("delta") or {}
        return chunk.get("type") == "content_block_delta" and bool(delta.get("text") or delta.get("partial_json"))

    def rename(self, doc: dict[str, Any], model: str) -> None:
        if doc.get("type") == "message_start" and isinstance(doc.get("message"), dict):
            doc["message"]["model"] = model
        elif doc.get("type") == "message":
            doc["model"] = model


OPENAI, RESPONSES, MESSAGES = Shape(), ResponsesShape(), MessagesShape()
SHAPES: dict[str, Shape] = {
    "chat.completions": OPENAI,
    "completions": OPENAI,
    "embeddings": OPENAI,
    "responses": RESPONSES,
    "messages": MESSAGES,
}


def merge_usage(current: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    """Usage from several events (Anthropic reports input and output tokens apart): later values win."""
    merged = {**current, **new}
    merged["total_tokens"] = merged.get("prompt_tokens", 0) + merged.get("completion_tokens", 0)
    return merged
