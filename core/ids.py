"""Identifiers the gateway hands out."""

from __future__ import annotations

import uuid


def new_request_id() -> str:
    """A request's id: the X-Request-Id header, its usage row, its flow run and its relay stream."""
    return uuid.uuid4().hex
