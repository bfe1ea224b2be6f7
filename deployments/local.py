"""The lifecycle and usage deployments of the embedded default: the `first-local` process work pool, the
deployments declared in prefect.yaml, and the worker that runs them."""

from __future__ import annotations

import sys
from pathlib import Path

WORK_POOL = "first-local"
DEPLOYMENTS = (
    "warm-up/warm-up",
    "scale-down/scale-down",
    "refresh-status/refresh-status",
    "scale-down-idle/scale-down-idle",
    "predictive-warm-up/predictive-warm-up",
    "autoscale/autoscale",
    "retire-instance/retire-instance",
    "drain-cluster/drain-cluster",
    "model-status/model-status",
    "ingest-usage/ingest-usage",
    "usage-report/usage-report",
    "audit-retention/audit-retention",
    "run-batch/run-batch",
    "batch-retention/batch-retention",
)
# The ones prefect.yaml schedules (tests pause them, to trigger them when they choose).
SCHEDULED = (
    "refresh-status/refresh-status",
    "scale-down-idle/scale-down-idle",
    "predictive-warm-up/predictive-warm-up",
    "autoscale/autoscale",
    "ingest-usage/ingest-usage",
    "usage-report/usage-report",
    "audit-retention/audit-retention",
    "batch-retention/batch-retention",
)
_PREFECT = str(Path(sys.executable).parent / "prefect")  # the worker's


def register(env: dict[str, str]) -> None:
    """Create (or update) the process work pool and deploy everything in prefect.yaml to it."""
    from deployments.register import register as register_on

    register_on(env, "process", WORK_POOL)


def worker_command() -> list[str]:
    """The worker that runs the deployments' flow runs (poll interval from PREFECT_WORKER_QUERY_SECONDS)."""
    return [_PREFECT, "worker", "start", "--pool", WORK_POOL]
