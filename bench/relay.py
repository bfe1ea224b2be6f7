"""What the relay costs: streams through the gateway's relay against the same streams read directly.

A relayed stream goes caller -> gateway -> local compute endpoint -> cluster function `openai_stream` -> model
server, and its chunks come back in batches through POST /internal/relay/{request_id} into SSE for the caller.
Here the model server is SlowStreamDouble (tests/fakes/slow_sse.py: an OpenAI-compatible SSE server that emits
chunks "0", "1", ... at a set pace) and the gateway is the test harness's live gateway (tests/live_gateway.py:
the Litestar app under uvicorn, model "slow" on a local cluster, FIRST_FLOW_TRACKING=off). The same request body
goes to the double directly and through the gateway, in the same run:

  1. time to first token: sequential short streams, alternating blocks; median, p95, and the added median
     with a bootstrap 95% interval;
  2. per-chunk overhead: sequential streams of --chunks chunks (interval 0), alternating; stream time / chunks, and
     the CPU per chunk of each process (this load generator, the double, the local endpoint, the gateway);
  3. --streams concurrent streams of --stream-chunks chunks each, rounds alternating direct and relayed:
     streams/s, chunks/s, stream duration p50/p95.

Every stream of every part is checked: its contents must be exactly "0".."n-1", in order (lost, duplicated,
reordered chunks and failed streams are counted). Targets: under 5 ms added to the median time to first token,
and no lost or reordered chunks.

The load generator (this process), the double and the gateway (with its local endpoint, a process of its own)
each run in a separate process, as they would in production: in one process they would share one GIL, and a
thread that waits for the GIL while another runs waits up to its 5 ms switch interval, the size of the target.

It prints a table and writes (or replaces) its own section of docs/benchmarks.md.

    .venv/bin/python bench/relay.py                 # a full run (a few minutes on 2 cores); writes docs/
    .venv/bin/python bench/relay.py --quick         # a smoke run; leaves docs/ alone unless --out is given
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* and tests.* are not installed

import httpx
import msgspec
from rich.table import Table

from bench.common import (
    REPO,
    BenchError,
    add_output_args,
    console,
    diff_ci,
    failure_code,
    fmt,
    log,
    machine_line,
    median,
    p95,
    resolve_output,
    stop_group,
    write_section,
)

BEGIN = "<!-- bench/relay.py: begin (generated; rerun the script to replace this section) -->"
END = "<!-- bench/relay.py: end -->"
SIDES = ("direct", "relayed")
PROCS = ("loadgen", "double", "endpoint", "gateway")
PROC_LABEL = {
    "loadgen": "load generator (this process)",
    "double": "model-server stand-in (the double)",
    "endpoint": "local compute endpoint",
    "gateway": "gateway",
}
CLIENT_TIMEOUT_S = 120.0
_decode = msgspec.json.decode


# ---- the server processes (this script, run with --serve double|gateway) ----


def _reply_channel() -> IO[str]:
    """Replies go to the real stdout; anything else that prints (uvicorn, warnings) goes to stderr, the log."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def serve_double() -> None:
    from tests.fakes.slow_sse import SlowStreamDouble

    out = _reply_channel()
    # The double listens with a large backlog and says `connection: close` (tests/fakes/slow_sse.py), so its
    # own quirks stay out of the numbers with 200 callers connecting at once.
    with SlowStreamDouble(chunks=1, interval_s=0.0) as double:
        out.write(json.dumps({"url": double.url, "pid": os.getpid()}) + "\n")
        for line in sys.stdin:  # "set CHUNKS INTERVAL_S"; EOF (the parent closed stdin or died) ends it
            parts = line.split()
            if parts[:1] == ["set"]:
                double.chunks, double.interval_s = int(parts[1]), float(parts[2])
                out.write(json.dumps({"ok": True}) + "\n")


def serve_gateway(args: argparse.Namespace) -> None:
    from tests.live_gateway import gateway_settings, live_gateway

    out = _reply_channel()
    settings = gateway_settings(
        Path(args.home), relay_batch_chunks=args.batch_chunks, relay_batch_ms=args.batch_ms
    ).model_copy(  # the harness's 8 threads would queue concurrent streams; all of them come from one key
        update={"local_workers": args.workers, "max_inflight_per_caller": 0}
    )
    with live_gateway(settings, args.model_url) as gw:
        state = json.loads((settings.instances_dir / "local" / "slow.json").read_text())
        out.write(json.dumps({"url": gw.url, "key": gw.key, "pid": os.getpid(), "stand_in_pid": state["pid"]}) + "\n")
        for line in sys.stdin:  # "endpoint" (after a first request started it); EOF ends it
            if line.strip() == "endpoint":
                out.write(json.dumps({"endpoint_pid": gw.endpoint_pid()}) + "\n")


class Child:
    """A server process of this script, spoken to over its stdin/stdout; its stderr goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FIRST_", "PREFECT_"))}
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, cwd=REPO, env=env, text=True, start_new_session=True,  # Ctrl-C reaches only us
        )  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"the {self.name} process exited (code {self.proc.wait()}):\n{self.log_tail()}")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def close(self) -> None:
        """Close its stdin (it leaves its context managers and exits), then SIGTERM/SIGKILL its group."""
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            log(f"[yellow]the {self.name} process did not exit within 20 s of EOF[/yellow]")
        stop_group(self.proc, self.name, grace_s=10)
        self._log.close()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int, needle: str) -> bool:
    """Is ``pid`` running, with ``needle`` in its command line (not a reused pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and needle in cmdline


# ---- streams ----


@dataclass
class StreamResult:
    ttft_ms: float = float("nan")
    total_s: float = float("nan")
    chunks: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    error: str | None = None


def check(contents: list[str], n: int, r: StreamResult) -> None:
    """Compare a stream's contents with "0".."n-1": lost, duplicated and reordered chunks."""
    r.chunks = len(contents)
    firsts = list(dict.fromkeys(contents))  # first occurrences, in arrival order
    r.duplicated = len(contents) - len(firsts)
    r.lost = len(set(map(str, range(n))) - set(firsts))
    try:
        nums = [int(c) for c in firsts]
    except ValueError:
        r.error = f"unexpected content {[c for c in firsts if not c.isdigit()][:3]}"
        return
    r.reordered = sum(1 for a, b in itertools.pairwise(nums) if b < a)
    if len(firsts) != n - r.lost:
        r.error = f"{len(firsts) - (n - r.lost)} chunks that are not in 0..{n - 1}"


async def one_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: bytes, n: int) -> StreamResult:
    """One streaming chat call, read to its end; its time to the first content chunk, its duration, its check."""
    r = StreamResult()
    contents: list[str] = []
    done = False
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                r.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                doc = _decode(data)
                if "error" in doc:
                    r.error = f"error event: {str(doc['error'])[:200]}"
                    continue
                for choice in doc.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content is not None:
                        if not contents:
                            r.ttft_ms = (time.perf_counter() - t0) * 1000
                        contents.append(content)
    except (httpx.HTTPError, msgspec.DecodeError) as exc:
        r.error = (f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))[:300]
    r.total_s = time.perf_counter() - t0
    if r.error is None and not done:
        r.error = "the stream ended without data: [DONE]"
    check(contents, n, r)
    return r


@dataclass
class Side:
    """One way to the double: directly, or through the gateway's relay."""

    name: str
    url: str
    headers: dict[str, str]
    client: httpx.AsyncClient
    results: list[tuple[str, StreamResult]] = field(default_factory=list)  # (part, result) of every stream

    async def stream(self, body: bytes, n: int, part: str) -> StreamResult:
        r = await one_stream(self.client, self.url, self.headers, body, n)
        self.results.append((part, r))
        return r

    def tally(self) -> dict[str, int]:
        rs = [r for _, r in self.results]
        return {
            "streams": len(rs), "failed": sum(r.error is not None for r in rs), "lost": sum(r.lost for r in rs),
            "duplicated": sum(r.duplicated for r in rs), "reordered": sum(r.reordered for r in rs),
        }  # fmt: skip

    def errors(self) -> list[str]:
        return [f"{part}: {r.error}" for part, r in self.results if r.error]


class CpuMeter:
    """CPU seconds of each process, summed over the blocks of each side of each part."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.spent: dict[tuple[str, str], dict[str, float]] = {}

    def snap(self) -> dict[str, float]:
        return {"loadgen": time.process_time(), **{k: proc_cpu_s(pid) for k, pid in self.pids.items()}}

    @contextlib.contextmanager
    def block(self, part: str, side: str) -> Any:
        before = self.snap()
        yield
        after = self.snap()
        acc = self.spent.setdefault((part, side), dict.fromkeys(PROCS, 0.0))
        for k in PROCS:
            acc[k] += after[k] - before[k]

    def per_chunk_us(self, part: str, side: str, chunks: int) -> dict[str, float]:
        acc = self.spent.get((part, side), {})
        return {k: acc[k] * 1e6 / chunks if chunks and k in acc else float("nan") for k in PROCS}


# ---- the three parts ----


@dataclass
class Results:
    ttft: dict[str, list[float]] = field(default_factory=dict)  # side -> ms
    per_chunk_us: dict[str, list[float]] = field(default_factory=dict)  # side -> µs per chunk, one per stream
    per_chunk_cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> process -> CPU µs per chunk
    conc_secs: dict[str, list[float]] = field(default_factory=dict)  # side -> wall seconds of each round
    conc_ok: dict[str, int] = field(default_factory=dict)  # side -> whole streams over the rounds
    conc_dur_ms: dict[str, list[float]] = field(default_factory=dict)  # side -> duration of each stream
    conc_ttft: dict[str, list[float]] = field(default_factory=dict)
    conc_cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    tally: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    load: float = float("nan")  # the 1-minute load average before the run (during it, it counts the run too)
    pool_full: int = 0  # urllib3 "Connection pool is full" warnings in the endpoint's log
    seconds: float = 0.0

    def streams_per_s(self, side: str) -> float:
        secs = sum(self.conc_secs.get(side, []))
        return self.conc_ok.get(side, 0) / secs if secs else float("nan")

    def added_ttft(self) -> float:
        return median(self.ttft["relayed"]) - median(self.ttft["direct"])

    def added_per_chunk(self) -> float:
        return median(self.per_chunk_us["relayed"]) - median(self.per_chunk_us["direct"])

    failed_chunks: list[int] = field(default_factory=list)  # chunks each failed relayed stream had delivered

    def clean(self) -> bool:
        """No relayed chunk lost, duplicated or reordered. A stream refused before its first chunk loses none:
        the caller got an HTTP error; one that breaks later loses the rest (counted as lost)."""
        t = self.tally.get("relayed", {})
        return bool(t) and t["lost"] == t["duplicated"] == t["reordered"] == 0

    def failed_before_first(self, after: int) -> int:
        """Failed relayed streams with no chunk (``after`` 0), or with some (``after`` 1)."""
        return sum(1 for n in self.failed_chunks if (n > 0) == bool(after))


def body_bytes() -> bytes:
    """The same bytes go to the double and to the gateway."""
    return json.dumps({
        "model": "slow", "messages": [{"role": "user", "content": "go"}], "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip


async def alternate(sides: list[Side], n: int, block: int, run: Any) -> None:
    """``n`` calls per side, one at a time, in alternating blocks of ``block`` (the side that goes first swaps
    every block pair, so that neither always follows the other)."""
    done = 0
    while done < n:
        size = min(block, n - done)
        for side in sides if (done // block) % 2 == 0 else sides[::-1]:
            await run(side, size)
        done += size


async def measure(double: Child, gateway: Child, args: argparse.Namespace) -> tuple[Results, dict[str, int]]:
    body = body_bytes()
    limits = httpx.Limits(max_connections=args.streams + 16, max_keepalive_connections=args.streams + 16)
    timeout = httpx.Timeout(CLIENT_TIMEOUT_S, connect=30.0)
    gw_headers = {"Authorization": f"Bearer {gateway.info['key']}", "Content-Type": "application/json"}
    # The double closes its connection after each stream (and says so): each stream, direct or through the
    # endpoint's function, opens a new connection to it.
    direct_headers = {"Content-Type": "application/json"}
    async with (
        httpx.AsyncClient(limits=limits, timeout=timeout) as c_direct,
        httpx.AsyncClient(limits=limits, timeout=timeout) as c_gw,
    ):
        direct = Side("direct", double.info["url"] + "/v1/chat/completions", direct_headers, c_direct)
        relayed = Side("relayed", gateway.info["url"] + "/v1/chat/completions", gw_headers, c_gw)
        sides = [direct, relayed]
        res = Results()

        def set_double(chunks: int, interval_s: float) -> None:
            double.ask(f"set {chunks} {interval_s}")

        set_double(args.ttft_chunks, args.ttft_interval_ms / 1000)
        log(f"warming up: {args.warmup} streams per side")
        for side in sides:
            for _ in range(args.warmup):
                r = await one_stream(side.client, side.url, side.headers, body, args.ttft_chunks)
                if r.error:
                    raise BenchError(f"warm-up stream ({side.name}) failed: {r.error}")
        pids = {
            "double": double.info["pid"], "gateway": gateway.info["pid"],
            "endpoint": gateway.ask("endpoint")["endpoint_pid"],
        }  # fmt: skip
        meter = CpuMeter(pids)

        # 1. time to first token
        log(
            f"1) time to first token: {args.requests} streams per side, one at a time, alternating blocks of "
            f"{args.block} ({args.ttft_chunks} chunks, one every {args.ttft_interval_ms:g} ms)"
        )
        res.ttft = {s: [] for s in SIDES}

        async def ttft_block(side: Side, size: int) -> None:
            for _ in range(size):
                r = await side.stream(body, args.ttft_chunks, "ttft")
                if r.error is None:
                    res.ttft[side.name].append(r.ttft_ms)

        await alternate(sides, args.requests, args.block, ttft_block)
        lo, hi = diff_ci(res.ttft["direct"], res.ttft["relayed"])
        log(
            f"   direct p50 {fmt(median(res.ttft['direct']), '.2f')} ms, relayed p50 "
            f"{fmt(median(res.ttft['relayed']), '.2f')} ms: added {fmt(res.added_ttft(), '+.2f')} ms "
            f"[95% CI {fmt(lo, '+.2f')}, {fmt(hi, '+.2f')}]"
        )

        # 2. per-chunk overhead
        set_double(args.chunks, 0.0)
        n2 = args.chunk_streams
        log(f"2) per chunk: {n2} streams of {args.chunks:,} chunks (interval 0) per side, alternating blocks of 2")
        res.per_chunk_us = {s: [] for s in SIDES}
        chunks_done = dict.fromkeys(SIDES, 0)

        async def chunk_block(side: Side, size: int) -> None:
            with meter.block("per_chunk", side.name):
                for _ in range(size):
                    r = await side.stream(body, args.chunks, "per-chunk")
                    chunks_done[side.name] += r.chunks
                    if r.error is None:
                        res.per_chunk_us[side.name].append(r.total_s * 1e6 / args.chunks)

        await alternate(sides, n2, 2, chunk_block)
        res.per_chunk_cpu = {s: meter.per_chunk_us("per_chunk", s, chunks_done[s]) for s in SIDES}
        log(
            f"   direct {fmt(median(res.per_chunk_us['direct']))} µs/chunk, relayed "
            f"{fmt(median(res.per_chunk_us['relayed']))} µs/chunk: added {fmt(res.added_per_chunk(), '+.1f')} µs; "
            f"CPU µs/chunk relayed: gateway {fmt(res.per_chunk_cpu['relayed']['gateway'])}, endpoint "
            f"{fmt(res.per_chunk_cpu['relayed']['endpoint'])}"
        )

        # 3. concurrent streams
        set_double(args.stream_chunks, 0.0)
        s, m = args.streams, args.stream_chunks
        order = [sides[(i % 2) ^ ((i // 2) % 2)] for i in range(2 * args.rounds)]  # direct, relayed, relayed, ...
        log(
            f"3) {s} concurrent streams of {m} chunks, {args.rounds} round(s) per side "
            f"({', '.join(x.name for x in order)})"
        )
        for name in SIDES:
            res.conc_secs[name], res.conc_dur_ms[name], res.conc_ttft[name], res.conc_ok[name] = [], [], [], 0
        conc_chunks = dict.fromkeys(SIDES, 0)
        for side in order:
            with meter.block("concurrent", side.name):
                t0 = time.perf_counter()
                rs = await asyncio.gather(*(side.stream(body, m, "concurrent") for _ in range(s)))
                secs = time.perf_counter() - t0
            ok = [r for r in rs if r.error is None]
            res.conc_secs[side.name].append(secs)
            res.conc_ok[side.name] += len(ok)
            res.conc_dur_ms[side.name] += [r.total_s * 1000 for r in ok]
            res.conc_ttft[side.name] += [r.ttft_ms for r in ok]
            conc_chunks[side.name] += sum(r.chunks for r in rs)
            bad = sum(r.lost + r.duplicated + r.reordered for r in rs)
            log(
                f"   {side.name}: {len(ok)}/{s} whole streams in {secs:.2f} s ({len(ok) / secs:.1f} streams/s, "
                f"{len(ok) * m / secs:,.0f} chunks/s); lost/duplicated/reordered chunks: {bad}"
            )
        res.conc_cpu = {x: meter.per_chunk_us("concurrent", x, conc_chunks[x]) for x in SIDES}
        res.tally = {x.name: x.tally() for x in sides}
        res.failed_chunks = [r.chunks for _, r in relayed.results if r.error]
        res.errors = {x.name: x.errors() for x in sides}
        return res, pids


# ---- output ----


def tally_cell(t: dict[str, int]) -> str:
    return f"{t['failed']} / {t['lost']} / {t['duplicated']} / {t['reordered']}"


def p50_p95(xs: list[float]) -> str:
    return f"{fmt(median(xs), '.0f')} / {fmt(p95(xs), '.0f')}"


def rows(res: Results, args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(measure, direct, relayed, added) for the table and the markdown."""
    d, g = "direct", "relayed"
    lo, hi = diff_ci(res.ttft[d], res.ttft[g])
    clo, chi = diff_ci(res.per_chunk_us[d], res.per_chunk_us[g])
    pc, cc = res.per_chunk_cpu, res.conc_cpu
    s, m = args.streams, args.stream_chunks

    def cpu_total(cpu: dict[str, float], side: str) -> float:
        return sum(cpu[side][k] for k in PROCS if k in ("loadgen", "double") or side == g)

    out = [
        ("1) TTFT p50 (ms)", fmt(median(res.ttft[d]), ".2f"), fmt(median(res.ttft[g]), ".2f"),
         f"{fmt(res.added_ttft(), '+.2f')} [{fmt(lo, '+.2f')}, {fmt(hi, '+.2f')}]"),
        ("1) TTFT p95 (ms)", fmt(p95(res.ttft[d]), ".2f"), fmt(p95(res.ttft[g]), ".2f"),
         fmt(p95(res.ttft[g]) - p95(res.ttft[d]), "+.2f")),
        (f"2) time per chunk, {args.chunks:,}-chunk streams, p50 (µs)", fmt(median(res.per_chunk_us[d])),
         fmt(median(res.per_chunk_us[g])), f"{fmt(res.added_per_chunk(), '+.1f')} [{fmt(clo, '+.1f')}, "
         f"{fmt(chi, '+.1f')}]"),
    ]  # fmt: skip
    for k in PROCS:
        relay_only = k in ("endpoint", "gateway")
        out.append((
            f"2) CPU per chunk: {PROC_LABEL[k]} (µs)", "–" if relay_only else fmt(pc[d][k]), fmt(pc[g][k]),
            "" if relay_only else fmt(pc[g][k] - pc[d][k], "+.1f"),
        ))  # fmt: skip
    out += [
        ("2) CPU per chunk, all processes (µs)", fmt(cpu_total(pc, d)), fmt(cpu_total(pc, g)),
         fmt(cpu_total(pc, g) - cpu_total(pc, d), "+.1f")),
        (f"3) {s} concurrent x {m} chunks: streams/s", fmt(res.streams_per_s(d)), fmt(res.streams_per_s(g)),
         f"{fmt(res.streams_per_s(g) / res.streams_per_s(d), '.2f')}x"),
        ("3) chunks/s", fmt(res.streams_per_s(d) * m, ",.0f"), fmt(res.streams_per_s(g) * m, ",.0f"),
         f"{fmt(res.streams_per_s(g) / res.streams_per_s(d), '.2f')}x"),
        ("3) stream duration p50 / p95 (ms)", p50_p95(res.conc_dur_ms[d]), p50_p95(res.conc_dur_ms[g]), ""),
        ("3) time to first token p50 / p95 (ms)", p50_p95(res.conc_ttft[d]), p50_p95(res.conc_ttft[g]), ""),
        ("3) CPU per chunk: endpoint / gateway (µs)", "–", f"{fmt(cc[g]['endpoint'])} / {fmt(cc[g]['gateway'])}", ""),
        ("all parts: streams", str(res.tally[d]["streams"]), str(res.tally[g]["streams"]), ""),
        ("all parts: failed streams / lost / duplicated / reordered chunks", tally_cell(res.tally[d]),
         tally_cell(res.tally[g]), ""),
    ]  # fmt: skip
    return out


def verdicts(res: Results, args: argparse.Namespace) -> list[tuple[bool, str]]:
    t = res.tally["relayed"]
    added = res.added_ttft()
    lo, hi = diff_ci(res.ttft["direct"], res.ttft["relayed"])
    return [
        (added < args.target_ms, f"time to first token, added at the median under {args.target_ms:g} ms: "
         f"{fmt(added, '+.2f')} ms [95% CI {fmt(lo, '+.2f')}, {fmt(hi, '+.2f')}]"),
        (res.clean(), f"no lost, duplicated or reordered chunks: {t['lost']} lost, {t['duplicated']} duplicated, "
         f"{t['reordered']} reordered in {t['streams']} relayed streams ({t['failed']} failed: "
         f"{res.failed_before_first(0)} before their first chunk, {res.failed_before_first(1)} after it)"),
    ]  # fmt: skip


def layout(args: argparse.Namespace) -> str:
    return (
        "The load generator (this script: asyncio, one `httpx.AsyncClient` per side), the double and the gateway "
        "(uvicorn; its local compute endpoint is a process of its own, with "
        f"{args.workers} worker threads) run as separate processes on the same cores. They are not run in one "
        "process, as the test harness would allow: there they would share one GIL, and a thread waiting for it "
        "while another runs waits up to the 5 ms switch interval, the size of the target."
    )


def notes(res: Results, args: argparse.Namespace) -> list[str]:
    out = [
        f"the machine's 1-minute load average before the run: {res.load:.2f} (other work on these cores moves "
        "both sides, the relayed one more: it has more processes to schedule)"
    ]
    for side, errs in res.errors.items():
        if errs:
            out.append(f"{len(errs)} {side} streams failed; first: {errs[0]}")
    if res.pool_full:
        out.append(
            f"the endpoint's urllib3 pool (64 connections per process) was full {res.pool_full} times: relay "
            "posts beyond 64 at once opened a connection each and dropped it afterwards"
        )
    for side, v in res.conc_secs.items():
        if len(v) > 1:
            out.append(f"{side}: the rounds of part 3 took {', '.join(f'{x:.2f}' for x in v)} s")
    out.append("relay posts (chunks per post) are not counted: the gateway has no public counter of them")
    return out


def print_table(res: Results, args: argparse.Namespace) -> None:
    t = Table(title=f"What the relay costs (FIRST_RELAY_BATCH_CHUNKS={args.batch_chunks}, _MS={args.batch_ms})")
    for col, justify in (("measure", "left"), ("direct", "right"), ("relayed", "right"), ("added", "right")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows(res, args):
        t.add_row(*row)
    console.print(t)
    for ok, text in verdicts(res, args):
        console.print(f"Target: [{'green' if ok else 'red'}]{'met' if ok else 'NOT met'}[/] — {text}")
    console.print(f"[dim]{layout(args)}[/dim]")


def markdown(res: Results, args: argparse.Namespace, started: datetime, wall_s: float) -> str:
    table = [
        "| Measure | Direct | Relayed | Added (relayed − direct) |",
        "|---|---|---|---|",
        *(f"| {m} | {d} | {g} | {a} |" for m, d, g, a in rows(res, args)),
    ]
    lines = [
        BEGIN,
        "## What the relay costs (`bench/relay.py`)",
        "",
        machine_line(
            started, wall_s, quick=args.quick, rerun="`make bench-relay` or `.venv/bin/python bench/relay.py`"
        ),
        "",
        "Method: the model server is `SlowStreamDouble` (`tests/fakes/slow_sse.py`, OpenAI-compatible SSE, chunks "
        '"0", "1", ... at a set pace); the gateway is the test harness\'s live gateway (`tests/live_gateway.py`, '
        "model `slow` on the local cluster, `FIRST_FLOW_TRACKING=off`, "
        f"`FIRST_RELAY_BATCH_CHUNKS={args.batch_chunks}`, `FIRST_RELAY_BATCH_MS={args.batch_ms}`). The same "
        "streaming request goes to the double directly and through the gateway (local endpoint, `openai_stream`, "
        "`POST /internal/relay`, SSE), in the same run. "
        f"1) {args.requests} streams per side, one at a time, in alternating blocks of {args.block}, "
        f"{args.ttft_chunks} chunks each, one every {args.ttft_interval_ms:g} ms: time to the first content chunk; "
        "the interval is a bootstrap 95% CI of the difference of medians. "
        f"2) {args.chunk_streams} streams of {args.chunks:,} chunks per side (interval 0), one at a time, "
        "alternating: stream time / chunks, and each process's CPU time (`/proc/<pid>/stat`; 10 ms ticks, summed "
        "over the part) per chunk. "
        f"3) {args.streams} concurrent streams of {args.stream_chunks} chunks (interval 0), {args.rounds} round(s) "
        "per side, alternating: whole streams per second of the rounds' wall time. Every stream of every part is "
        f'checked against "0".."n-1". {layout(args)}',
        "",
        *table,
        "",
        *(f"- Target {'met' if ok else '**not met**'}: {text}" for ok, text in verdicts(res, args)),
    ]
    extra = notes(res, args)
    if extra:
        lines += ["", "Notes from this run:", "", *(f"- {n}" for n in extra)]
    lines.append(END)
    return "\n".join(lines) + "\n"


# ---- main ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_output_args(ap, "fewer streams (a smoke run)")
    ap.add_argument("--requests", type=int, help="1) streams per side for time to first token (default 200; quick 20)")
    ap.add_argument("--block", type=int, default=10, help="1) streams per alternating block (default 10)")
    ap.add_argument("--ttft-chunks", type=int, default=4, help="1) chunks per stream (default 4)")
    ap.add_argument("--ttft-interval-ms", type=float, default=5.0, help="1) the double's pace, ms (default 5)")
    ap.add_argument("--chunks", type=int, default=1000, help="2) chunks per stream (default 1000)")
    ap.add_argument("--chunk-streams", type=int, help="2) streams per side (default 40; quick 4)")
    ap.add_argument("--streams", type=int, help="3) concurrent streams (default 200; quick 50)")
    ap.add_argument("--stream-chunks", type=int, default=100, help="3) chunks per concurrent stream (default 100)")
    ap.add_argument("--rounds", type=int, help="3) rounds per side (default 5; quick 1)")
    ap.add_argument("--batch-chunks", type=int, default=16, help="FIRST_RELAY_BATCH_CHUNKS (default 16)")
    ap.add_argument("--batch-ms", type=int, default=20, help="FIRST_RELAY_BATCH_MS (default 20)")
    ap.add_argument(
        "--workers", type=int, help="the local endpoint's worker threads (default: --streams + 8, at least 64)"
    )
    ap.add_argument("--warmup", type=int, default=5, help="warm-up streams per side (default 5)")
    ap.add_argument("--target-ms", type=float, default=5.0, help="target for the added median TTFT (default 5 ms)")
    ap.add_argument("--serve", choices=("double", "gateway"), help=argparse.SUPPRESS)  # the server processes
    ap.add_argument("--model-url", help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (
        ("requests", 200, 20), ("chunk_streams", 40, 4), ("streams", 200, 50), ("rounds", 5, 1),
    ):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.workers is None:
        args.workers = max(64, args.streams + 8)
    counts = (args.requests, args.block, args.ttft_chunks, args.chunks, args.chunk_streams, args.streams)
    if min(*counts, args.stream_chunks, args.rounds, args.batch_chunks, args.workers) < 1 or args.batch_ms < 0:
        ap.error("counts must be at least 1")
    resolve_output(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve == "double":
        serve_double()
        return 0
    if args.serve == "gateway":
        serve_gateway(args)
        return 0
    started = datetime.now(UTC)
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="first-bench-relay-"))
    children: list[Child] = []
    pids: dict[str, int] = {}
    res: Results | None = None
    code = 0
    try:
        log(f"starting the double and the gateway (logs in {tmp})")
        double = Child("double", ["--serve", "double"], tmp / "double.log")
        children.append(double)
        gateway = Child(
            "gateway",
            ["--serve", "gateway", "--model-url", double.info["url"], "--home", str(tmp), "--workers",
             str(args.workers), "--batch-chunks", str(args.batch_chunks), "--batch-ms", str(args.batch_ms)],
            tmp / "gateway.log",
        )  # fmt: skip
        children.append(gateway)
        pids = {"gateway": gateway.info["pid"], "stand-in": gateway.info["stand_in_pid"], "double": double.info["pid"]}
        log(
            f"double {double.info['url']} (pid {double.info['pid']}); gateway {gateway.info['url']} (pid "
            f"{gateway.info['pid']}, FIRST_FLOW_TRACKING=off, relay batches of {args.batch_chunks} chunks / "
            f"{args.batch_ms} ms, {args.workers} endpoint workers)"
        )
        log("[dim]the load generator, the double, the gateway and its endpoint are separate processes[/dim]")
        res, more = asyncio.run(measure(double, gateway, args))
        pids.update(more)
    except (KeyboardInterrupt, Exception) as exc:
        code = failure_code(exc)
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for child in reversed(children):
                child.close()
        finally:
            signal.signal(signal.SIGINT, previous)
        needles = {"gateway": "relay.py", "double": "relay.py", "endpoint": "compute.local", "stand-in": "sleep"}
        left = [f"{name} (pid {pid})" for name, pid in pids.items() if alive(pid, needles[name])]
        for name, pid in pids.items():
            if alive(pid, needles[name]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if left:
            console.print(f"[red]processes were left running (now killed):[/red] {', '.join(left)}")
            code = code or 1
        elif pids:
            log(f"[green]✓[/green] nothing left running ({', '.join(f'{k} {v}' for k, v in pids.items())} are gone)")
    wall_s = time.monotonic() - t0
    if res is not None:
        with contextlib.suppress(OSError):
            res.pool_full = (tmp / "gateway.log").read_text(errors="replace").count("Connection pool is full")
        res.seconds = wall_s
        res.load = load0
        print_table(res, args)
        for n in notes(res, args):
            console.print(f"[yellow]note:[/yellow] {n}")
        if args.write and code == 0:
            write_section(args.out, markdown(res, args, started, wall_s), BEGIN, END)
            log(f"wrote the section in {args.out}")
    if not args.write:
        log(f"--quick: {args.out} left alone (give --out to write it)")
    log(f"total run time {wall_s / 60:.1f} min")
    if code == 0 and res is not None and not any(res.errors.values()):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        log(f"logs kept in {tmp}")
    return code


if __name__ == "__main__":
    sys.exit(main())
