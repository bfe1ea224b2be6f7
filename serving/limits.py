"""Rate limits: requests and tokens per minute, per user and per model (and per cluster), as token buckets.

Tokens are *reserved* before a request runs (its prompt estimate plus ``max_tokens``) and *settled* with
the real usage after it. A check-then-record limiter lets a burst of N concurrent requests all pass the
check before any of them records, and overshoot the limit N-fold; reserving first makes the sum of what
is in flight fit the bucket. Over-estimates are refunded at settlement, under-estimates become debt.

All of it runs on the gateway's event loop with no ``await`` between check and take, so each reservation
is atomic across its buckets. Several gateway replicas share theirs in Redis instead (``serving/replicas/limits.py``,
the same buckets in Lua), and fall back to these while Redis is down.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from blocks.registry import RateLimits
from core.clock import SYSTEM_CLOCK, Clock
from core.errors import APIError


@dataclass
class _Bucket:
    capacity: float
    level: float
    last: float  # monotonic time of the last refill

    def refill(self, capacity: float, now: float) -> None:
        if capacity != self.capacity:  # the limit was edited: keep what was used, at the new size
            self.level = min(capacity, self.level + capacity - self.capacity)
            self.capacity = capacity
        self.level = min(capacity, self.level + (now - self.last) * capacity / 60.0)
        self.last = now


@dataclass
class Reservation:
    """What one request holds: the token buckets it drew from and how much it reserved from each."""

    tokens: int = 0
    token_buckets: list[_Bucket] = field(default_factory=list)
    settled: bool = False
    slot: str | None = None  # the concurrency slot it holds (a caller's cap on requests in flight per model)
    # Held in the replicas' Redis instead (serving/replicas/limits.py): token bucket keys and sizes, and the slot.
    shared_token_buckets: list[tuple[str, int]] = field(default_factory=list)
    shared_slot: tuple[str, str] | None = None  # (its sorted set, this request's member)


@dataclass(frozen=True)
class Limit:
    """One limit to enforce: which bucket (``key``), its size, and how to name it in a 429."""

    key: str
    limits: RateLimits
    label: str  # e.g. "model tiny" or "your API key"


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._inflight: dict[str, int] = {}  # concurrency slots in use, per caller and model

    def enter(self, key: str, cap: int, what: str, into: Reservation) -> None:
        """Take one of ``cap`` concurrency slots of ``key`` (0: no cap) for the request, or refuse it with 429:
        one caller's 65th stream must not take a share of everyone's capacity. Freed by ``settle``."""
        if not cap:
            return
        n = self._inflight.get(key, 0)
        if n >= cap:
            raise too_many_in_flight(what, cap)
        self._inflight[key] = n + 1
        into.slot = key

    def inflight(self, key: str) -> int:
        return self._inflight.get(key, 0)

    def _bucket(self, key: str, kind: str, capacity: int, now: float) -> _Bucket:
        bucket = self._buckets.get((key, kind))
        if bucket is None:
            bucket = self._buckets[(key, kind)] = _Bucket(float(capacity), float(capacity), now)
        bucket.refill(float(capacity), now)
        return bucket

    def reserve(self, user: str, limits: list[Limit], tokens: int, into: Reservation | None = None) -> Reservation:
        """Take one request and ``tokens`` tokens from every applicable bucket, or none of them (429)."""
        now = time.monotonic()
        requests: list[_Bucket] = []
        token_buckets: list[_Bucket] = []
        for limit in limits:
            rpm, tpm = limit.limits.rpm, limit.limits.tpm
            if rpm:
                b = self._bucket(limit.key, "rpm", rpm, now)
                if b.level < 1.0:
                    raise rate_limited(user, limit, "rpm", (1.0 - b.level) * 60.0 / rpm)
                requests.append(b)
            if tpm:
                check_fits(limit, tokens)
                b = self._bucket(limit.key, "tpm", tpm, now)
                if b.level < tokens:
                    raise rate_limited(user, limit, "tpm", (tokens - b.level) * 60.0 / tpm)
                token_buckets.append(b)
        for b in requests:
            b.level -= 1.0
        for b in token_buckets:
            b.level -= tokens
        res = into or Reservation()
        res.token_buckets.extend(token_buckets)
        res.tokens = tokens
        return res

    def settle(self, res: Reservation, used_tokens: int) -> None:
        """Give back what was reserved but not used (or charge the excess), and the concurrency slot. Idempotent."""
        if res.settled:
            return
        res.settled = True
        if res.slot is not None:
            left = self._inflight.get(res.slot, 1) - 1
            if left > 0:
                self._inflight[res.slot] = left
            else:
                self._inflight.pop(res.slot, None)
        for b in res.token_buckets:
            b.level = min(b.capacity, b.level + res.tokens - used_tokens)


def rate_limited(user: str, limit: Limit, kind: str, wait_s: float) -> APIError:
    """The 429 of a full bucket (``kind`` rpm or tpm), with the wait until it holds enough."""
    retry = max(1, math.ceil(wait_s))
    per_minute = f"{limit.limits.rpm} requests" if kind == "rpm" else f"{limit.limits.tpm} tokens"
    return APIError(
        429,
        f"Rate limit reached for {user}: {per_minute} per minute for {limit.label}. Retry in {retry} s.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry)},
    )


def check_fits(limit: Limit, tokens: int) -> None:
    """A request larger than a whole minute's tokens can never pass: say so rather than 'retry later'."""
    if tokens > limit.limits.tpm:
        raise APIError(
            429,
            f"This request needs up to {tokens} tokens (prompt + max_tokens), more than the {limit.limits.tpm} "
            f"tokens per minute allowed for {limit.label}. Lower max_tokens or shorten the prompt.",
            code="tokens_exceed_limit",
        )


def too_many_in_flight(what: str, cap: int) -> APIError:
    return APIError(
        429,
        f"Too many requests in flight: {what} allows {cap} at once. Wait for some to finish.",
        code="too_many_concurrent_requests",
        headers={"Retry-After": "1"},
    )


class FailedAuthThrottle:
    """Failed authentications per client address, as a token bucket (``per_minute``, refilled continuously).

    An address over its budget gets 429 before its credential is looked at, unless the credential is one the
    authenticator already knows (a cached Globus token, a local key): a flood of bogus tokens from one address
    then costs no Globus introspection and no spool row, and a real caller behind the same address still gets in.
    """

    def __init__(self, per_minute: int, clock: Clock = SYSTEM_CLOCK, max_addresses: int = 50_000) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.max_addresses = max_addresses
        self._buckets: dict[str, _Bucket] = {}
        self.failures = 0  # 401s so far (metrics)
        self.refused = 0  # 429s so far: requests from an address over its budget, with a credential not known

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try an unknown credential again (0: it may now)."""
        bucket = self._buckets.get(address)
        if not self.per_minute or bucket is None:
            return 0.0
        bucket.refill(self.per_minute, self.clock.monotonic())
        return 0.0 if bucket.level >= 1 else (1 - bucket.level) * 60.0 / self.per_minute

    def failed(self, address: str) -> None:
        self.failures += 1
        if not self.per_minute:
            return
        now = self.clock.monotonic()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self.max_addresses:
                self._forget_recovered(now)
            bucket = self._buckets[address] = _Bucket(self.per_minute, self.per_minute, now)
        bucket.refill(self.per_minute, now)
        bucket.level = max(0.0, bucket.level - 1)

    def _forget_recovered(self, now: float) -> None:
        """Drop addresses whose budget has refilled (they are as if new); if all are still spent, the oldest."""
        for address, bucket in list(self._buckets.items()):
            bucket.refill(self.per_minute, now)
            if bucket.level >= self.per_minute:
                del self._buckets[address]
        while len(self._buckets) >= self.max_addresses:
            del self._buckets[next(iter(self._buckets))]
