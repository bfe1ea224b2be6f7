"""The ``run-batch`` flow: one batch, start to end, as a Prefect flow run that operators watch and cancel.

Tasks, in the order the UI shows them: ``validate`` (the input is there, the batch still wanted), ``choose-path``
(through the gateway, or on a cluster with vLLM's own batch runner: ``serving/batches/paths.py``), ``plan`` (the
chunks of lines not answered yet: a resumed run skips what a dead one finished), one ``run-chunk`` per chunk
(``run-chunk-on-cluster`` on the runner's path, ``flows/batch_on_cluster.py``), and ``finalize`` (the output and
error files become the caller's files, the batch gets its final state). A progress artifact (``batch-<id>``)
follows the lines as they finish.

On the gateway path each line goes through a gateway's own serving path (routing, warm-up, failover, metering) as
the batch's owner, with the batch's credential (``serving/batches/tokens.py``) and its line number as its request
id, so a line sent again after a crash keeps one usage row. The gateway runs batch lines in the instance's batch
lane (a share of its slots) and never counts them against the owner's interactive limits.

A line is written to ``output.jsonl`` (answered 2xx) or ``errors.jsonl`` (anything else) once, after its answer:
each line of the input appears in exactly one of them.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from typing import Any

import httpx
import msgspec
from prefect import flow, task
from prefect.artifacts import acreate_progress_artifact
from prefect.cache_policies import NO_CACHE

from core.settings import get_settings
from flows.batch_on_cluster import ClusterRunFailed, run_chunk_on_cluster
from flows.batch_results import (
    POLL_S,
    Chunk,
    Results,
    custom_id,
    finish,
    forget_results,
    results_of,
    run_logger,
    stopping,
    stores,
    sync_progress,
    yield_cpu,
)
from flows.lifecycle_tasks import fleet
from serving.batches.lines import BatchLine, read_lines, read_lines_at
from serving.batches.paths import BatchPath, choose_path
from serving.batches.store import Batch
from serving.batches.tokens import BatchTokens

RETRY_STATUSES = frozenset({429, 502, 503, 504})  # the gateway is busy or a cluster was: try the line again
MAX_TRIES = 4


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
            return batches.update(batch_id, lambda b: finish(b, "failed", "input_file_missing", why))
        batch = batches.update(batch_id, start)
    return batch


@task(name="plan", cache_policy=NO_CACHE)
def plan(batch_id: str, chunk_lines: int) -> list[Chunk]:
    """The chunks of the input (``chunk_lines`` requests each) that still hold unanswered lines. The lines
    answered so far are read back from the results files here, at the start of every run of the batch."""
    settings = get_settings()
    batches, files = stores(settings)
    batch = batches.get(batch_id)
    results = results_of(batches, batch_id, fresh=True)
    chunks: list[Chunk] = []
    todo = 0
    for i, (n, raw, offset) in enumerate(read_lines_at(files.data_path(batch.input_file_id))):
        if custom_id(raw) in results.done:
            continue
        todo += 1
        if chunks and i < chunks[-1].first + chunk_lines:
            chunks[-1].last = i
        else:
            chunks.append(Chunk(first=i, last=i, offset=offset, line=n))
    run_logger().info("%d of %d lines to run, in %d chunks", todo, batch.request_counts.total, len(chunks))
    return chunks


@task(name="run-chunk", task_run_name="lines {chunk.first}-{chunk.last}", cache_policy=NO_CACHE)
async def run_chunk(batch_id: str, chunk: Chunk, gateway_url: str, progress: Any = None) -> str:
    """Send the chunk's unanswered lines through the gateway, ``batch_concurrency`` at a time; stop sending when
    the batch is cancelled or its window passes. Returns the batch's state."""
    settings = get_settings()
    yield_cpu(settings.batch_nice)
    batches, files = stores(settings)
    batch = batches.get(batch_id)
    results = results_of(batches, batch_id)
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
                if line.custom_id in results.done or stopping(state):
                    return
                doc, ok = await _send(client, batch_id, n, line)
                if doc is not None:
                    results.add(doc, ok)

        async def watch() -> None:
            while True:
                await asyncio.sleep(POLL_S)
                await sync_progress(batches, batch_id, results, state, progress)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.gather(*(one(n, raw) for n, raw in lines))
        finally:
            watcher.cancel()
    await sync_progress(batches, batch_id, results, state, progress)
    return "expired" if state["expired"] else str(state["status"])


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
    results = forget_results(batch_id) or Results(batches.folder(batch_id))
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
        finish(b, final)

    return batches.update(batch_id, end)


@task(name="choose-path", cache_policy=NO_CACHE)
async def choose_path_for(batch_id: str) -> BatchPath:
    """Through the gateway, or on a cluster with vLLM's batch runner (``serving/batches/paths.py``); the run's
    log says which, and why, and the batch record keeps it (``first batches list``)."""
    settings = get_settings()
    batches, _ = stores(settings)
    batch = batches.get(batch_id)
    try:
        registry = await fleet().current_registry()
    except Exception as exc:  # the blocks could not be read: the gateway path needs none of them
        path = BatchPath(None, f"through the gateway: the registry could not be read ({exc!r})")
    else:
        path = choose_path(batch.endpoint, batch.request_counts.total, batch.model, registry, batch.principal(),
                           settings.batch_cluster_min_lines)  # fmt: skip
    batches.update(batch_id, lambda b: setattr(b, "runs_on", (path.cluster and f"vllm-run-batch@{path.cluster}")
                                               or "gateway"))  # fmt: skip
    run_logger().info("the lines run %s", path.why)
    return path


def _cancelled_by_operator(flow: Any, flow_run: Any, state: Any) -> None:
    """An operator cancelled the run in the Prefect UI: the batch ends ``cancelled``, with what it finished."""
    batch_id = (flow_run.parameters or {}).get("batch_id")
    if batch_id:
        batches, _ = stores(get_settings())
        batches.update(batch_id, lambda b: setattr(b, "status", "cancelling") if b.active else None)
        finalize.fn(batch_id, "cancelling")


@flow(name="run-batch", on_cancellation=[_cancelled_by_operator], log_prints=True)
async def run_batch(batch_id: str, gateway_url: str | None = None) -> dict[str, Any]:
    """Run every line of a batch, through the gateway (``gateway_url``: the gateway that created it, by default
    this deployment's FIRST_PUBLIC_URL or 127.0.0.1:FIRST_PORT) or, for a large batch on a batch-scheduled
    cluster, with vLLM's own batch runner there; resuming after what an earlier run of the same
    batch finished. Cancel the run here, or the batch with ``client.batches.cancel``: either way it ends
    ``cancelled`` with the lines already answered in its output file."""
    settings = get_settings()
    batch = validate(batch_id)
    if batch.active and batch.status != "cancelling":
        key = "batch-" + batch_id.replace("_", "-").lower()
        progress = await acreate_progress_artifact(0.0, key=key, description=f"{batch.request_counts.total} lines")
        state = batch.status
        path = await choose_path_for(batch_id)
        gateway = gateway_url or batch.gateway_url or settings.gateway_url
        chunk_lines = settings.batch_cluster_chunk_lines if path.cluster else settings.batch_chunk_lines
        for chunk in plan(batch_id, chunk_lines):
            if path.cluster:
                try:
                    state = await run_chunk_on_cluster(batch_id, chunk, path.cluster, progress)
                except ClusterRunFailed as exc:
                    run_logger().warning("%s; lines %d-%d go through the gateway instead", exc, chunk.first,
                                         chunk.last)  # fmt: skip
                    state = await run_chunk(batch_id, chunk, gateway, progress)
            else:
                state = await run_chunk(batch_id, chunk, gateway, progress)
            if state in ("cancelling", "expired"):
                break
        batch = finalize(batch_id, state)
    elif batch.status == "cancelling":
        batch = finalize(batch_id, "cancelling")
    return batch.public()
