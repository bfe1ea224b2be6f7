"""The ``run-batch`` flow: one batch, start to end, as a Prefect flow run that operators watch and cancel.

Tasks, in the order the UI shows them: ``validate`` (the input is there, the batch still wanted), ``plan`` (the
chunks of lines not answered yet: a resumed run skips what a dead one finished), one ``run-chunk`` per chunk,
and ``finalize`` (the output and error files become the caller's files, the batch gets its final state). A
progress artifact (``batch-<id>``) follows the lines as they finish.

Each line goes through a gateway's own serving path (routing, warm-up, failover, metering) as the batch's owner,
with the batch's credential (``serving/batches/tokens.py``) and its line number as its request id, so a line sent
again after a crash keeps one usage row. The gateway runs batch lines in the instance's batch lane (a share of its
slots) and never counts them against the owner's interactive limits.

A line is written to ``output.jsonl`` (answered 2xx) or ``errors.jsonl`` (anything else) once, after its answer:
each line of the input appears in exactly one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext

from core.settings import Settings, get_settings
from serving.batches.files import FileStore
from serving.batches.lines import BatchLine, read_lines, read_lines_at
from serving.batches.store import Batch, BatchStore
from serving.batches.tokens import BatchTokens

log = logging.getLogger("first.batch")
RETRY_STATUSES = frozenset({429, 502, 503, 504})  # the gateway is busy or a cluster was: try the line again
MAX_TRIES = 4
POLL_S = 1.0  # how often a chunk reads the batch's state (a cancel) and writes its progress


class Results:
    """The answered lines of one batch: two append-only JSON-lines files, and what they hold."""

    def __init__(self, folder: Path) -> None:
        self.output, self.errors = folder / "output.jsonl", folder / "errors.jsonl"
        self.done: set[str] = set()
        self.completed = self.failed = 0
        self.usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for path in (self.output, self.errors):
            for doc in _read_back(path):
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


def _read_back(path: Path) -> Iterator[dict[str, Any]]:
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


# ---- tasks ----


@task(name="validate", cache_policy=NO_CACHE)
def validate(batch_id: str) -> Batch:
    """The batch is still wanted and its input is there; it is now ``in_progress``."""
    settings = get_settings()
    batches, files = stores(settings)

    def start(b: Batch) -> None:
        b.heartbeat_at = time.time()
        if b.status == "validating":
            b.status, b.in_progress_at = "in_progress", int(time.time())

    batch = batches.get(batch_id)
    if batch.active and batch.status != "cancelling":
        if not files.data_path(batch.input_file_id).exists():
            why = "the input file was deleted before the batch ran"
            return batches.update(batch_id, lambda b: _finish(b, "failed", "input_file_missing", why))
        batch = batches.update(batch_id, start)
    return batch


@task(name="plan", cache_policy=NO_CACHE)
def plan(batch_id: str, chunk_lines: int) -> list[Chunk]:
    """The chunks of the input (``chunk_lines`` requests each) that still hold unanswered lines. The lines
    answered so far are read back from the results files here, at the start of every run of the batch."""
    settings = get_settings()
    batches, files = stores(settings)
    batch = batches.get(batch_id)
    results = _RESULTS[batch_id] = Results(batches.folder(batch_id))
    chunks: list[Chunk] = []
    todo = 0
    for i, (n, raw, offset) in enumerate(read_lines_at(files.data_path(batch.input_file_id))):
        if _custom_id(raw) in results.done:
            continue
        todo += 1
        if chunks and i < chunks[-1].first + chunk_lines:
            chunks[-1].last = i
        else:
            chunks.append(Chunk(first=i, last=i, offset=offset, line=n))
    run_logger().info("%d of %d lines to run, in %d chunks", todo, batch.request_counts.total, len(chunks))
    return chunks


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


def _results(batches: BatchStore, batch_id: str) -> Results:
    if batch_id not in _RESULTS:
        _RESULTS[batch_id] = Results(batches.folder(batch_id))
    return _RESULTS[batch_id]


def _custom_id(raw: bytes) -> str:
    return str(msgspec.json.decode(raw, type=BatchLine).custom_id)


@task(name="run-chunk", task_run_name="lines {chunk.first}-{chunk.last}", cache_policy=NO_CACHE)
async def run_chunk(batch_id: str, chunk: Chunk, gateway_url: str, progress: Any = None) -> str:
    """Send the chunk's unanswered lines through the gateway, ``batch_concurrency`` at a time; stop sending when
    the batch is cancelled or its window passes. Returns the batch's state."""
    settings = get_settings()
    _yield_cpu(settings.batch_nice)
    batches, files = stores(settings)
    batch = batches.get(batch_id)
    results = _results(batches, batch_id)
    token = BatchTokens(settings.batch_secret_path).issue(batch_id)
    state = {"status": batch.status, "expired": False}
    lines = list(itertools.islice(read_lines(files.data_path(batch.input_file_id), chunk.offset, chunk.line),
                                  chunk.last - chunk.first + 1))  # fmt: skip
    gate = asyncio.Semaphore(settings.batch_concurrency)
    timeout = httpx.Timeout(settings.request_timeout_s + settings.warm_wait_s, connect=10)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"}) as client:  # fmt: skip

        async def one(n: int, raw: bytes) -> None:
            async with gate:
                line = msgspec.json.decode(raw, type=BatchLine)
                if line.custom_id in results.done or _stopping(state):
                    return
                doc, ok = await _send(client, batch_id, n, line)
                if doc is not None:
                    results.add(doc, ok)

        async def watch() -> None:
            while True:
                await asyncio.sleep(POLL_S)
                await _sync(batches, batch_id, results, state, progress)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.gather(*(one(n, raw) for n, raw in lines))
        finally:
            watcher.cancel()
    await _sync(batches, batch_id, results, state, progress)
    return "expired" if state["expired"] else str(state["status"])


_niced = False


def _yield_cpu(niceness: int) -> None:
    """Lower this process's CPU priority once: batch work waits for interactive work on a shared host."""
    global _niced
    if not _niced and niceness:
        with contextlib.suppress(OSError):
            os.nice(niceness)
        _niced = True


def _stopping(state: dict[str, Any]) -> bool:
    return state["status"] == "cancelling" or bool(state["expired"])


async def _sync(batches: BatchStore, batch_id: str, results: Results, state: dict[str, Any], progress: Any) -> None:
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


async def _send(client: httpx.AsyncClient, batch_id: str, n: int, line: BatchLine) -> tuple[dict | None, bool]:
    """One line through the gateway, retried while the gateway or the cluster is busy; its result line."""
    doc: dict[str, Any] = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": line.custom_id}
    last_error = "no answer"
    for attempt in range(MAX_TRIES):
        try:
            r = await client.post(line.url, json=line.body, headers={"X-First-Batch-Line": str(n)})
        except httpx.TransportError as exc:
            last_error = f"the gateway did not answer ({type(exc).__name__})"
        else:
            if r.status_code == 401:  # the batch ended (cancelled, expired) under this line: leave it unanswered
                return None, False
            if r.status_code not in RETRY_STATUSES or attempt == MAX_TRIES - 1:
                try:
                    body = r.json()
                except ValueError:
                    body = {"error": {"message": r.text[:500], "type": "server_error"}}
                doc["response"] = {"status_code": r.status_code, "request_id": r.headers.get("x-request-id"),
                                   "body": body}  # fmt: skip
                doc["error"] = None
                return doc, r.status_code < 300
            last_error = f"HTTP {r.status_code}"
        await asyncio.sleep(min(2**attempt, 10))
    doc["response"], doc["error"] = None, {"code": "gateway_unavailable", "message": last_error}
    return doc, False


@task(name="finalize", cache_policy=NO_CACHE)
def finalize(batch_id: str, state: str) -> Batch:
    """The results become the owner's files; the batch gets its final state (``completed``, ``cancelled`` or
    ``expired``: an expired batch's unanswered lines go to its error file as ``batch_expired``)."""
    settings = get_settings()
    batches, files = stores(settings)
    batch = batches.get(batch_id)
    if not batch.active:
        return batch
    results = _RESULTS.pop(batch_id, None) or Results(batches.folder(batch_id))
    if state == "expired":
        for _, raw in read_lines(files.data_path(batch.input_file_id)):
            line = msgspec.json.decode(raw, type=BatchLine)
            if line.custom_id not in results.done:
                results.add({"id": "batch_req_" + secrets.token_hex(12), "custom_id": line.custom_id,
                             "response": None, "error": {"code": "batch_expired", "message":
                             "This line was not run before the batch's completion_window passed."}}, False)  # fmt: skip
    batches.update(batch_id, lambda b: setattr(b, "finalizing_at", int(time.time())))
    output = errors = None
    if results.output.exists():
        output = files.add(batch.user, f"{batch_id}_output.jsonl", "batch_output", results.output).id
    if results.errors.exists():
        errors = files.add(batch.user, f"{batch_id}_error.jsonl", "batch_output", results.errors).id
    if batch.status == "cancelling" and results.completed + results.failed < batch.request_counts.total:
        state = "cancelling"  # cancelled after the run's last look at it, with lines left: cancelled, not completed
    final = {"in_progress": "completed", "validating": "completed", "finalizing": "completed",
             "cancelling": "cancelled"}.get(state, state)  # fmt: skip

    def end(b: Batch) -> None:
        b.output_file_id, b.error_file_id = output, errors
        b.request_counts.completed, b.request_counts.failed = results.completed, results.failed
        b.usage = dict(results.usage)
        _finish(b, final)

    return batches.update(batch_id, end)


def _finish(b: Batch, status: str, code: str | None = None, message: str | None = None) -> None:
    now = int(time.time())
    b.status = status
    setattr(b, {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at",
                "failed": "failed_at"}[status], now)  # fmt: skip
    if code:
        b.errors = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}


def _cancelled_by_operator(flow: Any, flow_run: Any, state: Any) -> None:
    """An operator cancelled the run in the Prefect UI: the batch ends ``cancelled``, with what it finished."""
    batch_id = (flow_run.parameters or {}).get("batch_id")
    if batch_id:
        batches, _ = stores(get_settings())
        batches.update(batch_id, lambda b: setattr(b, "status", "cancelling") if b.active else None)
        finalize.fn(batch_id, "cancelling")


@flow(name="run-batch", on_cancellation=[_cancelled_by_operator], log_prints=True)
async def run_batch(batch_id: str, gateway_url: str | None = None) -> dict[str, Any]:
    """Run every line of a batch through the gateway (``gateway_url``: the gateway that created it, by default
    this deployment's FIRST_PUBLIC_URL or 127.0.0.1:FIRST_PORT), resuming after what an earlier run of the same
    batch finished. Cancel the run here, or the batch with ``client.batches.cancel``: either way it ends
    ``cancelled`` with the lines already answered in its output file."""
    settings = get_settings()
    batch = validate(batch_id)
    if batch.active and batch.status != "cancelling":
        key = "batch-" + batch_id.replace("_", "-").lower()
        progress = await acreate_progress_artifact(0.0, key=key, description=f"{batch.request_counts.total} lines")
        state = batch.status
        for chunk in plan(batch_id, settings.batch_chunk_lines):
            state = await run_chunk(batch_id, chunk, gateway_url or batch.gateway_url or settings.gateway_url,
                                    progress)  # fmt: skip
            if state in ("cancelling", "expired"):
                break
        batch = finalize(batch_id, state)
    elif batch.status == "cancelling":
        batch = finalize(batch_id, "cancelling")
    return batch.public()
