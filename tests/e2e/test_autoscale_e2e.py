"""Autoscale for real: a Prefect server with the lifecycle deployments and a worker, the gateway, and one local
cluster whose "vLLM" is the vLLM API-server double (tests/fakes/vllm_double: the simulator on the port vLLM was
given, started and stopped by the real cluster functions through the local compute endpoint).

Under a sustained load of 8 concurrent callers on an instance of 2 slots, an `autoscale` run (triggered as the UI
does) starts a second instance of the model ("m@1") on the cluster; the gateway routes over both. When the load
stops, the next run retires it: `retire-instance` drains it, then stops its process. Then allocation
accounting over the instance time those runs logged: a project declared as a block is charged, and refused once
its budget is spent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core.settings import REPO_ROOT, Settings, prefect_env
from deployments import local as deployments
from first.runner import free_port, free_port_block, gateway_command, stop_local_models, wait_http
from tests.e2e.conftest import BIN, prefect_api, stop

pytestmark = pytest.mark.e2e

DOUBLE = REPO_ROOT / "tests" / "fakes" / "vllm_double"


class Stack:
    def __init__(self, home: Path, env: dict[str, str], url: str, api: str, key: str, admin: str) -> None:
        self.home, self.env, self.url, self.api, self.key, self.admin = home, env, url, api, key, admin

    def chat(self) -> httpx.Response:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip

    def instances(self) -> dict[int, dict[str, Any]]:
        doc = httpx.get(self.url + "/v1/status", headers={"Authorization": f"Bearer {self.admin}"}, timeout=10).json()
        return {i["instance"]: i for i in doc["instances"] if i["model"] == "m"}

    def run_deployment(self, name: str, timeout_s: float = 120, **parameters: Any) -> dict[str, Any]:
        dep = prefect_api("GET", f"{self.api}/deployments/name/{name}", self.env).raise_for_status().json()
        run = prefect_api("POST", f"{self.api}/deployments/{dep['id']}/create_flow_run", self.env,
                          json={"parameters": parameters}).raise_for_status().json()  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = prefect_api("GET", f"{self.api}/flow_runs/{run['id']}", self.env).raise_for_status().json()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise AssertionError(f"{name} did not finish within {timeout_s} s: {run['state']}")

    def artifact(self, key: str) -> str:
        found = prefect_api("POST", f"{self.api}/artifacts/latest/filter", self.env,
                            json={"artifacts": {"key": {"any_": [key]}}}).raise_for_status().json()  # fmt: skip
        return found[0]["data"] if found else ""


def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("autoscale-home")
    prefect_port, gateway_port = free_port(), free_port()
    settings = Settings(home=home, port=gateway_port, vllm_port_base=free_port_block(2))
    env = {
        **os.environ, **prefect_env(settings, prefect_port), "FIRST_PORT": str(gateway_port),
        "FIRST_VLLM_PORT_BASE": str(settings.vllm_port_base), "FIRST_VLLM_PYTHON": sys.executable,
        "FIRST_FLOW_SAMPLE_RATE": "0", "FIRST_QUEUE_WAIT_S": "120", "FIRST_ALLOCATION_CHECK_S": "1",
    }  # fmt: skip
    procs: list[subprocess.Popen] = []
    (home / "logs").mkdir()

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=open(home / "logs" / f"{name}.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip
        procs.append(p)
        return p

    def first(*args: str) -> str:
        r = subprocess.run([str(BIN / "first"), *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip()

    doc = {
        "clusters": [{"name": "a", "transport": "local", "max_concurrency": 2, "expected_start_s": 5}],
        "models": [{
            "name": "m", "path": "-", "clusters": ["a"], "port": settings.vllm_port_base, "max_instances": 2,
            "vllm_env": {"PYTHONPATH": f"{DOUBLE}:{REPO_ROOT}", "FAKE_VLLM_LATENCY_S": "1.0"},
        }],
    }  # fmt: skip
    (home / "fleet.yaml").write_text(yaml.safe_dump(doc))
    try:
        prefect = spawn("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                    "--port", str(prefect_port)])  # fmt: skip
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 120, prefect)
        first("apply", str(home / "fleet.yaml"), "--prune")
        deployments.register(env)
        api = f"http://127.0.0.1:{prefect_port}/api"
        for name in deployments.SCHEDULED:  # this test triggers autoscale itself
            dep = prefect_api("GET", f"{api}/deployments/name/{name}", env).raise_for_status().json()
            prefect_api("POST", f"{api}/deployments/{dep['id']}/pause_deployment", env).raise_for_status()
        spawn("worker", deployments.worker_command())
        key = first("keys", "create", "--user", "alice")
        admin = first("keys", "create", "--user", "ops", "--group", "admin")
        gateway = spawn("gateway", gateway_command("127.0.0.1", gateway_port))
        wait_http(f"http://127.0.0.1:{gateway_port}/health", 60, gateway)
        yield Stack(home, env, f"http://127.0.0.1:{gateway_port}", api, key, admin)
    finally:
        for p in reversed(procs[1:]):
            stop(p)
        stop_local_models(settings)
        for p in procs[:1]:
            stop(p)


def test_sustained_load_scales_out_to_a_second_instance_and_quiet_scales_it_back_in(stack: Stack) -> None:
    assert stack.chat().status_code == 200  # the first request warms instance 0 (a warm-up run)
    served_by: list[str] = []
    stop_load = threading.Event()

    def caller() -> None:
        while not stop_load.is_set():
            r = stack.chat()
            assert r.status_code == 200, r.text
            served_by.append(r.json()["system_fingerprint"])

    with ThreadPoolExecutor(8) as pool:
        callers = [pool.submit(caller) for _ in range(8)]
        try:
            _scale_out_under_load(stack, served_by)
        finally:
            stop_load.set()
        for c in callers:
            c.result()
    assert len(set(served_by)) == 2
    _scale_in_when_quiet(stack)


def _scale_out_under_load(stack: Stack, served_by: list[str]) -> None:
    _wait(lambda: stack.instances()[0].get("waiting", 0) > 0 or len(served_by) > 8, 30, "a queue at instance 0")
    time.sleep(3)  # the gateway's report (every 2 s) carries the load
    run = stack.run_deployment("autoscale/autoscale", out_cooldown_s=0)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    table = stack.artifact("autoscale")
    assert "| m | out | m@1 on a |" in table, table
    _wait(lambda: stack.instances().get(1, {}).get("state") == "hot", 120, "instance m@1 hot at the gateway")
    before = len(served_by)
    _wait(lambda: len(set(served_by[before:])) == 2, 60, "requests served by both instances")


def _scale_in_when_quiet(stack: Stack) -> None:
    pid_file = stack.home / "instances" / "a" / "m@1.json"
    assert pid_file.exists(), "the second instance has its own state file"
    time.sleep(3)  # a report with nothing in flight
    run = stack.run_deployment("autoscale/autoscale", scale_in_after_s=0, in_cooldown_s=0)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert "| m | in | m@1 on a |" in stack.artifact("autoscale")
    _wait(lambda: stack.instances().get(1, {}).get("state") in (None, "cold"), 120, "m@1 retired")
    _wait(lambda: "Retired `m@1` on `a`" in stack.artifact("retire-instance"), 60, "the retire-instance artifact")
    assert stack.chat().status_code == 200 and stack.instances()[0]["state"] == "hot", "instance 0 still serves"


def test_instance_time_is_charged_to_projects_and_a_spent_one_is_refused(stack: Stack) -> None:
    """After the scale-out and scale-in above: the lifecycle runs logged each instance's time. A project declared
    with `first apply` (a FIRST Project block) whose callers used the model is charged for it; once its tiny
    budget is spent, the gateway refuses its callers with a 403 naming it, and serves everyone else."""

    def first(*args: str) -> str:
        r = subprocess.run([str(BIN / "first"), *args], env=stack.env, cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip()

    events = "".join(p.read_text() for p in (stack.home / "instance-events").glob("*.jsonl"))
    assert '"model":"m@1","state":"hot"' in events and '"model":"m@1","state":"cold"' in events
    doc = yaml.safe_load((stack.home / "fleet.yaml").read_text())
    doc["projects"] = [{"name": "astro", "groups": ["astro-team"], "gpu_hours": 0.0001}]
    (stack.home / "fleet.yaml").write_text(yaml.safe_dump(doc))
    first("apply", str(stack.home / "fleet.yaml"))
    astro = first("keys", "create", "--user", "carol", "--group", "astro-team")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def as_carol() -> httpx.Response:
        return httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {astro}"})  # fmt: skip

    assert as_carol().status_code == 200  # nothing charged to astro yet
    first("usage", "ingest")
    _wait(lambda: as_carol().status_code == 403, 60, "the gateway to see astro's budget spent")
    refused = as_carol().json()["error"]
    assert refused["code"] == "allocation_spent" and "Project 'astro'" in refused["message"]
    assert stack.chat().status_code == 200, "callers of no spent project are served"
    rows = {r["project"]: r for r in json.loads(first("usage", "allocations", "--format", "json"))}
    assert rows["astro"]["spent"] and rows["astro"]["gpu_hours_used"] > 0.0001
    assert rows["facility"]["gpu_hours_used"] > 0, "hours nobody in a project used go to the idle owner"
