"""Secrets the gateway reads from Prefect Secret blocks (an upstream API's key), cached briefly."""

from __future__ import annotations

import time

from prefect.blocks.system import Secret

CACHE_S = 300.0  # an edited secret reaches running gateways within this long
_cache: dict[str, tuple[float, str]] = {}


async def read_secret(name: str) -> str:
    """The value of the Secret block ``name`` (raises ValueError naming it if there is none)."""
    hit = _cache.get(name)
    if hit is not None and time.monotonic() - hit[0] < CACHE_S:
        return hit[1]
    try:
        block = await Secret.aload(name)
    except ValueError as exc:
        raise ValueError(f"no Prefect Secret block named {name!r} (create it in the UI: Blocks -> Secret)") from exc
    value = str(block.get())
    _cache[name] = (time.monotonic(), value)
    return value
