"""The Prefect server on PostgreSQL, as a facility runs it (docs/admin/production.md): a real PostgreSQL
(tests/services.py),
`prefect server start` on it, FIRST's blocks and deployments registered against it by the CLI (which says which
Prefect it talks to), and a worker started as a separate process with a FIRST_HOME of its own (a worker on another
host) running the lifecycle deployments; their runs are rows in PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.settings import REPO_ROOT
from deployments import local
from first.runner import free_port
from tests.services import PostgresServer

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def prefect_on_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], PostgresServer]]:
    root = Path(tmp_path_factory.mktemp("prefect-pg"))
    pg = PostgresServer(root / "postgres").start()
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FIRST_", "PREFECT_"))}
    server_env = {**base, "PREFECT_HOME": str(root / "prefect-server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_API_DATABASE_CONNECTION_URL": pg.url}  # fmt: skip
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(api + "/health", timeout=2).status_code == 200:
                break
        assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    client_env = {**base, "PREFECT_API_URL": api, "PREFECT_HOME": str(root / "prefect-client"),
                  "FIRST_HOME": str(root / "gateway-home"), "FIRST_REPO_ROOT": str(REPO_ROOT)}  # fmt: skip
    try:
        yield client_env, pg
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        pg.stop()


def test_lifecycle_deployments_run_on_a_worker_of_its_own_against_prefect_on_postgres(
    prefect_on_postgres: tuple[dict[str, str], PostgresServer], tmp_path: Path
) -> None:
    env, pg = prefect_on_postgres
    init = subprocess.run([str(BIN / "first"), "registry", "init"], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert env["PREFECT_API_URL"] in init.stderr  # the CLI says which Prefect it wrote to
    local.register(env)
    worker_env = {**env, "FIRST_HOME": str(tmp_path / "worker-home"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(local.worker_command(), env=worker_env, cwd=tmp_path, stdout=open(log, "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        for deployment in ("refresh-status/refresh-status", "model-status/model-status"):
            cmd = [str(BIN / "prefect"), "deployment", "run", deployment, "--watch", "--watch-timeout", "240"]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            why = (run.stdout[-2000:], run.stderr[-2000:], log.read_text()[-3000:])
            assert run.returncode == 0 and "Completed" in run.stdout, why
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    import psycopg

    with psycopg.connect(pg.sync_url("prefect").replace("postgresql+psycopg", "postgresql")) as db:
        done = db.execute("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'").fetchone()
    assert done is not None and done[0] >= 2  # the runs are PostgreSQL's rows
