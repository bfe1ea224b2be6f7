"""The usage record: one per request, success or failure, written before the response completes."""

from __future__ import annotations

import msgspec


class UsageRecord(msgspec.Struct, kw_only=True):
    request_id: str  # unique per request; makes ingestion idempotent
    ts: float  # request start, seconds since the epoch (UTC)
    user: str
    groups: list[str] = []
    model: str
    cluster: str | None = None
    endpoint: str  # "chat.completions" | "completions"
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    latency_ms: float = 0.0  # request start to last byte
    ttft_ms: float | None = None  # time to first token, streams only
    status: int = 200  # HTTP status the caller got
    error_type: str | None = None  # OpenAI error type when status >= 400
    cold_start: bool = False  # the request waited for a warm-up
    batch_id: str | None = None  # a batch's line: the batch (interactive requests: null)
