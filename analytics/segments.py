"""Spool segments as the usage store's ingest sees them: which to read (oldest first), reading and decoding
them, batching them, and letting go of a dead writer's segment once it is ingested."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import pyarrow as pa

from analytics.records import UsageRecord
from analytics.schema import ARROW_SCHEMA


class DecodedRow(UsageRecord, gc=False):
    """UsageRecord decoded for ingestion: untracked by the cyclic GC (halves the decode time)."""


@dataclass
class Segment:
    path: Path
    deletable: bool  # closed, or open with a dead writer
    size: int = 0
    records: list[UsageRecord] | None = None  # decoded here; None: a closed segment for read_json
    lock_fd: int | None = None  # held flock on a dead writer's open segment until it is deleted


@dataclass
class Batch:
    segments: list[Segment] = field(default_factory=list)
    bytes: int = 0

    def add(self, seg: Segment) -> None:
        self.segments.append(seg)
        self.bytes += seg.size


class ReadJsonRefused(Exception):
    """read_json could not take a closed segment as it is (a malformed line): decode it with msgspec."""


def oldest_first(spool_dir: Path) -> list[Path]:
    """The spool's files, and those of the folders in it (one per replica), by last write, oldest first: batches
    then hold requests close in time (the gateways' segments interleave), which keeps the table in ``ts`` order
    for the zone maps."""
    entries = []
    folders = [spool_dir]
    with os.scandir(spool_dir) as it:
        folders += [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    for folder in folders:
        with contextlib.suppress(FileNotFoundError), os.scandir(folder) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    if e.is_file(follow_symlinks=False):
                        entries.append((e.stat().st_mtime_ns, e.path))
    return [Path(p) for _, p in sorted(entries)]


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def read_file(path: Path) -> bytes:
    """A closed segment's complete lines (empty if it is gone: ingested by someone else)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b""
    return data[: data.rfind(b"\n") + 1]


def release(seg: Segment) -> None:
    if seg.lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(seg.lock_fd)  # closing drops the flock
        seg.lock_fd = None


def to_arrow(records: list[UsageRecord]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(list(map(attrgetter(f.name), records)), type=f.type) for f in ARROW_SCHEMA],
        schema=ARROW_SCHEMA,
    )
