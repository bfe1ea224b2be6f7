"""The compute transport: cluster functions registered once and run by id through an executor with the Globus
Compute interface (here the local endpoint, the same functions and serializer), per-request timeouts that
cancel one request only, errors mapped to OpenAI-shaped statuses, and executors rebuilt after a failure."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from blocks.registry import ClusterSpec, ModelSpec
from compute import functions
from compute.backends import Backends, ExecutorBackend
from compute.relay import RelayHub
from core.errors import APIError
from tests.unit.test_api import HangingBackendDouble

MODEL = ModelSpec(name="m", path="-")


@pytest.fixture
async def backends(settings):
    b = Backends(settings, RelayHub())
    yield b
    await b.close()


def local(backends: Backends, name: str = "local") -> ExecutorBackend:
    backend = backends.get(ClusterSpec(name=name, transport="local"))
    assert isinstance(backend, ExecutorBackend)
    return backend


async def test_local_cluster_runs_the_registered_functions_by_id(backends):
    backend = local(backends)
    assert await backend.status(MODEL) == {"state": "cold"}
    _, ids = await backends.pool.get(backend.cluster)
    assert set(ids) == set(functions.CLUSTER_FUNCTIONS)  # every cluster function, registered once
    assert all(ids.values()) and len(set(ids.values())) == len(ids)
    assert backends.pool.built == 1


async def test_a_timeout_cancels_only_that_request(backends):
    backend = local(backends)
    with HangingBackendDouble() as hung:
        url = f"http://127.0.0.1:{hung.port}"
        slow = asyncio.create_task(backend.call("openai_request", url, "/v1/completions", {}, 30.0, timeout=1.0))
        fine = await backend.status(MODEL)  # another request on the same executor, meanwhile
        with pytest.raises(APIError) as e:
            await slow
    assert e.value.status == 504 and e.value.code == "backend_timeout" and "1 s" in e.value.message
    assert fine == {"state": "cold"}
    assert await backend.status(MODEL) == {"state": "cold"}  # the shared executor still serves
    assert backends.pool.built == 1


async def test_a_function_that_raises_is_502_naming_the_remote_cause(backends):
    backend = local(backends)
    with pytest.raises(APIError) as e:
        await backend.call("vllm_status", {"model": "m"})  # no state_dir: KeyError on the endpoint
    assert e.value.status == 502 and e.value.code == "task_failed"
    assert "KeyError" in e.value.internal and "state_dir" in e.value.internal  # for operators: /v1/status, logs
    assert "KeyError" not in e.value.message  # callers get the cluster and the kind of failure only
    assert backends.pool.built == 1  # a function's failure is not the executor's


async def test_a_lost_endpoint_is_503_and_the_next_request_gets_a_new_one(backends):
    backend = local(backends)
    executor, _ = await backends.pool.get(backend.cluster)
    with HangingBackendDouble() as hung:
        url = f"http://127.0.0.1:{hung.port}"
        in_flight = asyncio.create_task(backend.call("openai_request", url, "/v1/completions", {}, 30.0))
        await asyncio.sleep(0.5)
        os.kill(executor.pid, signal.SIGKILL)
        with pytest.raises(APIError) as e:
            await in_flight
    assert e.value.status == 503 and e.value.code == "endpoint_unreachable" and "exited" in e.value.internal
    assert e.value.headers["Retry-After"]
    assert await backend.status(MODEL) == {"state": "cold"}  # served by a rebuilt endpoint
    assert backends.pool.built == 2


async def test_clusters_share_nothing_but_their_own_executor(backends):
    a, b = local(backends, "a"), local(backends, "b")
    assert await a.status(MODEL) == await b.status(MODEL) == {"state": "cold"}
    (ex_a, _), (ex_b, _) = await backends.pool.get(a.cluster), await backends.pool.get(b.cluster)
    assert ex_a is not ex_b and ex_a.pid != ex_b.pid


async def test_concurrent_first_requests_build_one_executor(backends):
    backend = local(backends)
    results = await asyncio.gather(*(backend.status(MODEL) for _ in range(20)))
    assert results == [{"state": "cold"}] * 20 and backends.pool.built == 1


async def test_globus_compute_cluster_without_credentials_is_503_never_an_interactive_login(backends, monkeypatch):
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_ID", raising=False)
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_SECRET", raising=False)
    cluster = ClusterSpec(
        name="polaris", transport="globus-compute", endpoint_id="4b116d3c-1703-4f8f-9f6f-39921e5864df"
    )
    backend = backends.get(cluster)
    with pytest.raises(APIError) as e:
        await backend.status(MODEL)
    assert e.value.status == 503 and "GLOBUS_COMPUTE_CLIENT_ID" in e.value.internal


async def test_registered_ids_run_the_functions_a_cluster_block_names(backends, tmp_path):
    """`first functions register` stores ids from register_functions in the block; the gateway then runs by id.
    Here the local endpoint plays the registrar (it has Globus Compute's register_function)."""
    from compute.globus_compute import register_functions
    from compute.local import LocalComputeExecutor

    endpoint = LocalComputeExecutor(workers=2)
    try:
        ids = register_functions(endpoint)
        assert set(ids) == set(functions.CLUSTER_FUNCTIONS)
        spec = {"state_dir": str(tmp_path), "model": "m"}
        fut = endpoint.submit_to_registered_function(ids["vllm_status"], args=(spec,))
        assert fut.result(timeout=30) == {"state": "cold"}
    finally:
        endpoint.shutdown()


async def test_endpoint_status_of_the_local_endpoint_and_the_service_shape(backends):
    from compute.globus_compute import summarize_endpoint_status

    assert (await local(backends).endpoint_status())["ready"] is True
    raw = {"status": "online", "details": {"managers": 0, "idle_workers": 0, "outstanding_tasks": 2}}
    assert summarize_endpoint_status(raw) == {
        "status": "online", "ready": False, "managers": 0, "idle_workers": 0, "total_workers": 0,
        "outstanding_tasks": 2, "pending_tasks": 0,
    }  # fmt: skip  # online with no manager: a task would wait for a block to start
    raw = {"status": "online", "details": {"managers": 2, "idle_workers": 8, "total_workers": 8}}
    assert summarize_endpoint_status(raw)["ready"] is True
    assert summarize_endpoint_status({"status": "offline"})["ready"] is False


def test_cluster_functions_use_the_sites_proxy_for_the_relay_but_not_for_vllm(monkeypatch):
    import urllib3

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.site.example:3128")
    monkeypatch.setenv("NO_PROXY", "internal.site.example")
    relay = functions._http("https://first.example.org/internal/relay/abc")
    assert isinstance(relay, urllib3.ProxyManager) and relay.proxy.host == "proxy.site.example"
    assert not isinstance(functions._http("http://127.0.0.1:8100"), urllib3.ProxyManager)  # vLLM, on the node
    assert not isinstance(functions._http("https://internal.site.example/x"), urllib3.ProxyManager)


def test_remote_cluster_paths_are_expanded_on_the_endpoint(settings, monkeypatch):
    remote = ClusterSpec(name="polaris", transport="globus-compute", endpoint_id="e")
    spec = ExecutorBackend.instance_spec(MODEL, remote, settings)
    assert spec["state_dir"] == "${FIRST_HOME}/instances/polaris" and spec["python"] == "${FIRST_VLLM_PYTHON}"
    local_spec = ExecutorBackend.instance_spec(MODEL, ClusterSpec(name="local"), settings)
    assert local_spec["state_dir"] == str(settings.instances_dir / "local")
    monkeypatch.setenv("FIRST_HOME", "/local/scratch/first")
    assert str(functions._state_path(spec)) == "/local/scratch/first/instances/polaris/m.json"
    monkeypatch.delenv("FIRST_VLLM_PYTHON", raising=False)
    with pytest.raises(ValueError, match=r"FIRST_VLLM_PYTHON.*worker_init"):
        functions.expand_cluster_path(spec["python"], "python")


def test_cancel_job_runs_the_schedulers_cancel_command(tmp_path, monkeypatch):
    """A `qdel` double on PATH (no PBS here) records its argv: cancel_job runs exactly `qdel JOBID`."""
    log = tmp_path / "argv"
    qdel = tmp_path / "bin" / "qdel"
    qdel.parent.mkdir()
    qdel.write_text(
        f'#!/bin/sh\necho "$@" > {log}\n'
        '[ "$1" = "999.pbs" ] && echo "qdel: Unknown Job Id 999.pbs" >&2 && exit 35\nexit 0\n'
    )
    qdel.chmod(0o755)
    monkeypatch.setenv("PATH", f"{qdel.parent}:{os.environ['PATH']}")
    assert functions.cancel_job("pbs", "8412345.polaris-pbs-01") == {"cancelled": True, "error": None}
    assert log.read_text().strip() == "8412345.polaris-pbs-01"
    assert functions.cancel_job("pbs", "999.pbs") == {"cancelled": False, "error": "qdel: Unknown Job Id 999.pbs"}
    bad = functions.cancel_job("pbs", "-x")
    assert bad["cancelled"] is False and bad["error"]
    missing = functions.cancel_job("slurm", "123")  # no scancel anywhere
    assert missing["cancelled"] is False and "scancel" in missing["error"]


async def test_an_edit_to_a_clusters_connection_reaches_a_running_gateway(backends):
    """Backends are cached per cluster name; an operator who changes where a cluster's traffic goes (its URL,
    endpoint, function ids) must not have to restart every gateway to cut the old one off."""
    site = ClusterSpec(name="site", transport="http", base_url="http://127.0.0.1:9/v1")
    first = backends.get(site)
    assert backends.get(site) is first
    assert backends.get(site.model_copy(update={"maintenance": True})) is first  # not a connection field
    moved = backends.get(site.model_copy(update={"base_url": "http://127.0.0.1:10/v1"}))
    assert moved is not first and moved.cluster.base_url == "http://127.0.0.1:10/v1"
    remote = ClusterSpec(name="hpc", transport="globus-compute", endpoint_id="4b116d3c-1703-4f8f-9f6f-39921e5864df")
    old = backends.get(remote)
    new = backends.get(remote.model_copy(update={"function_ids": {"openai_request": "f00"}}))
    assert new is not old and backends.pool.key(new.cluster) != backends.pool.key(old.cluster)


async def test_a_retired_executor_is_shut_down_once_its_requests_in_flight_end(backends):
    """Retired executors are not kept until exit: an idle one is shut down when retired, a busy one when its
    last request in flight ends (that request still gets its answer)."""
    backend = local(backends)
    pool = backends.pool
    executor, _ = await pool.get(backend.cluster)
    with HangingBackendDouble() as hung:
        url = f"http://127.0.0.1:{hung.port}"
        in_flight = asyncio.create_task(backend.call("openai_request", url, "/v1/completions", {}, 1.5, timeout=20))
        await asyncio.sleep(0.3)
        pool.retire(backend.cluster, executor)
        assert pool.shut_down == 0  # its request is still running
        result = await in_flight  # ... and ends (vLLM timed out) on the retired executor
    assert result["status"] == 504 and result["kind"] == "timeout"
    await asyncio.sleep(0.1)
    assert pool.shut_down == 1 and executor._proc.wait(10) is not None  # the endpoint process is gone
    fresh, _ = await pool.get(backend.cluster)
    assert fresh is not executor
    pool.retire(backend.cluster, fresh)  # idle: shut down at once
    assert pool.shut_down == 2
