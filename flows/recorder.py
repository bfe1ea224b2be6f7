"""Records sampled, failed and cold-start inferences as Prefect flow runs, off the serving loop and out of the
gateway's process.

A flow run costs 100-300 ms of API calls and database writes (docs/benchmarks.md: what each flow-tracking
setting costs), so it must never sit on a
request's path or stall the serving event loop: records go through a bounded queue to a process of their own.
When Prefect falls behind, records are dropped and counted, never the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import AsyncClientContext, SyncClientContext

from core.settings import REPO_ROOT

log = logging.getLogger("first.recorder")


@flow(name="infer-record", flow_run_name="{endpoint} {model} for {user}: {status}", log_prints=False)
async def infer_record(
    request_id: str,
    endpoint: str,
    model: str,
    user: str,
    cluster: str | None,
    status: int,
    error: str | None,
    cold_start: bool,
    usage: dict[str, Any],
    steps: list[dict[str, Any]],
    event_resource: str | None = None,
) -> dict[str, Any]:
    """The trace of one served inference: its steps, their timings and its outcome. ``event_resource``: the
    resource of its ``first.inference.*`` event, when the gateway posts events (filter the Event Feed by it)."""
    logger = get_run_logger()
    if event_resource:
        logger.info("its event: resource %s in the Event Feed", event_resource)
    for s in steps:
        logger.info("%-15s %8.2f ms %s", s["step"], s["ms"], "ok" if s["ok"] else "FAILED")
    logger.info("request %s on %s: status %s, usage %s, cold start %s", request_id, cluster, status, usage, cold_start)
    if status >= 400:
        raise RuntimeError(f"{status}: {error}")
    return {"status": status, "usage": usage}


class FlowRecorder:
    """The gateway's side: a bounded queue, and a thread that writes each record as a JSON line to the recorder
    process (``python -m flows.recorder``). The process runs the flow runs; its answers count them.

    A process, not a thread of the gateway: a flow run costs the client about 40 ms of CPU, and in a thread that
    CPU holds the interpreter lock while requests wait; at a 1 % sample of 500 requests/s it was the gateway's p99
    at concurrency 1 (docs/benchmarks.md, issue 18). Writes to the pipe block only the writer thread."""

    RESTART_AFTER_S = 30.0

    def __init__(self, maxsize: int = 1000) -> None:
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=maxsize)
        self.recorded = 0
        self.dropped = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._thread = threading.Thread(target=self._write, daemon=True, name="first-flow-recorder")
        self._thread.start()

    def submit(self, req: Any, out: Any, event_resource: str | None = None) -> None:
        params = {
            "event_resource": event_resource,
            "request_id": req.request_id, "endpoint": req.endpoint, "model": out.model, "user": req.principal.user,
            "cluster": out.cluster, "status": out.status, "error": out.error_message, "cold_start": out.cold_start,
            "usage": out.usage, "steps": out.steps,
        }  # fmt: skip
        try:
            self._queue.put_nowait(params)
        except queue.Full:
            self.dropped += 1

    def _process(self) -> subprocess.Popen[bytes] | None:
        """The recorder process, started (again) when there is none alive; None while a restart is held off."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None and time.monotonic() - self._started_at < self.RESTART_AFTER_S:
            return None
        self._started_at = time.monotonic()
        self._proc = subprocess.Popen([sys.executable, "-m", "flows.recorder"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, cwd=REPO_ROOT)  # fmt: skip
        threading.Thread(target=self._read, args=(self._proc,), daemon=True, name="first-flow-recorder-acks").start()
        return self._proc

    def _write(self) -> None:
        while True:
            params = self._queue.get()
            if params is None:
                return
            proc = self._process()
            if proc is None or proc.stdin is None:  # no recorder process now: the request was served; its record
                self.dropped += 1  # is lost
                continue
            try:
                proc.stdin.write(json.dumps(params, default=str).encode() + b"\n")
                proc.stdin.flush()
            except OSError:  # the process died meanwhile
                self.dropped += 1

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(b"ok"):
                self.recorded += 1
            else:
                self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # the process records what it has, then exits
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()


async def _record_lines() -> None:
    """The recorder process: one ``infer-record`` flow run per line of stdin, one Prefect client for all of them;
    ``ok`` or ``failed`` on stdout for each."""
    # The flow engine reuses the context's clients, where it would otherwise build one per run (an SSL context
    # each, about 20 ms of CPU).
    loop = asyncio.get_running_loop()
    with SyncClientContext.get_or_create():  # the engine's result store asks with a sync client
        async with AsyncClientContext.get_or_create():
            while True:
                line = await loop.run_in_executor(None, sys.stdin.buffer.readline)
                if not line:
                    return
                params = json.loads(line)
                try:
                    await infer_record(**params, return_state=True)
                    sys.stdout.write("ok\n")
                except Exception as exc:  # Prefect down: the request was served; only its record is lost
                    log.warning("could not record inference %s in Prefect: %s", params["request_id"], exc)
                    sys.stdout.write("failed\n")
                sys.stdout.flush()


if __name__ == "__main__":  # python -m flows.recorder (started by FlowRecorder)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_record_lines())
