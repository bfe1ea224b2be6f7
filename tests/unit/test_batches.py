"""Files and batches against a real gateway process (a stand-in vLLM behind it), with the official client: uploads
checked line by line, files private to their owner, size limits; and the run-batch flow's tasks run against that
gateway: every line answered exactly once (also after a crash mid-batch), usage rows tagged with the batch, a
cancel that keeps what was answered, and batch lines that never touch their owner's interactive limits.
(The whole flow as a Prefect deployment run, on the real vLLM, is in tests/e2e/test_make_run.py.)"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from analytics.store import UsageStore
from core.principal import Principal
from core.settings import Settings
from flows import batch as batch_flow
from flows import batch_retention
from serving.auth import KeyStore
from serving.batches.store import BatchStore
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess


class Stack:
    def __init__(self, gw: GatewayProcess, home: Path, keys: dict[str, str], sim: OpenAISimulatorDouble) -> None:
        self.gw, self.home, self.keys, self.sim = gw, home, keys, sim

    def client(self, who: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gw.url + "/v1", api_key=self.keys[who], max_retries=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp("batches")) / "home"
    with OpenAISimulatorDouble(latency_s=0.01, capacity=64, name="sim") as sim:
        registry = home / "registry.yaml"
        home.mkdir(parents=True)
        registry.write_text(yaml.safe_dump({
            "clusters": [{"name": "direct", "transport": "http", "base_url": sim.base_url, "max_concurrency": 8}],
            "models": [{"name": "m", "clusters": ["direct"], "path": "-"},
                       {"name": "emb", "clusters": ["direct"], "path": "-", "kind": "embed"},
                       {"name": "secret", "clusters": ["direct"], "path": "-", "allowed_groups": ["staff"]}],
        }))  # fmt: skip
        store = KeyStore(Settings(home=home).keys_db)
        keys = {"alice": store.create("alice", rpm=2)[0], "bob": store.create("bob")[0]}
        gw = GatewayProcess(home, registry, env={"FIRST_MAX_FILE_BYTES": str(12 * 2**20)}).start()
        try:
            yield Stack(gw, home, keys, sim)
        finally:
            gw.stop()


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def chat_line(i: int, model: str = "m") -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4}
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


# ---- files ----


def test_files_upload_list_retrieve_content_delete(stack: Stack) -> None:
    c = stack.client()
    data = jsonl([chat_line(i) for i in range(3)])
    f = c.files.create(file=("qs.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.bytes == len(data) and f.filename == "qs.jsonl" and f.purpose == "batch" and f.status == "processed"
    assert c.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in c.files.list()]
    assert c.files.content(f.id).read() == data
    # private: someone else sees no such file
    other = stack.client("bob")
    for call in (lambda: other.files.retrieve(f.id), lambda: other.files.content(f.id).read(),
                 lambda: other.files.delete(f.id)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in [x.id for x in other.files.list()]
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    folder = stack.home / "batches" / "files"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert not list(folder.iterdir()) or all(p.stat().st_mode & 0o077 == 0 for p in folder.iterdir())


BAD_FILES = [
    (jsonl([chat_line(1)]) + b"not json\n", "line 2: not valid JSON"),
    (jsonl([chat_line(1), chat_line(1)]), "line 2: custom_id 'q1' is used twice"),
    (jsonl([{**chat_line(1), "url": "/v1/responses"}]), "line 1: url '/v1/responses' is not a batch endpoint"),
    (jsonl([chat_line(1), {**chat_line(2), "url": "/v1/completions", "body": {"model": "m", "prompt": "x"}}]),
     "line 2: url '/v1/completions' differs from the first line's"),
    (jsonl([chat_line(1), {**chat_line(2), "body": {"model": "m", "messages": "hi"}}]), "line 2: body.messages"),
    (jsonl([chat_line(1), {**chat_line(2), "body": {**chat_line(2)["body"], "stream": True}}]),
     "line 2: stream must be false"),
    (jsonl([chat_line(1), chat_line(2, model="nope")]), "line 2: the model 'nope' does not exist"),
    (jsonl([chat_line(1, model="secret")]), "line 1: you do not have access to the model 'secret'"),
    (jsonl([chat_line(1, model="emb")]), "line 1: the model 'emb' does not serve /v1/chat/completions"),
    (jsonl([{"custom_id": "x", "url": "/v1/chat/completions"}]), "line 1: Object missing required field `body`"),
    (b"\n\n", "The file has no requests"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "message"), BAD_FILES)
def test_a_bad_batch_file_is_refused_naming_its_line(stack: Stack, data: bytes, message: str) -> None:
    c = stack.client()
    before = {f.id for f in c.files.list()}
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("bad.jsonl", io.BytesIO(data)), purpose="batch")
    assert message in e.value.body["message"], e.value.body
    assert e.value.body["code"] in ("invalid_batch_line", None) and e.value.body["param"] == "file"
    assert {f.id for f in c.files.list()} == before  # nothing kept


def test_a_file_past_the_size_limit_is_413_and_not_kept(stack: Stack) -> None:
    """The gateway's own limit (here 12 MiB), not the web framework's 10 MB default: 11 MiB goes in, 13 MiB is
    refused as it streams, and nothing of it stays."""
    c = stack.client()
    ok = c.files.create(file=("big.bin", io.BytesIO(b"x" * (11 * 2**20))), purpose="user_data")
    assert ok.bytes == 11 * 2**20
    c.files.delete(ok.id)
    with pytest.raises(openai.APIStatusError) as e:
        c.files.create(file=("bigger.bin", io.BytesIO(b"x" * (13 * 2**20))), purpose="user_data")
    assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"
    assert "12 MiB" in e.value.body["message"]
    assert not [p for p in (stack.home / "batches" / "files").iterdir() if p.name.startswith(".")]  # no leftovers


def test_batches_need_the_control_plane_and_a_matching_file(stack: Stack) -> None:
    c = stack.client()
    f = c.files.create(file=("qs.jsonl", io.BytesIO(jsonl([chat_line(1)]))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    assert e.value.body["code"] == "endpoint_mismatch"
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="forever")
    assert e.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        stack.client("bob").batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")  # fmt: skip
    with pytest.raises(openai.APIStatusError) as e:  # this gateway runs without Prefect
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.status_code == 503 and "make run" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_" + "0" * 24)


# ---- the run-batch flow's tasks, against the gateway ----


def _new_batch(stack: Stack, lines: int, user: str = "alice") -> tuple[str, BatchStore]:
    c = stack.client(user)
    f = c.files.create(file=("qs.jsonl", io.BytesIO(jsonl([chat_line(i) for i in range(lines)]))), purpose="batch")
    store = BatchStore(stack.home / "batches")
    b = store.create(owner=Principal(user=user, key_id=None), endpoint="/v1/chat/completions", input_file_id=f.id,
                     window="24h", lines=lines, model="m", metadata=None)  # fmt: skip
    return b.id, store


@pytest.fixture
def flow_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setenv("FIRST_HOME", str(stack.home))
    monkeypatch.setenv("FIRST_BATCH_CHUNK_LINES", "10")
    return stack


async def _run(batch_id: str, url: str) -> dict:
    """The flow's body, task by task (no Prefect API here: no progress artifact)."""
    batch = batch_flow.validate.fn(batch_id)
    assert batch.status == "in_progress"
    state = batch.status
    for chunk in batch_flow.plan.fn(batch_id, 10):
        state = await batch_flow.run_chunk.fn(batch_id, chunk, url)
    return batch_flow.finalize.fn(batch_id, state).public()


def _usage_rows(home: Path, batch_id: str) -> list[tuple]:
    store = UsageStore(Settings(home=home).usage_db)
    store.ingest(Settings(home=home).spool_dir)
    return store.query(f"SELECT request_id, status, total_tokens FROM usage WHERE batch_id = '{batch_id}'").rows()


async def test_every_line_is_answered_once_with_usage_rows_tagged_by_batch(flow_env: Stack) -> None:
    stack = flow_env
    batch_id, _ = _new_batch(stack, 25)
    done = await _run(batch_id, stack.gw.url)
    assert done["status"] == "completed" and done["request_counts"] == {"total": 25, "completed": 25, "failed": 0}
    assert done["usage"]["total_tokens"] > 0 and done["completed_at"] and done["error_file_id"] is None
    out = [json.loads(x) for x in stack.client().files.content(done["output_file_id"]).read().splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(f"q{i}" for i in range(25))
    assert all(x["response"]["status_code"] == 200 and x["response"]["body"]["choices"] for x in out)
    assert {x["response"]["request_id"] for x in out} == {f"{batch_id}-{i + 1}" for i in range(25)}
    rows = _usage_rows(stack.home, batch_id)
    assert len(rows) == 25 and all(status == 200 for _, status, _ in rows)
    assert sum(t for _, _, t in rows) == done["usage"]["total_tokens"]
    # alice's key allows 2 requests a minute: 25 batch lines did not use them up
    assert stack.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2).choices  # fmt: skip


async def test_a_batch_resumes_after_a_crash_without_answering_a_line_twice(flow_env: Stack) -> None:
    stack = flow_env
    batch_id, store = _new_batch(stack, 30)
    batch_flow.validate.fn(batch_id)
    chunks = batch_flow.plan.fn(batch_id, 10)
    assert [(c.first, c.last, c.line) for c in chunks] == [(0, 9, 1), (10, 19, 11), (20, 29, 21)]
    await batch_flow.run_chunk.fn(batch_id, chunks[0], stack.gw.url)
    # the worker dies in the middle of writing line 11's answer
    with open(store.folder(batch_id) / "output.jsonl", "ab") as fh:
        fh.write(b'{"id": "batch_req_x", "custom_id": "q10", "respo')
    sent_before = stack.sim.requests
    again = batch_flow.plan.fn(batch_id, 10)  # the partial line is dropped: q10 runs again
    assert [(c.first, c.last) for c in again] == [(10, 19), (20, 29)]
    done = await _run(batch_id, stack.gw.url)
    assert stack.sim.requests - sent_before == 20
    out = [json.loads(x) for x in stack.client().files.content(done["output_file_id"]).read().splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(f"q{i}" for i in range(30))  # each once


async def test_a_cancelled_batch_keeps_what_was_answered(flow_env: Stack) -> None:
    stack = flow_env
    batch_id, _ = _new_batch(stack, 20)
    batch_flow.validate.fn(batch_id)
    first, second = batch_flow.plan.fn(batch_id, 10)
    await batch_flow.run_chunk.fn(batch_id, first, stack.gw.url)
    r = stack.client().batches.cancel(batch_id)
    assert r.status == "cancelling" and r.cancelling_at
    with pytest.raises(openai.NotFoundError):
        stack.client("bob").batches.cancel(batch_id)
    state = await batch_flow.run_chunk.fn(batch_id, second, stack.gw.url)
    assert state == "cancelling"
    done = batch_flow.finalize.fn(batch_id, state).public()
    assert done["status"] == "cancelled" and done["cancelled_at"]
    assert done["request_counts"] == {"total": 20, "completed": 10, "failed": 0}
    out = stack.client().files.content(done["output_file_id"]).read().splitlines()
    assert len(out) == 10
    with pytest.raises(openai.APIStatusError) as e:
        stack.client().batches.cancel(batch_id)
    assert e.value.status_code == 409
    listed = stack.client().batches.list(limit=100)
    assert batch_id in [b.id for b in listed.data]
    assert batch_id not in [b.id for b in stack.client("bob").batches.list().data]


async def test_a_batch_credential_works_only_for_its_live_batch(flow_env: Stack) -> None:
    import httpx

    from serving.batches.tokens import BatchTokens

    stack = flow_env
    batch_id, store = _new_batch(stack, 1)
    tokens = BatchTokens(Settings(home=stack.home).batch_secret_path)
    body = chat_line(0)["body"]
    ok = httpx.post(stack.gw.url + "/v1/chat/completions", json=body,
                    headers={"Authorization": f"Bearer {tokens.issue(batch_id)}"})  # fmt: skip
    assert ok.status_code == 200
    forged = tokens.issue(batch_id)[:-4] + "0000"
    assert httpx.post(stack.gw.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {forged}"}).status_code == 401  # fmt: skip
    store.update(batch_id, lambda b: setattr(b, "status", "cancelled"))
    assert httpx.post(stack.gw.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {tokens.issue(batch_id)}"}).status_code == 401  # fmt: skip


# ---- housekeeping (batch-retention) and the operators' listing ----


def test_housekeeping_finds_orphans_expires_waiting_batches_and_deletes_old_ones(flow_env: Stack) -> None:
    import time

    from serving.batches.files import FileStore

    stack = flow_env
    now = time.time()
    running, store = _new_batch(stack, 2)
    store.update(running, lambda b: (setattr(b, "status", "in_progress"), setattr(b, "heartbeat_at", now - 5)))
    dead, _ = _new_batch(stack, 2)
    store.update(dead, lambda b: (setattr(b, "status", "in_progress"), setattr(b, "heartbeat_at", now - 600)))
    assert [b.id for b in batch_retention.orphans(store, now)] == [dead]  # no sign of life for 10 minutes

    waiting, _ = _new_batch(stack, 3)  # no worker ever took it, and its window passed
    store.update(waiting, lambda b: setattr(b, "expires_at", int(now) - 1))
    assert batch_retention.expire_waiting(store, now) == [waiting]
    expired = store.get(waiting)
    assert expired.status == "expired" and expired.expired_at and expired.request_counts.failed == 3
    errors = [json.loads(x) for x in stack.client().files.content(expired.error_file_id).read().splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"} and len(errors) == 3

    files = FileStore(stack.home / "batches", 10**9, 10**9)
    assert batch_retention.delete_old(store, files, now, keep_days=1, dry_run=False) == []  # ended just now
    later = now + 2 * 86400
    assert waiting in batch_retention.delete_old(store, files, later, keep_days=1, dry_run=True)
    assert store.get(waiting)  # a dry run deletes nothing
    assert waiting in batch_retention.delete_old(store, files, later, keep_days=1, dry_run=False)
    with pytest.raises(openai.NotFoundError):
        stack.client().batches.retrieve(waiting)
    with pytest.raises(openai.NotFoundError):
        stack.client().files.retrieve(expired.error_file_id)
    with pytest.raises(openai.NotFoundError):
        stack.client().files.retrieve(expired.input_file_id)


def test_operators_list_every_batch_and_cancel_one(flow_env: Stack) -> None:
    import subprocess
    import sys

    stack = flow_env
    batch_id, store = _new_batch(stack, 2, user="bob")
    env = {"FIRST_HOME": str(stack.home), "PATH": "/usr/bin:/bin", "COLUMNS": "250"}
    first = [str(Path(sys.executable).parent / "first")]
    shown = subprocess.run([*first, "batches", "list", "--active"], env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if batch_id in line)
    assert "bob" in row and "validating" in row and "0/2" in row
    done = subprocess.run([*first, "batches", "cancel", batch_id], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0 and store.get(batch_id).status == "cancelling"
    again = subprocess.run([*first, "batches", "cancel", "batch_" + "f" * 24], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert again.returncode == 1 and "No such batch" in again.stderr


async def test_chunks_start_at_their_own_byte_offset_past_blank_lines(flow_env: Stack) -> None:
    stack = flow_env
    data = b"\n".join(jsonl([chat_line(i)]) for i in range(7))  # a blank line between every two requests
    f = stack.client().files.create(file=("gaps.jsonl", io.BytesIO(b"\n" + data)), purpose="batch")
    store = BatchStore(stack.home / "batches")
    b = store.create(owner=Principal(user="alice"), endpoint="/v1/chat/completions", input_file_id=f.id,
                     window="1h", lines=7, model="m", metadata=None)  # fmt: skip
    batch_flow.validate.fn(b.id)
    chunks = batch_flow.plan.fn(b.id, 3)
    assert [(c.first, c.last, c.line) for c in chunks] == [(0, 2, 2), (3, 5, 8), (6, 6, 14)]
    for chunk in chunks:
        await batch_flow.run_chunk.fn(b.id, chunk, stack.gw.url)
    done = batch_flow.finalize.fn(b.id, "in_progress").public()
    out = [json.loads(x) for x in stack.client().files.content(done["output_file_id"]).read().splitlines()]
    assert sorted(x["custom_id"] for x in out) == [f"q{i}" for i in range(7)]
    assert {x["response"]["request_id"] for x in out} == {f"{b.id}-{2 + 2 * i}" for i in range(7)}  # file lines


def test_the_quota_counts_every_file_of_its_owner(tmp_path: Path) -> None:
    from core.errors import APIError
    from serving.batches.files import FileStore

    store = FileStore(tmp_path, max_bytes=100, quota_bytes=150)
    up = store.upload("alice", "a.bin", "user_data")
    up.write(b"x" * 100)
    first = up.commit()
    up = store.upload("alice", "b.bin", "user_data")
    with pytest.raises(APIError) as e:
        up.write(b"y" * 60)  # 160 > 150
    assert e.value.status == 413 and e.value.code == "file_quota_exceeded"
    up = store.upload("bob", "c.bin", "user_data")  # another user's quota is their own
    up.write(b"z" * 60)
    up.commit()
    store.delete(first.id, "alice")
    up = store.upload("alice", "b.bin", "user_data")
    up.write(b"y" * 60)
    assert up.commit().bytes == 60
    assert sorted(p.name for p in tmp_path.joinpath("files").iterdir() if p.name.startswith(".")) == []


async def test_a_cancel_after_the_runs_last_look_still_ends_the_batch_cancelled(flow_env: Stack) -> None:
    """The caller cancels between the last chunk's final look at the batch and finalize: with lines left, the
    batch ends cancelled (not completed), keeping what was answered."""
    stack = flow_env
    batch_id, _ = _new_batch(stack, 12)
    batch_flow.validate.fn(batch_id)
    first, _second = batch_flow.plan.fn(batch_id, 10)
    state = await batch_flow.run_chunk.fn(batch_id, first, stack.gw.url)
    assert state == "in_progress"
    stack.client().batches.cancel(batch_id)
    done = batch_flow.finalize.fn(batch_id, state).public()
    assert done["status"] == "cancelled" and done["request_counts"] == {"total": 12, "completed": 10, "failed": 0}
