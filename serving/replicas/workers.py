"""Several gateway worker processes on one host (``FIRST_WORKERS``, uvicorn's ``--workers``): each one is a replica
of the others, sharing state through Redis as replicas on several hosts do.

Each worker takes a stable name, ``<host>_<port>-w<i>``, by holding the lock of slot ``i`` for its lifetime: its
usage spool is a folder of its own, and a worker restarted by uvicorn takes the slot (and the spool) its
predecessor left, instead of a new folder per process id."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from core.settings import Settings

_held: list[IO[str]] = []  # the slot lock, open for the process's lifetime


class WorkerSetupError(RuntimeError):
    """Several workers were asked for in a way that cannot work; the message says what to change."""


def for_this_worker(settings: Settings) -> Settings:
    """The settings of this worker: unchanged for one worker; a replica name of its own for several."""
    if settings.workers <= 1:
        return settings
    if not settings.redis_url:
        raise WorkerSetupError(
            f"FIRST_WORKERS={settings.workers} needs FIRST_REDIS_URL: worker processes share their limits, caps, "
            "warm-ups and streams through Redis (docs/admin/production.md). Set it, or run one worker "
            "(FIRST_WORKERS=1)."
        )
    base = settings.replica or f"{socket.gethostname()}_{settings.port}"
    slots = settings.spool_root / ".workers"
    slots.mkdir(parents=True, exist_ok=True)
    for i in range(settings.workers * 4):  # a worker still exiting may hold its slot a moment: spares
        fh = open(slots / f"{base}-w{i}.lock", "w")  # held open while the process lives
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        fh.write(str(os.getpid()))
        fh.flush()
        _held.append(fh)
        name = f"{base}-w{i}"
        gateway_id = f"{settings.gateway_id}-w{i}" if settings.gateway_id else name
        return settings.model_copy(update={"replica": name, "gateway_id": gateway_id})
    raise WorkerSetupError(f"no free worker slot under {slots}: more than {settings.workers * 4} workers run there")


def worker_slots(settings: Settings) -> list[Path]:
    """The slot files of this host's workers (for status and tests)."""
    return sorted((settings.spool_root / ".workers").glob("*.lock"))
