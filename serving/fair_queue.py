"""Admission to a full model instance: a weighted fair queue per caller group, interactive before batch, and a
bounded wait.

While an instance has room (fewer requests in flight than its cluster's ``max_concurrency``, less the other
replicas' share) a request goes straight through. Once it is full, requests wait here instead of in vLLM's own
first-come-first-served queue, so that one tenant flooding a model cannot push everyone else's latency up:

- **priority**: interactive requests (0) always go before batch lines (1), and both before the callers of a
  project that spent its GPU-hours and is demoted rather than refused (2);
- **fairness**: within a priority, self-clocked fair queuing (Golestani, 1994) between *flows* (a caller's group,
  or the user when it has none). Each waiter gets a finish tag ``max(V, last finish of its flow) + 1/weight``;
  the smallest tag goes first, and ``V`` is the tag of the last one admitted. A flow with weight 2 gets twice the
  slots of a flow with weight 1 while both wait; a flow alone gets them all;
- **bounded wait**: a request that waits ``wait_s`` gets a 503 (or a 429 when its own flow holds more than its
  fair share of the queue: it is the flood) with a ``Retry-After`` from the real queue: its position over the
  slots, times the mean time a slot is held.

Single event loop, no locks: every method runs on the gateway's loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from core.errors import APIError

T = TypeVar("T")
INTERACTIVE, BATCH, DEMOTED = 0, 1, 2  # DEMOTED: a project whose GPU-hour budget is spent (serving/budgets.py)
RECHECK_S = 1.0  # waiters re-check the capacity this often (other replicas' load changes without a release here)


@dataclass(order=True)
class Entry(Generic[T]):
    priority: int
    finish: float
    seq: int
    flow: str = field(compare=False)
    item: T = field(compare=False)


class FairOrder(Generic[T]):
    """The order of a fair queue, without the waiting: priority first, then self-clocked fair queuing tags per
    flow. The gateway's FairQueue waits on it; ``bench/resource_sim.py`` replays it in simulated time."""

    def __init__(self) -> None:
        self.heap: list[Entry[T]] = []
        self.virtual = 0.0
        self.last_finish: dict[str, float] = {}
        self._seq = itertools.count()

    def push(self, flow: str, weight: float, priority: int, item: T) -> Entry[T]:
        if not self.heap:  # an idle queue starts afresh: old tags mean nothing now
            self.virtual, self.last_finish = 0.0, {}
        start = max(self.virtual, self.last_finish.get(flow, 0.0))
        finish = start + 1.0 / max(weight, 1e-6)
        self.last_finish[flow] = finish
        entry = Entry(priority, finish, next(self._seq), flow, item)
        heapq.heappush(self.heap, entry)
        return entry

    def pop(self) -> Entry[T]:
        entry = heapq.heappop(self.heap)
        self.virtual = entry.finish
        return entry

    def __len__(self) -> int:
        return len(self.heap)


_Waiter = Entry[asyncio.Future[None]]


class QueueFull(APIError):
    """A request waited its bound at a full instance."""


class FairQueue:
    """One instance's admission gate. ``capacity`` is read at every admission: it changes with the other
    replicas' load. ``clock`` times how long slots are held (for the Retry-After estimate)."""

    def __init__(self, capacity: Callable[[], int], clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.clock = clock
        self.admitted = 0
        self.order: FairOrder[asyncio.Future[None]] = FairOrder()
        self.hold_s = 1.0  # mean time a slot is held (exponentially weighted), for Retry-After
        self.served: dict[str, int] = {}  # admissions per flow that had to wait (what fairness shares out)
        self.timeouts = 0
        self.queued = 0  # waiters still waiting (the order also holds those that gave up, until they surface)

    @property
    def waiting(self) -> list[_Waiter]:
        return self.order.heap

    def _has_room(self) -> bool:
        return self.admitted < max(1, self.capacity())

    def try_enter(self) -> bool:
        """Admit at once if there is room and nobody waits (the fast path of every request)."""
        if self.queued == 0 and self._has_room():
            self.admitted += 1
            return True
        return False

    def enqueue(self, flow: str, weight: float, priority: int) -> _Waiter:
        waiter = self.order.push(flow, weight, priority, asyncio.get_running_loop().create_future())
        self.queued += 1
        return waiter

    def give_up(self, waiter: _Waiter) -> None:
        waiter.item.cancel()
        self.queued -= 1

    def dispatch(self) -> None:
        """Admit waiters, best tag first, while there is room."""
        while self.order and self._has_room():
            waiter = self.order.pop()
            if waiter.item.done():  # gave up waiting
                continue
            self.queued -= 1
            self.admitted += 1
            self.served[waiter.flow] = self.served.get(waiter.flow, 0) + 1
            waiter.item.set_result(None)

    def leave(self, held_s: float) -> None:
        self.admitted -= 1
        self.hold_s = 0.8 * self.hold_s + 0.2 * held_s
        self.dispatch()

    def retry_after_s(self, position: int) -> int:
        """Seconds until ``position`` waiters ahead would be through, at the current capacity and hold time."""
        return max(1, math.ceil(math.ceil(position / max(1, self.capacity())) * self.hold_s))

    def over_share(self, flow: str) -> bool:
        """Whether ``flow`` holds more than an even share of the waiting requests (it is the flood)."""
        waiting = [w.flow for w in self.waiting if not w.item.done()]
        flows = set(waiting)
        return len(flows) > 1 and waiting.count(flow) > len(waiting) / len(flows)


@dataclass
class Slot:
    """An admission: ``waited_s`` in the queue; ``release`` once the request is done with the instance."""

    queue: FairQueue
    waited_s: float
    entered: float

    def release(self) -> None:
        self.queue.leave(self.queue.clock() - self.entered)


async def enter(queue: FairQueue, flow: str, weight: float, priority: int, wait_s: float, where: str) -> Slot:
    """Wait for a slot of ``queue`` (see the module docstring); raises QueueFull after ``wait_s``."""
    t0 = queue.clock()
    if queue.try_enter():
        return Slot(queue, 0.0, t0)
    waiter = queue.enqueue(flow, weight, priority)
    queue.dispatch()
    deadline = time.monotonic() + wait_s
    try:
        while not waiter.item.done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait({waiter.item}, timeout=min(RECHECK_S, left))
            if not waiter.item.done():
                queue.dispatch()  # the other replicas' share may have shrunk
    except BaseException:  # the request itself was cancelled while it waited: its place, or slot, goes back
        if waiter.item.done():
            queue.leave(0.0)
        else:
            queue.give_up(waiter)
        raise
    if waiter.item.done():
        now = queue.clock()
        return Slot(queue, now - t0, now)
    ahead = sum(1 for w in queue.waiting if not w.item.done() and w < waiter)
    flood = queue.over_share(flow)
    queue.give_up(waiter)
    queue.timeouts += 1
    retry = queue.retry_after_s(ahead + 1)
    if flood:
        raise QueueFull(
            429, f"{where} is at capacity and requests of your group '{flow}' fill more than its fair share of the "
            f"queue ({ahead} ahead of this one after {wait_s:.0f} s). Send fewer at once, or retry in {retry} s.",
            type="rate_limit_error", code="fair_share_exceeded", headers={"Retry-After": str(retry)},
        )  # fmt: skip
    raise QueueFull(
        503, f"{where} is at capacity ({queue.admitted} requests in flight, {ahead} waiting ahead of this one after "
        f"{wait_s:.0f} s). Retry in {retry} s.", code="model_busy", headers={"Retry-After": str(retry)},
    )  # fmt: skip
