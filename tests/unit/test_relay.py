import asyncio

from compute.relay import Channel, RelayBatch, RelayHub


def _batch(seq, done=False):
    return RelayBatch(seq=seq, chunks=[{"n": seq}], done=done)


async def test_channel_delivers_in_order_exactly_once():
    ch = Channel("r1")
    assert ch.put(_batch(2, done=True))
    assert ch.put(_batch(0))
    assert not ch.put(_batch(0))  # a repost of a delivered batch
    assert not ch.put(_batch(2))  # a repost of a pending batch
    assert ch.queue.qsize() == 1
    assert ch.put(_batch(1))
    got = [ch.queue.get_nowait().seq for _ in range(ch.queue.qsize())]
    assert got == [0, 1, 2]
    assert ch.closed and not ch.put(_batch(3))


async def test_hub_tokens_are_per_request_and_checked():
    hub = RelayHub(secret=b"k" * 32)
    t1 = hub.token_for("req-1")
    assert hub.verify("req-1", t1)
    assert not hub.verify("req-2", t1)  # a token can't be aimed at another request
    assert not hub.verify("req-1", None)
    assert not hub.verify("req-1", t1[:-1] + ("0" if t1[-1] != "0" else "1"))
    assert RelayHub().token_for("req-1") != t1  # each gateway has its own secret


async def test_hub_routes_batches_and_fails_from_other_threads():
    hub = RelayHub()
    ch = hub.open("r")
    assert hub.deliver("r", _batch(0)) == "ok"
    assert hub.deliver("r", _batch(0)) == "duplicate"
    assert hub.deliver("nope", _batch(0)) == "unknown"
    await asyncio.to_thread(hub.fail_threadsafe, "r", {"status": 502, "message": "boom"})
    await asyncio.sleep(0.01)
    assert ch.queue.get_nowait().seq == 0
    failed = ch.queue.get_nowait()
    assert failed.done and failed.error == {"status": 502, "message": "boom"}
    hub.close("r")
    assert hub.deliver("r", _batch(1)) == "unknown"
