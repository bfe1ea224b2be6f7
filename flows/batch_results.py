"""What the ``run-batch`` flow's tasks share: a batch's results so far, its chunks, and its progress.

``Results`` are two append-only JSON-lines files (``output.jsonl`` for lines answered 2xx, ``errors.jsonl`` for
the rest) in the batch's folder; a line is written to one of them once, after its answer, with one ``write(2)``,
so each line of the input appears in exactly one of them, and a resumed run reads them back to skip what is done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from prefect import get_run_logger
from prefect.artifacts import aupdate_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext

from core.settings import Settings
from serving.batches.files import FileStore
from serving.batches.lines import BatchLine
from serving.batches.store import Batch, BatchStore

log = logging.getLogger("first.batch")
POLL_S = 1.0  # how often a chunk reads the batch's state (a cancel) and writes its progress


class Results:
    """The answered lines of one batch: two append-only JSON-lines files, and what they hold."""

    def __init__(self, folder: Path) -> None:
        self.output, self.errors = folder / "output.jsonl", folder / "errors.jsonl"
        self.done: set[str] = set()
        self.completed = self.failed = 0
        self.usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for path in (self.output, self.errors):
            for doc in read_back(path):
                self._count(doc, path is self.output)

    def _count(self, doc: dict[str, Any], ok: bool) -> None:
        self.done.add(doc["custom_id"])
        if ok:
            self.completed += 1
            usage = ((doc.get("response") or {}).get("body") or {}).get("usage") or {}
            prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            self.usage["input_tokens"] += prompt
            self.usage["output_tokens"] += completion
            self.usage["total_tokens"] += int(usage.get("total_tokens") or prompt + completion)
        else:
            self.failed += 1

    def add(self, doc: dict[str, Any], ok: bool) -> None:
        """One line's answer, appended with one write (a crash leaves at most a partial last line, dropped on
        resume)."""
        path = self.output if ok else self.errors
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, msgspec.json.encode(doc) + b"\n")
        finally:
            os.close(fd)
        self._count(doc, ok)


def read_back(path: Path) -> Iterator[dict[str, Any]]:
    """The whole lines of a results file; a partial last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    for raw in data[:end].splitlines():
        if raw.strip():
            yield json.loads(raw)


def run_logger() -> Any:
    """The run's logger inside a flow or task run (the UI shows it), else the module's."""
    return get_run_logger() if FlowRunContext.get() or TaskRunContext.get() else log


def stores(settings: Settings) -> tuple[BatchStore, FileStore]:
    root = settings.batches_root
    return BatchStore(root), FileStore(root, settings.max_file_bytes, settings.file_quota_bytes)


@dataclass
class Chunk:
    """Requests ``first`` to ``last`` (positions among the input's requests, from 0); the first of them is line
    ``line`` of the file, at byte ``offset``."""

    first: int
    last: int
    offset: int
    line: int


# The results of the batches this process runs, read from disk by ``plan`` at the start of each run.
_RESULTS: dict[str, Results] = {}


def results_of(batches: BatchStore, batch_id: str, fresh: bool = False) -> Results:
    """The batch's results in this process; ``fresh`` reads them back from disk (the start of a run)."""
    if fresh or batch_id not in _RESULTS:
        _RESULTS[batch_id] = Results(batches.folder(batch_id))
    return _RESULTS[batch_id]


def forget_results(batch_id: str) -> Results | None:
    return _RESULTS.pop(batch_id, None)


def custom_id(raw: bytes) -> str:
    return str(msgspec.json.decode(raw, type=BatchLine).custom_id)


_niced = False


def yield_cpu(niceness: int) -> None:
    """Lower this process's CPU priority once: batch work waits for interactive work on a shared host."""
    global _niced
    if not _niced and niceness:
        with contextlib.suppress(OSError):
            os.nice(niceness)
        _niced = True


def stopping(state: dict[str, Any]) -> bool:
    return state["status"] == "cancelling" or bool(state["expired"])


async def sync_progress(
    batches: BatchStore, batch_id: str, results: Results, state: dict[str, Any], progress: Any
) -> None:
    """Write the counts and usage so far into the batch; read back whether it was cancelled or expired."""

    def counts(b: Batch) -> None:
        b.heartbeat_at = time.time()
        b.request_counts.completed, b.request_counts.failed = results.completed, results.failed
        b.usage = dict(results.usage)
        state["status"] = b.status
        state["expired"] = time.time() > b.expires_at

    b = batches.update(batch_id, counts)
    if progress is not None and b.request_counts.total:
        done = (results.completed + results.failed) / b.request_counts.total
        note = f"{results.completed} answered, {results.failed} failed"
        await aupdate_progress_artifact(progress, round(100 * done, 1), description=note)


def finish(b: Batch, status: str, code: str | None = None, message: str | None = None) -> None:
    now = int(time.time())
    b.status = status
    setattr(b, {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at",
                "failed": "failed_at"}[status], now)  # fmt: skip
    if code:
        b.errors = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}
