"""Prefect automations on the inference events (issue 21), shipped as code: `first automations apply` (also run by
`make run`) creates or updates them by name, so running it again changes nothing but what it was told.

- **first: failing cluster**: a model's requests failing on one cluster (``first.inference.failed`` of error
  class ``cluster``: a 5xx the cluster caused) at least ``failures`` times within ``window_s`` runs
  ``drain-cluster`` for that cluster (``action="drain"``), or sends a notification through a Prefect
  notification block (``action="notify"``), or is only recorded (``action="record"``: the automation's firing
  shows in the Event Feed).
- **first: demand for a cold model**: ``cold_burst`` requests that started a cold start of a model within
  ``window_s`` run ``warm-up`` for that model on the best cluster (idempotent: already hot or starting is left be).
- **first: busy tenant**: a user with at least ``tenant_requests`` requests within ``window_s`` is flagged: the
  firing names the user in the Event Feed (and notifies, when a block is given).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from prefect.automations import Automation, DoNothing, EventTrigger, RunDeployment, SendNotification
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

FAILING, COLD, TENANT = "first: failing cluster", "first: demand for a cold model", "first: busy tenant"


@dataclass
class AutomationOptions:
    failures: int = 10
    window_s: float = 300.0
    action: Literal["drain", "notify", "record"] = "drain"
    notify_block: str | None = None  # "<block type slug>/<name>" of a Prefect notification block
    cold_burst: int = 3
    tenant_requests: int = 1000


def _deployment_id(name: str) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name).id


def _block_id(slug_and_name: str) -> Any:
    kind, _, name = slug_and_name.partition("/")
    with get_client(sync_client=True) as client:
        return client.read_block_document_by_name(name=name, block_type_slug=kind).id


def _notification(block: str) -> SendNotification:
    return SendNotification(
        block_document_id=_block_id(block),
        subject="FIRST: {{ automation.name }}",
        body="{{ automation.name }}: {{ event.event }} ({{ event.resource.id }})",
    )


def _run(deployment: str, **parameters: str) -> RunDeployment:
    """Run a deployment with parameters taken from the triggering event (Jinja, rendered by Prefect)."""
    return RunDeployment(source="selected", deployment_id=_deployment_id(deployment), parameters=parameters)


def automations(o: AutomationOptions) -> list[Automation]:
    """The automations for these options (not yet saved)."""
    within = timedelta(seconds=o.window_s)
    notify = [_notification(o.notify_block)] if o.notify_block else []
    cluster, model = "{{ event.resource_in_role['cluster'].name }}", "{{ event.resource_in_role['model'].name }}"
    if o.action == "drain":
        on_failing: list[Any] = [_run("drain-cluster/drain-cluster", cluster=cluster)]
    elif o.action == "notify":
        if not notify:
            raise ValueError("action 'notify' needs a notification block (--notify-block TYPE/NAME)")
        on_failing = notify
    else:
        on_failing = [DoNothing()]
    answered = {"first.inference.completed", "first.inference.failed"}
    failing = EventTrigger(
        expect={"first.inference.failed"},
        match={"first.error_class": "cluster"},
        for_each={"related:cluster:prefect.resource.id", "related:model:prefect.resource.id"},
        posture="Reactive",
        threshold=o.failures,
        within=within,
    )
    cold = EventTrigger(
        expect=answered,
        match={"first.cold_start": "true"},
        for_each={"related:model:prefect.resource.id"},
        posture="Reactive",
        threshold=o.cold_burst,
        within=within,
    )
    busy = EventTrigger(
        expect=answered,
        for_each={"related:user:prefect.resource.id"},
        posture="Reactive",
        threshold=o.tenant_requests,
        within=within,
    )
    window = f"within {o.window_s:g} s"
    return [
        Automation(name=FAILING, trigger=failing, actions=on_failing,
                   description=f"{o.failures} cluster failures of one model on one cluster {window}: {o.action}"),
        Automation(name=COLD, trigger=cold, actions=[_run("warm-up/warm-up", model=model, cluster="best")],
                   description=f"{o.cold_burst} cold-start requests for one model {window}: warm it up"),
        Automation(name=TENANT, trigger=busy, actions=notify or [DoNothing()],
                   description=f"A user with {o.tenant_requests} requests {window} is flagged"),
    ]  # fmt: skip


def apply(o: AutomationOptions) -> list[tuple[str, str]]:
    """Create each automation, or update the one of the same name. Returns (name, "created" | "updated")."""
    done = []
    for wanted in automations(o):
        try:
            existing = Automation.read(name=wanted.name)
        except (ObjectNotFound, ValueError):
            wanted.create()
            done.append((wanted.name, "created"))
            continue
        wanted.id = existing.id
        wanted.update()
        done.append((wanted.name, "updated"))
    return done
