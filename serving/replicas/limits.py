"""Rate limits and per-caller caps that hold across gateway replicas: the token buckets of ``serving/limits.py``,
kept in Redis and changed by Lua scripts, so that a check and its take are one atomic step on the server whatever
replica a request reaches. A burst spread over replicas admits no more than the limit; a reservation is settled
with the real usage as on one gateway. Times come from Redis's own clock (``TIME``), never the replicas'.

A caller's requests in flight are a sorted set per caller and model, one member per request, scored with the time
its replica last vouched for it; each replica renews its members every ``RENEW_S`` and a member not renewed for
``STALE_S`` is dropped: a replica that dies frees its callers' slots within that bound.

While Redis is down (``SharedStateDown``), ``Admission`` uses this replica's own ``RateLimiter``: limits hold per
replica (N replicas admit up to N times a limit) until Redis answers again, and ``/v1/status`` says so. That is the
documented degraded behaviour; authentication never depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

from serving.limits import (
    Limit,
    RateLimiter,
    Reservation,
    check_fits,
    rate_limited,
    too_many_in_flight,
)
from serving.replicas.store import SharedStateDown, SharedStore

log = logging.getLogger("first.replicas")
RENEW_S = 10.0
STALE_S = 45.0
BUCKET_TTL_MS = 180_000  # an idle bucket is full after 60 s: forget it a while after that

# KEYS: the buckets. ARGV: per bucket its capacity then its cost. Returns {1} or {0, bucket index, wait seconds}.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2 * i - 1])
  local cost = tonumber(ARGV[2 * i])
  local h = redis.call('HMGET', KEYS[i], 'level', 'ts', 'cap')
  local level, ts, old = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if level == nil then level, ts, old = cap, now, cap end
  if old ~= cap then level = math.min(cap, level + cap - old) end
  level = math.min(cap, level + math.max(0, now - ts) * cap / 60.0)
  if level < cost then return {0, i, tostring((cost - level) * 60.0 / cap)} end
  levels[i] = level
end
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], 'level', tostring(levels[i] - tonumber(ARGV[2 * i])), 'ts', tostring(now),
             'cap', ARGV[2 * i - 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[#ARGV])
end
return {1}
"""
# KEYS: token buckets. ARGV: per bucket its capacity, then the refund (negative: a debt). Refills first.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local refund = tonumber(ARGV[#ARGV])
for i = 1, #KEYS do
  local cap = tonumber(ARGV[i])
  local h = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level, ts = tonumber(h[1]), tonumber(h[2])
  if level ~= nil then
    level = math.min(cap, level + math.max(0, now - ts) * cap / 60.0)
    redis.call('HSET', KEYS[i], 'level', tostring(math.min(cap, level + refund)), 'ts', tostring(now))
  end
end
return 1
"""
# KEYS[1]: the caller's slots. ARGV: cap, this request's member, stale seconds. Returns 1 (taken) or 0 (full).
ENTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 2))
return 1
"""
# ENTER then RESERVE in one step. KEYS[1]: the caller's slots; KEYS[2..]: the buckets. ARGV: cap (0: none), member,
# stale seconds, bucket TTL ms, then per bucket its capacity and cost. Returns {1}, {0, 0} (slots full) or
# {0, bucket index, wait seconds}; takes nothing unless it takes everything.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap = tonumber(ARGV[1])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
  if redis.call('ZCARD', KEYS[1]) >= cap then return {0, 0} end
end
local levels = {}
for i = 2, #KEYS do
  local c, cost = tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
  local h = redis.call('HMGET', KEYS[i], 'level', 'ts', 'cap')
  local level, ts, old = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if level == nil then level, ts, old = c, now, c end
  if old ~= c then level = math.min(c, level + c - old) end
  level = math.min(c, level + math.max(0, now - ts) * c / 60.0)
  if level < cost then return {0, i - 1, tostring((cost - level) * 60.0 / c)} end
  levels[i] = level
end
for i = 2, #KEYS do
  redis.call('HSET', KEYS[i], 'level', tostring(levels[i] - tonumber(ARGV[2 * i + 2])), 'ts', tostring(now),
             'cap', ARGV[2 * i + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
if cap > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 2))
end
return {1}
"""
# KEYS: slot sets; ARGV: their members, in the same order. Re-scores the members still there with Redis's time.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], 'XX', now, ARGV[i]) end
return 1
"""


class SharedLimits:
    """The Redis side: each call raises ``SharedStateDown`` when Redis does not answer."""

    def __init__(self, store: SharedStore, stale_s: float = STALE_S, renew_s: float = RENEW_S) -> None:
        self.store, self.stale_s, self.renew_s = store, stale_s, renew_s
        r = store.redis
        self._reserve, self._settle = r.register_script(RESERVE), r.register_script(SETTLE)
        self._enter, self._renew = r.register_script(ENTER), r.register_script(RENEW)
        self._admit = r.register_script(ADMIT)
        self._held: dict[tuple[str, str], None] = {}  # this replica's slots, renewed every RENEW_S

    async def enter(self, key: str, cap: int, what: str, into: Reservation) -> None:
        zset, member = self.store.key("inflight", key), f"{self.store.replica_id}:{secrets.token_hex(6)}"
        taken = await self.store.run(lambda: self._enter(keys=[zset], args=[cap, member, self.stale_s]))
        if not int(taken):
            raise too_many_in_flight(what, cap)
        into.shared_slot = (zset, member)
        self._held[(zset, member)] = None

    async def admit(
        self, key: str, cap: int, what: str, user: str, limits: list[Limit], tokens: int, into: Reservation
    ) -> None:
        """``enter`` and ``reserve`` in one Redis call (the serving path's one round trip before a request runs)."""
        keys, args, owners, token_buckets = self._buckets(limits, tokens)
        zset, member = self.store.key("inflight", key), f"{self.store.replica_id}:{secrets.token_hex(6)}"
        argv = [cap, member, self.stale_s, BUCKET_TTL_MS, *args]
        answer = await self.store.run(lambda: self._admit(keys=[zset, *keys], args=argv))
        if not int(answer[0]):
            if int(answer[1]) == 0:
                raise too_many_in_flight(what, cap)
            limit, kind = owners[int(answer[1]) - 1]
            raise rate_limited(user, limit, kind, float(answer[2]))
        if cap:
            into.shared_slot = (zset, member)
            self._held[(zset, member)] = None
        into.shared_token_buckets.extend(token_buckets)
        into.tokens = tokens

    def _buckets(
        self, limits: list[Limit], tokens: int
    ) -> tuple[list[str], list[Any], list[tuple[Limit, str]], list[tuple[str, int]]]:
        """Each bucket's key, its (capacity, cost) arguments, its limit and kind (to name it in a 429), and the
        token buckets with their capacities (what settling refunds)."""
        keys: list[str] = []
        args: list[Any] = []
        owners: list[tuple[Limit, str]] = []
        token_buckets: list[tuple[str, int]] = []
        for limit in limits:
            if limit.limits.rpm:
                keys.append(self.store.key("bucket", limit.key, "rpm"))
                args += [limit.limits.rpm, 1]
                owners.append((limit, "rpm"))
            if limit.limits.tpm:
                check_fits(limit, tokens)
                keys.append(self.store.key("bucket", limit.key, "tpm"))
                args += [limit.limits.tpm, tokens]
                owners.append((limit, "tpm"))
                token_buckets.append((keys[-1], limit.limits.tpm))
        return keys, args, owners, token_buckets

    async def reserve(self, user: str, limits: list[Limit], tokens: int, into: Reservation) -> None:
        keys, args, owners, token_buckets = self._buckets(limits, tokens)
        if not keys:
            return
        answer = await self.store.run(lambda: self._reserve(keys=keys, args=[*args, BUCKET_TTL_MS]))
        if not int(answer[0]):
            limit, kind = owners[int(answer[1]) - 1]
            raise rate_limited(user, limit, kind, float(answer[2]))
        into.shared_token_buckets.extend(token_buckets)
        into.tokens = tokens

    async def settle(self, res: Reservation, used_tokens: int) -> None:
        slot, res.shared_slot = res.shared_slot, None
        buckets, res.shared_token_buckets = res.shared_token_buckets, []
        if slot is not None:
            self._held.pop(slot, None)
        refund = res.tokens - used_tokens

        async def both() -> None:
            pipe = self.store.redis.pipeline(transaction=False)
            if slot is not None:
                pipe.zrem(slot[0], slot[1])
            if buckets and refund:
                await self._settle(keys=[k for k, _ in buckets], args=[*(c for _, c in buckets), refund], client=pipe)
            await pipe.execute()

        if slot is not None or (buckets and refund):
            await self.store.run(both)

    async def renew_forever(self) -> None:
        """Vouch for this replica's requests in flight (their slots), every ``renew_s``, while the gateway runs."""
        while True:
            await asyncio.sleep(self.renew_s)
            held = list(self._held)
            if held:
                keys, members = [z for z, _ in held], [m for _, m in held]
                with contextlib.suppress(SharedStateDown):
                    await self.store.run(lambda k=keys, m=members: self._renew(keys=k, args=m))


class Admission:
    """What the serving steps call: limits shared across replicas when Redis is configured and answers, else this
    process's own (``RateLimiter``). A request's reservation is settled where it was taken."""

    def __init__(self, local: RateLimiter | None = None, shared: SharedLimits | None = None) -> None:
        self.local = local or RateLimiter()
        self.shared = shared
        self._settling: set[asyncio.Task[None]] = set()  # settlements under way in Redis

    async def enter(self, key: str, cap: int, what: str, into: Reservation) -> None:
        if not cap:
            return
        if self.shared is not None:
            with contextlib.suppress(SharedStateDown):
                return await self.shared.enter(key, cap, what, into)
        self.local.enter(key, cap, what, into)

    async def reserve(
        self, user: str, limits: list[Limit], tokens: int, into: Reservation | None = None
    ) -> Reservation:
        res = into or Reservation()
        if self.shared is not None:
            with contextlib.suppress(SharedStateDown):
                await self.shared.reserve(user, limits, tokens, res)
                return res
        return self.local.reserve(user, limits, tokens, res)

    async def admit(
        self, key: str, cap: int, what: str, user: str, limits: list[Limit], tokens: int, into: Reservation
    ) -> None:
        """The cap on a caller's requests in flight, then the limits, or neither (429): one Redis round trip."""
        if self.shared is not None:
            with contextlib.suppress(SharedStateDown):
                return await self.shared.admit(key, cap, what, user, limits, tokens, into)
        if cap:
            self.local.enter(key, cap, what, into)
        self.local.reserve(user, limits, tokens, into)

    async def settle(self, res: Reservation, used_tokens: int) -> None:
        """Give back what was not used, and the slot. The Redis part runs after the response, off its path."""
        if res.settled:
            return
        if self.shared is not None and (res.shared_slot is not None or res.shared_token_buckets):
            task = asyncio.get_running_loop().create_task(self._settle_shared(self.shared, res, used_tokens))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        self.local.settle(res, used_tokens)

    async def settled(self) -> None:
        """Wait for the settlements still under way in Redis (tests, shutdown)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    @staticmethod
    async def _settle_shared(shared: SharedLimits, res: Reservation, used_tokens: int) -> None:
        with contextlib.suppress(SharedStateDown):  # unreachable: the slot lapses in STALE_S, buckets refill
            await shared.settle(res, used_tokens)

    def inflight(self, key: str) -> int:
        """This replica's own count (the one the embedded default uses)."""
        return self.local.inflight(key)
