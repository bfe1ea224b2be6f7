"""End to end on the endpoint side: the cluster functions run through ``globus_compute_endpoint``'s
``GlobusComputeEngine`` with a ``LocalProvider`` block whose ``worker_init`` starts vLLM CPU, as an endpoint
runs them: interchange, block, manager, worker, idle scale-in and scale-out from zero.

Only the Globus cloud hop is stood in for (it cannot be reached here): ``compute/engine_check.py``, run in
``.venv-endpoint``, packs each call as the service delivers it and hands it to ``engine.submit`` as the
endpoint's interchange does. Its own FIRST home and ports; no Prefect server or gateway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from blocks.registry import Registry
from compute.backends import ExecutorBackend
from core.settings import REPO_ROOT, Settings
from first.runner import free_port_block, stop_local_models
from tests.e2e.conftest import BIN

pytestmark = pytest.mark.e2e
ENDPOINT_PYTHON = REPO_ROOT / ".venv-endpoint" / "bin" / "python"
MAX_IDLETIME_S = 5


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment carries the marker: everything the check started inherits it."""
    needle = f"FIRST_ENGINE_CHECK={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if needle in environ.split(b"\0") and stat.rsplit(") ", 1)[1][0] != "Z":
            pids.append(int(entry))
    return pids


def test_cluster_functions_through_globus_compute_engine(tmp_path: Path) -> None:
    assert ENDPOINT_PYTHON.exists(), "no .venv-endpoint: `make test` builds it"
    settings = Settings(home=tmp_path, vllm_port_base=free_port_block(2))
    subprocess.run(
        [str(BIN / "first"), "model", "build-tiny", str(settings.models_dir / "tiny")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    registry = Registry.embedded_default(settings)
    spec = ExecutorBackend.instance_spec(registry.models["tiny"], registry.clusters["local"], settings)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    marker = uuid.uuid4().hex
    workdir = tmp_path / "endpoint"
    cmd = [str(ENDPOINT_PYTHON), "-m", "compute.engine_check", str(spec_file), str(workdir)]
    proc = subprocess.Popen(
        [*cmd, "--max-idletime", str(MAX_IDLETIME_S), "--hot-timeout", "180"],
        cwd=REPO_ROOT,
        env={**os.environ, "FIRST_ENGINE_CHECK": marker},
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "engine_check.stderr", "wb"),
        text=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = processes_with(marker)
        for pid in left:  # should be none; never leave them behind
            os.kill(pid, signal.SIGKILL)
        stop_local_models(settings)
    assert left == [], f"processes left running after the check: {left}"

    lines = stdout.strip().splitlines()
    assert lines, (tmp_path / "engine_check.stderr").read_text()[-3000:]
    r = json.loads(lines[-1])
    log = workdir / "engine_check.log"
    assert r["ok"], f"{r.get('error')}\n--- engine log tail:\n{log.read_text()[-3000:] if log.exists() else ''}"
    assert proc.returncode == 0
    steps = ("started", "first_status", "hot", "chat", "failure", "idle_scale_in", "stop", "final_status", "shutdown")
    print("engine check, seconds from engine start:", {k: r[k]["t_s"] for k in steps})

    assert (r["started"]["engine"], r["started"]["provider"]) == ("GlobusComputeEngine", "LocalProvider")
    # The first task waited for the initial block: its manager connected after worker_init started vLLM.
    assert r["first_status"]["state"] in ("starting", "hot")
    # (Block states are the provider's, refreshed every few seconds: a started block may still read PENDING.)
    assert r["first_status"]["blocks"].keys() == {"0"} and r["first_status"]["managers"]["active"] == 1
    assert r["hot"]["state"] == "hot" and r["hot"]["wait"]["states"][-1] == "hot"

    chat = r["chat"]
    assert chat["status"] == 200 and chat["body"]["object"] == "chat.completion", chat
    usage = chat["body"]["usage"]
    assert chat["body"]["choices"][0]["message"]["content"] and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # vLLM was started with its own API key: a call without it (any account on the node) is refused.
    assert r["without_key"]["status"] == 401, r["without_key"]

    # A function that raises comes back as the engine's error Result, which the SDK raises as TaskExecutionFailed.
    failure = r["failure"]
    assert failure["raised"] == "TaskExecutionFailed"
    assert "RuntimeError: deliberate failure through the engine" in failure["message"]
    assert failure["error_details"]["code"] == "RemoteExecutionError"

    # Idle scale-in: min_blocks=0, so after max_idletime the poller held the manager and killed the block;
    # vLLM, in its own session, outlives the block.
    idle = r["idle_scale_in"]
    assert idle["blocks"] == {"0": "SCALED_IN"} and idle["managers"]["active"] == 0, idle
    assert idle["block_groups_alive"] == {"0": False}
    assert idle["after_s"] < MAX_IDLETIME_S + 20
    assert idle["vllm_after"] == "hot"

    # The next task found no block: the poller scaled out a new one, whose worker_init found vLLM running.
    stop = r["stop"]
    assert stop["result"]["stopped"] and stop["result"]["pid"] == r["hot"]["pid"]
    assert stop["blocks"]["0"] == "SCALED_IN" and stop["blocks"]["1"] in ("PENDING", "RUNNING"), stop
    assert r["final_status"]["state"] == "cold"
    init = r["final_status"]["worker_init_output"]
    assert init["0"]["state"] == "starting" and init["1"]["state"] == "hot" and init["1"]["pid"] == r["hot"]["pid"]

    # Shutdown stopped every block; nothing was left for the safety net.
    assert not any(r["shutdown"]["block_groups_alive"].values()) and not r["shutdown"]["vllm_stopped_by_cleanup"]


def test_endpoint_templates_load_with_the_real_endpoint_package() -> None:
    """tests/unit/test_endpoint_templates.py again, in .venv-endpoint, where its checks against
    globus_compute_endpoint's own config loader run instead of being skipped."""
    r = subprocess.run(
        [str(ENDPOINT_PYTHON), "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
         "tests/unit/test_endpoint_templates.py"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-1000:]
