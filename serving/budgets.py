"""Project budgets at the gateway: which projects have spent their GPU-hours, and what that means for a request.

The burn is recomputed every ``FIRST_ALLOCATION_CHECK_S`` from the usage table and the instance-event log
(``analytics.allocations``, in a thread: DuckDB reads block), never per request. A project whose budget is spent
is refused with a 403 naming it (``when_spent: refuse``) or demoted: its requests wait behind everyone else's
(batch lines included) once a model is full (``when_spent: demote``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from analytics.allocations import allocation_report
from analytics.store import UsageStore
from blocks.registry import ProjectSpec
from core.errors import APIError
from core.principal import Principal

log = logging.getLogger("first.budgets")


@dataclass
class Burn:
    used: float
    budget: float
    renews: datetime


@dataclass
class Budgets:
    """The last computed burn of every project that has spent its budget (empty until the first check)."""

    spent: dict[str, Burn] = field(default_factory=dict)
    checked_at: float | None = None

    def update(self, rows: list[dict[str, Any]]) -> None:
        self.spent = {
            r["project"]: Burn(r["gpu_hours_used"], r["gpu_hours_budget"], r["renews"])
            for r in rows
            if r["spent"] and r["gpu_hours_budget"] is not None
        }
        self.checked_at = time.time()

    def demoted(self, project: ProjectSpec | None) -> bool:
        return project is not None and project.when_spent == "demote" and project.name in self.spent

    def check(self, principal: Principal, project: ProjectSpec | None) -> None:
        """Raise the 403 for a caller whose project spent its budget and refuses more."""
        if project is None or project.when_spent != "refuse" or project.name not in self.spent:
            return
        burn = self.spent[project.name]
        raise APIError(
            403, f"Project '{project.name}' has used its allocation: {burn.used:.1f} of {burn.budget:g} GPU-hours this "
            f"{project.period}. It renews on {burn.renews:%Y-%m-%d}; ask the project's PI or the facility for more "
            "GPU-hours.", code="allocation_spent",
        )  # fmt: skip


async def follow_budgets(svc: Any) -> None:
    """Recompute the burn now and then (only while some project is declared)."""
    loop = asyncio.get_running_loop()
    while True:
        registry = svc.registry
        if not registry.projects:
            svc.budgets.update([])  # no project declared (any more): nobody is refused or demoted
        else:
            try:
                store = UsageStore(svc.settings.usage_db)
                df = await loop.run_in_executor(
                    None, allocation_report, store, svc.settings.instance_events_dir, registry,
                    svc.settings.allocation_idle_owner,
                )  # fmt: skip
                svc.budgets.update(df.to_dicts())
            except Exception as exc:  # keep the last answer: a busy database must not open or close budgets
                log.warning("could not compute the projects' GPU-hour burn (%s); keeping the last one", exc)
        await asyncio.sleep(svc.settings.allocation_check_s)
