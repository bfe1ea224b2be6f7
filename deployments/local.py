"""The lifecycle and usage deployments of the embedded default: the `first-local` process work pool, the
deployments declared in prefect.yaml, and the worker that runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from core.settings import REPO_ROOT

WORK_POOL = "first-local"
DEPLOYMENTS = (
    "warm-up/warm-up",
    "scale-down/scale-down",
    "refresh-status/refresh-status",
    "scale-down-idle/scale-down-idle",
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
    "ingest-usage/ingest-usage",
    "usage-report/usage-report",
    "audit-retention/audit-retention",
    "batch-retention/batch-retention",
)
_PREFECT = str(Path(sys.executable).parent / "prefect")


def register(env: dict[str, str]) -> None:
    """Create (or update) the work pool and deploy everything in prefect.yaml. Raises with the CLI's output."""
    for cmd in (
        [_PREFECT, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
        [_PREFECT, "--no-prompt", "deploy", "--all"],
    ):
        r = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd[1:])}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def worker_command() -> list[str]:
    """The worker that runs the deployments' flow runs (poll interval from PREFECT_WORKER_QUERY_SECONDS)."""
    return [_PREFECT, "worker", "start", "--pool", WORK_POOL]
