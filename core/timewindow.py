"""Time bounds for usage queries, one parser for the CLI and the API.

A bound is ISO 8601 (a naive time is UTC; a date is its UTC midnight) or a span before now: a number and a
unit, s, m, h, d or w (``30m``, ``12h``, ``1.5d``, ``2w``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_EARLIEST = datetime(1, 1, 8, tzinfo=UTC)
_LATEST = datetime(9999, 12, 24, tzinfo=UTC)
FORMS = "an ISO 8601 time (2026-01-31T12:00:00Z, 2026-01-31) or a span before now (30m, 12h, 1d, 2w)"


class TimeBoundError(ValueError):
    """A bound in none of the accepted forms; the message names the forms."""


def parse_time_bound(value: str | None, now: datetime, name: str = "time") -> datetime | None:
    """The UTC time ``value`` means at ``now``; None for no bound (None or blank)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    m = _AGO.match(text.lower())
    try:
        if m:
            when = now - timedelta(**{_UNITS[m[2]]: float(m[1])})
        else:
            when = datetime.fromisoformat(text)
            when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        if not _EARLIEST <= when <= _LATEST:  # reports work in whole days around the bounds: keep a margin
            raise OverflowError
        return when
    except (OverflowError, ValueError):
        if m or _looks_like_a_time(text):
            raise TimeBoundError(f"'{name}' is out of range (0001-01-08 to 9999-12-24, UTC); got {value!r}") from None
        raise TimeBoundError(f"'{name}' must be {FORMS}; got {value!r}") from None


def _looks_like_a_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True
