"""vLLM's own batch runner against the model's vLLM server, on the same lines and the same model (issue 15).

In one run, on the tiny model and the real vLLM CPU (.venv-vllm):
  1. runner, 1 line    compute/cluster_batch.py:run_vllm_batch, as a cluster runs it: what a run costs before its
                       first answer (the runner starts and loads the model every run);
  2. runner, N lines   the same with --lines lines: lines per second once loaded;
  3. server            start_vllm (time to /health), then the same N lines POSTed to it --concurrency at a time (as
                       the gateway path's FIRST_BATCH_CONCURRENCY does, less the gateway, whose own cost per line
                       the "Batches" section measures), then stop_vllm.
From these, the batch size from which the runner's path finishes first, against a server that is already hot and
against one that must start. On a GPU cluster the runner's load is minutes and its throughput far higher: these
CPU numbers show the shape, and FIRST_BATCH_CLUSTER_MIN_LINES is the setting that acts on it.

    .venv/bin/python bench/batch_runner.py            # 2,000 lines; writes its section of docs/benchmarks.md
    .venv/bin/python bench/batch_runner.py --quick    # 200 lines; writes --out only when given
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* is not installed

import httpx

from bench.common import BenchError, add_output_args, fmt, log, machine_line, measure_and_write, resolve_output
from blocks.registry import Registry
from compute import cluster_batch, functions
from compute.backends import ExecutorBackend
from compute.tiny_model import build_tiny_model
from core.settings import Settings

SECTION = ("## vLLM's batch runner against its server (`bench/batch_runner.py`)", "<!-- end batch runner -->")


def lines_of(n: int) -> list[dict[str, Any]]:
    def body(i: int) -> dict[str, Any]:
        return {"model": "tiny", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 8,
                "temperature": 0}  # fmt: skip

    return [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body(i)} for i in range(n)]


def run_runner(spec: dict[str, Any], lines: list[dict[str, Any]], tag: str) -> float:
    packed = base64.b64encode(gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines))).decode()
    t0 = time.monotonic()
    answer = cluster_batch.run_vllm_batch(spec, tag, packed, 1800)
    took = time.monotonic() - t0
    if answer["status"] != "ok":
        raise BenchError(f"the runner failed: {answer['detail'][-1500:]}")
    docs = [json.loads(x) for x in gzip.decompress(base64.b64decode(answer["output"])).splitlines()]
    bad = [d for d in docs if (d.get("response") or {}).get("status_code") != 200]
    if len(docs) != len(lines) or bad:
        raise BenchError(f"the runner answered {len(docs)} of {len(lines)} lines, {len(bad)} not 200")
    return took


async def post_all(base_url: str, key: str, lines: list[dict[str, Any]], concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, headers={"Authorization": f"Bearer {key}"}) as c:

        async def one(line: dict[str, Any]) -> None:
            async with gate:
                r = await c.post(line["url"], json=line["body"])
                if r.status_code != 200:
                    raise BenchError(f"vLLM answered {r.status_code}: {r.text[:300]}")

        t0 = time.monotonic()
        await asyncio.gather(*(one(x) for x in lines))
        return time.monotonic() - t0


def run_server(spec: dict[str, Any], lines: list[dict[str, Any]], concurrency: int) -> tuple[float, float]:
    """(seconds from start to /health, seconds for the lines)."""
    t0 = time.monotonic()
    functions.start_vllm(spec)
    try:
        while (state := functions.vllm_status(spec))["state"] != "hot":
            if state["state"] == "failed" or time.monotonic() - t0 > 600:
                raise BenchError(f"vLLM did not start: {state.get('detail', '')[-1500:]}")
            time.sleep(0.5)
        ready = time.monotonic() - t0
        key = json.loads(Path(spec["state_dir"], "tiny.json").read_text())["api_key"]
        return ready, asyncio.run(post_all(state["base_url"], key, lines, concurrency))
    finally:
        functions.stop_vllm(spec)


def measure(args: argparse.Namespace) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="first-bench-runner-"))
    settings = Settings(home=home, vllm_port_base=args.port)
    log("building the tiny model")
    build_tiny_model(settings.models_dir / "tiny")
    reg = Registry.embedded_default(settings)
    spec = ExecutorBackend.instance_spec(reg.models["tiny"], reg.clusters["local"], settings)
    lines = lines_of(args.lines)
    log("runner, 1 line")
    one = run_runner(spec, lines[:1], "bench-1")
    log(f"runner, {args.lines} lines")
    many = run_runner(spec, lines, "bench-n")
    log(f"server: start, then {args.lines} lines at concurrency {args.concurrency}")
    ready, served = run_server(spec, lines, args.concurrency)
    return {"one": one, "many": many, "ready": ready, "served": served}


def report(args: argparse.Namespace, m: dict[str, float], started: datetime, wall_s: float) -> str:
    n = args.lines
    runner_rate = (n - 1) / max(m["many"] - m["one"], 1e-9)  # lines/s once loaded
    server_rate = n / m["served"]
    # batch size B where the runner's time (load + B / runner_rate) equals the server's (B / server_rate [+ ready])
    gain = 1 / server_rate - 1 / runner_rate

    def even(extra_s: float) -> str:
        if gain <= 0:
            return "never (the server answers lines faster here)"
        return f"{max(0.0, (m['one'] - extra_s) / gain):,.0f} lines"

    rows = [
        ("runner, 1 line (start + model load + 1 answer)", f"{fmt(m['one'])} s", "-"),
        (f"runner, {n:,} lines", f"{fmt(m['many'])} s", f"{n / m['many']:.1f} ({runner_rate:.1f} once loaded)"),
        ("server: start to /health", f"{fmt(m['ready'])} s", "-"),
        (f"server: {n:,} lines at concurrency {args.concurrency}", f"{fmt(m['served'])} s", f"{server_rate:.1f}"),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""{SECTION[0]}

{machine_line(started, wall_s, quick=args.quick, rerun="`.venv/bin/python bench/batch_runner.py`")}

The same {n:,} chat lines (8 tokens each, the tiny model, vLLM CPU) through vLLM's own batch runner, as a cluster
runs a chunk (`compute/cluster_batch.py`), and through the model's vLLM server, {args.concurrency} at a time.

| run | time | lines/s |
|---|---|---|
{table}

- Once loaded, the runner answers about **{runner_rate / server_rate:.0f}×** as many lines per second as the server
  does at concurrency {args.concurrency} (it batches every line of its file at once; "once loaded" is the
  difference of the two runner rows, so a rough figure); each run of the runner first pays {fmt(m["one"])} s to
  start and load.
- The runner's path finishes first from about **{even(0.0)}** against a server that is already hot, and from
  **{even(m["ready"])}** against one that must start first.
- What FIRST does with this: a cluster with a scheduler takes a batch of `FIRST_BATCH_CLUSTER_MIN_LINES`
  (10,000) lines or more with the runner, in chunks of `FIRST_BATCH_CLUSTER_CHUNK_LINES` (5,000), where a run's
  load is paid once per chunk; smaller batches go through the gateway, whose interactive instance is usually
  hot. On a GPU cluster the load is minutes (a large model from a parallel file system) and the gap in
  throughput wider, which is why the threshold is a setting.

{SECTION[1]}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=None, help="lines per batch (default 2,000; --quick 200)")
    ap.add_argument("--concurrency", type=int, default=8, help="lines in flight against the server (default 8)")
    ap.add_argument("--port", type=int, default=8190, help="the vLLM server's port (default 8190)")
    add_output_args(ap, "200 lines")
    args = ap.parse_args(argv)
    args.lines = args.lines or (200 if args.quick else 2000)
    resolve_output(args)
    return measure_and_write(args, SECTION, measure, report)


if __name__ == "__main__":
    sys.exit(main())
