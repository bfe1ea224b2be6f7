"""Run the cluster functions through a real Globus Compute endpoint engine, without the Globus cloud.

Runs in an environment with ``globus-compute-endpoint`` (``.venv-endpoint``, made by ``make test``):

    .venv-endpoint/bin/python -m compute.engine_check SPEC_JSON WORKDIR [--max-idletime S]

What is real: ``GlobusComputeEngine`` (Parsl's HighThroughputExecutor: its interchange process, a
``LocalProvider`` block whose ``worker_init`` starts vLLM through ``compute.functions.start_vllm``, the
block's manager and worker, CurveZMQ between them, the job-status poller's scale-out and idle scale-in)
and the worker's ``execute_task``, which unpacks the task, runs the function and packs the result.
What stands in: only the cloud hop. Each call is packed as the Globus Compute service delivers it (a
messagepack ``Task`` whose buffer is the function followed by its arguments) and handed to
``engine.submit`` with a ``GCFuture``, as the endpoint's interchange does with what it reads from
the service's queue; the packed ``Result`` is read back as the SDK does (``TaskExecutionFailed`` when it
is an error).

Prints one JSON document with what it observed; exits 1 if a step failed. Everything it started (the
engine, its block, vLLM) is stopped before it exits, also on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any


def boom(message: str) -> None:
    """A cluster function that fails (by reference, like the functions in compute.functions)."""
    raise RuntimeError(message)


def wait_until_hot(spec: dict[str, Any], timeout_s: float, period_s: float = 0.5) -> dict[str, Any]:
    """Poll ``vllm_status`` on the worker, as the warm-up flow polls it, but as one task: a block counts
    as idle whenever the job-status poller finds no task outstanding, and short polls between pauses
    leave it looking idle, so it would be scaled in during the warm-up."""
    from compute.functions import vllm_status

    t0 = time.monotonic()
    states: list[str] = []
    while True:
        status = vllm_status(spec)
        if not states or states[-1] != status["state"]:
            states.append(status["state"])
        if status["state"] in ("hot", "failed", "cold") or time.monotonic() - t0 > timeout_s:
            return {**status, "states": states, "waited_s": round(time.monotonic() - t0, 1)}
        time.sleep(period_s)


class EngineCaller:
    """Submit cluster functions to an engine as the endpoint's interchange does; read results as the SDK."""

    def __init__(self, engine: Any) -> None:
        from globus_compute_sdk.serialize import ComputeSerializer

        self.engine = engine
        self.serde = ComputeSerializer()
        self.tasks = 0

    def __call__(self, fn: Any, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Result, Task
        from globus_compute_endpoint.engines.base import GCFuture
        from globus_compute_sdk.errors import TaskExecutionFailed

        task_id = uuid.uuid4()
        # As stored by register_function, then as the SDK's Batch packs the arguments; the service joins them.
        fn_buf = self.serde.pack_buffers([self.serde.serialize(fn)])
        args_buf = self.serde.pack_buffers([self.serde.serialize(args), self.serde.serialize(kwargs)])
        packed = messagepack.pack(Task(task_id=task_id, task_buffer=fn_buf + args_buf))
        fut = GCFuture(task_id, function_id=uuid.uuid4())
        self.engine.submit(fut, packed, resource_specification={})
        self.tasks += 1
        result = messagepack.unpack(fut.result(timeout=timeout))
        assert isinstance(result, Result) and result.task_id == task_id, result
        if result.is_error:
            exc = TaskExecutionFailed(result.data, str(time.time()))
            exc.error_details = result.error_details  # type: ignore[attr-defined]
            raise exc
        return self.serde.deserialize(result.data)


def blocks(engine: Any) -> dict[str, str]:
    return {bid: s.state.name for bid, s in engine.executor.status_facade.items()}


def managers(engine: Any) -> dict[str, int]:
    """Managers the interchange knows, as in the endpoint's heartbeat; a scaled-in block's manager is held
    (inactive) at once and forgotten only after the heartbeat threshold."""
    state = engine.get_status_report().global_state
    return {"connected": int(state["managers"]), "active": int(state["active_managers"])}


def block_pids(engine: Any) -> dict[str, int]:
    """Block id -> the pid of the block's launch shell (LocalProvider runs each block in its own group)."""
    res = engine.provider.resources
    return {bid: res[job]["remote_pid"] for bid, job in engine.executor.blocks_to_job_id.items() if job in res}


def worker_init_output(engine: Any) -> dict[str, Any]:
    """Block id -> start_vllm's answer as its worker_init printed it (the first line of the block's output)."""
    res = engine.provider.resources
    out: dict[str, Any] = {}
    for bid, job in engine.executor.blocks_to_job_id.items():
        path = Path(res[job]["script_path"] + ".out") if job in res else None
        lines = path.read_text().splitlines() if path and path.exists() else []
        out[bid] = json.loads(lines[0]) if lines and lines[0].startswith("{") else None
    return out


def group_alive(pgid: int) -> bool:
    from compute.functions import _group_has_live_members

    return _group_has_live_members(pgid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec", help="the model spec (compute.backends' instance_spec), as a JSON file")
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--max-idletime", type=float, default=5.0)
    ap.add_argument("--hot-timeout", type=float, default=180.0)
    a = ap.parse_args()

    from globus_compute_endpoint.engines import GlobusComputeEngine
    from parsl.providers import LocalProvider

    from compute import functions
    from compute.engine_check import boom, wait_until_hot  # by reference, not as __main__'s

    a.workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=a.workdir / "engine_check.log", level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s"
    )
    venv_bin = Path(sys.executable).parent
    # The engine launches its interchange and the block's workers with the `globus-compute-endpoint` command.
    os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    spec = json.loads(Path(a.spec).read_text())
    init_code = "import json, sys; from compute.functions import start_vllm; print(json.dumps(start_vllm(json.load(open(sys.argv[1])))))"  # noqa: E501
    worker_init = (
        f"source {shlex.quote(str(venv_bin / 'activate'))}\n"
        f"python -c {shlex.quote(init_code)} {shlex.quote(str(Path(a.spec).resolve()))}"
    )
    engine = GlobusComputeEngine(
        label="first-engine-check",
        address="127.0.0.1",
        max_workers_per_node=1,
        heartbeat_period=5,
        provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1, worker_init=worker_init),
        job_status_kwargs={"max_idletime": a.max_idletime, "strategy_period": 1.0},
    )
    out: dict[str, Any] = {"ok": False, "worker_init": worker_init}
    t0 = time.monotonic()

    def mark(step: str, **info: Any) -> None:
        out[step] = {"t_s": round(time.monotonic() - t0, 1), **info}

    try:
        engine.start(endpoint_id=uuid.uuid4(), run_dir=str(a.workdir / "endpoint"))
        mark("started", engine=type(engine).__name__, provider=type(engine.provider).__name__, blocks=blocks(engine))
        call = EngineCaller(engine)

        first = call(functions.vllm_status, spec)  # waits for the block: its worker_init has started vLLM
        mark("first_status", state=first["state"], blocks=blocks(engine), managers=managers(engine))
        hot = call(wait_until_hot, spec, a.hot_timeout, timeout=a.hot_timeout + 30)
        status = call(functions.vllm_status, spec)
        mark("hot", wait=hot, state=status["state"], pid=status.get("pid"), base_url=status.get("base_url"))
        if status["state"] != "hot":
            raise RuntimeError(f"vLLM did not become hot: {hot}")

        body = {"model": spec["served_name"], "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
        key_ref = {"state_dir": spec["state_dir"], "model": spec["model"]}  # where the server's API key is
        reply = call(functions.openai_request, status["base_url"], "/v1/chat/completions", body, 60.0, key_ref,
                     timeout=90)  # fmt: skip
        mark("chat", status=reply["status"], body=reply["body"])
        keyless = call(functions.openai_request, status["base_url"], "/v1/chat/completions", body, 60.0, timeout=90)
        mark("without_key", status=keyless["status"])

        try:
            call(boom, "deliberate failure through the engine")
            mark("failure", raised=None)
        except Exception as exc:
            mark(
                "failure", raised=type(exc).__name__, message=str(exc)[-600:],
                error_details=dict(getattr(exc, "error_details", None) or {}),
            )  # fmt: skip

        # Idle scale-in: no task for longer than max_idletime; the poller scales the block in (min_blocks=0).
        pids_before = block_pids(engine)
        t_idle = time.monotonic()
        while time.monotonic() - t_idle < a.max_idletime + 60:
            states = blocks(engine)
            if states and all(s == "SCALED_IN" for s in states.values()) and managers(engine)["active"] == 0:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # let the provider's kill reach the block's process group
        mark(
            "idle_scale_in", after_s=round(time.monotonic() - t_idle, 1), blocks=blocks(engine),
            managers=managers(engine), block_groups_alive={b: group_alive(p) for b, p in pids_before.items()},
            vllm_after=functions.vllm_status(spec)["state"],  # read here, not through the engine: no task now
        )  # fmt: skip

        # A task with no block: the poller scales out a new one; its worker_init finds vLLM running.
        stopped = call(functions.stop_vllm, spec, timeout=120)
        mark("stop", result=stopped, blocks=blocks(engine))
        final = call(functions.vllm_status, spec)
        mark("final_status", state=final["state"], tasks=call.tasks, worker_init_output=worker_init_output(engine))
        out["ok"] = True
    except Exception:
        out["error"] = traceback.format_exc()[-3000:]
    finally:
        pids = block_pids(engine)
        try:
            engine.shutdown()
        except Exception:
            out["shutdown_error"] = traceback.format_exc()[-1000:]
        leftover = functions.stop_vllm(spec, grace_s=10)  # the safety net: vLLM runs in its own session
        deadline = time.monotonic() + 15
        while any(group_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        mark(
            "shutdown", vllm_stopped_by_cleanup=leftover.get("stopped", False),
            block_groups_alive={b: group_alive(p) for b, p in pids.items()},
        )  # fmt: skip
        print(json.dumps(out, default=str))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
