"""UsageStore under concurrency and crashes, with real processes (DuckDB's file lock is per process).

- One process ingests a spool of 300k records (most already written as segments, the rest arriving from a live
  writer process meanwhile) while three analyst processes query the store in a loop (`UsageStore` read-write
  connections and `analytics.reports` read-only ones): no lock error reaches any of them, and the final count is
  exact.
- An ingesting process SIGKILLed several times, each time after a batch has committed and while it reads and
  inserts the next one, loses nothing and doubles nothing: a last in-process ingest ends with exactly the records
  written. Segments put back after they were ingested (a crash between the commit and the deletes) add nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from analytics.store import UsageStore
from core.settings import REPO_ROOT

pytestmark = pytest.mark.e2e  # ~20 s of several processes

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
MODELS = ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3")
ENC = msgspec.json.Encoder()


def rec(i: int) -> UsageRecord:
    err = i % 53 == 0
    return UsageRecord(
        request_id=f"r{i:09d}", ts=T0 + i * 0.01, user=f"user{i % 97}", groups=["alcf", f"p{i % 5}"],
        model=MODELS[i % 3], cluster=("polaris", "sophia")[i % 2], endpoint="chat.completions", stream=bool(i % 2),
        prompt_tokens=50 + i % 400, completion_tokens=0 if err else 20 + i % 300,
        total_tokens=50 + i % 400 + (0 if err else 20 + i % 300), latency_ms=200.0 + i % 1500,
        ttft_ms=30.0 + i % 90 if i % 2 else None, status=500 if err else 200, error_type="api_error" if err else None,
    )  # fmt: skip


def write_segments(spool_dir: Path, start: int, n: int, per_segment: int, pid: int = 999_999) -> int:
    """Closed segments as a writer process ``pid`` would have left them; returns the number of files."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    files = 0
    for seq, lo in enumerate(range(start, start + n, per_segment)):
        data = ENC.encode_lines([rec(i) for i in range(lo, min(lo + per_segment, start + n))])
        (spool_dir / f"usage-{pid}-{int(T0 * 1000)}-{seq:06d}.jsonl").write_bytes(data)
        files += 1
    return files


# ---- the roles, each run in its own process: python -c '...' ROLE ARGS... (prints one JSON line) ----


def _writer(spool_dir: str, start: str, n: str, max_records: str) -> dict:
    spool = UsageSpool(Path(spool_dir), max_records=int(max_records))
    t = time.monotonic()
    for i in range(int(start), int(start) + int(n)):
        spool.append(rec(i))
        if i % 1000 == 0:
            time.sleep(0.1)  # arrive over a few seconds, not in one burst
    spool.close()
    return {"written": int(n), "s": time.monotonic() - t}


def _ingester(spool_dir: str, db: str, done_flag: str) -> dict:
    store, spool = UsageStore(Path(db), batch_rows=50_000, lock_timeout_s=30), Path(spool_dir)
    ingests = inserted = 0
    started = time.time()
    while True:
        writer_done = Path(done_flag).exists()
        inserted += store.ingest(spool)
        ingests += 1
        if writer_done and not any(spool.iterdir()):
            return {"ingests": ingests, "inserted": inserted, "started": started, "ended": time.time()}
        time.sleep(0.05)


def _analyst(db: str, stop_flag: str, seed: str) -> dict:
    from analytics import reports  # read-only connections, beside the store's read-write ones

    store = UsageStore(Path(db), lock_timeout_s=30)
    ok, errors, k, last, done_at = 0, [], int(seed), 0, []
    while not Path(stop_flag).exists():
        try:
            match k % 4:
                case 0:
                    n = store.count()
                    if n < last:
                        errors.append(f"count went down: {last} -> {n}")
                    last = n
                case 1:
                    store.summary()
                case 2:
                    reports.latency(store)
                case _:
                    store.query("SELECT model, count(*), quantile_cont(latency_ms, 0.95) FROM usage GROUP BY model")
            ok += 1
            done_at.append(time.time())
        except Exception as exc:  # any lock error that escapes the retry is a failure
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
        k += 1
        time.sleep(0.01)
    return {"ok": ok, "errors": errors, "done_at": done_at}


def _crash_ingester(spool_dir: str, db: str) -> dict:
    return {"inserted": UsageStore(Path(db), batch_rows=20_000).ingest(Path(spool_dir))}


ROLES = {"writer": _writer, "ingester": _ingester, "analyst": _analyst, "crash-ingester": _crash_ingester}
_CODE = (
    "import json, sys\n"
    "from tests.unit.test_usage_concurrency import ROLES\n"
    "print(json.dumps(ROLES[sys.argv[1]](*sys.argv[2:])))"
)


def spawn(role: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CODE, role, *map(str, args)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def result(p: subprocess.Popen, timeout: float = 60) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"{p.args[3]} exited {p.returncode}:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def duplicates(store: UsageStore) -> int:
    return store.query("SELECT count(*) - count(DISTINCT request_id) AS d FROM usage")["d"][0]


# ---- tests ----


def test_analysts_query_while_a_large_spool_is_ingested(tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "usage.duckdb"
    done_flag, stop_flag = tmp_path / "writer-done", tmp_path / "stop"
    bulk, live = 250_000, 50_000
    write_segments(spool, 0, bulk, per_segment=10_000)
    UsageStore(db).count()  # the table exists before the analysts' first query
    t = time.monotonic()
    procs = [spawn("analyst", db, stop_flag, k) for k in range(3)]
    ingester = spawn("ingester", spool, db, done_flag)
    writer = spawn("writer", spool, bulk, live, 2_000)
    try:
        wrote = result(writer)
        done_flag.touch()
        ingested = result(ingester, timeout=120)
        time.sleep(0.5)  # the analysts see the final table too
    finally:
        stop_flag.touch()
    analysts = [result(p) for p in procs]
    elapsed = time.monotonic() - t

    assert wrote["written"] == live
    assert [a["errors"] for a in analysts] == [[], [], []]
    # Each analyst got answers while the ingest was running, not only before or after it (how many depends on
    # the machine: each query waits for the batch in progress to commit).
    during = [sum(ingested["started"] <= t <= ingested["ended"] for t in a["done_at"]) for a in analysts]
    assert all(n >= 2 for n in during), (during, ingested)
    store = UsageStore(db)
    assert ingested["inserted"] == bulk + live
    assert ingested["ingests"] >= 2, "segments should keep arriving while the spool is ingested"
    assert store.count() == bulk + live and duplicates(store) == 0
    assert store.query("SELECT min(request_id) AS lo, max(request_id) AS hi FROM usage").row(0) == (
        "r000000000",
        f"r{bulk + live - 1:09d}",
    )
    assert store.summary()["requests"].sum() == bulk + live
    print(f"\n{ingested['ingests']} ingests, analysts {[a['ok'] for a in analysts]} queries ({during} during the "
          f"ingest); {elapsed:.1f} s")  # fmt: skip


def test_a_crash_mid_ingest_loses_and_doubles_nothing(tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "usage.duckdb"
    n = 200_000
    files = write_segments(spool, 0, n, per_segment=2_000)
    # A writer killed mid-line: an open segment whose flock nobody holds, with a partial last line.
    tail = ENC.encode_lines([rec(i) for i in range(n, n + 500)]) + ENC.encode(rec(n + 500))[:40]
    (spool / f"usage-999998-{int(T0 * 1000)}-000000.jsonl.open").write_bytes(tail)
    total = n + 500
    assert len(list(spool.iterdir())) == files + 1
    kept = {p.name: p.read_bytes() for p in sorted(spool.iterdir())[:25]}  # the first batches' segments

    kills = []
    for extra_s in (0.0, 0.07, 0.2):  # several crashes: right after a commit (mid-delete), then mid-read/insert
        left = len(list(spool.iterdir()))
        p = spawn("crash-ingester", spool, db)
        deadline = time.monotonic() + 30
        while p.poll() is None and len(list(spool.iterdir())) >= left and time.monotonic() < deadline:
            time.sleep(0.002)  # until a batch has committed and its segments start to go
        time.sleep(extra_s)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=10)
        kills.append((p.returncode, len(list(spool.iterdir()))))
    assert any(code == -signal.SIGKILL for code, _ in kills), f"no ingest was killed mid-way: {kills}"

    store = UsageStore(db)
    before = store.count()  # the database opens cleanly after the kills (WAL replayed)
    assert before <= total
    store.ingest(spool)
    assert list(spool.iterdir()) == []
    assert store.count() == total, (store.count(), total, kills)
    assert duplicates(store) == 0
    assert store.ingest(spool) == 0
    for name, data in kept.items():  # as if a crash had come between a batch's commit and its deletes
        (spool / name).write_bytes(data)
    assert store.ingest(spool) == 0 and list(spool.iterdir()) == []
    assert store.count() == total and duplicates(store) == 0
    print(f"\nkills (exit code, segments left): {kills}; {before} rows before the last ingest")
