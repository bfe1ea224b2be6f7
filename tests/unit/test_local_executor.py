"""The local compute endpoint: a real worker process, arguments and results through ComputeSerializer."""

import os
import signal
import time

import pytest
from globus_compute_sdk.errors import TaskExecutionFailed

from compute import functions
from compute.local import EndpointLost, LocalComputeExecutor


@pytest.fixture(scope="module")
def executor():
    ex = LocalComputeExecutor(workers=4)
    yield ex
    ex.shutdown()


def test_runs_cluster_functions_in_another_process(executor, tmp_path):
    spec = {"state_dir": str(tmp_path), "model": "m"}
    assert executor.submit(functions.vllm_status, spec).result(timeout=30) == {"state": "cold"}
    assert executor.submit(os.getpid).result(timeout=30) == executor.pid != os.getpid()


def test_remote_failure_is_task_execution_failed(executor):
    with pytest.raises(TaskExecutionFailed) as e:
        executor.submit(functions.vllm_status, {}).result(timeout=30)
    assert "KeyError" in str(e.value) and "state_dir" in str(e.value)


def test_unreachable_vllm_is_reported_not_raised(executor):
    result = executor.submit(functions.openai_request, "http://127.0.0.1:9", "/v1/completions", {}, 2.0).result(30)
    assert result["status"] == 503 and result["kind"] == "unreachable"


def test_lifecycle_functions_manage_a_process_group(executor, tmp_path):
    """start_vllm's process handling, with a stand-in command: a sleeping python child (no vLLM needed)."""
    import sys

    spec = {
        "state_dir": str(tmp_path), "model": "m", "served_name": "m", "model_path": "-", "port": 9,
        "python": sys.executable, "args": [], "env": {},
    }  # fmt: skip
    # "python -m vllm..." fails at once in this env (no vLLM here): the status says failed, with the log tail.
    started = executor.submit(functions.start_vllm, spec).result(timeout=30)
    assert started["state"] == "starting" and started["pid"] > 0
    deadline = time.monotonic() + 20
    while (status := functions.vllm_status(spec))["state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status["state"] == "failed" and "vllm" in status["detail"].lower()
    stopped = functions.stop_vllm(spec)
    assert stopped["state"] == "cold" and not (tmp_path / "m.json").exists()


def test_endpoint_death_fails_pending_futures():
    ex = LocalComputeExecutor(workers=2)
    fut = ex.submit(time.sleep, 30)
    os.kill(ex.pid, signal.SIGKILL)
    with pytest.raises(EndpointLost, match="exited"):
        fut.result(timeout=10)
    with pytest.raises(EndpointLost):  # and it takes no more work
        ex.submit(os.getpid)
    ex.shutdown()


def test_registered_functions_run_by_id(executor, tmp_path):
    fid = executor.register_function(functions.vllm_status)
    spec = {"state_dir": str(tmp_path), "model": "m"}
    assert executor.submit_to_registered_function(fid, args=(spec,)).result(timeout=30) == {"state": "cold"}
    assert executor.register_function(os.getpid, function_id="fixed-id") == "fixed-id"
    assert executor.submit_to_registered_function("fixed-id").result(timeout=30) == executor.pid
    with pytest.raises(ValueError, match="no function registered"):
        executor.submit_to_registered_function("unknown")


def test_a_hung_vllm_is_a_timeout_not_unreachable(executor):
    from tests.unit.test_api import HangingBackendDouble

    with HangingBackendDouble() as hung:
        url = f"http://127.0.0.1:{hung.port}"
        result = executor.submit(functions.openai_request, url, "/v1/completions", {}, 1.0).result(30)
    assert result["status"] == 504 and result["kind"] == "timeout"


def test_each_vllm_gets_its_own_api_key_that_only_cluster_functions_use(executor, tmp_path):
    """start_vllm makes a key, hands it to vLLM in its environment (not its command line), keeps it in the 0600
    state file, and never returns it; openai_request finds it there. Without it the server answers 401."""
    import json
    import sys

    from tests.fakes.openai_simulator import OpenAISimulatorDouble

    spec = {
        "state_dir": str(tmp_path), "model": "m", "served_name": "m", "model_path": "-", "port": 9,
        "python": sys.executable, "args": [], "env": {},
    }  # fmt: skip
    started = executor.submit(functions.start_vllm, spec).result(timeout=30)
    state_file = tmp_path / "m.json"
    key = json.loads(state_file.read_text())["api_key"]
    assert len(key) >= 40 and "api_key" not in started and key not in json.dumps(started)
    assert state_file.stat().st_mode & 0o777 == 0o600
    assert key not in " ".join(json.loads(state_file.read_text())["cmd"])  # not in `ps` output
    assert "api_key" not in functions.vllm_status(spec)
    functions.stop_vllm(spec)

    # The key as a server (vLLM's --api-key, here the simulator's) checks it.
    state_file.write_text(json.dumps({"pid": 1, "api_key": "k-123", "base_url": "-", "log": "-"}))
    ref = {"state_dir": str(tmp_path), "model": "m"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with OpenAISimulatorDouble(latency_s=0.0, api_key="k-123") as sim:
        with_key = executor.submit(functions.openai_request, sim.base_url, "/v1/chat/completions", chat, 10.0, ref)
        without = executor.submit(functions.openai_request, sim.base_url, "/v1/chat/completions", chat, 10.0)
        assert with_key.result(30)["status"] == 200
        assert without.result(30)["status"] == 401


def test_a_killed_server_is_not_alive_before_its_parent_reaps_it():
    """A killed vLLM must read as failed, never as "starting" (alive, health failing) while it is torn down."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert functions._pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        assert not functions._pid_alive(child.pid), "killed, still being torn down (state R): not alive"
        deadline = time.monotonic() + 10
        while open(f"/proc/{child.pid}/stat").read().split(") ", 1)[1][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not functions._pid_alive(child.pid), "a zombie its parent has not reaped yet: not alive"
    finally:
        child.wait()
    assert not functions._pid_alive(child.pid)


def test_a_state_whose_pid_was_reused_is_failed_at_once_and_never_signalled(tmp_path):
    """After a crash, a state file's pid may belong to another process: vllm_status says failed (a warm-up then
    starts afresh instead of waiting on it), and stop_vllm signals nothing."""
    import json

    spec = {"state_dir": str(tmp_path), "model": "m"}
    identity = functions._proc_identity(os.getpid())
    assert identity is not None
    boot, start = identity.rsplit(":", 1)
    state = {"pid": os.getpid(), "port": 9, "base_url": "http://127.0.0.1:9", "log": str(tmp_path / "m.log"),
             "model": "m", "identity": f"{boot}:{int(start) + 1}"}  # fmt: skip  # this test's pid, another process
    (tmp_path / "m.json").write_text(json.dumps(state))
    status = functions.vllm_status(spec)
    assert status["state"] == "failed" and "pid was reused" in status["detail"]
    assert functions.stop_vllm(spec) == {"state": "cold", "stopped": False, "pid": os.getpid()}
    assert not (tmp_path / "m.json").exists()  # and this process is still here to say so
    state["identity"] = identity  # the real one: alive, /health not answering yet
    (tmp_path / "m.json").write_text(json.dumps(state))
    assert functions.vllm_status(spec)["state"] == "starting"


def test_a_fresh_start_ends_the_engine_processes_a_killed_vllm_left_behind(tmp_path):
    """vLLM's API server was SIGKILLed (a crash) and its engine and worker live on in its process group, holding
    the model's memory: the next start ends those (they name themselves vLLM), and nothing else in the group."""
    import json
    import subprocess
    import sys

    leader = subprocess.Popen(["bash", "-c", "(exec -a VLLM::Worker sleep 300) & (exec -a bystander sleep 301) & wait"],
                              start_new_session=True)  # fmt: skip
    time.sleep(0.5)
    members = [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == leader.pid]
    worker = next(p for p in members if open(f"/proc/{p}/cmdline", "rb").read().startswith(b"VLLM::Worker"))
    bystander = next(p for p in members if open(f"/proc/{p}/cmdline", "rb").read().startswith(b"bystander"))
    os.kill(leader.pid, signal.SIGKILL)  # the crash: the server dies, its group lives on
    leader.wait()
    spec = {"state_dir": str(tmp_path), "model": "m", "served_name": "m", "model_path": "-", "port": 9,
            "python": sys.executable, "args": [], "env": {}}  # fmt: skip
    (tmp_path / "m.json").write_text(
        json.dumps(
            {"pid": leader.pid, "identity": "gone", "base_url": "http://x:9", "log": str(tmp_path / "m.log"), "port": 9}
        )
    )
    try:
        functions.start_vllm(spec)
        deadline = time.monotonic() + 5
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker) and _running(bystander)
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        functions.stop_vllm(spec, grace_s=0)


def _pgid(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[2])
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False
