"""The ``batch-retention`` flow (every 5 minutes): batches that need looking after once their run-batch run is gone.

A running batch whose run went silent (its worker died) is resumed by a new run, or ended ``cancelled`` if an
operator cancelled that run; a batch no worker took before its window passed is expired; finished batches and
their files are deleted after ``FIRST_BATCH_RETENTION_DAYS``.
"""

from __future__ import annotations

import contextlib
import time

from prefect import flow

from core.errors import APIError
from core.settings import get_settings
from flows.batch import finalize
from flows.batch_results import run_logger, stores
from serving.batches.files import FileStore
from serving.batches.store import Batch, BatchStore

STALE_S = 120.0  # a running batch whose flow run wrote nothing for this long lost its worker


def orphans(batches: BatchStore, now: float, stale_s: float = STALE_S) -> list[Batch]:
    """Running batches whose flow run stopped writing progress: its worker died (or its run was lost)."""
    return [b for b in batches.all() if b.status in ("in_progress", "cancelling", "finalizing")
            and (b.heartbeat_at or b.created_at) < now - stale_s]  # fmt: skip


def expire_waiting(batches: BatchStore, now: float) -> list[str]:
    """Batches whose window passed before any run started (no worker took them): ``expired``, every line in the
    error file as ``batch_expired``."""
    ended = []
    for b in batches.all():
        if b.status == "validating" and now > b.expires_at:
            finalize.fn(b.id, "expired")
            ended.append(b.id)
    return ended


def delete_old(batches: BatchStore, files: FileStore, now: float, keep_days: int, dry_run: bool) -> list[str]:
    """Finished batches older than ``keep_days`` (by when they ended), with their input, output and error files."""
    gone = []
    for b in batches.all():
        ended = b.completed_at or b.cancelled_at or b.expired_at or b.failed_at
        if b.active or ended is None or ended > now - keep_days * 86400:
            continue
        gone.append(b.id)
        if dry_run:
            continue
        for file_id in (b.input_file_id, b.output_file_id, b.error_file_id):
            if file_id:
                with contextlib.suppress(APIError):
                    files.delete(file_id, None)
        batches.delete(b.id)
    return gone


@flow(name="batch-retention", log_prints=True)
async def batch_retention(retention_days: int | None = None, dry_run: bool = False) -> dict[str, list[str]]:
    """Every 5 minutes: resume the batches whose worker died (a new run-batch run carries on from the lines
    already answered), expire the batches whose completion_window passed before a worker took them, and delete the
    batches (and their input, output and error files) that ended more than FIRST_BATCH_RETENTION_DAYS ago.

    Args:
        retention_days: Days to keep a finished batch (default: FIRST_BATCH_RETENTION_DAYS).
        dry_run: Only report what would be resumed, expired and deleted.
    """
    settings = get_settings()
    batches, files = stores(settings)
    now, resumed = time.time(), []
    for b in orphans(batches, now):
        resumed.append(b.id)
        if not dry_run:
            await _resume_or_end(batches, b)
    expired = [] if dry_run else expire_waiting(batches, now)
    keep = settings.batch_retention_days if retention_days is None else retention_days
    deleted = delete_old(batches, files, now, keep, dry_run)
    run_logger().info("resumed %s, expired %s, deleted %s%s", resumed or "none", expired or "none",
                   deleted or "none", " (dry run)" if dry_run else "")  # fmt: skip
    return {"resumed": resumed, "expired": expired, "deleted": deleted}


async def _resume_or_end(batches: BatchStore, b: Batch) -> None:
    """A batch whose run went silent. If an operator cancelled that run (in the UI), the batch ends ``cancelled``
    with what it finished; otherwise a new run-batch run carries on, and the dead run is marked crashed, so the
    UI tells the story."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    old_state = None
    if b.flow_run_id:
        async with get_client() as client:
            with contextlib.suppress(Exception):
                old_state = (await client.read_flow_run(b.flow_run_id)).state_type
    if old_state is not None and old_state.value in ("CANCELLED", "CANCELLING"):
        batches.update(b.id, lambda x: setattr(x, "status", "cancelling"))
        finalize.fn(b.id, "cancelling")
        run_logger().info("batch %s: its run was cancelled; the batch is cancelled", b.id)
        return
    name = f"{(b.flow_run_name or b.id).split(' (resumed')[0]} (resumed {b.runs + 1})"
    run = await run_deployment("run-batch/run-batch", parameters={"batch_id": b.id, "gateway_url": b.gateway_url},
                               timeout=0, flow_run_name=name, tags=["batch"])  # fmt: skip
    if b.flow_run_id:
        async with get_client() as client:
            with contextlib.suppress(Exception):  # it may have ended meanwhile; the new run carries on anyway
                await client.set_flow_run_state(b.flow_run_id, Crashed(message=f"its worker stopped; resumed as "
                                                                       f"{name}"), force=True)  # fmt: skip

    def resumed(x: Batch) -> None:
        x.flow_run_id, x.flow_run_name, x.runs, x.heartbeat_at = str(run.id), name, x.runs + 1, time.time()

    batches.update(b.id, resumed)
    run_logger().warning("batch %s lost its worker; resumed as flow run %s", b.id, name)
