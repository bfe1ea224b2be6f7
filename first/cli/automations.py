"""`first automations`: the Prefect automations on the inference events (flows/automations.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from first.cli.render import err

ACTION_HELP = (
    "On a failing cluster: drain (run drain-cluster), notify (a notification block), or record (the firing shows "
    "in the Event Feed)"
)
NOTIFY_HELP = (
    "A Prefect notification block as TYPE/NAME (slack-webhook/ops): notify on a failing cluster (with --action "
    "notify) and on a busy tenant"
)

app = typer.Typer(help="Prefect automations that act on the inference events.", no_args_is_help=True)


@app.command("apply")
def apply_cmd(
    failures: Annotated[int, typer.Option(help="Cluster failures of one model on one cluster that trigger")] = 10,
    window_s: Annotated[float, typer.Option(help="The window every threshold counts in, in seconds")] = 300.0,
    action: Annotated[str, typer.Option(help=ACTION_HELP)] = "drain",
    notify_block: Annotated[str | None, typer.Option(help=NOTIFY_HELP)] = None,
    cold_burst: Annotated[int, typer.Option(help="Cold-start requests for one model that trigger a warm-up")] = 3,
    tenant_requests: Annotated[int, typer.Option(help="Requests of one user that flag the user")] = 1000,
) -> None:
    """Create or update the automations (by name; rerunning changes only what the options change):

    "first: failing cluster": FAILURES failed requests of one model on one cluster (errors the cluster caused, not
    the caller's) within WINDOW_S run drain-cluster for it, or notify, or are only recorded.

    "first: demand for a cold model": COLD_BURST cold-start requests for one model within WINDOW_S run warm-up on
    the best cluster.

    "first: busy tenant": a user with TENANT_REQUESTS requests within WINDOW_S is flagged in the Event Feed (and
    notified with --notify-block).

    They are in the Prefect UI under Automations; each firing is in its Event Feed."""
    from first.cli.running import prefect_for_writing
    from flows.automations import AutomationOptions, apply

    if action not in ("drain", "notify", "record"):
        err.print(f"[red]--action is drain, notify or record, not {action!r}[/red]")
        raise typer.Exit(2)
    prefect_for_writing()
    options = AutomationOptions(
        failures=failures,
        window_s=window_s,
        action=action,  # type: ignore[arg-type]
        notify_block=notify_block,
        cold_burst=cold_burst,
        tenant_requests=tenant_requests,
    )
    try:
        done = apply(options)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    for name, what in done:
        err.print(f"[green]✓[/green] {what} automation '{name}'")
