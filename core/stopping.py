"""The process is stopping (Ctrl-C, SIGTERM): one signal that long waits watch.

A warm-up follows a starting server to /health for up to minutes. When the stack stops under it, the wait ends
within a poll and its flow run ends as Cancelled, saying the stack stopped, instead of Crashed ("Execution was
cancelled by the runtime environment"), and a caller waiting on a cold start gets a 503 that says why.

``first run`` sets it from its own signal handler; a gateway under uvicorn chains it in front of uvicorn's
(``watch_stop_signals``), so that it is set the moment the signal arrives, before uvicorn's graceful wait.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from core.errors import APIError

STOPPING = threading.Event()


def stopping_error(what: str = "", detail: str | None = None) -> APIError:
    """The caller's answer while this gateway stops: 503, retry soon (another replica, or this one once back)."""
    return APIError(503, f"This gateway is stopping{what}. Retry in a few seconds (another replica answers, or "
                    "this one once it is back).", code="gateway_stopping", headers={"Retry-After": "10"},
                    detail=detail)  # fmt: skip


STOPPED_MESSAGE = (
    "The FIRST stack was stopped (Ctrl-C or SIGTERM) while this run was under way; nothing failed. "
    "Run it again once the stack is back."
)


@contextmanager
def watch_stop_signals() -> Iterator[bool]:
    """While inside: SIGTERM and SIGINT set ``STOPPING``, then run the handler that was installed (uvicorn's);
    on leaving, that handler is put back. Only the main thread can install handlers: elsewhere (a test client's
    thread) nothing is done, and the value is False."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: FrameType | None) -> None:
        STOPPING.set()
        before = previous[signal.Signals(signum)]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:  # what the signal would have done: SIGINT raises, SIGTERM ends the process
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield True
    finally:
        for sig, before in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, before)
