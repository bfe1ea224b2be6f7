"""Batches as a new user meets them, on `make run` (Prefect server and worker, gateway, the real vLLM CPU server):
the official client uploads a file, creates a batch, polls it to `completed` and reads the output; a second batch
is cancelled midway; a malformed file is refused naming its line. The batch is a `run-batch` flow run with its
tasks and progress artifact, and every line has its usage row, tagged with the batch."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from analytics.store import UsageStore
from core.settings import Settings
from tests.e2e.conftest import prefect_api, start_make_run

pytestmark = pytest.mark.e2e
LINES = 500


class Run:
    def __init__(self, home: Path, ready: dict[str, Any], env: dict[str, str]) -> None:
        auth = (home / "prefect-api-auth").read_text().strip()  # what `make run` made for its Prefect server
        self.home, self.ready, self.env = home, ready, {**env, "PREFECT_API_AUTH_STRING": auth}
        self.client = openai.OpenAI(base_url=ready["base_url"], api_key=ready["api_key"], max_retries=0, timeout=120)
        self.prefect = ready["prefect_ui"] + "/api"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    home = tmp_path_factory.mktemp("batches-e2e") / "home"
    make, ready, env = start_make_run(home)
    try:
        yield Run(home, ready, env)
    finally:
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=120)


def _file(lines: int, prefix: str = "q") -> bytes:
    def line(i: int) -> dict[str, Any]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 8,
                "temperature": 0}  # fmt: skip
        return {"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}

    return b"".join(json.dumps(line(i)).encode() + b"\n" for i in range(lines))


def _wait(c: openai.OpenAI, batch_id: str, until: set[str], timeout_s: float = 600) -> Any:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        b = c.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status in until:
            return b, seen
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {seen[-1]} after {timeout_s} s (states {seen})")


def _flow_run_of(run: Run, batch_id: str) -> tuple[dict, list[str], list[dict]]:
    """The batch's run-batch flow run, its task runs' names and its progress artifact, once Prefect recorded them
    all (task runs are written a few seconds after they end)."""
    deadline = time.monotonic() + 60
    while True:
        flows = prefect_api("POST", run.prefect + "/flow_runs/filter", run.env,
                            json={"flow_runs": {"tags": {"all_": ["batch"]}}}).json()  # fmt: skip
        mine = next((r for r in flows if batch_id in r["name"]), None)
        names: list[str] = []
        arts: list[dict] = []
        if mine is not None:
            tasks = prefect_api("POST", run.prefect + "/task_runs/filter", run.env,
                                json={"flow_runs": {"id": {"any_": [mine["id"]]}}}).json()  # fmt: skip
            names = [t["name"] for t in tasks]
            key = "batch-" + batch_id.replace("_", "-")
            arts = prefect_api("POST", run.prefect + "/artifacts/filter", run.env,
                               json={"artifacts": {"key": {"any_": [key]}}}).json()  # fmt: skip
            if mine["state_type"] == "COMPLETED" and any(n.startswith("finalize") for n in names) and arts:
                return mine, names, arts
        if time.monotonic() > deadline:
            return mine or {}, names, arts
        time.sleep(1)


def test_a_batch_end_to_end_with_the_official_client(run: Run) -> None:
    c = run.client
    f = c.files.create(file=("questions.jsonl", io.BytesIO(_file(LINES))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"project": "e2e"})  # fmt: skip
    assert b.status == "validating" and b.request_counts.total == LINES and b.metadata == {"project": "e2e"}
    t0 = time.monotonic()
    done, states = _wait(c, b.id, {"completed", "failed", "cancelled", "expired"})
    took = time.monotonic() - t0
    assert done.status == "completed", (done, states)
    assert done.request_counts.completed == LINES and done.request_counts.failed == 0
    assert "in_progress" in states and done.in_progress_at and done.completed_at
    out = [json.loads(x) for x in c.files.content(done.output_file_id).read().splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(f"q{i}" for i in range(LINES))  # each line once
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert all(x["response"]["body"]["usage"]["completion_tokens"] == 8 for x in out)
    assert done.usage.output_tokens == 8 * LINES and done.usage.input_tokens > 0
    # the same questions at temperature 0 answer the same through the interactive path
    q0 = next(x for x in out if x["custom_id"] == "q0")
    live = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "question 0"}],
                                     max_tokens=8, temperature=0)  # fmt: skip
    assert live.choices[0].message.content == q0["response"]["body"]["choices"][0]["message"]["content"]
    # The batch is a flow run of run-batch, named after its owner, model and size, with its tasks and progress.
    mine, names, arts = _flow_run_of(run, b.id)
    assert mine["state_type"] == "COMPLETED" and "tiny" in mine["name"] and f"{LINES} lines" in mine["name"]
    for step in ("validate", "plan", "lines 0-", "finalize"):
        assert any(n.startswith(step) for n in names), names
    assert arts and arts[0]["type"] == "progress" and float(arts[0]["data"]) == 100.0
    # Every line has its usage row, tagged with the batch.
    settings = Settings(home=run.home)
    store = UsageStore(settings.usage_db)
    store.ingest(settings.spool_dir)
    n, tokens = store.query(f"SELECT count(*), sum(completion_tokens) FROM usage WHERE batch_id = '{b.id}'").row(0)
    assert (n, tokens) == (LINES, 8 * LINES)
    print(f"{LINES}-line batch on the real vLLM CPU server: created to completed in {took:.1f} s")


def test_a_batch_on_a_cluster_runs_with_vllms_own_batch_runner(run: Run) -> None:
    """A cluster whose batch_runner is 'vllm' (as a PBS cluster is for a large batch): the chunk goes through the
    worker's compute endpoint to the real `vllm run-batch` on the tiny model, and its answers and usage rows come
    back exactly as on the gateway path."""
    import asyncio

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from blocks.registry import ClusterSpec, Registry
    from serving.batches.store import BatchStore

    tiny = Registry.embedded_default(Settings(home=run.home)).models["tiny"]
    offline = tiny.model_copy(update={"name": "tiny-offline", "aliases": [], "clusters": ["local-batch"]})
    cluster = ClusterSpec(name="local-batch", transport="local", batch_runner="vllm")
    with temporary_settings(
        {PREFECT_API_URL: run.prefect, PREFECT_API_AUTH_STRING: run.env["PREFECT_API_AUTH_STRING"]}
    ):
        asyncio.run(Registry(clusters={"local-batch": cluster}, models={"tiny-offline": offline}).save_blocks())
    c = run.client
    deadline = time.monotonic() + 30  # the gateway re-reads the blocks every few seconds
    while "tiny-offline" not in [m.id for m in c.models.list()] and time.monotonic() < deadline:
        time.sleep(1)
    data = _file(40, "v").replace(b'"model": "tiny"', b'"model": "tiny-offline"')
    f = c.files.create(file=("offline.jsonl", io.BytesIO(data)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    t0 = time.monotonic()
    done, states = _wait(c, b.id, {"completed", "failed", "cancelled", "expired"})
    took = time.monotonic() - t0
    assert done.status == "completed" and done.request_counts.completed == 40, (done, states)
    out = [json.loads(x) for x in c.files.content(done.output_file_id).read().splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(f"v{i}" for i in range(40))
    assert all(x["response"]["body"]["usage"]["completion_tokens"] == 8 for x in out)
    assert all(x["response"]["body"]["model"] == "tiny-offline" for x in out)  # vLLM's runner, as served there
    assert done.usage.output_tokens == 8 * 40
    assert BatchStore(Settings(home=run.home).batches_root).get(b.id).runs_on == "vllm-run-batch@local-batch"
    _, names, _ = _flow_run_of(run, b.id)
    assert "choose-path" in " ".join(names) and any(n.startswith("lines 0-39 on local-batch") for n in names), names
    settings = Settings(home=run.home)
    store = UsageStore(settings.usage_db)
    store.ingest(settings.spool_dir)
    rows = store.query(f"SELECT cluster, count(*), sum(completion_tokens) FROM usage WHERE batch_id = '{b.id}' "
                       "GROUP BY cluster").rows()  # fmt: skip
    assert rows == [("local-batch", 40, 320)]
    print(f"40-line batch with vLLM's batch runner on the cluster: created to completed in {took:.1f} s")


def _batch_under_way(c: openai.OpenAI, prefix: str) -> Any:
    """A 3,000-line batch that has answered its first 20 lines (and has most of its lines still to run)."""
    f = c.files.create(file=(f"{prefix}.jsonl", io.BytesIO(_file(3000, prefix))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while c.batches.retrieve(b.id).request_counts.completed < 20:
        assert time.monotonic() < deadline, "no line answered in 300 s"
        time.sleep(0.5)
    return b


def test_a_batch_cancelled_midway_keeps_its_answered_lines(run: Run) -> None:
    c = run.client
    b = _batch_under_way(c, "c")
    assert c.batches.cancel(b.id).status == "cancelling"
    done, _ = _wait(c, b.id, {"cancelled", "completed", "failed"}, timeout_s=120)
    assert done.status == "cancelled" and done.cancelled_at
    answered = done.request_counts.completed
    assert 20 <= answered < 3000
    out = c.files.content(done.output_file_id).read().splitlines()
    assert len(out) == answered and len({json.loads(x)["custom_id"] for x in out}) == answered


def test_an_operator_cancels_a_batch_from_the_prefect_ui(run: Run) -> None:
    """What the UI's Cancel button does (the flow run's state set to CANCELLING through Prefect's API): the worker
    stops the run, its on_cancellation hook ends the batch `cancelled`, and the lines already answered stay."""
    c = run.client
    b = _batch_under_way(c, "o")
    flows = prefect_api("POST", run.prefect + "/flow_runs/filter", run.env,
                        json={"flow_runs": {"tags": {"all_": ["batch"]}}}).json()  # fmt: skip
    flow_run = next(r for r in flows if b.id in r["name"])
    r = prefect_api("POST", f"{run.prefect}/flow_runs/{flow_run['id']}/set_state", run.env,
                    json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})  # fmt: skip
    assert r.status_code in (200, 201), r.text
    done, states = _wait(c, b.id, {"cancelled", "completed", "failed"}, timeout_s=180)
    assert done.status == "cancelled" and done.cancelled_at, (done, states)
    answered = done.request_counts.completed
    assert 20 <= answered < 3000
    out = c.files.content(done.output_file_id).read().splitlines()
    assert len(out) == answered and len({json.loads(x)["custom_id"] for x in out}) == answered
    deadline = time.monotonic() + 60
    while (state := prefect_api("GET", f"{run.prefect}/flow_runs/{flow_run['id']}", run.env).json())["state_type"] \
            != "CANCELLED" and time.monotonic() < deadline:  # fmt: skip
        time.sleep(1)
    assert state["state_type"] == "CANCELLED"


def test_a_malformed_file_is_refused_naming_the_line(run: Run) -> None:
    bad = _file(3) + b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny"}}\n'
    with pytest.raises(openai.BadRequestError) as e:
        run.client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch")
    assert e.value.body["message"].startswith("line 4: body.messages")


def test_the_user_guide_batch_example_runs_as_written(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The user guide's Python batch example, exactly as printed there, against `make run` (its KEY and URL)."""
    import re

    from core.settings import REPO_ROOT

    guide = (REPO_ROOT / "docs" / "users" / "guide.md").read_text()
    section = guide[guide.index("## Batches: many requests in one file") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)  # type: ignore[union-attr]
    code = code.replace("http://127.0.0.1:8000/v1", run.ready["base_url"])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/users/guide.md (batches)", "exec"), {"KEY": run.ready["api_key"]})
    printed = capsys.readouterr().out
    assert re.search(r"^q0 ", printed, re.M) and re.search(r"^q1 ", printed, re.M), printed
