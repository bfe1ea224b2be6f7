"""Abuse under load, and a soak (issue 13's reliability suite): does one greedy caller hurt the others, and does
the gateway hold steady (memory, threads, file descriptors, asyncio tasks) under many long streams?

  abuse  A quiet baseline, then the same in one run under abuse: caller `interactive` sends small chat requests
         one after another (model `chat`, a fast stand-in), first alone, then while caller `abuser` opens
         --streams streams at once (model `long`, each ~--stream-s long) and drops half of them after a few chunks.
         Reports the interactive caller's p50/p99 quiet and under abuse (and their ratio), how many of the abuser's
         streams the per-caller cap turned away (429), the gateway's RSS, and the work the stand-in model server
         did for the dropped streams after their caller left (it should stop: the gateway cancels them).
  soak   --streams concurrent streams (each a loop: open, read to the end, again) for --minutes against a fast
         stand-in. Samples the gateway's RSS, threads and file descriptors (from /proc) and its asyncio tasks (from
         /metrics) every 10 s. Reports errors, RSS growth after warm-up (the first fifth), and what is left after
         the load: threads, descriptors and tasks against the idle gateway before it.

The stand-ins are OpenAISimulatorDouble (tests/fakes/openai_simulator.py), direct-HTTP clusters, threads of this
process; like vLLM they stop generating when their client disconnects. The gateway is its own uvicorn process
(tests.gateway_factory.GatewayProcess), flow tracking off, no Prefect.

    .venv/bin/python bench/abuse.py abuse             # about 1 minute; writes its section of docs/benchmarks.md
    .venv/bin/python bench/abuse.py soak              # 2,000 streams for 10 minutes
    .venv/bin/python bench/abuse.py soak --quick      # 200 streams for 1 minute (tests/e2e/test_reliability_benches.py)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* and tests.* are not installed

import httpx

from bench.common import BenchError, console, failure_code, fmt, log, machine_line, stop_group, write_section
from core.settings import Settings
from first.runner import free_port
from serving.auth import KeyStore
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess, http_registry_yaml

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN = {"abuse": "## Abuse under load (`bench/abuse.py abuse`)", "soak": "## Soak (`bench/abuse.py soak`)"}
END = {"abuse": "<!-- end abuse -->", "soak": "<!-- end soak -->"}


def proc_stats(pid: int) -> dict[str, int]:
    """The gateway process's resident memory (KiB), threads and open file descriptors, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {
        "rss_kib": rss,
        "threads": len(list(Path(f"/proc/{pid}/task").iterdir())),
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
    }


async def gateway_tasks(client: httpx.AsyncClient, admin: str) -> int:
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {admin}"})
    for line in r.text.splitlines():
        if line.startswith("first_gateway_asyncio_tasks "):
            return int(float(line.split()[1]))
    raise BenchError("/metrics has no first_gateway_asyncio_tasks")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


@dataclass
class Stack:
    home: Path
    gw: GatewayProcess
    sims: dict[str, OpenAISimulatorDouble]
    keys: dict[str, str] = field(default_factory=dict)


def start_stack(sim_latency: dict[str, float], env: dict[str, str]) -> Stack:
    home = Path(tempfile.mkdtemp(prefix="first-bench-abuse-"))
    sims = {name: OpenAISimulatorDouble(latency, capacity=100_000, name=name) for name, latency in sim_latency.items()}
    for s in sims.values():
        s.start()
    registry = home / "registry.yaml"
    registry.write_text(http_registry_yaml({n: s.base_url for n, s in sims.items()}, {n: [n] for n in sims}))
    store = KeyStore(Settings(home=home).keys_db)
    keys = {who: store.create(who)[0] for who in ("interactive", "abuser")}
    keys["admin"] = store.create("ops", ["admin"])[0]
    gw = GatewayProcess(home, registry, free_port(), env=env)
    try:
        gw.start()
    except RuntimeError as exc:
        raise BenchError(str(exc)) from exc
    return Stack(home, gw, sims, keys)


def stop_stack(stack: Stack) -> None:
    if stack.gw.proc is not None:
        stop_group(stack.gw.proc, "gateway")
    for s in stack.sims.values():
        s.stop()
    shutil.rmtree(stack.home, ignore_errors=True)


# ---- abuse ----


async def interactive(client: httpx.AsyncClient, key: str, until: float) -> tuple[list[float], int]:
    """Small chat requests one after another until ``until``: latencies (ms) and errors."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    lat, errors = [], 0
    while time.monotonic() < until:
        t0 = time.perf_counter()
        r = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        if r.status_code == 200:
            lat.append((time.perf_counter() - t0) * 1000)
        else:
            errors += 1
    return lat, errors


async def abusive_stream(
    client: httpx.AsyncClient, key: str, i: int, leave_after: int | None, left_at: dict[str, float]
) -> int:
    """One of the abuser's streams; returns its status. A leaver closes its connection after ``leave_after``
    chunks (the moment is kept, to compare with the stand-in's work)."""
    user = f"abuser-{i}"
    body = {"model": "long", "messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "stream": True,
            "user": user}  # fmt: skip
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as r:  # fmt: skip
        if r.status_code != 200:
            await r.aread()
            return r.status_code
        chunks = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    left_at[user] = time.monotonic()
                    return 499
    return 200


async def interactive_process(stack: Stack, seconds: float) -> tuple[list[float], int]:
    """The interactive caller for ``seconds``, in a process of its own: (latencies in ms, errors)."""
    out = stack.home / f"interactive-{time.monotonic_ns()}.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_interactive", "--url", stack.gw.url, "--key", stack.keys["interactive"],
        "--seconds", str(seconds), "--json", str(out),
    )  # fmt: skip
    if await proc.wait():
        raise BenchError("the interactive caller's process failed")
    doc = json.loads(out.read_text())
    return doc["ms"], doc["errors"]


async def interactive_client(url: str, key: str, seconds: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        ms, errors = await interactive(client, key, time.monotonic() + seconds)
    return {"ms": ms, "errors": errors}


async def run_abuse(args: argparse.Namespace) -> dict[str, Any]:
    stack = start_stack({"chat": 0.005, "long": args.stream_s}, env={})
    try:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=stack.gw.url, timeout=120, limits=limits) as client:
            idle = proc_stats(stack.gw.proc.pid)  # type: ignore[union-attr]
            # The interactive caller is a process of its own: its latencies are the gateway's, not this event
            # loop's (which also reads the abuser's streams).
            await interactive_process(stack, 2.0)  # warm-up
            log(f"quiet baseline: {args.window_s:g} s of interactive requests")
            quiet, quiet_err = await interactive_process(stack, args.window_s)
            log(f"abuse: {args.streams} streams from one caller, half of them dropped after 5 chunks")
            left_at: dict[str, float] = {}
            streams = [
                asyncio.create_task(abusive_stream(client, stack.keys["abuser"], i, 5 if i % 2 else None, left_at))
                for i in range(args.streams)
            ]
            peak = dict(idle)

            async def sample() -> None:
                while not all(t.done() for t in streams):
                    st = proc_stats(stack.gw.proc.pid)  # type: ignore[union-attr]
                    peak.update({k: max(peak[k], v) for k, v in st.items()})
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            await asyncio.sleep(0.5)
            loaded, loaded_err = await interactive_process(stack, args.window_s)
            statuses = await asyncio.gather(*streams, return_exceptions=True)
            await sampler
            await asyncio.sleep(2)
            after = proc_stats(stack.gw.proc.pid)  # type: ignore[union-attr]
        sim = stack.sims["long"]
        after_leave = [sum(1 for t in sim.token_times.get(u, []) if t > at + 0.05) for u, at in left_at.items()]
        counts: dict[str, int] = {}
        for s in statuses:
            k = str(s) if isinstance(s, int) else type(s).__name__
            counts[k] = counts.get(k, 0) + 1
        return {
            "quiet_ms": quiet, "loaded_ms": loaded, "errors": quiet_err + loaded_err, "statuses": counts,
            "idle": idle, "peak": peak, "after": after, "left": len(left_at), "after_leave": after_leave,
            "aborted": sim.streams_aborted, "tokens": sim.tokens_generated,
        }  # fmt: skip
    finally:
        stop_stack(stack)


def abuse_markdown(r: dict[str, Any], args: argparse.Namespace, started: datetime, wall_s: float) -> str:
    q50, q99, l50, l99 = (pct(r["quiet_ms"], 0.5), pct(r["quiet_ms"], 0.99), pct(r["loaded_ms"], 0.5),
                          pct(r["loaded_ms"], 0.99))  # fmt: skip
    mib = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
    after = r["after_leave"]
    median_after = statistics.median(after) if after else 0
    return "\n".join([
        BEGIN["abuse"], "",
        machine_line(started, wall_s, quick=args.quick, rerun="`.venv/bin/python bench/abuse.py abuse`"), "",
        f"One caller opens {args.streams} streams at once (each ~{args.stream_s:g} s, 400 tokens) and drops every "
        "other one after 5 chunks, while another caller sends small chat requests one after another; the same "
        f"small requests alone for {args.window_s:g} s first are the quiet baseline. Per-caller cap: the default "
        "(64 in flight per model). The interactive caller runs in a process of its own; the abuser's streams and "
        "the stand-in model servers share the bench's.", "",
        "| interactive caller | requests | p50 ms | p99 ms |", "|---|---:|---:|---:|",
        f"| quiet | {len(r['quiet_ms'])} | {fmt(q50)} | {fmt(q99)} |",
        f"| under abuse | {len(r['loaded_ms'])} | {fmt(l50)} | {fmt(l99)} |",
        f"| ratio | | {l50 / q50:.2f}x | {l99 / q99:.2f}x |", "",
        f"- The abuser's streams: {json.dumps(r['statuses'], sort_keys=True)} (429: turned away by the per-caller "
        "cap; 499: dropped by the bench).",
        f"- The interactive caller's errors: {r['errors']}.",
        f"- Gateway RSS: {mib(r['idle']['rss_kib'])} idle, {mib(r['peak']['rss_kib'])} at the peak, "
        f"{mib(r['after']['rss_kib'])} after; threads {r['idle']['threads']} → {r['peak']['threads']} → "
        f"{r['after']['threads']}; descriptors {r['idle']['fds']} → {r['peak']['fds']} → {r['after']['fds']}.",
        f"- Work after the caller left: of {r['left']} dropped streams, the stand-in model server made "
        f"{sum(after)} tokens in all more than 50 ms after their caller left (median {median_after:g}, "
        f"max {max(after, default=0)}) of up to {400 * r['left']}; it stopped {r['aborted']} streams on "
        "the gateway's disconnect.", "",
        END["abuse"], "",
    ])  # fmt: skip


# ---- soak ----


async def soak_worker(client: httpx.AsyncClient, key: str, until: float, result: dict[str, int]) -> None:
    body = {"model": "fast", "messages": [{"role": "user", "content": "go"}], "max_tokens": 32, "stream": True}
    while time.monotonic() < until:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"}) as r:  # fmt: skip
                text = (await r.aread()).decode()
            if r.status_code != 200:
                kind = f"http {r.status_code}"
            elif not text.rstrip().endswith("data: [DONE]") or '"error"' in text:
                kind = "stream ended with an error event"
            else:
                kind = "ok"
        except httpx.HTTPError as exc:
            kind = type(exc).__name__
        result[kind] = result.get(kind, 0) + 1


async def soak_client(url: str, key: str, streams: int, seconds: float) -> dict[str, int]:
    """One load-generating process: ``streams`` workers for ``seconds``."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    result: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=600), limits=limits) as client:
        until = time.monotonic() + seconds
        await asyncio.gather(*(soak_worker(client, key, until, result) for _ in range(streams)))
    return result


async def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    env = {"FIRST_MAX_INFLIGHT_PER_CALLER": "0"}
    if args.header_timeout_s is not None:
        env["FIRST_HEADER_TIMEOUT_S"] = str(args.header_timeout_s)
    stack = start_stack({"fast": args.stream_s}, env=env)
    try:
        async with httpx.AsyncClient(base_url=stack.gw.url, timeout=120) as client:
            pid = stack.gw.proc.pid  # type: ignore[union-attr]
            idle = {**proc_stats(pid), "tasks": await gateway_tasks(client, stack.keys["admin"])}
            duration = args.minutes * 60
            log(f"soak: {args.streams} concurrent streams for {args.minutes:g} min, from {args.clients} processes")
            share = [args.streams // args.clients + (i < args.streams % args.clients) for i in range(args.clients)]
            outs = [stack.home / f"client-{i}.json" for i in range(args.clients)]
            clients = [await asyncio.create_subprocess_exec(
                sys.executable, __file__, "_client", "--url", stack.gw.url, "--key", stack.keys["abuser"],
                "--streams", str(n), "--seconds", str(duration), "--json", str(out),
            ) for n, out in zip(share, outs, strict=True)]  # fmt: skip
            samples: list[dict[str, float]] = []
            t0 = time.monotonic()
            while any(c.returncode is None for c in clients):
                await asyncio.sleep(10.0)
                st = {**proc_stats(pid), "tasks": await gateway_tasks(client, stack.keys["admin"]),
                      "t": time.monotonic() - t0}  # fmt: skip
                samples.append(st)
                log(
                    f"  {st['t']:.0f} s: RSS {st['rss_kib'] / 1024:.0f} MiB, {st['threads']} threads, "
                    f"{st['fds']} fds, {st['tasks']} tasks"
                )
                for c in clients:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(c.wait(), 0.01)
            if any(c.returncode for c in clients):
                raise BenchError("a load-generating process failed")
            result: dict[str, int] = {}
            for out in outs:
                for kind, n in json.loads(out.read_text()).items():
                    result[kind] = result.get(kind, 0) + n
            # The last streams' usage rows, connections closing: the gateway's idle connections to the model
            # server close after its keep-alive (compute/model_http.py, 4 s; aiohttp checks every 4 s).
            await asyncio.sleep(10)
        async with httpx.AsyncClient(base_url=stack.gw.url, timeout=30) as fresh:
            after = {**proc_stats(pid), "tasks": await gateway_tasks(fresh, stack.keys["admin"])}
        ok = result.pop("ok", 0)
        return {"idle": idle, "after": after, "samples": samples, "ok": ok, "errors": sum(result.values()),
                "error_kinds": result}  # fmt: skip
    finally:
        stop_stack(stack)


def soak_growth(r: dict[str, Any]) -> tuple[float, float, float]:
    """RSS (KiB) at the end of warm-up (the first fifth of the run), at the end, and the growth between (%)."""
    samples = r["samples"]
    warm = next((s for s in samples if s["t"] >= samples[-1]["t"] / 5), samples[0])
    end = samples[-1]
    return warm["rss_kib"], end["rss_kib"], (end["rss_kib"] - warm["rss_kib"]) / warm["rss_kib"] * 100


def soak_markdown(r: dict[str, Any], args: argparse.Namespace, started: datetime, wall_s: float) -> str:
    warm, end, growth = soak_growth(r)
    i, a = r["idle"], r["after"]
    rows = [f"| {s['t']:.0f} | {s['rss_kib'] / 1024:.0f} | {s['threads']} | {s['fds']} | {s['tasks']} |"
            for s in r["samples"]]  # fmt: skip
    if len(rows) > 14:
        rows = [*rows[:6], "| … | | | | |", *rows[-6:]]
    return "\n".join([
        BEGIN["soak"], "",
        machine_line(started, wall_s, quick=args.quick, rerun="`.venv/bin/python bench/abuse.py soak`"), "",
        f"{args.streams} concurrent streams (32 tokens each, ~{args.stream_s:g} s, then the next) for "
        f"{args.minutes:g} min against a fast stand-in, from {args.clients} load-generating processes; per-caller cap "
        "off. On 2 cores the load generators, the stand-in and the gateway share the CPU: streams take longer than "
        "the stand-in's pace, and the count of streams completed says as much about the load generators.", "",
        f"- Streams completed: {r['ok']}; errors: {r['errors']} {json.dumps(r['error_kinds'], sort_keys=True)}.",
        f"- RSS after warm-up {warm / 1024:.0f} MiB, at the end {end / 1024:.0f} MiB: growth {growth:+.1f} % "
        "(bound: 10 %).",
        f"- Idle before → idle after: threads {i['threads']} → {a['threads']}, descriptors {i['fds']} → {a['fds']}, "
        f"asyncio tasks {i['tasks']} → {a['tasks']}.", "",
        "| s | RSS MiB | threads | fds | asyncio tasks |", "|---:|---:|---:|---:|---:|", *rows, "",
        END["soak"], "",
    ])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "what",
        choices=["abuse", "soak", "_client", "_interactive"],
        help="abuse: one greedy caller against another; soak: long run (_client, _interactive: load generators that "
        "the others run)",
    )
    ap.add_argument("--clients", type=int, default=2, help="soak: load-generating processes")
    ap.add_argument("--header-timeout-s", type=float, help="soak: the gateway's FIRST_HEADER_TIMEOUT_S (default 10)")
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, help="concurrent streams (abuse: 500; soak: 2000; --quick: 200)")
    ap.add_argument("--minutes", type=float, help="soak: how long (default 10; --quick: 1)")
    ap.add_argument("--stream-s", type=float, help="how long one stream lasts (abuse: 8; soak: 1)")
    ap.add_argument("--window-s", type=float, default=10.0, help="abuse: seconds of interactive requests, each phase")
    ap.add_argument("--quick", action="store_true", help="a short run; writes --out only when given")
    ap.add_argument("--out", type=Path, help="markdown file whose section is replaced (default docs/benchmarks.md)")
    ap.add_argument("--json", type=Path, help="also write the raw results here (tests read them)")
    args = ap.parse_args(argv)
    soak = args.what == "soak"
    args.streams = args.streams or (200 if args.quick else 2000 if soak else 500)
    args.minutes = args.minutes or (1.0 if args.quick else 10.0)
    args.stream_s = args.stream_s or (1.0 if soak else 8.0)
    args.write = args.out is not None or not args.quick
    args.out = args.out or DOCS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.what in ("_client", "_interactive"):
        if args.what == "_client":
            result: Any = asyncio.run(soak_client(args.url, args.key, args.streams, args.seconds))
        else:
            result = asyncio.run(interactive_client(args.url, args.key, args.seconds))
        args.json.write_text(json.dumps(result))
        return 0
    started, t0 = datetime.now(UTC), time.monotonic()
    try:
        result = asyncio.run(run_abuse(args) if args.what == "abuse" else run_soak(args))
    except (KeyboardInterrupt, Exception) as exc:
        return failure_code(exc)
    wall_s = time.monotonic() - t0
    text = (abuse_markdown if args.what == "abuse" else soak_markdown)(result, args, started, wall_s)
    console.print(text)
    if args.json:
        args.json.write_text(json.dumps(result, default=str))
    if args.write:
        write_section(args.out, text, BEGIN[args.what], END[args.what])
        log(f"wrote the section in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
