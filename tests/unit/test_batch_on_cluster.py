"""Batches on a cluster with vLLM's own batch runner: which batches take that path, the cluster function that runs
the runner (here through the real local compute endpoint, with a test double of vLLM's runner module on the
PYTHONPATH), and the flow task that sends a chunk there and writes each line's answer and usage row once.
(The real vLLM runner on the tiny model is in tests/e2e/test_batches_e2e.py.)"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from analytics.store import UsageStore
from blocks.registry import ClusterSpec, ModelSpec, Registry
from compute import cluster_batch
from compute.backends import Backends
from core.principal import Principal
from core.settings import Settings, get_settings
from flows import batch as batch_flow
from flows.batch_on_cluster import ClusterRunFailed, run_chunk_on_cluster
from flows.lifecycle_tasks import FleetContext, use_gateway
from serving.batches.files import FileStore
from serving.batches.paths import choose_path
from serving.batches.store import BatchStore

RUNNER_DOUBLE = Path(__file__).resolve().parent.parent / "fakes" / "vllm_double"


def chat_line(i: int, text: str | None = None, model: str = "m") -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text or f"question {i}"}], "max_tokens": 4}
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def packed(lines: list[dict]) -> str:
    return base64.b64encode(gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines))).decode()


def unpacked(data: str) -> list[dict]:
    return [json.loads(x) for x in gzip.decompress(base64.b64decode(data)).splitlines()]


# ---- which path a batch takes ----


def test_server_only_options_are_not_given_to_the_runner() -> None:
    args = ["--max-model-len", "512", "--port", "8101", "--host=0.0.0.0", "--api-key", "k", "--enforce-eager",
            "--disable-uvicorn-access-log", "--tool-call-parser", "hermes"]  # fmt: skip
    assert cluster_batch.runner_args(args) == [
        "--max-model-len", "512", "--enforce-eager", "--tool-call-parser", "hermes",
    ]  # fmt: skip


def _registry(**overrides: object) -> Registry:
    clusters = {
        "polaris": ClusterSpec(name="polaris", transport="globus-compute", endpoint_id="e", scheduler="pbs"),
        "local": ClusterSpec(name="local"),
        "hosted": ClusterSpec(name="hosted", transport="http", base_url="http://x", batch_runner="vllm"),
    }
    for name, changes in overrides.items():
        clusters[name] = clusters[name].model_copy(update=changes)  # type: ignore[arg-type]
    models = {"m": ModelSpec(name="m", clusters=["hosted", "polaris", "local"], path="-"),
              "emb": ModelSpec(name="emb", clusters=["polaris"], path="-", kind="embed")}  # fmt: skip
    return Registry(clusters=clusters, models=models)


ALICE = Principal(user="alice", groups=("users",))


def test_a_large_batch_on_a_scheduler_cluster_runs_there_and_a_small_one_through_the_gateway() -> None:
    reg = _registry()
    big = choose_path("/v1/chat/completions", 20_000, "m", reg, ALICE, 10_000)
    assert big.cluster == "polaris" and "20000 lines" in big.why and "pbs" in big.why  # the http cluster is skipped
    small = choose_path("/v1/chat/completions", 500, "m", reg, ALICE, 10_000)
    assert small.cluster is None and "threshold 10000" in small.why and "polaris: batch_runner 'auto'" in small.why
    assert choose_path("/v1/embeddings", 10_000, "emb", reg, ALICE, 10_000).cluster == "polaris"
    legacy = choose_path("/v1/completions", 50_000, "m", reg, ALICE, 10_000)  # vLLM's runner does not serve it
    assert legacy.cluster is None and "/v1/completions" in legacy.why


def test_the_cluster_setting_and_access_rules_decide_the_path() -> None:
    assert choose_path("/v1/chat/completions", 1, "m", _registry(local={"batch_runner": "vllm"},
                       polaris={"scheduler": "none"}), ALICE, 10_000).cluster == "local"  # fmt: skip
    never = _registry(polaris={"batch_runner": "gateway"})
    assert choose_path("/v1/chat/completions", 90_000, "m", never, ALICE, 10_000).cluster is None
    # a cluster the owner may not use, or one in maintenance, is passed over for the next
    staff_only = _registry(polaris={"allowed_groups": ["staff"]}, local={"batch_runner": "vllm"})
    assert choose_path("/v1/chat/completions", 90_000, "m", staff_only, ALICE, 10_000).cluster == "local"
    down = _registry(polaris={"maintenance": True})
    assert choose_path("/v1/chat/completions", 90_000, "m", down, ALICE, 10_000).cluster is None
    assert choose_path("/v1/chat/completions", 90_000, "gone", _registry(), ALICE, 10_000).cluster is None


# ---- the cluster function ----


def _spec(tmp_path: Path, **env: str) -> dict:
    return {"model": "m", "served_name": "m", "model_path": "/models/m", "port": 8101, "nice": 0,
            "args": ["--max-model-len", "512", "--port", "8101"], "python": sys.executable,
            "state_dir": str(tmp_path / "instances"), "env": {"PYTHONPATH": str(RUNNER_DOUBLE), **env}}  # fmt: skip


def test_the_runner_answers_a_chunk_inline_and_leaves_nothing_behind(tmp_path: Path) -> None:
    seen = tmp_path / "args.json"
    answer = cluster_batch.run_vllm_batch(_spec(tmp_path, FAKE_RUNNER_ARGS=str(seen)), "batch_x-0",
                                          packed([chat_line(i) for i in range(3)]), 60)  # fmt: skip
    assert answer["status"] == "ok" and answer["lines"] == 3 and answer["host"]
    docs = unpacked(answer["output"])
    assert [d["custom_id"] for d in docs] == ["q0", "q1", "q2"]
    assert docs[0]["response"]["body"]["usage"]["total_tokens"] == 8
    argv = json.loads(seen.read_text())
    assert "--port" not in argv and argv[argv.index("--model") + 1] == "/models/m" and "--max-model-len" in argv
    assert not (tmp_path / "instances" / "batches" / "batch_x-0").exists()


def test_a_runner_that_fails_or_overruns_says_why_and_keeps_its_log(tmp_path: Path) -> None:
    failed = cluster_batch.run_vllm_batch(_spec(tmp_path, FAKE_RUNNER_FAIL="1"), "b-0", packed([chat_line(0)]), 60)
    assert failed["status"] == "failed" and "exited 1" in failed["detail"] and "out of memory" in failed["detail"]
    assert (tmp_path / "instances" / "batches" / "b-0" / "runner.log").exists()
    slow = cluster_batch.run_vllm_batch(_spec(tmp_path, FAKE_RUNNER_SLEEP_S="30"), "b-1", packed([chat_line(0)]), 1)
    assert slow["status"] == "failed" and "within 1 s" in slow["detail"]
    with pytest.raises(ValueError):
        cluster_batch.run_vllm_batch(_spec(tmp_path), "../escape", packed([chat_line(0)]), 5)


def test_a_running_chunk_can_be_stopped(tmp_path: Path) -> None:
    spec = _spec(tmp_path, FAKE_RUNNER_SLEEP_S="60")
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(
        cluster_batch.run_vllm_batch(spec, "b-2", packed([chat_line(0)]), 120)))  # fmt: skip
    worker.start()
    pid_file = tmp_path / "instances" / "batches" / "b-2" / "pid"
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster_batch.cancel_vllm_batch(spec, "b-2") == {"cancelled": True}
    worker.join(30)
    assert result["status"] == "failed" and "was stopped" in result["detail"]
    assert cluster_batch.cancel_vllm_batch(spec, "never-ran") == {"cancelled": False}


# ---- the flow's task, through the real local compute endpoint ----


@pytest.fixture
def cluster_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    home = tmp_path / "home"
    monkeypatch.setenv("FIRST_HOME", str(home))
    monkeypatch.setenv("FIRST_VLLM_PYTHON", sys.executable)
    get_settings.cache_clear()
    settings = get_settings()
    registry = Registry(
        clusters={"local": ClusterSpec(name="local", batch_runner="vllm")},
        models={
            "m": ModelSpec(name="m", path="/models/m", vllm_env={"PYTHONPATH": str(RUNNER_DOUBLE)}),
            "broken": ModelSpec(name="broken", path="-", vllm_env={"PYTHONPATH": str(RUNNER_DOUBLE),
                                                                   "FAKE_RUNNER_FAIL": "1"}),
            "slow": ModelSpec(name="slow", path="-", vllm_env={"PYTHONPATH": str(RUNNER_DOUBLE),
                                                               "FAKE_RUNNER_SLEEP_S": "60"}),
        },
    )  # fmt: skip
    backends = Backends(settings)
    use_gateway(FleetContext(settings, backends, registry))
    try:
        yield settings
    finally:
        use_gateway(None)
        asyncio.run(backends.close())
        get_settings.cache_clear()


def _batch(settings: Settings, lines: list[dict], model: str = "m") -> tuple[str, BatchStore]:
    source = settings.home / "input.jsonl"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    f = FileStore(settings.batches_root, settings.max_file_bytes, settings.file_quota_bytes).add(
        "alice", "in.jsonl", "batch", source
    )
    store = BatchStore(settings.batches_root)
    b = store.create(owner=ALICE, endpoint="/v1/chat/completions", input_file_id=f.id, window="24h",
                     lines=len(lines), model=model, metadata=None)  # fmt: skip
    return b.id, store


async def test_a_chunk_on_the_cluster_answers_every_line_once_with_its_usage_row(cluster_env: Settings) -> None:
    lines = [chat_line(i) for i in range(6)] + [chat_line(6, "omit"), chat_line(7, "bad")]
    batch_id, store = _batch(cluster_env, lines)
    path = await batch_flow.choose_path_for.fn(batch_id)
    assert path.cluster == "local" and store.get(batch_id).runs_on == "vllm-run-batch@local"
    batch_flow.validate.fn(batch_id)
    (chunk,) = batch_flow.plan.fn(batch_id, 5000)
    assert await run_chunk_on_cluster.fn(batch_id, chunk, "local") == "in_progress"
    done = batch_flow.finalize.fn(batch_id, "in_progress").public()
    assert done["status"] == "completed" and done["request_counts"] == {"total": 8, "completed": 6, "failed": 2}
    assert (done["usage"]["input_tokens"], done["usage"]["output_tokens"], done["usage"]["total_tokens"]) == (
        30,
        18,
        48,
    )
    files = FileStore(cluster_env.batches_root, cluster_env.max_file_bytes, cluster_env.file_quota_bytes)
    out = [json.loads(x) for x in files.data_path(done["output_file_id"]).read_bytes().splitlines()]
    errors = {json.loads(x)["custom_id"]: json.loads(x) for x in files.data_path(done["error_file_id"]).read_bytes()
              .splitlines()}  # fmt: skip
    assert sorted(x["custom_id"] for x in out) == [f"q{i}" for i in range(6)]
    for x in out:  # line n of the file is request <batch>-<n>, as on the gateway path
        assert (
            x["id"].startswith("batch_req_")
            and x["response"]["request_id"] == f"{batch_id}-{int(x['custom_id'][1:]) + 1}"
        )
    assert errors["q6"]["error"]["code"] == "not_answered" and errors["q7"]["response"]["status_code"] == 400
    usage = UsageStore(cluster_env.usage_db)
    usage.ingest(cluster_env.spool_dir)
    rows = usage.query(f"SELECT request_id, status, total_tokens, cluster, endpoint, error_type FROM usage "
                       f"WHERE batch_id = '{batch_id}' ORDER BY request_id").rows()  # fmt: skip
    assert len(rows) == 8 and {r[3] for r in rows} == {"local"} and {r[4] for r in rows} == {"chat.completions"}
    assert sum(r[2] for r in rows) == 48
    assert [r[1] for r in rows if r[0] in (f"{batch_id}-7", f"{batch_id}-8")] == [500, 400]


async def test_a_failed_runner_hands_the_chunk_back_and_a_cancel_stops_it(cluster_env: Settings) -> None:
    batch_id, _ = _batch(cluster_env, [chat_line(i, model="broken") for i in range(3)], model="broken")
    batch_flow.validate.fn(batch_id)
    (chunk,) = batch_flow.plan.fn(batch_id, 5000)
    with pytest.raises(ClusterRunFailed, match="out of memory"):
        await run_chunk_on_cluster.fn(batch_id, chunk, "local")

    batch_id, store = _batch(cluster_env, [chat_line(i, model="slow") for i in range(3)], model="slow")
    batch_flow.validate.fn(batch_id)
    (chunk,) = batch_flow.plan.fn(batch_id, 5000)
    started = time.monotonic()
    running = asyncio.ensure_future(run_chunk_on_cluster.fn(batch_id, chunk, "local"))
    await asyncio.sleep(2)
    store.update(batch_id, lambda b: setattr(b, "status", "cancelling"))
    assert await asyncio.wait_for(running, 30) == "cancelling"
    assert time.monotonic() - started < 30  # the runner (60 s) was stopped, not waited for
    done = batch_flow.finalize.fn(batch_id, "cancelling").public()
    assert done["status"] == "cancelled" and done["request_counts"]["completed"] == 0
