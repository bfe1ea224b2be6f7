"""Several gateway worker processes on one host (FIRST_WORKERS, issue 18): each a replica with a stable name of its
own, sharing state through Redis; and a clear refusal without Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from core.settings import Settings
from serving.auth import KeyStore
from serving.replicas import workers
from serving.replicas.workers import WorkerSetupError, for_this_worker
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess
from tests.services import RedisServer


def test_one_worker_keeps_its_settings(tmp_path: Path) -> None:
    s = Settings(home=tmp_path)
    assert for_this_worker(s) is s


def test_several_workers_without_redis_are_refused_saying_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(WorkerSetupError, match="FIRST_REDIS_URL") as e:
        for_this_worker(Settings(home=tmp_path, workers=2))
    assert "FIRST_WORKERS=1" in str(e.value)


def test_each_worker_takes_a_slot_and_a_spool_of_its_own(tmp_path: Path) -> None:
    code = (
        "import sys; from core.settings import Settings; from serving.replicas.workers import for_this_worker;"
        f"s = for_this_worker(Settings(home={str(tmp_path)!r}, port=9, workers=2, redis_url='redis://x'));"
        "print(s.replica, s.spool_dir, s.gateway_id); sys.stdout.flush(); sys.stdin.read()"
    )
    first = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    second = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        a = first.stdout.readline().split()  # type: ignore[union-attr]
        b = second.stdout.readline().split()  # type: ignore[union-attr]
    finally:
        first.communicate("")
        second.communicate("")
    assert {a[0][-3:], b[0][-3:]} == {"-w0", "-w1"} and a[1] != b[1] and a[0] == a[2]
    # A worker that replaces one that exited takes its slot, and its spool, again.
    again = subprocess.run([sys.executable, "-c", code], input="", capture_output=True, text=True, check=True)
    assert again.stdout.split()[0].endswith("-w0")
    assert len(workers.worker_slots(Settings(home=tmp_path))) == 2


def test_two_workers_on_one_port_serve_and_meter_every_request(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    home = tmp_path / "home"
    try:
        with OpenAISimulatorDouble(latency_s=0.0, capacity=64) as sim:
            registry = tmp_path / "registry.yaml"
            registry.write_text(yaml.safe_dump({
                "clusters": [{"name": "sim", "transport": "http", "base_url": sim.base_url}],
                "models": [{"name": "m", "clusters": ["sim"], "path": "-"}],
            }))  # fmt: skip
            key = KeyStore(Settings(home=home).keys_db).create("alice")[0]
            gw = GatewayProcess(home, registry, env={"FIRST_WORKERS": "2", "FIRST_REDIS_URL": redis.url}).start(90)
            try:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                for _ in range(40):  # a new connection each: the kernel spreads them over the workers
                    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30,
                                   headers={"Authorization": f"Bearer {key}", "Connection": "close"})  # fmt: skip
                    assert r.status_code == 200, r.text
            finally:
                gw.stop()
    finally:
        redis.stop()
    spools = sorted(p.name for p in (home / "spool").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert spools and all("-w" in name for name in spools), spools
    rows = [json.loads(line) for f in (home / "spool").rglob("*.jsonl") for line in f.read_text().splitlines()]
    assert len([r for r in rows if r["status"] == 200]) == 40
