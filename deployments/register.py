"""Register FIRST's deployments (prefect.yaml) against a Prefect server, for the kind of work pool a site runs.

    python -m deployments.register --pool-type process                      # a worker process on a host (default)
    python -m deployments.register --pool-type docker --image REG/first:1   # each flow run a container
    python -m deployments.register --pool-type kubernetes --image REG/first:1 --pool first-k8s

It creates (or updates) the work pool, then deploys every deployment of prefect.yaml to it: the same flows,
parameters and schedules; the pool and, for container pools, the image (the one image of deploy/Dockerfile) are
set here. Pull steps assume no checkout of this repository: a process worker's code is where FIRST_REPO_ROOT says
(the image sets it to /app), a container's is its image's /app.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from core.settings import REPO_ROOT

POOL_TYPES = ("process", "docker", "kubernetes")
_PREFECT = str(Path(sys.executable).parent / "prefect")


def prefect_file(pool: str, pool_type: str, image: str | None = None) -> dict[str, Any]:
    """prefect.yaml with every deployment on ``pool``, and for a container pool its image and /app."""
    if pool_type not in POOL_TYPES:
        raise ValueError(f"pool type must be one of {', '.join(POOL_TYPES)}, not {pool_type!r}")
    if pool_type != "process" and not image:
        raise ValueError(f"a {pool_type} pool runs each flow run in FIRST's image: give --image")
    doc = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    directory = "{{ $FIRST_REPO_ROOT }}" if pool_type == "process" else "/app"
    doc["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": directory}}]
    for d in doc["deployments"]:
        d["work_pool"] = {"name": pool}
        if pool_type != "process":
            d["work_pool"]["job_variables"] = {"image": image}
    return doc


def register(
    env: dict[str, str], pool_type: str = "process", pool: str = "first-local", image: str | None = None
) -> None:
    """Create (or update) the pool and deploy everything to it. Raises with the CLI's output."""
    doc = prefect_file(pool, pool_type, image)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=REPO_ROOT, prefix=".prefect-", delete=False) as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    try:
        for cmd in (
            [_PREFECT, "work-pool", "create", pool, "--type", pool_type, "--overwrite"],
            [_PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", fh.name],
            [sys.executable, "-m", "flows.parameter_choices"],  # model and cluster as drop-downs in the UI
        ):
            r = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
            if r.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd[1:])}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    finally:
        Path(fh.name).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-type", choices=POOL_TYPES, default="process", help="the work pool's kind (process)")
    ap.add_argument("--pool", default="first-local", help="the work pool's name (first-local)")
    ap.add_argument("--image", help="FIRST's image, for docker and kubernetes pools")
    args = ap.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("PREFECT_API_URL is not set: say which Prefect server to register with", file=sys.stderr)
        return 2
    try:
        register(dict(os.environ), args.pool_type, args.pool, args.image)
    except (ValueError, RuntimeError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"deployed {len(prefect_file(args.pool, args.pool_type, args.image)['deployments'])} deployments to "
          f"{args.pool_type} pool {args.pool!r} at {os.environ['PREFECT_API_URL']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
