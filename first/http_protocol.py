"""uvicorn's HTTP protocol with a header timeout: a connection must finish sending a request's headers within
``FIRST_HEADER_TIMEOUT_S`` of opening (or of the request's first byte), or it is closed.

uvicorn has none: a client that connects and sends nothing, or drips a header a byte at a time (slowloris), holds
its connection (and a slot of ``--limit-concurrency``) for ever. Run with ``--http first.http_protocol:Guarded``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.settings import get_settings


class Guarded(HttpToolsProtocol):
    header_timeout_s = get_settings().header_timeout_s

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._header_timer is None and self.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.logger.info("closed a connection from %s: no complete request headers within %g s",
                             self.client, self.header_timeout_s)  # fmt: skip
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # an idle kept-alive connection is the keep-alive timeout's (75 s)
