"""Many concurrent requests with `AsyncOpenAI`: a bounded number in flight, each timed, and what to do with a 429.

    .venv/bin/python examples/async_many.py [REQUESTS] [CONCURRENCY]     # default 32 and 8

The gateway caps what one caller has in flight per model (FIRST_MAX_INFLIGHT_PER_CALLER, 64) and may rate-limit
you (429 with Retry-After); the client's own retries honour Retry-After, so `max_retries` is all it takes.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from _connect import MODEL, api_key, base_url
from openai import AsyncOpenAI


async def main(requests: int, concurrency: int) -> None:
    client = AsyncOpenAI(base_url=base_url(), api_key=api_key(), max_retries=5)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> float:
        async with gate:
            start = time.perf_counter()
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=8
            )
            return time.perf_counter() - start

    start = time.perf_counter()
    latencies = await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - start
    print(f"{requests} requests, {concurrency} at a time: {wall:.2f} s, {requests / wall:.1f} requests/s, "
          f"median {statistics.median(latencies) * 1000:.0f} ms, slowest {max(latencies) * 1000:.0f} ms")  # fmt: skip
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 32, int(sys.argv[2]) if len(sys.argv) > 2 else 8))
