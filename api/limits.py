"""Per-credential request rate limit (token bucket). Full per-model/token limits come with Globus auth."""

from __future__ import annotations

import math
import time

from api.auth import Principal
from api.errors import APIError


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)

    def check(self, principal: Principal) -> None:
        """Take one request from the caller's bucket, or raise 429 with Retry-After."""
        rpm = principal.rpm
        if rpm <= 0:
            return
        key = principal.key_id or principal.user
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(rpm), now))
        tokens = min(float(rpm), tokens + (now - last) * rpm / 60.0)
        if tokens < 1.0:
            retry = math.ceil((1.0 - tokens) * 60.0 / rpm)
            self._buckets[key] = (tokens, now)
            raise APIError(
                429,
                f"Rate limit reached for {principal.user}: {rpm} requests per minute. Retry in {retry} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )
        self._buckets[key] = (tokens - 1.0, now)
