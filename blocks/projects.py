"""Project allocations (issue 17): the caller groups a project pays for and its GPU-hour budget, as a Prefect
block that operators edit beside clusters and models (``first apply`` a file with a ``projects:`` list). What
they are charged is ``analytics/allocations.py``; what a spent one means at the gateway, ``serving/budgets.py``."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import BaseModel, Field


class ProjectSpec(BaseModel):
    """An allocation: the caller groups whose work it pays for, and its GPU-hour budget per period."""

    name: str
    groups: list[str] = Field(description="Caller groups charged to this project (a caller's first matching project)")
    gpu_hours: float = Field(gt=0, description="GPU-hours the project may use per period")
    period: Literal["month", "quarter", "year"] = Field(default="month", description="When the budget renews (UTC)")
    when_spent: Literal["refuse", "demote"] = Field(
        default="refuse",
        description="Once the budget is used: 'refuse' answers 403 naming the project; 'demote' serves its callers "
        "after everyone else (below batch lines) when a model is full",
    )


class ProjectBlock(Block):
    """A project allocation: which groups it pays for, and its GPU-hour budget."""

    _block_type_name = "FIRST Project"
    _block_type_slug = "first-project"
    _description = "A project allocation: the caller groups it pays for and its GPU-hour budget per period."

    spec: ProjectSpec
