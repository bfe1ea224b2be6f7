"""Durable, append-only usage spool written on the gateway's request path.

Each process writes its own segment files, one JSON line per :class:`UsageRecord`::

    usage-<pid>-<start_ms>-<seq>.jsonl.open   while being written
    usage-<pid>-<start_ms>-<seq>.jsonl        once closed (renamed after the last write)

``start_ms`` is when the spool was created in that process (milliseconds since the epoch) and
``seq`` counts segments from 0.  A segment is rotated (closed and a new one started on the next
append) after ``max_records`` records or ``max_age_s`` seconds, so closed segments can be ingested
and deleted by :class:`analytics.store.UsageStore`.  Segments are created lazily, so an idle spool
leaves no empty files.

The writer holds an exclusive ``flock`` on its open segment for as long as it writes to it.  The
kernel drops that lock when the process dies, so an ingester that can take the lock knows the
segment is abandoned (robust against pid reuse); where ``flock`` is unsupported the pid in the
name is checked instead.  A process killed mid-write leaves at most one partial last line, which
the ingester never turns into a row.

``append`` costs a lock, a msgspec encode and one ``write(2)``: the line reaches the OS page cache
(it survives a crash of the process, not of the machine).  ``fsync=True`` adds an ``fsync`` per
record for machine-crash durability, at a much higher price.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import re
import threading
import time
import weakref
from pathlib import Path

import msgspec

from analytics.records import UsageRecord

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CLOSED_SUFFIX",
    "OPEN_SUFFIX",
    "SEGMENT_RE",
    "UsageSpool",
    "segment_owner_alive",
    "try_lock_segment",
]

CLOSED_SUFFIX = ".jsonl"
OPEN_SUFFIX = ".jsonl.open"
# usage-<pid>-<start_ms>-<seq>.jsonl[.open]
SEGMENT_RE = re.compile(r"^usage-(?P<pid>\d+)-(?P<start>\d+)-(?P<seq>\d+)\.jsonl(?P<open>\.open)?$")

_LOCK_UNSUPPORTED = {errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}

log = logging.getLogger("first.usage")


def try_lock_segment(fd: int) -> bool | None:
    """Try a non-blocking exclusive ``flock`` on ``fd``.

    Returns True when taken, False when someone else holds it, None when locking is unsupported.
    """
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in _LOCK_UNSUPPORTED:
            return None
        raise
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def segment_owner_alive(path: Path) -> bool:
    """Best-effort liveness of an open segment's writer from the pid in its name (fallback check)."""
    m = SEGMENT_RE.match(path.name)
    return bool(m) and pid_alive(int(m["pid"]))


# Spools alive in this process: closed at interpreter exit, reset in a forked child.
_SPOOLS: weakref.WeakSet[UsageSpool] = weakref.WeakSet()


def _close_all() -> None:
    for spool in list(_SPOOLS):
        with contextlib.suppress(Exception):
            spool.close()


def _after_fork_in_child() -> None:
    for spool in list(_SPOOLS):
        spool._reset_after_fork()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class UsageSpool:
    """Per-process append-only JSON-lines spool of :class:`UsageRecord` (thread-safe)."""

    def __init__(
        self,
        directory: Path,
        *,
        max_records: int = 10_000,
        max_age_s: float = 60.0,
        fsync: bool = False,
    ) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if max_age_s <= 0:
            raise ValueError("max_age_s must be > 0")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self.max_age_s = max_age_s
        self.fsync = fsync
        self._encoder = msgspec.json.Encoder()
        self._lock = threading.Lock()
        # Lines that could not be written (disk full, ...): kept in memory and written first by the next append or
        # retry that can, so that an answered request's row is not lost to a full disk. Bounded; past the bound the
        # oldest are dropped (counted in ``dropped``, and logged).
        self._backlog: list[bytes] = []
        self.max_backlog = 100_000
        self.dropped = 0
        self.failing_since: float | None = None  # time.monotonic() of the first failed write, until one succeeds
        self._init_process_state()
        _SPOOLS.add(self)

    # --- state ------------------------------------------------------------------------------

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._start_ms = time.time_ns() // 1_000_000
        self._seq = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._count = 0  # records in the current segment
        self._offset = 0  # bytes written to the current segment
        self._opened_at = 0.0  # time.monotonic() when the current segment was opened

    def _reset_after_fork(self) -> None:
        # The child must not write to (or rename) the parent's segment. Closing the inherited fd
        # leaves the parent's flock in place: the lock belongs to the shared open file description.
        self._lock = threading.Lock()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._init_process_state()

    @property
    def current_path(self) -> Path | None:
        """The segment being written (``.jsonl.open``), or None before the first append."""
        return self._path

    # --- segments ---------------------------------------------------------------------------

    def _open_segment(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        for _ in range(1000):
            name = f"usage-{self._pid}-{self._start_ms}-{self._seq:06d}{OPEN_SUFFIX}"
            self._seq += 1
            path = self.directory / name
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                continue
            if try_lock_segment(fd) is False or os.fstat(fd).st_nlink == 0:
                # An ingester claimed (and maybe deleted) the fresh empty file between our create
                # and our lock: abandon it and take the next name.
                os.close(fd)
                continue
            self._fd, self._path = fd, path
            self._count, self._offset = 0, 0
            self._opened_at = time.monotonic()
            return
        raise RuntimeError(f"could not create a spool segment in {self.directory}")

    def _close_segment(self) -> None:
        fd, path = self._fd, self._path
        if fd is None or path is None:
            return
        self._fd = self._path = None
        try:
            if self.fsync:
                os.fsync(fd)
            # Rename while still holding the lock: an ingester never sees an unlocked .open file
            # that is about to change.
            os.rename(path, path.with_name(path.name[: -len(".open")]))
            if self.fsync:
                _fsync_dir(self.directory)
        finally:
            os.close(fd)

    # --- public API -------------------------------------------------------------------------

    def append(self, record: UsageRecord, hold: bool = False) -> None:
        """Write one record as a JSON line to the current segment (one ``write(2)``), after any rows held in memory.

        Raises OSError if the line cannot be written (disk full, ...); the segment is then truncated back to its last
        complete line. With ``hold`` the row is also kept in memory, to be written by the next write that can.
        """
        self._write(self._encoder.encode(record) + b"\n", hold=hold)

    def hold(self, record: UsageRecord) -> None:
        """Append, and if the write fails keep the row in memory until a later write succeeds (never raises)."""
        with contextlib.suppress(OSError):
            self.append(record, hold=True)

    @property
    def healthy(self) -> bool:
        """False while writes fail (and rows wait in memory)."""
        return self.failing_since is None

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def retry(self) -> bool:
        """Write the rows held in memory, if any; True when none are left."""
        if not self._backlog:
            return True
        try:
            self._write(b"")
        except OSError:
            return False
        return True

    def _write(self, line: bytes, hold: bool = True) -> None:
        if self._pid != os.getpid():  # forked without register_at_fork
            self._reset_after_fork()
        with self._lock:
            try:
                if self._backlog:  # first one held row: while the disk stays full, a failure costs one small write
                    self._write_locked(self._backlog[0])
                    del self._backlog[0]
                held = b"".join(self._backlog)
                self._write_locked(held + line)
            except OSError:
                if hold and line:  # one row (``append``)
                    self._backlog.append(line)
                    if len(self._backlog) > self.max_backlog:
                        del self._backlog[0]
                        self.dropped += 1
                        log.error("usage spool: %d rows dropped, %d kept in memory (writes keep failing)",
                                  self.dropped, self.max_backlog)  # fmt: skip
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                raise
            if self._backlog:
                log.warning("usage spool: wrote %d rows held in memory while writes failed", len(self._backlog))
            self._backlog = []
            self.failing_since = None

    def _write_locked(self, line: bytes) -> None:
        if not line:
            return
        if self._fd is not None and (
            self._count >= self.max_records or time.monotonic() - self._opened_at >= self.max_age_s
        ):
            self._close_segment()
        if self._fd is None:
            self._open_segment()
        fd = self._fd
        assert fd is not None
        try:
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._offset)
                os.lseek(fd, self._offset, os.SEEK_SET)
            raise
        self._offset += len(line)
        self._count += line.count(b"\n")

    def rotate(self) -> None:
        """Close the current segment now (if any); the next append starts a new one."""
        with self._lock:
            if self._pid == os.getpid():
                self._close_segment()

    def close(self) -> None:
        """Close the current segment (renamed to ``.jsonl``). The spool may still be appended to. Rows still held in
        memory get one more try; if that fails too they go to the log, one JSON line each, for an operator."""
        if not self.retry():
            for line in self._backlog:
                log.error("usage row not written (the spool's writes fail): %s", line.decode(errors="replace").strip())
        self.rotate()

    def __enter__(self) -> UsageSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)
