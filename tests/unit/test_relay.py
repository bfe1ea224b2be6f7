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


async def test_a_full_channel_holds_the_next_post_until_its_reader_catches_up():
    """Backpressure: past MAX_QUEUED_BATCHES, the relay answers a post only once the reader has taken one; a
    reader that lets go releases the held post at once."""
    from compute.relay import MAX_QUEUED_BATCHES

    hub = RelayHub()
    ch = hub.open("r")
    for seq in range(MAX_QUEUED_BATCHES):
        assert hub.deliver("r", _batch(seq)) == "ok"
    held = asyncio.create_task(hub.wait_for_room("r", timeout_s=30))
    await asyncio.sleep(0.05)
    assert not held.done()  # the post's answer waits
    assert (await ch.get()).seq == 0
    await asyncio.wait_for(held, 5)  # one taken: room again

    assert hub.deliver("r", _batch(MAX_QUEUED_BATCHES)) == "ok"
    held = asyncio.create_task(hub.wait_for_room("r", timeout_s=30))
    await asyncio.sleep(0.05)
    assert not held.done()
    hub.close("r")  # the caller is gone
    await asyncio.wait_for(held, 5)
    assert hub.deliver("r", _batch(MAX_QUEUED_BATCHES + 1)) == "unknown"  # and the function stops on this 404


async def test_a_held_post_is_answered_within_its_bound_even_if_nobody_reads():
    from compute.relay import MAX_QUEUED_BATCHES

    hub = RelayHub()
    hub.open("r")
    for seq in range(MAX_QUEUED_BATCHES):
        hub.deliver("r", _batch(seq))
    await asyncio.wait_for(hub.wait_for_room("r", timeout_s=0.1), 5)  # answered; never past the function's timeout


async def test_a_result_channel_holds_a_bounded_buffer_and_gives_up_on_a_caller_who_stops_reading():
    """The pipeline's side of a stream waits while the caller's buffer is full; a caller who reads nothing for
    the stall bound is treated as gone (the pipeline then stops the cluster's work and records 499)."""
    from serving.results import ResultChannel

    channel = ResultChannel(max_buffered=4)
    for i in range(4):
        await channel.chunk({"i": i}, stalled_after_s=5)
    writer = asyncio.create_task(channel.chunk({"i": 4}, stalled_after_s=5))
    await asyncio.sleep(0.05)
    assert not writer.done()  # full: the fifth waits
    first = await channel.result()
    assert first.first.data == {"i": 0}  # type: ignore[union-attr]
    assert (await channel.next()).data == {"i": 1}  # type: ignore[union-attr]
    await asyncio.wait_for(writer, 5)
    assert not channel.stalled

    stuck = ResultChannel(max_buffered=2)
    await stuck.chunk({"i": 0}, stalled_after_s=5)
    await stuck.chunk({"i": 1}, stalled_after_s=5)
    await stuck.chunk({"i": 2}, stalled_after_s=0.05)  # nobody reads
    assert stuck.stalled and stuck.abandoned
