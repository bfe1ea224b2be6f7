"""vLLM's own batch runner (``vllm run-batch``) on a cluster: one chunk of a batch's lines, run where the model is.

Cluster functions, under the rules of ``compute/functions.py`` (module level, JSON-like values, imports inside).
The lines travel inline both ways, gzip-compressed and base64-encoded: a chunk needs no staged file and no
shared file system between the gateway and the cluster, and both directions stay under Globus Compute's payload
limit (a chunk whose answers would not is refused with a message that says to lower
``FIRST_BATCH_CLUSTER_CHUNK_LINES``). vLLM's runner reads and writes OpenAI's batch line format, the one the
``run-batch`` flow keeps its results in.

On a cluster with a batch scheduler this runs inside the endpoint's block, on a node of the job that holds it,
like ``start_vllm``. The runner loads its own copy of the model: a block that also serves the model interactively
needs the room for both (or a block of its own for batches, which the endpoint's ``max_blocks`` allows).
"""

from __future__ import annotations

from typing import Any

# Result payloads above this are refused (Globus Compute's limit is 10 MB per result, with its own framing).
MAX_RESULT_BYTES = 8 * 1024 * 1024
# Server-only vLLM options that the batch runner does not take (value-taking ones, then flags).
_SERVER_OPTIONS = frozenset({
    "--host", "--port", "--uds", "--api-key", "--root-path", "--uvicorn-log-level", "--ssl-keyfile",
    "--ssl-certfile", "--ssl-ca-certs", "--allowed-origins", "--allowed-methods", "--allowed-headers",
    "--middleware", "--served-model-name", "--grpc-port",
})  # fmt: skip
_SERVER_FLAGS = frozenset({
    "--disable-uvicorn-access-log", "--allow-credentials", "--enable-ssl-refresh", "--disable-fastapi-docs",
    "--enable-request-id-headers", "--enable-offline-docs",
})  # fmt: skip


def runner_args(args: list[str]) -> list[str]:
    """The model's vLLM options less those only its HTTP server takes (``--port 8001``, ``--host=...``)."""
    kept: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in _SERVER_FLAGS or (name in _SERVER_OPTIONS and "=" in arg):
            continue
        if name in _SERVER_OPTIONS:
            skip_value = True
            continue
        kept.append(arg)
    return kept


def _folder(spec: dict[str, Any], tag: str) -> Any:
    from pathlib import Path

    from compute.functions import expand_cluster_path

    if not tag.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"batch chunk tag {tag!r} must be letters, digits, '-' and '_'")
    return Path(expand_cluster_path(spec["state_dir"], "state_dir")) / "batches" / tag


def _log_tail(path: Any, size: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def run_vllm_batch(spec: dict[str, Any], tag: str, lines_gz: str, timeout_s: float) -> dict[str, Any]:
    """Run vLLM's batch runner on ``lines_gz`` (a chunk's request lines, gzip + base64) with the model of
    ``spec`` (what ``start_vllm`` takes). Blocks until it ends.

    Returns ``{"status": "ok", "output": <gzip + base64 of its output lines>, "lines", "seconds", "host",
    "job_id"}`` or ``{"status": "failed", "detail": <why, with the runner's log tail>}``. The chunk's folder
    (``<state_dir>/batches/<tag>``) is removed after a run that succeeded, and kept with its log after one that
    failed.
    """
    import base64
    import gzip
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import time

    from compute.functions import expand_cluster_path

    folder = _folder(spec, tag)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    source, target, log_path = folder / "input.jsonl", folder / "output.jsonl", folder / "runner.log"
    data = gzip.decompress(base64.b64decode(lines_gz))
    with os.fdopen(os.open(source, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        fh.write(data)
    target.unlink(missing_ok=True)
    nice = ["nice", "-n", str(spec["nice"])] if spec.get("nice") else []
    cmd = [
        *nice, expand_cluster_path(spec["python"], "python"), "-m", "vllm.entrypoints.openai.run_batch",
        "-i", str(source), "-o", str(target), "--model", spec["model_path"],
        "--served-model-name", spec["served_name"], *runner_args(list(spec.get("args", []))),
    ]  # fmt: skip
    started = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **spec.get("env", {})}, start_new_session=True,
        )  # fmt: skip
    (folder / "pid").write_text(str(proc.pid))
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"status": "failed", "detail": f"vLLM's batch runner did not finish within {timeout_s:g} s. "
                f"Log tail:\n{_log_tail(log_path)}"}  # fmt: skip
    if rc != 0 or not target.exists():
        why = "was stopped (the batch was cancelled)" if rc in (-signal.SIGTERM, -signal.SIGKILL) else f"exited {rc}"
        return {"status": "failed", "detail": f"vLLM's batch runner {why}. Log tail:\n{_log_tail(log_path)}"}
    output = target.read_bytes()
    packed = base64.b64encode(gzip.compress(output, compresslevel=6)).decode()
    if len(packed) > MAX_RESULT_BYTES:
        return {"status": "failed", "detail": f"the chunk's answers are {len(packed)} bytes compressed, over the "
                f"{MAX_RESULT_BYTES} a result may carry: lower FIRST_BATCH_CLUSTER_CHUNK_LINES"}  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "status": "ok", "output": packed, "lines": output.count(b"\n"), "seconds": time.monotonic() - started,
        "host": socket.gethostname(), "job_id": os.environ.get("PBS_JOBID") or os.environ.get("SLURM_JOB_ID"),
    }  # fmt: skip


def cancel_vllm_batch(spec: dict[str, Any], tag: str, grace_s: float = 10.0) -> dict[str, Any]:
    """Stop a running chunk of vLLM's batch runner (the batch was cancelled): SIGTERM to its process group,
    SIGKILL after ``grace_s``. Returns ``{"cancelled": bool}``."""
    import os
    import signal
    import time

    try:
        pid = int((_folder(spec, tag) / "pid").read_text())
    except (OSError, ValueError):
        return {"cancelled": False}
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return {"cancelled": False}
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return {"cancelled": True}
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return {"cancelled": True}
