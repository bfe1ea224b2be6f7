"""What the pipeline hands the HTTP handler: a whole response, a stream of chunks, or an error.

The pipeline runs as its own task (a caller who disconnects must not stop its usage record), so the two
meet through a ``ResultChannel``: the pipeline calls ``respond``, ``chunk``, ``fail`` and ``finish``; the
handler awaits ``result()`` and, for a stream, reads the following ``Chunk``/``Finished``/``Failed`` items.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from core.errors import APIError


@dataclass(slots=True)
class Completed:
    """A whole (non-streaming) response body, released once its usage row is written."""

    body: dict[str, Any]


@dataclass(slots=True)
class Chunk:
    """One stream chunk, as the caller gets it in an SSE ``data:`` line."""

    data: dict[str, Any]


@dataclass(slots=True)
class Finished:
    """The stream (or the held response) ended and its usage row is written."""


@dataclass(slots=True)
class Failed:
    """The request failed: before the first byte an HTTP error, after it an error event in the stream."""

    error: APIError


@dataclass(slots=True)
class Streaming:
    """The handler's view of a stream: its first item, the rest come from ``channel.next()``."""

    first: Chunk | Finished | Failed
    channel: ResultChannel


StreamItem = Chunk | Finished | Failed
Result = Completed | Streaming | Failed


# Chunks a stream may have waiting for its caller to read them. Past this the pipeline waits (and with it the
# relay, and the cluster function's posts): a caller who reads slowly holds a bounded buffer, not a growing one.
MAX_BUFFERED_CHUNKS = 256


class ResultChannel:
    """From the pipeline's task to the HTTP handler, in order."""

    def __init__(self, max_buffered: int = MAX_BUFFERED_CHUNKS) -> None:
        self._queue: asyncio.Queue[Completed | StreamItem] = asyncio.Queue()
        self._max_buffered = max_buffered
        self._room = asyncio.Event()
        self.started = False  # a stream's first byte went out: failures can no longer become HTTP errors
        self.cluster: str | None = None  # where it runs (the X-First-Cluster response header)
        self.finished = False  # the terminal item (Finished or Failed) was sent
        self.abandoned = False  # the caller went away mid-stream: the pipeline stops the work on the cluster
        self.stalled = False  # ... or stopped reading, with the buffer full

    # ---- the pipeline's side ----

    def respond(self, body: dict[str, Any]) -> None:
        self._queue.put_nowait(Completed(body))

    async def chunk(self, data: dict[str, Any], stalled_after_s: float) -> None:
        """Queue a chunk; while the buffer is full, wait for the caller to read. A caller who reads nothing for
        ``stalled_after_s`` counts as gone (``abandoned``): the pipeline then stops the work on the cluster."""
        self.started = True
        if self._queue.qsize() >= self._max_buffered and not self.abandoned:
            try:
                async with asyncio.timeout(stalled_after_s):
                    while self._queue.qsize() >= self._max_buffered and not self.abandoned:
                        self._room.clear()
                        await self._room.wait()
            except TimeoutError:
                self.abandoned = self.stalled = True
                return
        self._queue.put_nowait(Chunk(data))

    def fail(self, error: APIError) -> None:
        self.finished = True
        self._queue.put_nowait(Failed(error))

    def finish(self) -> None:
        self.finished = True
        self._queue.put_nowait(Finished())

    # ---- the handler's side ----

    def abandon(self) -> None:
        """The caller is gone (disconnected before the stream ended)."""
        self.abandoned = True
        self._room.set()

    async def result(self) -> Result:
        """Wait until the request has an answer: a held response comes out only after its usage is recorded."""
        first = await self._queue.get()
        if isinstance(first, Completed):
            end = await self._queue.get()
            return end if isinstance(end, Failed) else first
        if isinstance(first, Failed):
            return first
        return Streaming(first, self)

    async def next(self) -> StreamItem:
        item = await self._queue.get()
        self._room.set()
        return item  # type: ignore[return-value]  # after the first item: never Completed

    def next_nowait(self) -> StreamItem | None:
        """The next item if one is already waiting (a relay batch arrives at once), else None."""
        if self._queue.empty():
            return None
        self._room.set()
        return self._queue.get_nowait()  # type: ignore[return-value]
