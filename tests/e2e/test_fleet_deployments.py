"""The fleet deployments (prefect.yaml) run by a real worker against a real Prefect server, triggered the way the
UI does: refresh-status, scale-down, scale-down-idle and drain-cluster on two local clusters, "alpha" and "beta",
whose model server is a stand-in (an OpenAI simulator for /health, a ``sleep`` process as vLLM's pid), so no
vLLM starts. Gateways are played by the test: it publishes their reports through ``serving.bus``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from blocks.registry import ClusterSpec, ModelSpec
from compute.backends import ExecutorBackend
from core.settings import Settings, prefect_env
from deployments import local
from first.runner import free_port, free_port_block
from serving import bus
from serving.bus import GatewayReport, InstanceUse
from tests.e2e.conftest import BIN, REPO_ROOT, dump, stop
from tests.e2e.conftest import prefect_api as api
from tests.fakes.openai_simulator import OpenAISimulatorDouble

pytestmark = pytest.mark.e2e

CLUSTERS = ("alpha", "beta")
GATEWAY = "test-gateway"


@dataclass
class Fleet:
    home: Path
    env: dict[str, str]
    api: str
    settings: Settings
    sims: dict[str, OpenAISimulatorDouble]
    stand_ins: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ---- the model servers' stand-ins ----

    def serve(self, cluster: str) -> subprocess.Popen:
        """Write the state file start_vllm would have written on ``cluster``, with a ``sleep`` as vLLM."""
        previous = self.stand_ins.get(cluster)
        if previous is not None:
            previous.kill()
            previous.wait()
        proc = subprocess.Popen(
            ["sleep", "600"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.stand_ins[cluster] = proc
        spec = ExecutorBackend.instance_spec(
            ModelSpec(name="sim", path="-"), ClusterSpec(name=cluster, transport="local"), self.settings
        )
        state_dir = Path(spec["state_dir"])
        state_dir.mkdir(parents=True, exist_ok=True)
        base_url = self.sims[cluster].base_url
        state = {"pid": proc.pid, "pgid": proc.pid, "base_url": base_url, "log": str(state_dir / "sim.log"),
                 "model": "sim", "port": self.sims[cluster].port, "started": time.time()}  # fmt: skip
        (state_dir / "sim.json").write_text(json.dumps(state))
        return proc

    def running(self, cluster: str) -> bool:
        return self.stand_ins[cluster].poll() is None

    # ---- Prefect, as the UI and the gateways use it ----

    def bus(self, fn: Callable[..., Any], *args: Any) -> Any:
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        auth = self.env["PREFECT_API_AUTH_STRING"]
        with temporary_settings(updates={PREFECT_API_URL: self.api, PREFECT_API_AUTH_STRING: auth}):
            return asyncio.run(fn(*args))

    def run(self, deployment: str, parameters: dict[str, Any], timeout_s: float = 90) -> dict[str, Any]:
        """Create a flow run of ``flow/deployment`` as the UI's Run button does, and wait until it ends."""
        run = self.start(deployment, parameters)
        return self.wait(run, timeout_s)

    def start(self, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
        d = api("GET", f"{self.api}/deployments/name/{deployment}", self.env)
        assert d.status_code == 200, d.text
        r = api(
            "POST",
            f"{self.api}/deployments/{d.json()['id']}/create_flow_run",
            self.env,
            json={"parameters": parameters},
        )
        assert r.status_code == 201, r.text
        return r.json()

    def wait(self, run: dict[str, Any], timeout_s: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = api("GET", f"{self.api}/flow_runs/{run['id']}", self.env).json()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(0.5)
        assert run["state"]["type"] == "COMPLETED", f"{dump(run['state'])}\n{self.logs(run)}"
        return run

    def logs(self, run: dict[str, Any]) -> str:
        """The run's log, once it has all arrived (a run ships its logs in batches, the last after it ends)."""
        deadline = time.monotonic() + 15
        while True:
            r = api(
                "POST",
                f"{self.api}/logs/filter",
                self.env,
                json={"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
            )
            text = "\n".join(entry["message"] for entry in r.json())
            if "Finished in state" in text or time.monotonic() > deadline:
                return text
            time.sleep(0.5)

    def task_runs(self, run: dict[str, Any], expected: set[str]) -> dict[str, str]:
        """The run's steps as the UI shows them: task name -> final state type. Waits (up to 30 s) until every
        name in ``expected`` is there and every task run has its final state: the server's task-run recorder
        writes in batches, names before final states."""
        deadline = time.monotonic() + 30
        while True:
            r = api("POST", f"{self.api}/task_runs/filter", self.env, json={"flow_runs": {"id": {"any_": [run["id"]]}}})
            runs = [(t["name"].rsplit("-", 1)[0], (t.get("state") or {}).get("type")) for t in r.json()]
            tasks = dict(runs)
            final = all(state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for _, state in runs)
            if (set(tasks) >= expected and final) or time.monotonic() > deadline:
                return tasks
            time.sleep(0.5)

    def artifacts(self, run: dict[str, Any]) -> dict[str, str]:
        r = api(
            "POST", f"{self.api}/artifacts/filter", self.env, json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
        )
        return {a["key"]: a["data"] for a in r.json()}

    def observation(self, cluster: str) -> dict[str, Any]:
        r = api("GET", f"{self.api}/variables/name/{bus.state_variable(cluster, 'sim')}", self.env)
        assert r.status_code == 200, r.text
        return r.json()["value"]

    def cluster_block(self, cluster: str) -> dict[str, Any]:
        r = api("GET", f"{self.api}/block_types/slug/first-cluster/block_documents/name/{cluster}", self.env)
        assert r.status_code == 200, r.text
        return r.json()["data"]["spec"]

    def report(self, maintenance: list[str] | None = None, **uses: InstanceUse) -> None:
        report = GatewayReport(
            gateway=GATEWAY, instances={f"{c}/sim": u for c, u in uses.items()}, maintenance=maintenance or []
        )
        self.bus(bus.publish_gateway, report)


@contextmanager
def playing_gateway(fleet: Fleet, report: Callable[[], dict[str, Any]]) -> Iterator[None]:
    """A gateway publishing its report (``fleet.report(**report())``) now and every ~2 s, as real ones do."""
    done = threading.Event()

    def play() -> None:
        while not done.wait(2):
            fleet.report(**report())

    fleet.report(**report())
    player = threading.Thread(target=play, daemon=True)
    player.start()
    try:
        yield
    finally:
        done.set()
        player.join(10)


# What warm-up starts in place of vLLM (FIRST_VLLM_PYTHON): a server on --port whose /health answers 200 after
# a second of "loading".
FAKE_VLLM = """
import http.server, sys, time

port = int(sys.argv[sys.argv.index("--port") + 1])
time.sleep(1)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

REGISTRY = """
clusters:
  - {{name: alpha, transport: local, expected_start_s: 20}}
  - {{name: beta, transport: local, expected_start_s: 40}}
models:
  - name: sim
    path: "-"
    clusters: [alpha, beta]
    idle_timeout_s: 600
    per_cluster:
      alpha: {{port: {alpha}}}
      beta: {{port: {beta}}}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fleet-home")
    prefect_port = free_port()
    settings = Settings(home=home)
    fake_vllm = home / "fake-vllm"
    (home / "fake_vllm.py").write_text(FAKE_VLLM)
    fake_vllm.write_text(f'#!/bin/sh\nexec {sys.executable} {home / "fake_vllm.py"} "$@"\n')
    fake_vllm.chmod(0o755)
    env = {
        **os.environ,
        **prefect_env(settings, prefect_port),
        "FIRST_FLOW_SAMPLE_RATE": "0",
        "FIRST_VLLM_PYTHON": str(fake_vllm),
    }
    logs = home / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    sims = {c: OpenAISimulatorDouble(name="sim") for c in CLUSTERS}

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(
            cmd, env=env, cwd=REPO_ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(p)
        return p

    from first.runner import stop_local_models, wait_http

    fleet = Fleet(home, env, f"http://127.0.0.1:{prefect_port}/api", settings, sims)
    try:
        for sim in sims.values():
            sim.start()
        server = spawn("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(prefect_port)])  # fmt: skip
        wait_http(f"{fleet.api}/health", 120, server, "the Prefect server")
        registry_file = home / "registry.yaml"
        registry_file.write_text(REGISTRY.format(alpha=free_port_block(1), beta=free_port_block(1)))
        subprocess.run([str(BIN / "first"), "apply", str(registry_file)], env=env, cwd=REPO_ROOT, check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        local.register(env)
        for name in local.SCHEDULED:
            # The schedules would run them in the middle of the tests: the tests trigger them themselves.
            d = api("GET", f"{fleet.api}/deployments/name/{name}", fleet.env).json()
            api("POST", f"{fleet.api}/deployments/{d['id']}/pause_deployment", fleet.env).raise_for_status()
        spawn("worker", local.worker_command())
        for c in CLUSTERS:
            fleet.serve(c)
        yield fleet
    finally:
        for p in reversed(procs):
            stop(p)
        stop_local_models(settings)  # what warm-up started
        for p in fleet.stand_ins.values():
            p.kill()
            p.wait()
        for sim in sims.values():
            sim.stop()


def test_the_deployments_are_registered(fleet: Fleet) -> None:
    found = {}
    for name in local.DEPLOYMENTS:
        r = api("GET", f"{fleet.api}/deployments/name/{name}", fleet.env)
        assert r.status_code == 200, name
        found[name] = r.json()
    assert found["drain-cluster/drain-cluster"]["parameter_openapi_schema"]["required"] == ["cluster"]
    assert found["warm-up/warm-up"]["parameters"] == {"model": "tiny", "cluster": "best"}
    # model and cluster are drop-downs of the registry's names (issue 19), not enforced (see parameter_choices)
    forms = {name: found[name]["parameter_openapi_schema"]["properties"] for name in found}
    assert forms["warm-up/warm-up"]["model"]["enum"] == ["sim"]
    assert forms["warm-up/warm-up"]["cluster"]["enum"] == ["best", "alpha", "beta"]
    assert forms["scale-down/scale-down"]["cluster"]["enum"] == ["all", "alpha", "beta"]
    assert forms["drain-cluster/drain-cluster"]["cluster"]["enum"] == ["alpha", "beta"]
    assert "first apply" in forms["warm-up/warm-up"]["model"]["description"]
    assert not found["warm-up/warm-up"]["enforce_parameter_schema"]
    schedules = {
        name: [s["schedule"].get("interval") or s["schedule"].get("cron") for s in d["schedules"]]
        for name, d in found.items()
        if d["schedules"]
    }
    assert schedules == {
        "refresh-status/refresh-status": [60.0], "scale-down-idle/scale-down-idle": [300.0],
        "ingest-usage/ingest-usage": [60.0], "usage-report/usage-report": ["0 6 * * *"],
        "audit-retention/audit-retention": ["0 3 * * *"], "batch-retention/batch-retention": [300.0],
        "predictive-warm-up/predictive-warm-up": [600.0], "autoscale/autoscale": [30.0],
    }  # fmt: skip


def test_refresh_status_publishes_every_cluster(fleet: Fleet) -> None:
    run = fleet.run("refresh-status/refresh-status", {})
    for c in CLUSTERS:
        o = fleet.observation(c)
        assert (o["state"], o["base_url"], o["source"]) == ("hot", fleet.sims[c].base_url, run["name"]), o
    table = fleet.artifacts(run)["fleet-status"]
    assert "| alpha | sim | hot |" in table and "| beta | sim | hot |" in table


def test_scale_down_stops_the_model_on_one_cluster(fleet: Fleet) -> None:
    run = fleet.run("scale-down/scale-down", {"model": "sim", "cluster": "alpha"})
    assert not fleet.running("alpha") and fleet.running("beta")
    o = fleet.observation("alpha")
    assert (o["state"], o["source"]) == ("cold", run["name"]), o
    assert fleet.observation("beta")["state"] == "hot"
    assert "| alpha | stopped |" in fleet.artifacts(run)["scale-down-sim"]


def test_scale_down_idle_stops_only_the_idle_one(fleet: Fleet) -> None:
    fleet.serve("alpha")  # hot again (started outside FIRST): the flow's own status check finds it
    t0 = time.time()
    uses = {
        "alpha": InstanceUse(state="hot", last_used=t0 - 3600, hot_since=t0 - 7200),
        "beta": InstanceUse(state="hot", last_used=t0, hot_since=t0 - 7200),
    }
    with playing_gateway(fleet, lambda: uses):
        run = fleet.run("scale-down-idle/scale-down-idle", {})
    assert not fleet.running("alpha") and fleet.running("beta")
    assert fleet.observation("alpha")["state"] == "cold" and fleet.observation("beta")["state"] == "hot"
    table = fleet.artifacts(run)["scale-down-idle"]
    assert "| alpha | sim | 36" in table and "| 600 | stopped |" in table
    assert "| beta | sim |" in table and "keep: idle" in table


def test_warm_up_best_goes_where_the_model_is_hot(fleet: Fleet) -> None:
    run = fleet.run("warm-up/warm-up", {"model": "sim"})  # cluster "best"
    assert "best cluster for sim: beta (already hot there)" in fleet.logs(run)
    assert not fleet.running("alpha")  # nothing started
    o = fleet.observation("beta")
    assert (o["state"], o["source"]) == ("hot", run["name"]), o
    assert "Already hot" in fleet.artifacts(run)["warm-up-sim"]


def test_drain_cluster_waits_for_the_gateways_then_stops_it(fleet: Fleet) -> None:
    gateway: dict[str, Any] = {"maintenance": [], "inflight": 2}

    def report() -> dict[str, Any]:
        return {
            "maintenance": gateway["maintenance"],
            "alpha": InstanceUse(state="cold"),
            "beta": InstanceUse(state="hot", inflight=gateway["inflight"], last_used=time.time()),
        }

    with playing_gateway(fleet, report):
        run = fleet.start("drain-cluster/drain-cluster", {"cluster": "beta", "timeout_s": 60})
        deadline = time.monotonic() + 60
        while not fleet.cluster_block("beta")["maintenance"]:  # the gateway notices the block's maintenance
            assert time.monotonic() < deadline, "drain-cluster did not set maintenance"
            time.sleep(0.5)
        gateway.update(maintenance=["beta"], inflight=1)
        time.sleep(3)
        assert fleet.running("beta"), "stopped while a request was still in flight"
        gateway["inflight"] = 0
        run = fleet.wait(run, 60)
    assert not fleet.running("beta")
    spec = fleet.cluster_block("beta")
    assert spec["maintenance"] and spec["maintenance_message"].startswith(f"drained by {run['name']} at ")
    assert not fleet.cluster_block("alpha")["maintenance"]
    o = fleet.observation("beta")
    assert (o["state"], o["source"]) == ("cold", run["name"]), o
    logs = fleet.logs(run)
    assert "1 requests still in flight on cluster beta" in logs, logs
    assert "clear `maintenance`" in logs
    assert "| sim | stopped |" in fleet.artifacts(run)["drain-beta"]
    steps = fleet.task_runs(run, {"enter-maintenance", "wait-for-drain", "stop-model", "publish-state"})
    assert steps == dict.fromkeys(["enter-maintenance", "wait-for-drain", "stop-model", "publish-state"], "COMPLETED")


def test_warm_up_best_starts_it_out_of_maintenance(fleet: Fleet) -> None:
    # beta (drained above) stays in maintenance: "best" is alpha, although both are cold now.
    run = fleet.run("warm-up/warm-up", {"model": "sim", "timeout_s": 60})
    assert "best cluster for sim: alpha (smallest expected start" in fleet.logs(run)
    state = json.loads((fleet.settings.instances_dir / "alpha" / "sim.json").read_text())
    assert httpx.get(state["base_url"] + "/health", timeout=5).status_code == 200
    o = fleet.observation("alpha")
    assert (o["state"], o["base_url"], o["source"]) == ("hot", state["base_url"], run["name"]), o
    assert fleet.observation("beta")["state"] == "cold"
    # The run's steps are task runs, each in its final state, as an operator sees them in the UI.
    steps = fleet.task_runs(run, {"check-status", "submit-start", "wait-until-healthy", "publish-state"})
    assert steps == dict.fromkeys(["check-status", "submit-start", "wait-until-healthy", "publish-state"], "COMPLETED")
    assert "| alpha | sim |" in fleet.artifacts(run)["warm-up-sim"]


def test_predictive_warm_up_warms_a_model_ahead_of_its_busy_hour(fleet: Fleet) -> None:
    """Four past weeks of usage say 'sim' is busy this hour: the scheduled predictive-warm-up (run here as its
    schedule would) starts a warm-up run before any request, and the model is hot again."""
    from datetime import UTC, datetime, timedelta

    from analytics.records import UsageRecord
    from analytics.spool import UsageSpool
    from analytics.store import UsageStore

    fleet.run("scale-down/scale-down", {"model": "sim", "cluster": "all"})
    soon = datetime.now(UTC) + timedelta(minutes=5)
    spool = fleet.home / "history-spool"
    with UsageSpool(spool) as s:
        for k in range(1, 5):
            for i in range(30):
                at = soon - timedelta(weeks=k, seconds=i)
                s.append(UsageRecord(request_id=f"hist-{k}-{i}", ts=at.timestamp(), user="u", model="sim",
                                     endpoint="chat.completions"))  # fmt: skip
    UsageStore(fleet.settings.usage_db).ingest(spool)
    run = fleet.run("predictive-warm-up/predictive-warm-up", {}, timeout_s=120)
    table = fleet.artifacts(run)["predictive-warm-up"]
    assert "| sim | warm | 30.0 |" in table, table
    deadline = time.monotonic() + 120  # the warm-up it started, a run of the warm-up deployment of its own
    while time.monotonic() < deadline and fleet.observation("alpha")["state"] != "hot":
        time.sleep(1)
    assert fleet.observation("alpha")["state"] == "hot"
    again = fleet.run("predictive-warm-up/predictive-warm-up", {"dry_run": True}, timeout_s=120)
    assert "| sim | keep |" in fleet.artifacts(again)["predictive-warm-up"]  # running: kept through the hour
    t0 = time.time()  # idle for an hour by the gateways' account: scale-down-idle keeps it for the busy hour
    uses = {"alpha": InstanceUse(state="hot", last_used=t0 - 3600, hot_since=t0 - 7200)}
    with playing_gateway(fleet, lambda: uses):
        idle = fleet.run("scale-down-idle/scale-down-idle", {})
    assert "keep: a busy hour is predicted" in fleet.artifacts(idle)["scale-down-idle"]
    assert fleet.observation("alpha")["state"] == "hot"
