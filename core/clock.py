"""Clocks, injected where behaviour depends on time passing (cache lifetimes, reload intervals), so that a test
moves time on instead of sleeping through it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (token expiry, timestamps)."""
        ...

    def monotonic(self) -> float:
        """Seconds that only move forward (intervals, cache lifetimes)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that moves only when told: starts at the real time, ``advance(s)`` moves both readings on."""

    def __init__(self, start: float | None = None) -> None:
        self._time = time.time() if start is None else start
        self._monotonic = 1_000.0

    def time(self) -> float:
        return self._time

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._time += seconds
        self._monotonic += seconds
