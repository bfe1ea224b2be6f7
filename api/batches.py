"""/v1/batches: create (which starts the batch's ``run-batch`` flow run), retrieve, list, cancel.

The lines run in the flow run (``flows/batch.py``), which sends each one through a gateway's serving path as the
batch's owner; this module only keeps the records. Per-user limits on unfinished batches and on their lines are
settings (``FIRST_MAX_ACTIVE_BATCHES``, ``FIRST_MAX_QUEUED_LINES``), refused with 429.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from litestar import Controller, Request, get, post
from pydantic import BaseModel, Field

from api.errors import GUARDED, error_responses
from api.files import file_store, list_page
from api.guards import DEPENDENCIES, authenticate, principal_of
from core.errors import APIError
from serving.batches.lines import BATCH_ENDPOINTS
from serving.batches.store import Batch, BatchStore, window_seconds
from serving.request import Services

log = logging.getLogger("first.batches")


class BatchCreate(BaseModel):
    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def batch_store(services: Services) -> BatchStore:
    if services.batches is None:  # pragma: no cover - the app always makes one
        raise APIError(503, "Batches are not enabled on this gateway.", code="batches_disabled")
    return services.batches


class BatchesController(Controller):
    guards = [authenticate]
    dependencies = DEPENDENCIES

    @post(
        "/v1/batches",
        status_code=200,
        summary="Create a batch",
        responses=error_responses(*GUARDED, 400, 404, 503),
    )
    async def create(self, request: Request, data: BatchCreate, services: Services) -> dict[str, Any]:
        """Run every line of an uploaded `purpose=batch` file. The batch is a Prefect flow run (`run-batch`):
        poll it with `client.batches.retrieve(id)` until `completed`, then read `output_file_id` (and
        `error_file_id` for the lines that failed)."""
        who, settings = principal_of(request), services.settings
        if data.endpoint not in BATCH_ENDPOINTS:
            raise APIError(400, f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}; got '{data.endpoint}'.",
                           param="endpoint")  # fmt: skip
        window_seconds(data.completion_window)
        source = file_store(services).get(data.input_file_id, who.user)
        if source.purpose != "batch" or source.lines is None:
            raise APIError(400, f"The file '{source.id}' was not uploaded with purpose 'batch'.",
                           param="input_file_id")  # fmt: skip
        if source.endpoint != data.endpoint:
            raise APIError(400, f"The file's lines go to '{source.endpoint}', but the batch says '{data.endpoint}'.",
                           param="endpoint", code="endpoint_mismatch")  # fmt: skip
        store = batch_store(services)
        active = [b for b in store.all(who.user) if b.active]
        if len(active) >= settings.max_active_batches:
            raise APIError(429, f"You have {len(active)} unfinished batches, the most this gateway allows; wait for "
                           "one to finish or cancel one.", code="too_many_batches")  # fmt: skip
        queued = sum(b.request_counts.total - b.request_counts.completed - b.request_counts.failed for b in active)
        if queued + source.lines > settings.max_queued_lines:
            raise APIError(429, f"Your unfinished batches hold {queued} lines; this one's {source.lines} would pass "
                           f"the limit of {settings.max_queued_lines}. Wait for some to finish.",
                           code="too_many_queued_lines")  # fmt: skip
        if services.control is None:
            raise APIError(503, "This gateway has no Prefect control plane, which runs batches; start it with "
                           "`make run` or `first run`.", code="batches_unavailable")  # fmt: skip
        model = _first_model(file_store(services).data_path(source.id))
        batch = store.create(owner=who, endpoint=data.endpoint, input_file_id=source.id,
                             window=data.completion_window, lines=source.lines, model=model,
                             metadata=data.metadata)  # fmt: skip
        name = f"{who.user} · {model or '?'} · {source.lines} lines · {batch.id}"
        lines_via = settings.batch_gateway_url or settings.gateway_url
        try:
            run_id = await services.control.start_batch(batch.id, name, lines_via)
        except Exception as exc:
            log.exception("could not start the run-batch flow run of %s", batch.id)
            why = f"its flow run could not be started ({exc if isinstance(exc, RuntimeError) else type(exc).__name__})"
            store.update(batch.id, lambda b: _fail(b, why))
            raise APIError(503, f"The batch could not be started: {why}. Batches run as Prefect flow runs: start "
                           "the gateway with `make run` (or `first run`), or retry shortly.",
                           code="batches_unavailable") from None  # fmt: skip

        def started(b: Batch) -> None:
            b.flow_run_id, b.flow_run_name, b.runs, b.gateway_url = run_id, name, 1, lines_via

        return store.update(batch.id, started).public()

    @get("/v1/batches", summary="List your batches", responses=error_responses(*GUARDED, 400))
    async def list_batches(self, request: Request, services: Services, after: str | None = None,
                           limit: int = 20) -> dict[str, Any]:  # fmt: skip
        """Your batches, newest first, `limit` (1 to 100) per page after the batch `after`."""
        if not 1 <= limit <= 100:
            raise APIError(400, "limit must be 1 to 100.", param="limit")
        batches, more = batch_store(services).list(principal_of(request).user, after, limit)
        return list_page([b.public() for b in batches], more)

    @get("/v1/batches/{batch_id:str}", summary="Retrieve a batch", responses=error_responses(*GUARDED, 404))
    async def retrieve(self, request: Request, services: Services, batch_id: str) -> dict[str, Any]:
        return batch_store(services).get(batch_id, principal_of(request).user).public()

    @post(
        "/v1/batches/{batch_id:str}/cancel",
        status_code=200,
        summary="Cancel a batch",
        responses=error_responses(*GUARDED, 404, 409, 503),
    )
    async def cancel(self, request: Request, services: Services, batch_id: str) -> dict[str, Any]:
        """The batch goes to `cancelling`; its flow run stops sending lines within a second or two and ends it
        `cancelled`, with the lines already answered in its output file."""
        store = batch_store(services)
        store.get(batch_id, principal_of(request).user)  # 404 for someone else's

        def cancelling(b: Batch) -> None:
            if b.status in ("validating", "in_progress", "finalizing"):
                b.status, b.cancelling_at = "cancelling", int(time.time())
            elif b.status != "cancelling":
                raise APIError(409, f"The batch is already {b.status}; only an unfinished batch can be cancelled.",
                               param="batch_id", code="batch_finished")  # fmt: skip

        return store.update(batch_id, cancelling).public()


def _fail(batch: Batch, why: str) -> None:
    batch.status, batch.failed_at = "failed", int(time.time())
    batch.errors = {"object": "list", "data": [{"code": "batch_not_started", "message": why, "param": None,
                                                "line": None}]}  # fmt: skip


def _first_model(path: Any) -> str | None:
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                return str(json.loads(raw)["body"].get("model"))
    return None
