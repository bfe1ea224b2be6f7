"""`first batches`: every user's batches for operators (the Prefect UI shows each as a run-batch flow run)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from core.settings import get_settings
from first.cli.render import err, print_table

app = typer.Typer(help="Batches of every user: owner, state, progress, flow run. Cancel one.", no_args_is_help=True)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts else "-"


@app.command("list")
def batches_list(
    user: Annotated[str | None, typer.Option(help="Only this user's batches")] = None,
    active: Annotated[bool, typer.Option("--active", help="Only unfinished batches")] = False,
) -> None:
    """List batches, newest first: owner, model, state, lines done of all, tokens, where its lines run (the gateway,
    or vLLM's batch runner on a cluster), the flow run's name."""
    from serving.batches.store import BatchStore

    batches = sorted(BatchStore(get_settings().batches_root).all(user), key=lambda b: b.created_at, reverse=True)
    rows = []
    for b in batches:
        if active and not b.active:
            continue
        c = b.request_counts
        done = c.completed + c.failed
        progress = f"{done}/{c.total} ({100 * done / c.total:.0f}%)" if c.total else "-"
        rows.append((b.id, b.user, b.model or "-", b.status, progress, c.failed, b.usage.get("total_tokens", 0),
                     _when(b.created_at), b.runs_on or "-", b.flow_run_name or "-"))  # fmt: skip
    print_table(("batch", "user", "model", "state", "done", "failed", "tokens", "created", "runs on", "flow run"), rows)


@app.command("cancel")
def batches_cancel(batch_id: Annotated[str, typer.Argument(help="The batch's id (batch_...)")]) -> None:
    """Cancel a batch for its owner: its flow run stops sending lines and ends it `cancelled`, keeping the lines
    already answered (cancelling the flow run in the Prefect UI does the same)."""
    import time

    from core.errors import APIError
    from serving.batches.store import Batch, BatchStore

    def cancelling(b: Batch) -> None:
        if not b.active:
            raise APIError(409, f"the batch is already {b.status}")
        b.status, b.cancelling_at = "cancelling", int(time.time())

    try:
        BatchStore(get_settings().batches_root).update(batch_id, cancelling)
    except APIError as exc:
        err.print(f"[red]{exc.message}[/red] (see `first batches list`)")
        raise typer.Exit(1) from None
    err.print(f"{batch_id}: cancelling; its flow run ends it within a few seconds")
