"""Measure UsageSpool.append per-record cost and UsageStore.ingest throughput.

python bench/spool_append.py [--n 100000] [--fsync]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from analytics.store import UsageStore


def make(i: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"bench-{i:08d}",
        ts=1_767_225_600.0 + i * 0.01,
        user=f"user{i % 50}",
        groups=["alcf", f"proj{i % 7}"],
        model=("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct")[i % 2],
        cluster="polaris",
        endpoint="chat.completions",
        stream=bool(i % 2),
        prompt_tokens=100 + i % 500,
        completion_tokens=50 + i % 300,
        total_tokens=150 + i % 500 + i % 300,
        latency_ms=250.0 + i % 1000,
        ttft_ms=40.0 + i % 100 if i % 2 else None,
        status=200 if i % 50 else 500,
        error_type=None if i % 50 else "api_error",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--fsync", action="store_true", help="fsync every record")
    args = ap.parse_args()
    n = args.n
    records = [make(i) for i in range(n)]

    with tempfile.TemporaryDirectory() as tmp:
        spool_dir, db = Path(tmp) / "spool", Path(tmp) / "usage.duckdb"
        spool = UsageSpool(spool_dir, fsync=args.fsync)
        clock = time.perf_counter_ns
        samples = []
        t_all = clock()
        for r in records:
            t = clock()
            spool.append(r)
            samples.append(clock() - t)
        t_all = clock() - t_all
        spool.close()
        samples.sort()
        segments = len(list(spool_dir.iterdir()))
        size = sum(p.stat().st_size for p in spool_dir.iterdir())
        print(
            f"append x{n} (fsync={args.fsync}): median {statistics.median(samples) / 1e3:.2f} us, "
            f"p99 {samples[int(0.99 * n)] / 1e3:.2f} us, max {samples[-1] / 1e3:.0f} us, "
            f"overall {t_all / n / 1e3:.2f} us/record; {segments} segments, {size / 1e6:.1f} MB"
        )

        store = UsageStore(db)
        t = time.perf_counter()
        inserted = store.ingest(spool_dir)
        dt = time.perf_counter() - t
        assert inserted == n, (inserted, n)
        print(f"ingest {inserted} rows into an empty table: {dt:.3f} s = {inserted / dt:,.0f} rows/s")

        # Re-ingest the same 100k (e.g. after a crash between commit and delete): all conflicts.
        spool = UsageSpool(spool_dir)
        for r in records:
            spool.append(r)
        spool.close()
        t = time.perf_counter()
        again = store.ingest(spool_dir)
        dt = time.perf_counter() - t
        assert again == 0, again
        print(f"re-ingest {n} duplicate rows (0 inserted): {dt:.3f} s = {n / dt:,.0f} rows/s")

        t = time.perf_counter()
        summary = store.summary()
        print(f"summary over {store.count()} rows: {(time.perf_counter() - t) * 1e3:.1f} ms, {summary.height} groups")


if __name__ == "__main__":
    main()
