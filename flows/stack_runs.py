"""What a stopping stack leaves in Prefect: its runs end as Cancelled, saying the stack stopped (issue 20).

Warm-ups that the gateway or ``first run`` runs end themselves as Cancelled (``core.stopping``). Runs the worker
executes (an operator's warm-up, drain or batch from the UI) die with the worker, and Prefect would show them as
Running for ever, or as Crashed ("Execution was cancelled by the runtime environment"). ``first run`` calls
``cancel_left_runs`` after the worker and the gateway stopped and before the Prefect server does.

A stack that was killed (SIGKILL, a crash) could not; the next ``first run`` marks what it left under way
Crashed (``crash_orphaned_runs``), before it starts anything that runs flows.
"""

from __future__ import annotations

import datetime as dt

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Crashed

from core.stopping import STOPPED_MESSAGE

UNDER_WAY = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]
ORPHANED_MESSAGE = (
    "The FIRST stack that ran this was killed (a crash, SIGKILL, a reboot) before the run ended; found at the "
    "next start of the stack."
)


def cancel_left_runs(since: dt.datetime, limit: int = 200) -> list[str]:
    """Mark Cancelled (with ``STOPPED_MESSAGE``) every flow run still under way, and every run that crashed
    since ``since`` (the stop's start, UTC). Scheduled runs stay: they run when the stack is back. Returns the
    names of the runs it cancelled."""
    kinds = FlowRunFilterStateType(any_=[*UNDER_WAY, StateType.CRASHED])
    cancelled = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=kinds)), limit=limit)
        for run in runs:
            state = run.state
            if state is None or (state.type is StateType.CRASHED and state.timestamp < since):
                continue  # a crash of another day is history, not this stop's doing
            client.set_flow_run_state(run.id, Cancelled(message=STOPPED_MESSAGE), force=True)
            cancelled.append(run.name)
    return cancelled


def crash_orphaned_runs(limit: int = 200) -> list[str]:
    """At a stack's start, before its worker and gateway run anything: a run still under way belonged to a stack
    that was killed. Mark it Crashed, saying so, instead of leaving it Running for ever. Returns their names."""
    kinds = FlowRunFilterStateType(any_=UNDER_WAY)
    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=kinds)), limit=limit)
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message=ORPHANED_MESSAGE), force=True)
            crashed.append(run.name)
    return crashed
