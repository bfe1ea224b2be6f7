"""Records sampled, failed and cold-start inferences as Prefect flow runs, off the serving loop.

A flow run costs 100-300 ms of API calls and database writes (notes/prefect.md), so it must never sit
on a request's path or stall the serving event loop: the recorder owns a thread with its own loop and a
bounded queue. When Prefect falls behind, records are dropped and counted, never the requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

from prefect import flow, get_run_logger

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
) -> dict[str, Any]:
    """The trace of one served inference: its steps, their timings and its outcome."""
    logger = get_run_logger()
    for s in steps:
        logger.info("%-15s %8.2f ms %s", s["step"], s["ms"], "ok" if s["ok"] else "FAILED")
    logger.info("request %s on %s: status %s, usage %s, cold start %s", request_id, cluster, status, usage, cold_start)
    if status >= 400:
        raise RuntimeError(f"{status}: {error}")
    return {"status": status, "usage": usage}


class FlowRecorder:
    def __init__(self, maxsize: int = 1000) -> None:
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=maxsize)
        self.recorded = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._main, daemon=True, name="first-flow-recorder")
        self._thread.start()

    def submit(self, req: Any, out: Any) -> None:
        params = {
            "request_id": req.request_id, "endpoint": req.endpoint, "model": out.model, "user": req.principal.user,
            "cluster": out.cluster, "status": out.status, "error": out.error_message, "cold_start": out.cold_start,
            "usage": out.usage, "steps": out.steps,
        }  # fmt: skip
        try:
            self._queue.put_nowait(params)
        except queue.Full:
            self.dropped += 1

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        while True:
            params = await asyncio.to_thread(self._queue.get)
            if params is None:
                return
            try:
                await infer_record(**params, return_state=True)
                self.recorded += 1
            except Exception as exc:  # Prefect down: the request was served; only its record is lost
                self.dropped += 1
                log.warning("could not record inference %s in Prefect: %s", params["request_id"], exc)

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)
