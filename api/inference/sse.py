"""A pipeline result as HTTP: JSON for a whole response, Server-Sent Events for a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from litestar import Response
from litestar.response import Stream

from api.errors import error_response
from serving.results import Chunk, Completed, Failed, Finished, Result, ResultChannel, StreamItem
from serving.shapes import OPENAI, Shape

_encode = msgspec.json.encode
DONE = b"data: [DONE]\n\n"


def to_response(result: Result, headers: dict[str, str], shape: Shape = OPENAI, anthropic: bool = False) -> Response:
    if isinstance(result, Failed):
        return error_response(result.error, headers, anthropic=anthropic)
    if isinstance(result, Completed):
        return Response(content=_encode(result.body), media_type="application/json", headers=headers)
    return Stream(
        _events(result.first, result.channel, shape, anthropic),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache"},
    )


def _event(data: dict, shape: Shape) -> bytes:
    """One SSE event: a ``data:`` line, after an ``event:`` line naming its type where the API names them."""
    if shape.named_events:
        return b"event: " + str(data.get("type", "message")).encode() + b"\ndata: " + _encode(data) + b"\n\n"
    return b"data: " + _encode(data) + b"\n\n"


def _end(item: Finished | Failed, shape: Shape, anthropic: bool) -> bytes:
    if isinstance(item, Failed):  # after the first byte an HTTP status can't change: the stream ends with an error
        if anthropic:
            return _event(item.error.anthropic_body(), shape)
        if shape.named_events:  # the Responses API's error event
            e = item.error
            return _event({"type": "error", "code": e.code, "message": e.message, "param": e.param}, shape)
        return b"data: " + _encode(item.error.body()) + b"\n\n"
    return DONE if shape.done_marker else b""


async def _events(first: StreamItem, channel: ResultChannel, shape: Shape, anthropic: bool) -> AsyncIterator[bytes]:
    """SSE bytes. Chunks that are already waiting go out in one write (a relay batch arrives at once)."""
    item: StreamItem | None = first
    parts: list[bytes] = []
    ended = False
    try:
        while True:
            if item is None:
                yield b"".join(parts)
                parts = []
                item = await channel.next()
            if type(item) is not Chunk:
                parts.append(_end(item, shape, anthropic))  # type: ignore[arg-type]
                ended = True
                yield b"".join(parts)
                return
            parts.append(_event(item.data, shape))
            item = channel.next_nowait()
    finally:
        if not ended:  # closed before its end: the caller left (Litestar closes the stream on a disconnect)
            channel.abandon()
