"""The streaming relay (design decision 3): cluster functions post batches of chunks back to the gateway.

Each request gets a token derived from the gateway's secret (HMAC-SHA256 of the request id), so a post
for one request cannot be forged or aimed at another. Posts carry a sequence number: the channel
delivers batches in order, exactly once, whatever order or how many times they arrive.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RelayBatch:
    seq: int
    chunks: list[dict[str, Any]]
    done: bool = False
    error: dict[str, Any] | None = None  # {"status": int, "message": str, ...} from the cluster side


@dataclass
class Channel:
    request_id: str
    queue: asyncio.Queue[RelayBatch] = field(default_factory=asyncio.Queue)
    next_seq: int = 0
    pending: dict[int, RelayBatch] = field(default_factory=dict)
    closed: bool = False

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

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._channels: dict[str, Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

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
        self._channels.pop(request_id, None)

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
