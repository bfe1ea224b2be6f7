"""Fault injection (issue 13's reliability suite). Each fault has a stated expected behaviour:

- a cluster's compute endpoint is killed mid-load: requests that had not started answering fail over to another
  cluster; every answered request has its row.
- the disk under the spool fills up: new work is refused with 503 `usage_spool` (no unmetered cluster work); rows
  of requests already answered are held in memory and written once there is room again; nothing is lost.
- Prefect becomes unreachable: the gateway keeps serving hot models from the registry it has, /health stays up,
  requests do not wait on Prefect.
- Globus Auth hangs: tokens checked before keep working; a new token is refused 503 after the bound
  (tests/unit/test_globus_auth.py: test_a_token_checked_before_an_outage_keeps_working,
  test_auth_hanging_past_the_timeout_is_503_after_the_bound).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from analytics.store import UsageStore
from core.settings import Settings
from first.runner import free_port
from serving.auth import KeyStore
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess, http_registry_yaml, stand_in_instance

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def sim() -> Iterator[OpenAISimulatorDouble]:
    with OpenAISimulatorDouble(latency_s=0.2, capacity=64, name="sim") as s:
        yield s


def _rows(settings: Settings) -> list[tuple]:
    store = UsageStore(settings.usage_db)
    store.ingest(settings.spool_dir)
    return store.query("SELECT request_id, status, cluster FROM usage").rows()


# ---- a cluster's endpoint dies mid-load ----


def _endpoint_pids(gateway_pid: int) -> list[int]:
    """The gateway's local compute endpoint processes (`python -m compute.local`), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == gateway_pid and b"compute.local" in cmd:
            pids.append(int(entry.name))
    return pids


def test_killing_a_clusters_endpoint_mid_load_fails_over(tmp_path, sim) -> None:
    """Cluster `local-a` runs the model through the local compute endpoint (its vLLM here: the stand-in, by the
    state file start_vllm would have written); `http-b` serves it directly. The endpoint process is killed while
    40 requests run: none fails, and each has its usage row."""
    home = tmp_path / "home"
    with stand_in_instance(home, "local-a", "m", sim.base_url, sim.port):
        registry = tmp_path / "registry.yaml"
        registry.write_text(yaml.safe_dump({
            "clusters": [{"name": "local-a", "transport": "local"},
                         {"name": "http-b", "transport": "http", "base_url": sim.base_url}],
            "models": [{"name": "m", "clusters": ["local-a", "http-b"], "path": "-", "port": sim.port}],
        }))  # fmt: skip
        key = KeyStore(Settings(home=home).keys_db).create("alice")[0]
        gw = GatewayProcess(home, registry, env={"FIRST_MAX_INFLIGHT_PER_CALLER": "0"}).start()
        auth = {"Authorization": f"Bearer {key}"}

        async def load() -> tuple[list[httpx.Response], list[httpx.Response]]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=60, headers=auth) as client:
                warm = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(4)]
                tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT)) for _ in range(40)]
                await asyncio.sleep(0.1)  # the stand-in takes 0.2 s: about half of them wait on local-a now
                for pid in _endpoint_pids(gw.proc.pid):  # type: ignore[union-attr]
                    os.kill(pid, signal.SIGKILL)
                return warm, list(await asyncio.gather(*tasks))

        try:
            warm, rs = asyncio.run(load())
            status = httpx.get(gw.url + "/v1/status", headers=auth, timeout=10).json()
        finally:
            gw.stop()
        assert {r.headers["x-first-cluster"] for r in warm} == {"local-a", "http-b"}  # both served before
        assert [r.status_code for r in rs] == [200] * 40, [r.text[:200] for r in rs if r.status_code != 200]
        assert "http-b" in {r.headers["x-first-cluster"] for r in rs}
        assert status["object"] == "status"
        answered = {r.headers["x-request-id"] for r in [*warm, *rs]}
        rows = {rid: code for rid, code, _ in _rows(Settings(home=home))}
        assert answered <= set(rows) and all(rows[rid] == 200 for rid in answered)


# ---- the disk under the spool fills up ----


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"this test fills a small tmpfs, and mounting one needs CAP_SYS_ADMIN: {r.stderr.strip()}")


def _fill(path: Path) -> Path:
    """Fill the file system at ``path`` to the last byte."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_under_the_spool_refuses_new_work_and_loses_no_row(tmp_path, sim) -> None:
    home = tmp_path / "home"
    spool = home / "spool"
    _mount_tmpfs(spool, "256k")
    try:
        registry = tmp_path / "registry.yaml"
        registry.write_text(http_registry_yaml({"c": sim.base_url}, {"m": ["c"]}))
        key = KeyStore(Settings(home=home).keys_db).create("alice")[0]
        gw = GatewayProcess(home, registry, env={"FIRST_MAX_INFLIGHT_PER_CALLER": "0"}).start()
        auth = {"Authorization": f"Bearer {key}"}
        try:
            before = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=30)
            assert before.status_code == 200
            # A stream is under way when the disk fills: its answer goes out, so its row must survive.
            sim.latency_s = 2.0
            with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 20},
                              headers=auth, timeout=30) as stream:  # fmt: skip
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                sim.latency_s = 0.01
                filler = _fill(spool)
                answered = []  # until the segment's last page is full too, rows still fit
                for _ in range(100):
                    answered.append(httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=30))
                    if answered[-1].status_code != 200:
                        break
                events = [first, *(line for line in lines if line.startswith("data: "))]
                stream_id = stream.headers["x-request-id"]
            withheld = answered[-1]  # its row did not fit: the answer was withheld, and the row says so
            assert withheld.status_code == 503 and withheld.json()["error"]["code"] == "usage_spool"
            assert any('"content"' in e for e in events)  # the stream's caller got its answer ...
            assert "usage_spool" in events[-1]  # ... and was told its row is not on disk yet
            work = sim.requests
            refused = [httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=30)
                       for _ in range(3)]  # fmt: skip
            assert [r.status_code for r in refused] == [503] * 3
            assert {r.json()["error"]["code"] for r in refused} == {"usage_spool"}
            assert sim.requests == work  # no cluster work while usage cannot be recorded
            assert httpx.get(gw.url + "/health", timeout=10).status_code == 200
            filler.unlink()  # room again: the rows held in memory are written, and service resumes
            after = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=30)
            assert after.status_code == 200
        finally:
            gw.stop()
        rows = {rid: status for rid, status, _ in _rows(Settings(home=home))}
        for r in [before, *answered, *refused, after]:  # every answer has its row, with the status it got
            assert rows[r.headers["x-request-id"]] == r.status_code, r.headers["x-request-id"]
        assert rows[stream_id] == 200
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)


# ---- Prefect becomes unreachable ----


def test_an_unreachable_prefect_does_not_stop_the_hot_path(tmp_path, sim) -> None:
    """Prefect is down (nothing listens at PREFECT_API_URL) while every request would be recorded as a flow run
    (sample rate 1): requests are served, /health answers, and no record is made (they are dropped and counted)."""
    home = tmp_path / "home"
    registry = tmp_path / "registry.yaml"
    registry.write_text(http_registry_yaml({"c": sim.base_url}, {"m": ["c"]}))
    key = KeyStore(Settings(home=home).keys_db).create("alice")[0]
    env = {
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api", "FIRST_FLOW_TRACKING": "sample",
        "FIRST_FLOW_SAMPLE_RATE": "1", "PREFECT_HOME": str(home / "prefect"),
    }  # fmt: skip
    gw = GatewayProcess(home, registry, env=env).start()
    try:
        sim.latency_s = 0.01
        rs = [httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"},
                         timeout=30) for _ in range(20)]  # fmt: skip
        assert [r.status_code for r in rs] == [200] * 20
        health = httpx.get(gw.url + "/health", timeout=10).json()
        # Every request was answered while not one of its flow records could be made: none waited on Prefect.
        assert health["status"] == "ok" and health["flow_records"]["recorded"] == 0
    finally:
        gw.stop()
    rows = {rid for rid, _, _ in _rows(Settings(home=home))}
    assert {r.headers["x-request-id"] for r in rs} <= rows
