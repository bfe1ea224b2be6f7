"""Federation for real: two local clusters (alpha, beta), each with its own vLLM CPU server for the tiny model,
a real Prefect server with the lifecycle deployments and a worker, and the gateway following both.

In order (one fleet for the module, as an operator would see it): 20 concurrent requests for the cold model
start exactly one warm-up; an operator's `warm-up` deployment run on beta (triggered through the Prefect API,
as the UI does) reaches the gateway's routing within seconds, and load then spreads over both; killing beta's
vLLM mid-run loses no request; `drain-cluster` on alpha lets its streams finish, then stops it; with nothing
hot, a request that won't wait gets 503 naming the cluster that is warming up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from blocks.registry import ClusterModelArgs, ClusterSpec, Registry
from core.settings import REPO_ROOT, Settings, prefect_env
from deployments import local as deployments
from first.runner import free_port, free_port_block, gateway_command, stop_local_models, wait_http
from tests.e2e.conftest import BIN, prefect_api, stop

pytestmark = pytest.mark.e2e


@dataclass
class Fleet:
    home: Path
    env: dict[str, str]
    url: str
    api: str
    key: str
    admin: str
    settings: Settings

    def chat(self, max_tokens: int = 8, timeout: float = 300, **headers: str) -> httpx.Response:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}
        auth = {"Authorization": f"Bearer {self.key}", **headers}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=auth, timeout=timeout)

    def status(self) -> dict[str, dict[str, Any]]:
        return {i["cluster"]: i for i in self.status_doc()["instances"]}

    def status_doc(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/v1/status", headers={"Authorization": f"Bearer {self.admin}"}, timeout=10)
        return r.json()

    def run_deployment(self, name: str, timeout_s: float = 300, **parameters: Any) -> dict[str, Any]:
        """What the UI's "Run" button does: create a flow run of the deployment; then wait for it to end."""
        dep = prefect_api("GET", f"{self.api}/deployments/name/{name}", self.env).raise_for_status().json()
        run = (
            prefect_api(
                "POST", f"{self.api}/deployments/{dep['id']}/create_flow_run", self.env, json={"parameters": parameters}
            )
            .raise_for_status()
            .json()
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = prefect_api("GET", f"{self.api}/flow_runs/{run['id']}", self.env).raise_for_status().json()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise AssertionError(f"{name} did not finish within {timeout_s} s: {run['state']}")

    def vllm_pid(self, cluster: str) -> int | None:
        path = self.settings.instances_dir / cluster / "tiny.json"
        if not path.exists():
            return None
        pid = json.loads(path.read_text())["pid"]
        return pid if Path(f"/proc/{pid}").exists() else None


def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fleet-home")
    prefect_port, gateway_port, vllm_port = free_port(), free_port(), free_port_block(2)
    settings = Settings(home=home, port=gateway_port, vllm_port_base=vllm_port)
    env = {
        **os.environ, **prefect_env(settings, prefect_port), "FIRST_PORT": str(gateway_port),
        "FIRST_VLLM_PORT_BASE": str(vllm_port), "FIRST_FLOW_SAMPLE_RATE": "0", "FIRST_WARM_WAIT_S": "300",
        "FIRST_REQUEST_TIMEOUT_S": "120", "FIRST_BREAKER_COOLDOWN_S": "5",
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

    # Two local clusters, each running its own vLLM for the tiny model (beta on a port of its own).
    default = Registry.embedded_default(settings)
    tiny = default.models["tiny"].model_copy(
        update={
            "clusters": ["alpha", "beta"],
            "per_cluster": {"beta": ClusterModelArgs(port=free_port_block(1))},
        }
    )
    doc = {
        "clusters": [
            ClusterSpec(name=n, transport="local", expected_start_s=60).model_dump() for n in ("alpha", "beta")
        ],
        "models": [json.loads(tiny.model_dump_json())],
    }
    (home / "fleet.yaml").write_text(yaml.safe_dump(doc))
    try:
        first("model", "build-tiny", str(settings.models_dir / "tiny"))
        prefect = spawn("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                    "--port", str(prefect_port)])  # fmt: skip
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 120, prefect)
        first("registry", "init")
        first("apply", str(home / "fleet.yaml"), "--prune")
        deployments.register(env)
        api = f"http://127.0.0.1:{prefect_port}/api"
        for name in deployments.SCHEDULED:
            # Their schedules would land at random points of the tests (test_fleet_deployments.py runs them).
            dep = prefect_api("GET", f"{api}/deployments/name/{name}", env).raise_for_status().json()
            prefect_api("POST", f"{api}/deployments/{dep['id']}/pause_deployment", env).raise_for_status()
        spawn("worker", deployments.worker_command())
        key = first("keys", "create", "--user", "alice")
        admin = first("keys", "create", "--user", "ops", "--group", "admin")
        gateway = spawn("gateway", gateway_command("127.0.0.1", gateway_port))
        wait_http(f"http://127.0.0.1:{gateway_port}/health", 60, gateway)
        yield Fleet(home, env, f"http://127.0.0.1:{gateway_port}", api, key, admin, settings)
    finally:
        for p in reversed(procs[1:]):
            stop(p)
        stop_local_models(settings)
        for p in procs[:1]:
            stop(p)


def test_20_concurrent_cold_requests_start_one_warm_up(fleet: Fleet) -> None:
    _wait(lambda: {c: i["state"] for c, i in fleet.status().items()} == {"alpha": "cold", "beta": "cold"}, 60,
          "the gateway's first status check")  # fmt: skip
    with ThreadPoolExecutor(20) as pool:
        rs = list(pool.map(lambda _: fleet.chat(), range(20)))
    assert [r.status_code for r in rs] == [200] * 20, [r.text for r in rs if r.status_code != 200]
    assert {r.headers["x-first-cluster"] for r in rs} == {"alpha"}
    assert fleet.vllm_pid("alpha") and fleet.vllm_pid("beta") is None, "exactly one vLLM started"
    status = fleet.status()
    assert status["alpha"]["state"] == "hot" and status["alpha"]["warm_ups"] == 1
    assert status["beta"]["state"] == "cold" and status["beta"]["warm_ups"] == 0


def test_an_operators_warm_up_run_reaches_routing(fleet: Fleet) -> None:
    run = fleet.run_deployment("warm-up/warm-up", model="tiny", cluster="beta")
    assert run["state"]["type"] == "COMPLETED", run["state"]
    t0 = time.monotonic()
    _wait(lambda: fleet.status()["beta"]["state"] == "hot", 30, "the gateway to see beta hot")
    seen_after_s = time.monotonic() - t0
    assert seen_after_s < 15
    # Both hot: concurrent load spreads over both (least loaded first).
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda _: fleet.chat(max_tokens=24), range(16)))
    assert [r.status_code for r in rs] == [200] * 16
    assert {r.headers["x-first-cluster"] for r in rs} == {"alpha", "beta"}


def test_killing_one_clusters_vllm_mid_run_loses_no_request(fleet: Fleet) -> None:
    pid = fleet.vllm_pid("beta")
    assert pid
    failovers = fleet.status_doc()["failovers"]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(fleet.chat, 24) for _ in range(36)]
        time.sleep(1.0)
        os.killpg(pid, signal.SIGKILL)  # beta's vLLM dies with requests in flight and more arriving
        rs = [f.result() for f in futures]
    assert [r.status_code for r in rs] == [200] * 36, [r.text for r in rs if r.status_code != 200]
    after = [fleet.chat() for _ in range(4)]
    assert [(r.status_code, r.headers["x-first-cluster"]) for r in after] == [(200, "alpha")] * 4
    doc = fleet.status_doc()
    assert doc["failovers"] > failovers, "requests in flight on beta moved to alpha"
    assert {i["cluster"]: i["state"] for i in doc["instances"]}["beta"] in ("unknown", "failed")


def test_drain_finishes_in_flight_streams_then_scales_down(fleet: Fleet) -> None:
    streams_n, max_tokens = 3, 200

    def stream() -> tuple[int, int, str | None, float]:
        """(HTTP status, completion tokens, finish reason, end time) of one stream pinned to alpha."""
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
        tokens, finish = 0, None
        headers = {"Authorization": f"Bearer {fleet.key}", "X-First-Cluster": "alpha"}
        with httpx.stream("POST", fleet.url + "/v1/chat/completions", json=body, timeout=300, headers=headers) as r:
            if r.status_code != 200:  # arrived after the gateway saw the maintenance: refused, as it should be
                assert r.status_code == 503 and "drained by" in r.read().decode(), r.read()
                return r.status_code, 0, None, time.time()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    doc = json.loads(line[6:])
                    assert "error" not in doc, doc
                    tokens = (doc.get("usage") or {}).get("completion_tokens") or tokens
                    finish = doc["choices"][0].get("finish_reason") or finish if doc.get("choices") else finish
        return 200, tokens, finish, time.time()

    with ThreadPoolExecutor(streams_n) as pool:
        streams = [pool.submit(stream) for _ in range(streams_n)]
        _wait(lambda: fleet.status()["alpha"]["inflight"] >= 1, 60, "streams on alpha")
        run = fleet.run_deployment("drain-cluster/drain-cluster", cluster="alpha", timeout_s=240)
        results = [s.result() for s in streams]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    admitted = [(n, finish, end) for status, n, finish, end in results if status == 200]
    assert len(admitted) >= 1
    # every admitted stream ran to its end: a scale-down before they finished would have cut them with an error
    # event. (How many were still running when the run began depends on how fast the worker starts it; the waiting
    # itself is checked step by step in test_fleet_deployments.py.)
    assert [(n, finish) for n, finish, _ in admitted] == [(max_tokens, "length")] * len(admitted)
    assert max(end for _, _, end in admitted) < datetime.fromisoformat(run["end_time"]).timestamp()
    assert fleet.vllm_pid("alpha") is None, "drained, then scaled down"
    # the gateway adopts the run's published observation on its next state sync (every 2 s; longer under load)
    _wait(lambda: fleet.status()["alpha"]["state"] == "cold", 20, "the gateway to see alpha cold")
    assert fleet.status()["alpha"]["inflight"] == 0
    # alpha is in maintenance now and beta's vLLM is dead (its breaker half-open again after the short cool-down):
    # a caller that won't wait hears which cluster is warming up
    r = fleet.chat(**{"X-First-Warm-Wait": "0"})
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    assert "warming up on cluster 'beta'" in r.json()["error"]["message"]
