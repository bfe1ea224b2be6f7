"""A stop under way (issue 20): the signal reaches waits at once, a cold start answers why, the local endpoint
outlives the group's Ctrl-C until the gateway lets it go, and a warm-up's wait ends Cancelled."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from litestar.testing import AsyncTestClient
from prefect.logging import disable_run_logger
from prefect.states import State

from blocks.registry import ClusterSpec, ModelSpec, Registry
from compute.backends import Backends
from compute.local import LocalComputeExecutor
from compute.relay import RelayHub
from core.errors import APIError
from core.settings import Settings
from core.stopping import STOPPED_MESSAGE, STOPPING, watch_stop_signals
from first.gateway import create_gateway
from flows import lifecycle_tasks
from flows.control_plane import PrefectControlPlane
from serving.auth import KeyStore


@pytest.fixture(autouse=True)
def not_stopping() -> Iterator[None]:
    STOPPING.clear()
    yield
    STOPPING.clear()


def test_the_signal_sets_stopping_then_runs_the_handler_that_was_there() -> None:
    seen: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    try:
        with watch_stop_signals() as installed:
            assert installed and not STOPPING.is_set()
            signal.raise_signal(signal.SIGTERM)
            assert STOPPING.is_set() and seen == [signal.SIGTERM]
        STOPPING.clear()
        signal.raise_signal(signal.SIGTERM)  # put back on leaving: the earlier handler alone
        assert not STOPPING.is_set() and seen == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigint_with_no_handler_of_its_own_still_interrupts() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        with watch_stop_signals(), pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert STOPPING.is_set()
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_local_endpoint_ignores_the_groups_signals_and_leaves_when_the_gateway_closes_it() -> None:
    executor = LocalComputeExecutor(workers=2)
    try:
        time.sleep(0.5)  # the endpoint installs its handlers as it starts
        os.kill(executor.pid, signal.SIGINT)
        os.kill(executor.pid, signal.SIGTERM)
        assert executor.submit(os.getpid).result(timeout=30) == executor.pid  # still serving the gateway
    finally:
        pid = executor.pid
        executor.shutdown()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_a_wait_for_health_ends_cancelled_saying_the_stack_stopped(settings: Settings) -> None:
    """The server never gets healthy (its state stays "starting"): once STOPPING is set the task returns a
    Cancelled state within a poll, which makes the warm-up run Cancelled."""
    cluster = ClusterSpec(name="local", transport="local")
    model = ModelSpec(name="m", path="-", clusters=["local"])
    backends = Backends(settings, RelayHub())
    lifecycle_tasks.use_gateway(lifecycle_tasks.FleetContext(settings, backends, Registry(clusters={}, models={})))
    STOPPING.set()
    try:
        with disable_run_logger():
            out = await lifecycle_tasks.wait_until_healthy.fn(model, cluster, {"state": "starting"})
    finally:
        lifecycle_tasks.use_gateway(None)
        await backends.close()
    assert isinstance(out, State) and out.is_cancelled() and out.message == STOPPED_MESSAGE


async def test_a_warm_up_asked_for_while_the_gateway_stops_is_not_started(settings: Settings) -> None:
    model, cluster = ModelSpec(name="m", path="-", clusters=["local"]), ClusterSpec(name="local", transport="local")
    run_warm_up = PrefectControlPlane(settings).warm_runner(None)  # type: ignore[arg-type]  # (never reached)
    STOPPING.set()
    with pytest.raises(APIError) as caught:
        await run_warm_up(model, cluster)
    assert caught.value.status == 503 and caught.value.code == "gateway_stopping"
    assert "warm-up of 'm' on cluster 'local' was cancelled" in caught.value.message


async def test_a_request_while_the_gateway_stops_is_a_503_that_says_why(settings: Settings) -> None:
    registry = Registry(
        clusters={"local": ClusterSpec(name="local", transport="local")},
        models={"m": ModelSpec(name="m", path="-", clusters=["local"])},
    )
    key = KeyStore(settings.keys_db).create("alice")[0]
    async with AsyncTestClient(app=create_gateway(settings, registry)) as client:
        STOPPING.set()
        r = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        health = await client.get("/health")  # a load balancer takes this replica out
    for answer in (r, health):
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "gateway_stopping" and "stopping" in error["message"]
        assert answer.headers["retry-after"] == "10"
