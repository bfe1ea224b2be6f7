"""POST /internal/relay/{request_id}: cluster functions post batches of stream chunks here (``compute/relay.py``);
a post for a stream another replica holds (``?to=<replica>``) is forwarded there (``serving/replicas/relay.py``)."""

from __future__ import annotations

import logging
import re

import msgspec
from litestar import Request, post

from compute.relay import RelayBatch, RelayHub
from core.errors import APIError

log = logging.getLogger("first.api")
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
RELAY_ROOM_WAIT_S = 20.0  # below the function's 30 s read timeout: a held answer never becomes a repost


@post("/internal/relay/{request_id:str}", status_code=200, include_in_schema=False)
async def relay_post(request: Request, request_id: str) -> dict[str, str]:
    """A batch of one stream's chunks, signed with the request's relay token (no caller credential)."""
    hub: RelayHub = request.app.state.relay
    if not _REQUEST_ID.fullmatch(request_id):  # ids are ours (32 hex digits): anything else is not logged as it is
        log.warning("rejected a relay post for a malformed stream id from %s", request.client)
        raise APIError(404, "No such stream", code="unknown_stream")
    if not hub.verify(request_id, request.headers.get("x-relay-token")):
        log.warning("rejected a relay post for %s with a bad token from %s", request_id, request.client)
        raise APIError(401, "Invalid relay token", code="invalid_relay_token")
    try:
        batch = msgspec.json.decode(await request.body(), type=RelayBatch)
    except msgspec.DecodeError as exc:  # only a function with this stream's token gets here: a bug, not an attack
        raise APIError(400, f"Malformed relay batch: {exc}", code="malformed_batch") from None
    holder = request.query_params.get("to")
    forwarder = getattr(request.app.state, "relay_forwarder", None)
    if holder and holder != hub.replica and forwarder is not None and not hub.holds(request_id):
        result = await forwarder.forward(holder, request_id, await request.body())  # the holder waits for room
    else:
        result = hub.deliver(request_id, batch)
        if result == "ok":
            await hub.wait_for_room(request_id, RELAY_ROOM_WAIT_S)
    if result == "unknown":
        log.warning("rejected a relay post for %s: no open stream (finished, or never opened)", request_id)
        raise APIError(404, f"No open stream {request_id}", code="unknown_stream")
    if result == "duplicate":  # a replay, or the function's repost after a lost answer: delivered once already
        log.warning("rejected a replayed relay post for %s (batch %s was delivered already)", request_id, batch.seq)
        raise APIError(409, f"Batch {batch.seq} of {request_id} was delivered already", code="duplicate_batch")
    return {"status": result}
