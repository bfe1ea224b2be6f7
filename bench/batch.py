"""A big batch through the gateway, and what it does to an interactive caller meanwhile (issue 15).

In one run:
  1. quiet      caller `interactive` sends small chat requests one after another for --window-s;
  2. upload     caller `batcher` uploads a --lines chat batch file (timed: the upload and its line checks);
  3. batch      the batch's run-batch flow body (validate, plan, a run-chunk task per chunk, finalize) runs in a
                process of its own, as a worker runs it (without a Prefect API: no progress artifact), sending the
                lines through the gateway; meanwhile `interactive` sends the same requests as in 1;
  4. quiet      `interactive` again once the batch is done.
Reports lines per second, the time from create to completed, the gateway's peak memory (VmHWM, before the
upload and after the batch: it must not grow with the file) and the runner's, and the interactive caller's
p50/p99 quiet (1 and 4) against during the batch (3), with their ratio.

The model server is OpenAISimulatorDouble (tests/fakes/openai_simulator.py), a direct-HTTP cluster answering
after --backend-ms, in a process of its own. The gateway is its own uvicorn process (tests.gateway_factory).

    .venv/bin/python bench/batch.py               # 150,000 lines; writes its section of docs/benchmarks.md
    .venv/bin/python bench/batch.py --quick       # 5,000 lines; writes --out only when given
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* and tests.* are not installed

import httpx
import openai
import yaml

from bench.common import (
    add_output_args,
    console,
    failure_code,
    fmt,
    log,
    machine_line,
    resolve_output,
    serve_stand_in,
    write_section,
)
from core.principal import Principal
from core.settings import Settings
from serving.auth import KeyStore
from serving.batches.store import BatchStore
from tests.gateway_factory import GatewayProcess

SECTIONS = {  # (begin, end) of each variant's section in docs/benchmarks.md
    False: ("## Batches (`bench/batch.py`)", "<!-- end batch -->"),
    True: ("## Batches through a gateway of their own (`bench/batch.py --separate-gateway`)",
           "<!-- end batch separate -->"),
}  # fmt: skip
CHAT = {"model": "m", "messages": [{"role": "user", "content": "How far is the moon?"}], "max_tokens": 8}


def vm_hwm_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


def batch_file(lines: int) -> bytes:
    out = io.BytesIO()
    for i in range(lines):
        body = {**CHAT, "messages": [{"role": "user", "content": f"Question number {i}: how far is the moon?"}]}
        out.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                              "body": body}).encode() + b"\n")  # fmt: skip
    return out.getvalue()


async def interactive(url: str, key: str, seconds: float) -> list[float]:
    """Chat requests one after another for ``seconds``: their latencies (ms)."""
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            r = await c.post("/v1/chat/completions", json=CHAT)
            r.raise_for_status()
            lat.append((time.perf_counter() - t) * 1000)
    return lat


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="first-bench-batch-"))
    home = tmp / "home"
    home.mkdir()
    sim_proc = subprocess.Popen([sys.executable, __file__, "_sim", "--backend-ms", str(args.backend_ms)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    sim_url = sim_proc.stdout.readline().strip()  # type: ignore[union-attr]
    try:
        registry = tmp / "registry.yaml"
        registry.write_text(yaml.safe_dump({
            "clusters": [{"name": "sim", "transport": "http", "base_url": sim_url, "max_concurrency": 32}],
            "models": [{"name": "m", "clusters": ["sim"], "path": "-"}],
        }))  # fmt: skip
        keys = KeyStore(Settings(home=home).keys_db)
        k_int, k_batch = keys.create("interactive")[0], keys.create("batcher")[0]
        env = {"FIRST_MAX_FILE_BYTES": str(2**30), "FIRST_MAX_BATCH_LINES": str(max(args.lines, 1)),
               "FIRST_MAX_QUEUED_LINES": str(max(args.lines, 1))}  # fmt: skip
        gw = GatewayProcess(home, registry, env=env).start()
        # --separate-gateway: batch lines go through a second gateway process (FIRST_BATCH_GATEWAY_URL)
        lines_gw = GatewayProcess(home, registry, env=env).start() if args.separate_gateway else gw
        try:
            await interactive(gw.url, k_int, 2)  # warm
            log(f"quiet: {args.window_s:g} s of interactive requests")
            quiet_before = await interactive(gw.url, k_int, args.window_s)
            hwm_before = vm_hwm_mib(gw.proc.pid)
            data = batch_file(args.lines)
            log(f"uploading {args.lines:,} lines ({len(data) / 2**20:.1f} MiB)")
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key=k_batch, max_retries=0, timeout=600)
            t = time.perf_counter()
            f = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
            upload_s = time.perf_counter() - t
            del data
            store = BatchStore(home / "batches")
            b = store.create(owner=Principal(user="batcher"), endpoint="/v1/chat/completions", input_file_id=f.id,
                             window="24h", lines=args.lines, model="m", metadata=None)  # fmt: skip
            log(f"running {b.id} ({args.concurrency} lines in flight) while `interactive` keeps asking")
            out_json = tmp / "runner.json"
            runner_env = {**os.environ, "FIRST_HOME": str(home), "FIRST_BATCH_CONCURRENCY": str(args.concurrency)}
            t_create = time.time()
            runner = subprocess.Popen([sys.executable, __file__, "_run", "--batch-id", b.id, "--url", lines_gw.url,
                                       "--json", str(out_json)], env=runner_env)  # fmt: skip
            during: list[float] = []
            while runner.poll() is None:
                during += await interactive(gw.url, k_int, min(args.window_s, 5))
            if runner.returncode != 0:
                raise RuntimeError(f"the batch runner exited with {runner.returncode}")
            ran = json.loads(out_json.read_text())
            took = ran["ended"] - t_create  # the worker's start-up (imports) included
            done = store.get(b.id)
            hwm_after = vm_hwm_mib(gw.proc.pid)
            log("quiet again")
            quiet_after = await interactive(gw.url, k_int, args.window_s)
        finally:
            gw.stop()
            if lines_gw is not gw:
                lines_gw.stop()
    finally:
        sim_proc.kill()
        sim_proc.wait()
    quiet = quiet_before + quiet_after
    return {
        "lines": args.lines, "backend_ms": args.backend_ms, "concurrency": args.concurrency,
        "separate_gateway": args.separate_gateway,
        "file_mib": f.bytes / 2**20, "upload_s": upload_s, "create_to_completed_s": took,
        "lines_per_s": args.lines / ran["run_s"], "run_s": ran["run_s"], "status": done.status,
        "completed": done.request_counts.completed, "failed": done.request_counts.failed,
        "gateway_hwm_before_mib": hwm_before, "gateway_hwm_after_mib": hwm_after, "runner_hwm_mib": ran["hwm_mib"],
        "quiet": {"n": len(quiet), "p50": statistics.median(quiet), "p99": pct(quiet, 99)},
        "during": {"n": len(during), "p50": statistics.median(during), "p99": pct(during, 99)},
    }  # fmt: skip


async def run_batch_body(batch_id: str, url: str) -> dict[str, Any]:
    """The run-batch flow's tasks, in order, as the flow runs them."""
    from flows import batch as batch_flow

    t = time.perf_counter()
    state = batch_flow.validate.fn(batch_id).status
    for chunk in batch_flow.plan.fn(batch_id, Settings().batch_chunk_lines):
        state = await batch_flow.run_chunk.fn(batch_id, chunk, url)
    batch_flow.finalize.fn(batch_id, state)
    return {"run_s": time.perf_counter() - t, "ended": time.time(),
            "hwm_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def markdown(r: dict[str, Any], args: argparse.Namespace, started: datetime, wall_s: float) -> str:
    q, d = r["quiet"], r["during"]
    begin, end = SECTIONS[r["separate_gateway"]]
    return "\n".join([
        begin, "",
        machine_line(started, wall_s, quick=args.quick, rerun="`.venv/bin/python bench/batch.py"
                     + (" --separate-gateway`" if r["separate_gateway"] else "`")),
        "",
        f"A {r['lines']:,}-line chat batch ({r['file_mib']:.1f} MiB) through the gateway to a stand-in model server "
        f"answering after {r['backend_ms']:g} ms (a direct-HTTP cluster, `max_concurrency` 32, so the batch lane "
        f"has 16 slots), {r['concurrency']} lines in flight; the run-batch flow's tasks in a process of their own, "
        "as a worker runs them, sending the lines through "
        + ("a second gateway process (`FIRST_BATCH_GATEWAY_URL`)" if r["separate_gateway"] else
           "the same gateway as the interactive caller")
        + ". The interactive caller (another user) sends small chat requests one after another "
        "before, during and after the batch.",
        "",
        "| | value |", "| --- | --- |",
        f"| upload and line checks | {r['upload_s']:.1f} s |",
        f"| create to completed (the runner's start included) | {r['create_to_completed_s']:.1f} s "
        f"({r['status']}: {r['completed']:,} answered, "
        f"{r['failed']} failed) |",
        f"| lines per second | {r['lines_per_s']:.0f} |",
        f"| gateway peak memory (VmHWM) before the upload / after the batch | {r['gateway_hwm_before_mib']:.0f} / "
        f"{r['gateway_hwm_after_mib']:.0f} MiB |",
        f"| batch runner peak memory | {r['runner_hwm_mib']:.0f} MiB |",
        "",
        "| interactive caller | requests | p50 ms | p99 ms |", "| --- | --- | --- | --- |",
        f"| quiet (before and after) | {q['n']} | {fmt(q['p50'], '.2f')} | {fmt(q['p99'], '.2f')} |",
        f"| during the batch | {d['n']} | {fmt(d['p50'], '.2f')} | {fmt(d['p99'], '.2f')} |",
        f"| ratio | | {d['p50'] / q['p50']:.2f}× | {d['p99'] / q['p99']:.2f}× |",
        "",
        end, "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="run", choices=["run", "_run", "_sim"], help=argparse.SUPPRESS)
    ap.add_argument("--lines", type=int, help="lines in the batch (default 150,000; --quick 5,000)")
    ap.add_argument("--backend-ms", type=float, default=2.0, help="the stand-in's answer time")
    ap.add_argument("--concurrency", type=int, default=8, help="lines of the batch in flight (FIRST_BATCH_CONCURRENCY)")
    ap.add_argument("--window-s", type=float, default=15.0, help="seconds of interactive requests, quiet phases")
    ap.add_argument("--separate-gateway", action="store_true",
                    help="batch lines through a second gateway process (FIRST_BATCH_GATEWAY_URL)")  # fmt: skip
    ap.add_argument("--batch-id", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    add_output_args(ap, "5,000 lines")
    args = ap.parse_args(argv)
    if args.what == "_sim":
        serve_stand_in(args.backend_ms)
        return 0
    if args.what == "_run":
        args.json.write_text(json.dumps(asyncio.run(run_batch_body(args.batch_id, args.url))))
        return 0
    resolve_output(args)
    args.lines = args.lines or (5_000 if args.quick else 150_000)
    started, t0 = datetime.now(UTC), time.monotonic()
    try:
        result = asyncio.run(run(args))
    except (KeyboardInterrupt, Exception) as exc:
        return failure_code(exc)
    text = markdown(result, args, started, time.monotonic() - t0)
    console.print(text)
    if args.json:
        args.json.write_text(json.dumps(result))
    if args.write:
        write_section(args.out, text, *SECTIONS[args.separate_gateway])
        log(f"wrote the section in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
