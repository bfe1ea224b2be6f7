"""The other way a chunk of a batch runs: on the cluster, with vLLM's own batch runner (``vllm run-batch``), through
the cluster's compute endpoint (Globus Compute, or the local endpoint), as public FIRST runs batches.

The chunk's unanswered lines travel inline to ``compute/cluster_batch.py:run_vllm_batch``, which runs vLLM's runner
next to the model and sends its output lines back; this task then writes each line's usage row (request id
``<batch id>-<line>``, as on the gateway path, tagged with the batch) and only then its answer to the results, so
a crash in between runs the line again and keeps one row. Which batches take this path:
``serving/batches/paths.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import itertools
import json
import secrets
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from core.errors import APIError
from core.principal import Principal
from core.settings import get_settings
from flows.batch_results import (
    POLL_S,
    Chunk,
    Results,
    custom_id,
    results_of,
    run_logger,
    stopping,
    stores,
    sync_progress,
)
from flows.lifecycle_tasks import backend_of, resolve_model
from serving.batches.lines import read_lines
from serving.batches.store import Batch

USAGE_ENDPOINTS = {"/v1/chat/completions": "chat.completions", "/v1/embeddings": "embeddings"}


class ClusterRunFailed(RuntimeError):
    """vLLM's batch runner could not answer the chunk; the flow sends it through the gateway instead."""


@task(name="run-chunk-on-cluster", task_run_name="lines {chunk.first}-{chunk.last} on {cluster}", cache_policy=NO_CACHE)
async def run_chunk_on_cluster(batch_id: str, chunk: Chunk, cluster: str, progress: Any = None) -> str:
    """Run the chunk's unanswered lines with vLLM's batch runner on ``cluster``; stop it if the batch is cancelled
    or expires meanwhile. Returns the batch's state; raises ``ClusterRunFailed`` when the runner failed."""
    settings = get_settings()
    batches, files = stores(settings)
    batch = batches.get(batch_id)
    results = results_of(batches, batch_id)
    count = chunk.last - chunk.first + 1
    todo = [(n, raw) for n, raw in itertools.islice(read_lines(files.data_path(batch.input_file_id), chunk.offset,
                                                               chunk.line), count)
            if custom_id(raw) not in results.done]  # fmt: skip
    state: dict[str, Any] = {"status": batch.status, "expired": False}
    if not todo:
        return str(batch.status)
    registry, model = await resolve_model(str(batch.model))
    if cluster not in registry.clusters:
        raise ClusterRunFailed(f"cluster {cluster!r} is no longer in the registry")
    backend = backend_of(registry.clusters[cluster])
    tag = f"{batch_id}-{chunk.first}"
    packed = base64.b64encode(gzip.compress(b"".join(raw + b"\n" for _, raw in todo))).decode()
    started = time.time()
    run_logger().info("%d lines (%d bytes packed) to vLLM's batch runner on %s", len(todo), len(packed), cluster)
    job = asyncio.ensure_future(backend.run_batch_chunk(model, tag, packed, settings.batch_cluster_timeout_s))
    while True:
        done, _ = await asyncio.wait({job}, timeout=POLL_S)
        await sync_progress(batches, batch_id, results, state, progress)
        if done:
            break
        if stopping(state):
            with contextlib.suppress(APIError):
                await backend.cancel_batch_chunk(model, tag)
            job.cancel()
            run_logger().info("batch %s: the runner on %s was stopped", state["status"], cluster)
            return "expired" if state["expired"] else str(state["status"])
    try:
        answer = job.result()
    except APIError as exc:
        raise ClusterRunFailed(f"cluster {cluster}: {exc.message}") from exc
    if answer.get("status") != "ok":
        raise ClusterRunFailed(f"cluster {cluster}: {answer.get('detail')}")
    elapsed = time.time() - started
    docs = [json.loads(raw) for raw in gzip.decompress(base64.b64decode(answer["output"])).splitlines() if raw]
    record_answers(batch, cluster, todo, docs, results, started, elapsed)
    run_logger().info("%d lines answered on %s (host %s, job %s) in %.1f s", len(docs), cluster, answer.get("host"),
                      answer.get("job_id") or "none", answer.get("seconds", elapsed))  # fmt: skip
    await sync_progress(batches, batch_id, results, state, progress)
    return "expired" if state["expired"] else str(state["status"])


def record_answers(
    batch: Batch, cluster: str, todo: list[tuple[int, bytes]], docs: list[dict[str, Any]], results: Results,
    started: float, elapsed_s: float,
) -> None:  # fmt: skip
    """Each line's usage row, then its answer (vLLM's line, with this batch's ids) in the results; a line the
    runner left out is answered in the error file."""
    by_id = {str(d.get("custom_id")): d for d in docs}
    owner = batch.principal()
    entries = []
    for n, raw in todo:
        cid = custom_id(raw)
        doc = by_id.get(cid)
        request_id = f"{batch.id}-{n}"
        if doc is None:
            why = "vLLM's batch runner returned no answer for this line"
            doc = {"response": None, "error": {"code": "not_answered", "message": why}}
        response = doc.get("response") or None
        status = int(response.get("status_code") or 500) if response else 500
        ok = response is not None and status < 300 and not doc.get("error")
        if response is not None:
            response["request_id"] = request_id
        line = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": cid, "response": response,
                "error": doc.get("error")}  # fmt: skip
        entries.append((line, ok))
        body = (response or {}).get("body") or {}
        usage = body.get("usage") or {}
        error = next((e for e in (doc.get("error"), body.get("error")) if isinstance(e, dict)), None)
        _append_usage(owner, batch, cluster, request_id, usage, status, error, started, elapsed_s)
    for doc, ok in entries:
        results.add(doc, ok)


def _append_usage(
    owner: Principal, batch: Batch, cluster: str, request_id: str, usage: dict[str, Any], status: int,
    error: dict[str, Any] | None, started: float, elapsed_s: float,
) -> None:  # fmt: skip
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    _spool().append(UsageRecord(
        request_id=request_id, ts=started, user=owner.user, groups=list(owner.groups), model=str(batch.model),
        cluster=cluster, endpoint=USAGE_ENDPOINTS.get(batch.endpoint, batch.endpoint.removeprefix("/v1/")),
        prompt_tokens=prompt, completion_tokens=completion,
        total_tokens=int(usage.get("total_tokens") or prompt + completion),
        latency_ms=elapsed_s * 1000.0,  # the runner's time for the whole chunk: a line has no time of its own
        status=status if status >= 100 else 500,
        error_type=(error or {}).get("type") if status >= 300 else None, batch_id=batch.id,
    ))  # fmt: skip


_spools: list[UsageSpool] = []  # this worker process's usage spool, opened on first use


def _spool() -> UsageSpool:
    if not _spools:
        _spools.append(UsageSpool(get_settings().spool_dir))
    return _spools[0]
