"""UsageSpool (per-process JSON-lines segments) and UsageStore (DuckDB ingestion and summary)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from analytics.records import UsageRecord
from analytics.schema import USAGE_COLUMNS
from analytics.spool import SEGMENT_RE, UsageSpool
from analytics.store import UsageStore

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
ENC = msgspec.json.Encoder()


def rec(i: int, **kw) -> UsageRecord:
    base = dict(
        request_id=f"req-{i:05d}",
        ts=T0 + i * 0.25,
        user=f"user{i % 3}",
        groups=[f"g{i % 2}", "all"] if i % 4 else [],
        model="m-a" if i % 2 else "m-b",
        cluster="polaris" if i % 5 else None,
        endpoint="chat.completions" if i % 3 else "completions",
        stream=bool(i % 2),
        prompt_tokens=10 + i,
        completion_tokens=2 * i,
        total_tokens=10 + 3 * i,
        latency_ms=100.0 + i * 1.5,
        ttft_ms=(20.0 + i) if i % 2 else None,
        status=500 if i % 7 == 0 else 200,
        error_type="api_error" if i % 7 == 0 else None,
        cold_start=i % 11 == 0,
    )
    base.update(kw)
    return UsageRecord(**base)


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def as_row(r: UsageRecord) -> dict:
    row = msgspec.structs.asdict(r)
    row["ts"] = datetime.fromtimestamp(r.ts, UTC)
    return row


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def store(tmp_path: Path) -> UsageStore:
    return UsageStore(tmp_path / "usage.duckdb")


# --- spool -----------------------------------------------------------------------------------


def test_segments_are_named_per_process_and_rotate_by_count(spool_dir: Path) -> None:
    spool = UsageSpool(spool_dir, max_records=10)
    assert files(spool_dir) == []  # segments are created lazily
    for i in range(25):
        spool.append(rec(i))
    names = files(spool_dir)
    assert len(names) == 3
    assert [n.endswith(".jsonl.open") for n in names] == [False, False, True]
    for seq, name in enumerate(names):
        m = SEGMENT_RE.match(name)
        assert m and int(m["pid"]) == os.getpid() and int(m["seq"]) == seq
    spool.close()
    names = files(spool_dir)
    assert all(n.endswith(".jsonl") for n in names)
    lines = [ln for n in names for ln in (spool_dir / n).read_bytes().splitlines()]
    assert [msgspec.json.decode(ln, type=UsageRecord) for ln in lines] == [rec(i) for i in range(25)]
    assert [len((spool_dir / n).read_bytes().splitlines()) for n in names] == [10, 10, 5]


def test_rotates_by_age(spool_dir: Path) -> None:
    spool = UsageSpool(spool_dir, max_records=1000, max_age_s=0.05)
    spool.append(rec(0))
    spool.append(rec(1))
    time.sleep(0.08)
    spool.append(rec(2))
    names = files(spool_dir)
    assert len(names) == 2 and names[0].endswith(".jsonl") and names[1].endswith(".jsonl.open")
    spool.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_writes_its_own_segment(spool_dir: Path, store: UsageStore) -> None:
    spool = UsageSpool(spool_dir)
    spool.append(rec(0))
    pid = os.fork()
    if pid == 0:  # child: must not touch the parent's segment
        code = 1
        try:
            spool.append(rec(1))
            spool.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    spool.append(rec(2))
    spool.close()
    by_pid = {int(SEGMENT_RE.match(n)["pid"]): (spool_dir / n).read_bytes() for n in files(spool_dir)}
    assert by_pid == {
        os.getpid(): ENC.encode(rec(0)) + b"\n" + ENC.encode(rec(2)) + b"\n",
        pid: ENC.encode(rec(1)) + b"\n",
    }
    assert store.ingest(spool_dir) == 3


def test_fsync_mode_writes_the_same_lines(spool_dir: Path) -> None:
    with UsageSpool(spool_dir, fsync=True) as spool:
        spool.append(rec(1))
        spool.append(rec(2))
    (name,) = files(spool_dir)
    assert (spool_dir / name).read_bytes() == ENC.encode(rec(1)) + b"\n" + ENC.encode(rec(2)) + b"\n"


# --- ingestion -------------------------------------------------------------------------------


def test_append_then_ingest_exact_rows_and_values(spool_dir: Path, store: UsageStore) -> None:
    records = [rec(i) for i in range(37)]
    with UsageSpool(spool_dir, max_records=10) as spool:
        for r in records:
            spool.append(r)
    assert store.ingest(spool_dir) == 37
    assert files(spool_dir) == []  # closed segments are deleted once committed
    df = store.rows()
    assert df.columns == list(USAGE_COLUMNS)
    assert df.height == 37
    assert df.to_dicts() == [as_row(r) for r in records]
    assert str(df.schema["ts"]) == "Datetime(time_unit='us', time_zone='UTC')"


def test_each_replicas_folder_is_ingested_once(spool_dir: Path, store: UsageStore) -> None:
    """Replicas (FIRST_REPLICA) spool to their own folders under the shared root; ingest reads them all."""
    from core.settings import Settings

    settings = [Settings(home=spool_dir.parent, usage_spool_dir=spool_dir, replica=f"gw-{i}") for i in range(2)]
    assert [s.spool_dir for s in settings] == [spool_dir / "gw-0", spool_dir / "gw-1"]
    with UsageSpool(settings[0].spool_dir) as a, UsageSpool(settings[1].spool_dir) as b, UsageSpool(spool_dir) as c:
        for i in range(30):
            (a, b, c)[i % 3].append(rec(i))
    assert store.ingest(settings[0].spool_root) == 30
    assert store.ingest(settings[0].spool_root) == 0
    assert store.count() == 30 and files(spool_dir / "gw-0") == files(spool_dir / "gw-1") == []


def test_ingest_twice_and_rereading_a_segment_never_doubles(spool_dir: Path, store: UsageStore, tmp_path: Path) -> None:
    with UsageSpool(spool_dir, max_records=8) as spool:
        for i in range(20):
            spool.append(rec(i))
    backup = tmp_path / "backup"
    shutil.copytree(spool_dir, backup)
    assert store.ingest(spool_dir) == 20
    before = store.rows()
    assert store.ingest(spool_dir) == 0
    # A crash between commit and delete leaves the segments behind: re-ingesting them is harmless.
    shutil.rmtree(spool_dir)
    shutil.copytree(backup, spool_dir)
    assert store.ingest(spool_dir) == 0
    assert files(spool_dir) == []
    assert store.rows().equals(before)
    assert store.count() == 20


def test_duplicate_request_ids_and_malformed_lines_are_skipped(spool_dir: Path, store: UsageStore) -> None:
    spool_dir.mkdir()
    lines = [
        ENC.encode(rec(1)),
        ENC.encode(rec(1, user="someone-else")),  # the same request twice: first one wins
        b'{"request_id": "bogus", "ts": "yesterday"}',  # complete but invalid
        b"not json at all",
        b"",
        ENC.encode(rec(2)),
    ]
    (spool_dir / f"usage-{os.getpid()}-1-000000.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (spool_dir / "unrelated.txt").write_text("ignored")
    assert store.ingest(spool_dir) == 2
    assert store.last_skipped_lines == 2
    assert store.rows().to_dicts() == [as_row(rec(1)), as_row(rec(2))]
    assert files(spool_dir) == ["unrelated.txt"]


def test_live_open_segment_partial_line_is_skipped_then_picked_up(spool_dir: Path, store: UsageStore) -> None:
    # Simulate a live writer: it holds the flock on its .open segment, as UsageSpool does.
    spool_dir.mkdir()
    path = spool_dir / f"usage-{os.getpid()}-2-000000.jsonl.open"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        full = ENC.encode(rec(3)) + b"\n"
        os.write(fd, ENC.encode(rec(1)) + b"\n" + ENC.encode(rec(2)) + b"\n" + full[:40])
        assert store.ingest(spool_dir) == 2
        assert files(spool_dir) == [path.name]  # live writer: kept
        assert store.rows()["request_id"].to_list() == ["req-00001", "req-00002"]
        os.write(fd, full[40:])  # the write completes
        assert store.ingest(spool_dir) == 1
        assert store.ingest(spool_dir) == 0
        assert files(spool_dir) == [path.name]
    finally:
        os.close(fd)  # the writer goes away (drops its lock)
    assert store.ingest(spool_dir) == 0
    assert files(spool_dir) == []
    assert store.rows().to_dicts() == [as_row(rec(i)) for i in (1, 2, 3)]


def test_open_segment_of_a_live_spool_is_read_but_kept(spool_dir: Path, store: UsageStore) -> None:
    spool = UsageSpool(spool_dir)
    for i in range(5):
        spool.append(rec(i))
    assert store.ingest(spool_dir) == 5
    assert len(files(spool_dir)) == 1 and files(spool_dir)[0].endswith(".open")
    spool.append(rec(5))
    assert store.ingest(spool_dir) == 1
    spool.close()
    assert store.ingest(spool_dir) == 0
    assert files(spool_dir) == []
    assert store.count() == 6


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    import msgspec
    from pathlib import Path
    from analytics.records import UsageRecord
    from analytics.spool import UsageSpool
    spool = UsageSpool(Path(sys.argv[1]))
    for i in range(5):
        spool.append(UsageRecord(request_id=f"crash-{i}", ts=1.0 + i, user="u", model="m", endpoint="completions"))
    line = msgspec.json.encode(UsageRecord(request_id="crash-5", ts=9.0, user="u", model="m", endpoint="x"))
    os.write(spool._fd, line[: len(line) // 2])  # killed mid-write
    os._exit(0)  # no atexit, no close: the segment stays .open
    """
)


def test_dead_process_open_segment_keeps_complete_lines_and_is_deleted(spool_dir: Path, store: UsageStore) -> None:
    subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(spool_dir)], check=True, timeout=60)
    (name,) = files(spool_dir)
    assert name.endswith(".jsonl.open")
    assert not (spool_dir / name).read_bytes().endswith(b"\n")
    assert store.ingest(spool_dir) == 5
    assert store.rows()["request_id"].to_list() == [f"crash-{i}" for i in range(5)]
    assert files(spool_dir) == []  # owner dead: deleted, partial tail dropped with it


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from analytics.records import UsageRecord
    from analytics.spool import UsageSpool
    directory, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    spool = UsageSpool(directory, max_records=37)
    for i in range(n):
        spool.append(UsageRecord(request_id=f"{tag}-{i}", ts=1000.0 + i, user=tag, model="m",
                                 endpoint="chat.completions", total_tokens=i))
        if i % 50 == 0:
            time.sleep(0.001)
    if tag == "b":
        import os; os._exit(0)  # b dies without closing its last segment
    spool.close()
    """
)


def test_two_processes_writing_one_directory_arrive_exactly_once(spool_dir: Path, store: UsageStore) -> None:
    n = 1500
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(spool_dir), tag, str(n)]) for tag in ("a", "b")]
    inserted = 0
    while any(p.poll() is None for p in procs):  # ingest concurrently with the writers
        inserted += store.ingest(spool_dir)
        time.sleep(0.01)
    assert [p.wait() for p in procs] == [0, 0]
    inserted += store.ingest(spool_dir)
    assert inserted == 2 * n
    assert files(spool_dir) == []
    got = store.query('SELECT "user", count(*) AS n, count(DISTINCT request_id) AS d FROM usage GROUP BY 1 ORDER BY 1')
    assert got.rows() == [("a", n, n), ("b", n, n)]
    ids = set(store.rows()["request_id"].to_list())
    assert ids == {f"{t}-{i}" for t in "ab" for i in range(n)}


def test_waits_for_another_process_holding_the_db_lock(tmp_path: Path, store: UsageStore) -> None:
    store.count()  # create the file
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(0.7)",
            str(store.db_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        assert store.count() == 0
        assert time.monotonic() - start > 0.2
    finally:
        holder.wait(timeout=30)


# --- summary ---------------------------------------------------------------------------------

# (user, model, prompt, completion, latency_ms, ttft_ms, status, ts offset in hours)
DATA = [
    ("alice", "m1", 10, 5, 100.0, 10.0, 200, 0),
    ("alice", "m1", 20, 0, 200.0, 30.0, 200, 1),
    ("alice", "m1", 30, 0, 600.0, None, 500, 2),
    ("alice", "m2", 7, 3, 50.0, None, 200, 3),
    ("bob", "m1", 100, 50, 100.0, 20.0, 429, 4),
    ("bob", "m1", 200, 70, 300.0, 40.0, 200, 5),
    ("carol", "m2", 1, 1, 10.0, 5.0, 200, 6),
    ("carol", "m2", 2, 2, 20.0, 6.0, 399, 7),
    ("carol", "m2", 3, 3, 30.0, 7.0, 400, 8),
    ("carol", "m2", 4, 4, 1000.0, 8.0, 503, 9),
]


@pytest.fixture
def loaded(spool_dir: Path, store: UsageStore) -> UsageStore:
    with UsageSpool(spool_dir, max_records=4) as spool:
        for i, (user, model, p, c, lat, ttft, status, hours) in enumerate(DATA):
            spool.append(
                UsageRecord(
                    request_id=f"s{i}",
                    ts=T0 + hours * 3600,
                    user=user,
                    model=model,
                    endpoint="chat.completions",
                    prompt_tokens=p,
                    completion_tokens=c,
                    total_tokens=p + c,
                    latency_ms=lat,
                    ttft_ms=ttft,
                    status=status,
                )
            )
    assert store.ingest(spool_dir) == len(DATA)
    return store


def test_summary_numbers_by_hand(loaded: UsageStore) -> None:
    df = loaded.summary()
    assert df.columns == [
        "user",
        "model",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "p50_latency_ms",
        "p50_ttft_ms",
    ]
    assert df.rows() == [
        # alice/m1: latencies 100,200,600 -> 200; ttfts 10,30 (null ignored) -> 20; one 500
        ("alice", "m1", 3, 1, 60, 5, 65, 200.0, 20.0),
        # alice/m2: a single non-streamed request: no ttft
        ("alice", "m2", 1, 0, 7, 3, 10, 50.0, None),
        # bob/m1: 429 counts as an error; p50 of 100,300 -> 200; of 20,40 -> 30
        ("bob", "m1", 2, 1, 300, 120, 420, 200.0, 30.0),
        # carol/m2: 399 is not an error, 400 and 503 are; p50 of 10,20,30,1000 -> 25; of 5..8 -> 6.5
        ("carol", "m2", 4, 2, 10, 10, 20, 25.0, 6.5),
    ]


def test_summary_since_until(loaded: UsageStore) -> None:
    since = datetime.fromtimestamp(T0 + 2 * 3600, UTC)  # drops alice's first two requests
    until = datetime.fromtimestamp(T0 + 8 * 3600, UTC)  # drops carol's last two (8h and 9h)
    assert loaded.summary(since=since).rows()[0] == ("alice", "m1", 1, 1, 30, 0, 30, 600.0, None)
    df = loaded.summary(since=since, until=until)
    assert df.rows() == [
        ("alice", "m1", 1, 1, 30, 0, 30, 600.0, None),
        ("alice", "m2", 1, 0, 7, 3, 10, 50.0, None),
        ("bob", "m1", 2, 1, 300, 120, 420, 200.0, 30.0),
        ("carol", "m2", 2, 0, 3, 3, 6, 15.0, 5.5),
    ]
    # A naive datetime is UTC; a datetime in another zone is converted.
    naive = datetime(2026, 1, 1, 6, 0, 0)
    assert loaded.summary(since=naive)["requests"].to_list() == [4]
    assert loaded.summary(since=datetime.fromisoformat("2026-01-01T07:00:00+01:00"))["requests"].sum() == 4
    assert loaded.summary(since=datetime(2030, 1, 1)).height == 0


def test_rows_that_cannot_be_written_are_held_in_memory_and_written_later(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, no privileges needed) stands in for a full disk, in a child process: an
    append that fails raises, a held row stays in memory, and the next write that can puts them all on disk."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from analytics.records import UsageRecord
        from analytics.spool import UsageSpool

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        spool = UsageSpool({str(tmp_path / "spool")!r})
        row = lambda i, status=200: UsageRecord(request_id=f"r{{i}}", ts=0.0, user="u", model="m", endpoint="chat",
                                                 status=status)
        spool.append(row(0))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (spool._offset, hard))  # the segment is "full"
        try:
            spool.append(row(1))
            raise SystemExit("the write should have failed")
        except OSError:
            pass
        assert spool.backlog == 0 and not spool.healthy  # not held: the caller's answer is withheld
        spool.hold(row(2, 503))
        spool.hold(row(3))
        assert spool.backlog == 2 and not spool.retry()
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
        assert spool.retry() and spool.healthy and spool.backlog == 0
        spool.close()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for seg in sorted((tmp_path / "spool").iterdir()) for line in seg.read_text().splitlines()]
    ids = [json.loads(line)["request_id"] for line in lines]
    assert ids == ["r0", "r2", "r3"]  # r1 was refused (its caller got 503 instead), r2 and r3 were held
