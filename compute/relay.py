"""The streaming relay (design decision 3): cluster functions post batches of chunks back to the gateway.

Each request gets a token derived from the gateway's secret (HMAC-SHA256 of the request id), so a post
for one request cannot be forged or aimed at another. Posts carry a sequence number: the channel
delivers batches in order, exactly once, whatever order or how many times they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RelayBatch:
    seq: int
    chunks: list[dict[str, Any]]
    done: bool = False  # (the relay route decodes posts into this type: a field of the wrong type is a 400)
    error: dict[str, Any] | None = None  # {"status": int, "message": str, ...} from the cluster side


# Batches a stream may have waiting for its reader. Past this, the relay holds each post's answer until there is
# room: the cluster function, which posts one batch at a time, slows to the pace of its caller.
MAX_QUEUED_BATCHES = 64


@dataclass
class Channel:
    request_id: str
    queue: asyncio.Queue[RelayBatch] = field(default_factory=asyncio.Queue)
    next_seq: int = 0
    pending: dict[int, RelayBatch] = field(default_factory=dict)
    closed: bool = False
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set while fewer than MAX_QUEUED_BATCHES wait
    gone: bool = False  # its reader let go (relay.close)

    async def get(self) -> RelayBatch:
        batch = await self.queue.get()
        if self.queue.qsize() < MAX_QUEUED_BATCHES:
            self.room.set()
        return batch

    def put(self, batch: RelayBatch) -> bool:
        """Accept a batch; returns False for a duplicate (already delivered or already pending)."""
        if self.closed or batch.seq < self.next_seq or batch.seq in self.pending:
            return False
        self.pending[batch.seq] = batch
        while self.next_seq in self.pending:
            b = self.pending.pop(self.next_seq)
            self.queue.put_nowait(b)
            self.next_seq += 1
            if b.done:
                self.closed = True
        return True


class RelayHub:
    """Gateway side of the relay: one channel per in-flight streaming request."""

    def __init__(self, secret: bytes | None = None, replica: str | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._channels: dict[str, Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Several replicas behind one URL: posts name this one (``?to=``), and one that lands on another replica is
        # forwarded here through Redis (serving/replicas/relay.py); every replica signs with the same secret.
        self.replica = replica

    def use_secret(self, secret: bytes) -> None:
        """The secret the replicas share (streams opened before keep working on this replica)."""
        self._secret = secret

    def post_url(self, gateway_url: str, request_id: str) -> str:
        """Where a cluster function posts this stream's chunks."""
        url = f"{gateway_url}/internal/relay/{request_id}"
        return f"{url}?to={self.replica}" if self.replica else url

    def holds(self, request_id: str) -> bool:
        return request_id in self._channels

    def token_for(self, request_id: str) -> str:
        return hmac.new(self._secret, request_id.encode(), hashlib.sha256).hexdigest()

    def verify(self, request_id: str, token: str | None) -> bool:
        """The token is this request's; any other string (non-ASCII included) is simply wrong."""
        if not token:
            return False
        return hmac.compare_digest(self.token_for(request_id).encode(), token.encode("utf-8", "surrogateescape"))

    def open(self, request_id: str) -> Channel:
        self._loop = asyncio.get_running_loop()
        ch = self._channels[request_id] = Channel(request_id)
        return ch

    def close(self, request_id: str) -> None:
        ch = self._channels.pop(request_id, None)
        if ch is not None:
            ch.gone = True
            ch.room.set()  # a post waiting for room is answered now (and the next one gets 404)

    async def wait_for_room(self, request_id: str, timeout_s: float) -> None:
        """Hold a post's answer while the stream's reader is behind (at most ``timeout_s``, below the function's
        read timeout): backpressure, so that a caller who reads slowly cannot make the gateway buffer without
        bound."""
        ch = self._channels.get(request_id)
        if ch is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while ch.queue.qsize() >= MAX_QUEUED_BATCHES and not ch.gone:
                    ch.room.clear()
                    await ch.room.wait()

    def deliver(self, request_id: str, batch: RelayBatch) -> str:
        """Called by the relay route (on the serving loop). Returns 'ok', 'duplicate' or 'unknown'."""
        ch = self._channels.get(request_id)
        if ch is None:
            return "unknown"
        return "ok" if ch.put(batch) else "duplicate"

    def fail_threadsafe(self, request_id: str, error: dict[str, Any]) -> None:
        """Fail a channel from another thread (e.g. the compute future's callback) if it is still open."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def _fail() -> None:
            ch = self._channels.get(request_id)
            if ch is not None and not ch.closed:
                ch.closed = True
                ch.queue.put_nowait(RelayBatch(seq=-1, chunks=[], done=True, error=error))

        loop.call_soon_threadsafe(_fail)
