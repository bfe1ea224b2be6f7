"""Rate limits: requests and tokens per minute, reserved up front and settled with the real usage."""

from __future__ import annotations

import pytest

from blocks.registry import ModelSpec, RateLimits
from core.errors import APIError
from serving.limits import Limit, RateLimiter, Reservation
from serving.protocol import TEMPLATE_TOKENS_PER_MESSAGE, ChatCompletionRequest, CompletionRequest, token_estimate


def _limit(rpm: int = 0, tpm: int = 0) -> list[Limit]:
    return [Limit("model:m:alice", RateLimits(rpm=rpm, tpm=tpm), "model m")]


def test_rpm_gives_429_with_retry_after():
    limiter = RateLimiter()
    limiter.reserve("alice", _limit(rpm=2), 0)
    limiter.reserve("alice", _limit(rpm=2), 0)
    with pytest.raises(APIError) as e:
        limiter.reserve("alice", _limit(rpm=2), 0)
    assert e.value.status == 429 and e.value.type == "rate_limit_error" and e.value.code == "rate_limit_exceeded"
    assert 1 <= int(e.value.headers["Retry-After"]) <= 30  # one request comes back every 30 s at 2 rpm
    assert "2 requests per minute for model m" in e.value.message


def test_tokens_are_reserved_then_settled_with_real_usage():
    limiter = RateLimiter()
    first = limiter.reserve("alice", _limit(tpm=1000), 600)
    with pytest.raises(APIError) as e:  # 600 are held: another 600 does not fit
        limiter.reserve("alice", _limit(tpm=1000), 600)
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
    limiter.settle(first, 100)  # it used only 100: 500 come back
    limiter.settle(first, 100)  # settling twice changes nothing
    second = limiter.reserve("alice", _limit(tpm=1000), 600)
    assert second.tokens == 600
    with pytest.raises(APIError):
        limiter.reserve("alice", _limit(tpm=1000), 600)


def test_a_concurrent_burst_cannot_overshoot_the_token_limit():
    """All reservations happen before any request finishes (the burst); what was admitted fits the limit even
    when every request uses all it asked for."""
    limiter = RateLimiter()
    admitted: list[Reservation] = []
    for _ in range(50):
        try:
            admitted.append(limiter.reserve("alice", _limit(tpm=1000), 120))
        except APIError as e:
            assert e.status == 429
    assert len(admitted) == 8  # 8 x 120 = 960 <= 1000; a check-then-record limiter would admit all 50
    for r in admitted:
        limiter.settle(r, 120)
    with pytest.raises(APIError):
        limiter.reserve("alice", _limit(tpm=1000), 120)


def test_a_request_bigger_than_the_limit_says_to_lower_max_tokens():
    with pytest.raises(APIError) as e:
        RateLimiter().reserve("alice", _limit(tpm=100), 500)
    assert e.value.status == 429 and e.value.code == "tokens_exceed_limit" and "max_tokens" in e.value.message


def test_reservation_is_all_or_nothing_across_buckets():
    limiter = RateLimiter()
    both = [Limit("a", RateLimits(tpm=1000), "model a"), Limit("b", RateLimits(tpm=100), "cluster b")]
    with pytest.raises(APIError) as e:
        limiter.reserve("alice", both, 200)  # fits a, not b
    assert "cluster b" in e.value.message
    limiter.reserve("alice", [both[0]], 1000)  # nothing was taken from a by the failed reservation


def test_users_have_separate_buckets_and_unlimited_means_unlimited():
    limiter = RateLimiter()
    limiter.reserve("alice", [Limit("m:alice", RateLimits(rpm=1), "m")], 0)
    limiter.reserve("bob", [Limit("m:bob", RateLimits(rpm=1), "m")], 0)
    for _ in range(1000):
        limiter.reserve("carol", [Limit("m:carol", RateLimits(), "m")], 10**6)


def test_group_overrides_pick_the_most_generous():
    m = ModelSpec(
        name="m", path="-", limits=RateLimits(rpm=10, tpm=1000),
        group_limits={"pro": RateLimits(rpm=100, tpm=50_000), "unlimited": RateLimits(rpm=0, tpm=0)},
    )  # fmt: skip
    assert m.limits_for(()) == RateLimits(rpm=10, tpm=1000)
    assert m.limits_for(("other",)) == RateLimits(rpm=10, tpm=1000)
    assert m.limits_for(("pro",)) == RateLimits(rpm=100, tpm=50_000)
    assert m.limits_for(("pro", "unlimited")) == RateLimits(rpm=0, tpm=0)


def test_token_estimate_covers_max_tokens_and_prompt():
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "é" * 100}], max_tokens=50)
    assert token_estimate(chat, 4096) == 200 + TEMPLATE_TOKENS_PER_MESSAGE + 50  # UTF-8 bytes bound the tokens
    no_max = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert token_estimate(no_max, 512) == 512  # the whole context
    parts = [{"type": "text", "text": "abc"}, {"type": "text", "text": "de"}]
    multi = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": parts}], max_tokens=1)
    assert token_estimate(multi, 512) == 5 + TEMPLATE_TOKENS_PER_MESSAGE + 1
    ids = CompletionRequest(model="m", prompt=[[1, 2, 3], [4, 5]], max_tokens=10, n=2)
    assert token_estimate(ids, 512) == 5 + 20


def test_concurrency_slots_are_taken_and_given_back_once():
    limiter = RateLimiter()
    a, b = Reservation(), Reservation()
    limiter.enter("k:m", 2, "model m", a)
    limiter.enter("k:m", 2, "model m", b)
    with pytest.raises(APIError) as e:
        limiter.enter("k:m", 2, "model m", Reservation())
    assert e.value.status == 429 and e.value.code == "too_many_concurrent_requests"
    limiter.settle(a, 0)
    limiter.settle(a, 0)  # settling twice gives back one slot, not two
    assert limiter.inflight("k:m") == 1
    limiter.enter("k:m", 2, "model m", Reservation())
    limiter.enter("other:m", 0, "model m", Reservation())  # 0: no cap, nothing counted
    assert limiter.inflight("other:m") == 0


def test_failed_auth_throttle_refills_per_address_and_forgets_recovered_addresses():
    from core.clock import ManualClock
    from serving.limits import FailedAuthThrottle

    clock = ManualClock()
    throttle = FailedAuthThrottle(per_minute=3, clock=clock, max_addresses=2)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1") == 0
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 20.0  # one failure's worth refills in 60/3 s
    assert throttle.retry_after("10.0.0.2") == 0  # another address is not affected
    clock.advance(20)
    assert throttle.retry_after("10.0.0.1") == 0
    throttle.failed("10.0.0.2")
    clock.advance(60)  # both recovered: a third address makes room by forgetting them
    throttle.failed("10.0.0.3")
    assert set(throttle._buckets) == {"10.0.0.3"} and throttle.failures == 5
    assert FailedAuthThrottle(per_minute=0).retry_after("x") == 0  # 0: no throttle
