"""A pipeline result as HTTP: JSON for a whole response, Server-Sent Events for a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from litestar import Response
from litestar.response import Stream

from api.errors import error_response
from serving.results import Chunk, Completed, Failed, Finished, Result, ResultChannel, StreamItem

_encode = msgspec.json.encode
DONE = b"data: [DONE]\n\n"


def to_response(result: Result, headers: dict[str, str]) -> Response:
    if isinstance(result, Failed):
        return error_response(result.error, headers)
    if isinstance(result, Completed):
        return Response(content=_encode(result.body), media_type="application/json", headers=headers)
    return Stream(
        _events(result.first, result.channel),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache"},
    )


def _end(item: Finished | Failed) -> bytes:
    if isinstance(item, Failed):  # after the first byte an HTTP status can't change: the stream ends with an error
        return b"data: " + _encode(item.error.body()) + b"\n\n"
    return DONE


async def _events(first: StreamItem, channel: ResultChannel) -> AsyncIterator[bytes]:
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
                parts.append(_end(item))  # type: ignore[arg-type]
                ended = True
                yield b"".join(parts)
                return
            parts.append(b"data: " + _encode(item.data) + b"\n\n")
            item = channel.next_nowait()
    finally:
        if not ended:  # closed before its end: the caller left (Litestar closes the stream on a disconnect)
            channel.abandon()
