"""The streaming relay across gateway replicas: a cluster function's post for a stream that another replica holds
(the load balancer sent it elsewhere) is forwarded there through Redis, and the post is answered with what the
holder made of it. The holder is named in the post's URL (``?to=<replica>``, ``RelayHub.post_url``); the post's
token is checked before anything is forwarded, with the secret all replicas share (kept in Redis).

Forwarding is request and answer: the post is published on the holder's channel with a reply key; the holder
delivers it to the stream (in order, once: duplicates get 409 as on one gateway), waits for room when the
stream's reader is behind, and pushes its answer to the reply key, which the forwarding replica waits on. So the
order of a stream's batches, replay protection and backpressure hold across replicas. While Redis is down, a post
that lands on another replica than its stream's gets 404 and the stream ends at its idle bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets

import msgspec

from compute.relay import RelayBatch, RelayHub
from serving.replicas.store import SharedStateDown, SharedStore

log = logging.getLogger("first.replicas")
SECRET_KEY = "relay-secret"


async def shared_relay_secret(store: SharedStore) -> bytes:
    """The relay secret every replica signs with: the first replica to start makes it, the others read it."""
    key = store.key(SECRET_KEY)
    fresh = secrets.token_hex(32)

    async def get_or_make() -> bytes:
        await store.redis.set(key, fresh, nx=True)
        return bytes(await store.redis.get(key))

    return bytes.fromhex((await store.run(get_or_make)).decode())


class RelayForwarder:
    def __init__(self, store: SharedStore, hub: RelayHub, room_wait_s: float) -> None:
        self.store, self.hub, self.room_wait_s = store, hub, room_wait_s
        self.forwarded = 0  # posts this replica forwarded to another (metrics, tests)
        self.received = 0  # posts another replica forwarded here

    def channel(self, replica: str) -> str:
        return self.store.key("relay", replica)

    async def forward(self, replica: str, request_id: str, body: bytes) -> str:
        """Hand a post to ``replica``; returns its answer: 'ok', 'duplicate' or 'unknown' (no such stream, or no
        such replica now)."""
        reply = self.store.key("relay-reply", secrets.token_hex(8))
        message = json.dumps({"request_id": request_id, "body": body.decode(), "reply": reply})
        try:
            listeners = await self.store.run(lambda: self.store.redis.publish(self.channel(replica), message))
            if not listeners:
                return "unknown"
            self.forwarded += 1
            answer = await self.store.run(lambda: self.store.blocking.blpop([reply], timeout=self.room_wait_s + 5))
        except SharedStateDown:
            return "unknown"
        return answer[1].decode() if answer else "unknown"

    async def listen_forever(self) -> None:
        """Take the posts other replicas forward to this one, while the gateway runs (re-subscribing after Redis
        comes back)."""
        while True:
            try:
                async with self.store.blocking.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel(self.hub.replica or ""))
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            asyncio.get_running_loop().create_task(self._take(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: the store's state says so; try again shortly
                log.debug("relay subscription lost (%r); retrying", exc)
                await asyncio.sleep(self.store.retry_s)

    async def _take(self, data: bytes) -> None:
        doc = json.loads(data)
        self.received += 1
        try:
            batch = msgspec.json.decode(doc["body"], type=RelayBatch)
            result = self.hub.deliver(doc["request_id"], batch)
        except msgspec.DecodeError:
            result = "unknown"
        if result == "ok":
            await self.hub.wait_for_room(doc["request_id"], self.room_wait_s)
        with contextlib.suppress(SharedStateDown):
            await self.store.run(lambda: self._answer(doc["reply"], result))

    async def _answer(self, reply: str, result: str) -> None:
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.rpush(reply, result)
        pipe.expire(reply, 60)
        await pipe.execute()
