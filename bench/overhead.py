"""Gateway overhead: the FIRST gateway against vLLM directly, for each flow-tracking setting.

Starts the embedded default with `first run` (Prefect server, worker, gateway, vLLM CPU for the tiny
demo model) on its own ports and state folder, then, one setting at a time, an extra gateway with
FIRST_FLOW_TRACKING=off|sample|all against the same Prefect and vLLM. It alternates small blocks of
identical requests between vLLM directly and the gateway under test, in the same run, and measures:

  a) non-streaming chat latency at concurrency 1 (median, p95),
  b) streaming time to first token at concurrency 1 (median),
  c) requests/s at concurrency 16 (non-streaming),

prints a table, and writes (or replaces) its section of docs/benchmarks.md. Everything it started is
stopped at the end, on Ctrl-C and on errors too.

    make bench                                    # = .venv/bin/python bench/overhead.py
    .venv/bin/python bench/overhead.py --quick    # a smoke run; leaves docs/ alone unless --out is given
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* is not installed

from bench.common import (
    BIN,
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
    port_free,
    resolve_output,
    stop_group,
    tail,
    tree_cpu_s,
    vllm_key,
    write_section,
)  # fmt: skip
from core.settings import Settings, prefect_env
from tests.gateway_factory import GatewayProcess

SETTINGS = ("off", "sample", "all")
CLIENT_TIMEOUT_S = 180.0
BEGIN = "<!-- bench/overhead.py: begin (generated; rerun the script to replace this section) -->"
END = "<!-- bench/overhead.py: end -->"


# ---- processes ----


def base_env(home: Path, prefect_port: int) -> dict[str, str]:
    """The environment `first run` gives its children; inherited FIRST_*/PREFECT_* variables are dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIRST_", "PREFECT_"))}
    env.update(prefect_env(Settings(home=home), prefect_port))
    return env


class Stack:
    """`first run` plus the extra gateways under test; ``close`` stops all of it."""

    def __init__(self, home: Path, prefect_port: int, port: int) -> None:
        self.home = home
        self.prefect_port = prefect_port
        self.port = port  # the gateway of `first run`
        self.vllm_port = port + 1
        self.env = base_env(home, prefect_port)
        self.first: subprocess.Popen | None = None
        self.gateways: dict[str, subprocess.Popen] = {}
        self.api_key = ""
        self.log_path = home / "bench-first-run.log"

    def start(self, timeout_s: float) -> None:
        env = {**self.env, "FIRST_PORT": str(self.port), "FIRST_VLLM_PORT_BASE": str(self.vllm_port)}
        cmd = [str(BIN / "first"), "run", "--prefect-port", str(self.prefect_port)]
        log(f"starting `first run` (Prefect :{self.prefect_port}, gateway :{self.port}, vLLM :{self.vllm_port})")
        log(f"  state folder {self.home}; its output goes to {self.log_path}")
        stderr = open(self.log_path, "ab")
        self.first = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            start_new_session=True,  # a terminal's Ctrl-C reaches only us: we stop it in order
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()

        def reader() -> None:
            assert self.first is not None and self.first.stdout is not None
            for raw in self.first.stdout:
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        t0 = time.monotonic()
        next_note = t0 + 15
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None or self.first.poll() is not None:
                raise BenchError(
                    f"`first run` exited (code {self.first.wait()}) before it was ready:\n{tail(self.log_path)}"
                )
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if doc.get("ready"):
                        self.api_key = doc["api_key"]
                        log(f"[green]✓[/green] stack ready in {time.monotonic() - t0:.0f} s: {doc['base_url']}")
                        return
            now = time.monotonic()
            if now - t0 > timeout_s:
                raise BenchError(f"`first run` was not ready within {timeout_s:.0f} s:\n{tail(self.log_path)}")
            if now >= next_note:
                last = tail(self.log_path, 1).strip()[:100]
                log(f"  … {now - t0:.0f} s; last line of its output: {last}")
                next_note = now + 15

    def start_gateway(
        self,
        setting: str,
        port: int,
        sample_rate: float,
        extra_env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> str:
        """One more gateway with FIRST_FLOW_TRACKING=``setting`` (and ``extra_env``), known as ``name`` (default:
        the setting) in ``gateways``, its log file name and messages."""
        name = name or setting
        gw = GatewayProcess(self.home / "logs", port=port, base_env=self.env, env={
            "FIRST_VLLM_PORT_BASE": str(self.vllm_port), "FIRST_FLOW_TRACKING": setting,
            "FIRST_FLOW_SAMPLE_RATE": str(sample_rate), **(extra_env or {}),
        })  # fmt: skip
        try:
            gw.start(timeout_s=90)
        except RuntimeError as exc:
            raise BenchError(f"gateway ({name}): {exc}") from exc
        assert gw.proc is not None
        self.gateways[name] = gw.proc
        got = httpx.get(gw.url + "/health", timeout=5).json().get("flow_tracking")
        if got != setting:
            raise BenchError(f"gateway on :{port} reports flow_tracking={got!r}, not {setting!r}")
        return gw.url

    def health(self, setting: str, url: str) -> dict[str, Any]:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return httpx.get(url + "/health", timeout=5).json()
        return {}

    def stop_gateway(self, setting: str) -> None:
        proc = self.gateways.pop(setting, None)
        if proc is not None:
            stop_group(proc, f"gateway ({setting})")
            log(f"  stopped the gateway ({setting})")

    def close(self) -> list[str]:
        """Stop everything; returns the command lines of processes left over (after killing them)."""
        for setting in list(self.gateways):
            self.stop_gateway(setting)
        if self.first is not None and self.first.poll() is None:
            log("stopping `first run` (SIGINT; it stops the gateway, worker, vLLM and Prefect)…")
            t0 = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                self.first.send_signal(signal.SIGINT)
            try:
                self.first.wait(timeout=150)
            except subprocess.TimeoutExpired:
                log("[yellow]`first run` did not exit within 150 s: SIGTERM, then SIGKILL[/yellow]")
                stop_group(self.first, "first run", grace_s=30)
            log(f"  `first run` exited with code {self.first.returncode} after {time.monotonic() - t0:.0f} s")
        return self.leftovers()

    def leftovers(self) -> list[str]:
        """Processes whose command line names our state folder (vLLM does: its model path is in it)."""
        r = subprocess.run(["pgrep", "-af", str(self.home)], capture_output=True, text=True)
        found = [line for line in r.stdout.splitlines() if line.split(" ", 1)[0] != str(os.getpid())]
        for line in found:  # ours: the state folder is unique to this run
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split(" ", 1)[0]), signal.SIGKILL)
        return found


# ---- load ----


@dataclass
class Target:
    name: str
    client: httpx.AsyncClient
    errors: list[str] = field(default_factory=list)
    short: int = 0  # responses with fewer completion tokens than asked for
    first_event: list[float] = field(default_factory=list)  # streams: ms to the first data event of any kind
    block_rps: list[float] = field(default_factory=list)  # req/s of each full throughput block

    def reset(self) -> None:
        self.errors, self.short, self.first_event, self.block_rps = [], 0, [], []


def make_client(base_url: str, api_key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        timeout=httpx.Timeout(CLIENT_TIMEOUT_S, connect=10.0),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    )


def bodies(max_tokens: int) -> tuple[bytes, bytes]:
    """The same bytes go to vLLM and to the gateway (the served name of the demo model is its name)."""
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Summarize the benefits of federated inference in one line."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "ignore_eos": True,  # a vLLM extension: every answer has exactly max_tokens tokens
    }
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode(), json.dumps(stream).encode()


async def chat(t: Target, payload: bytes, max_tokens: int) -> float:
    """One non-streaming call; its latency in ms."""
    t0 = time.perf_counter()
    r = await t.client.post("/chat/completions", content=payload)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise BenchError(f"HTTP {r.status_code}: {r.text[:200]}")
    usage = r.json().get("usage") or {}
    if usage.get("completion_tokens") != max_tokens:
        t.short += 1
    return ms


async def ttft(t: Target, payload: bytes) -> float:
    """One streaming call; ms until the first chunk that carries content (the stream is read to its end)."""
    t0 = time.perf_counter()
    first: float | None = None
    event = False
    async with t.client.stream("POST", "/chat/completions", content=payload) as r:
        if r.status_code != 200:
            await r.aread()
            raise BenchError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            if not event:
                event = True
                t.first_event.append((time.perf_counter() - t0) * 1000)
            if first is None or '"error"' in data:
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchError(f"error event in the stream: {str(chunk['error'])[:200]}")
                if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                    first = (time.perf_counter() - t0) * 1000
    if first is None:
        raise BenchError("the stream ended without a content chunk")
    return first


async def guarded(t: Target, coro: Any) -> float | None:
    try:
        return await coro
    except (BenchError, httpx.HTTPError, ValueError) as exc:
        if isinstance(exc, httpx.TimeoutException):
            t.errors.append(f"{type(exc).__name__}: no answer within the client's {CLIENT_TIMEOUT_S:.0f} s timeout")
        else:
            t.errors.append((f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))[:300])
        return None


async def alternate_c1(
    targets: list[Target], call: Any, n: int, block: int, budget_s: float
) -> tuple[dict[str, list[float]], bool]:
    """``n`` sequential calls per target in alternating blocks (the first target of a block pair swaps
    every pair, so that neither side always follows the other). Stops early past ``budget_s``."""
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    deadline = time.monotonic() + budget_s
    done = 0
    while done < n:
        size = min(block, n - done)
        order = targets if (done // block) % 2 == 0 else targets[::-1]
        for t in order:
            for _ in range(size):
                if time.monotonic() > deadline:
                    return samples, True
                ms = await guarded(t, call(t))
                if ms is not None:
                    samples[t.name].append(ms)
        done += size
    return samples, False


async def burst(
    t: Target, payload: bytes, max_tokens: int, n: int, concurrency: int, deadline: float = float("inf")
) -> tuple[int, float, int]:
    """``n`` calls, ``concurrency`` at a time (none started after ``deadline``); returns (successes, seconds,
    calls started)."""
    left = n
    ok = started = 0

    async def worker() -> None:
        nonlocal left, ok, started
        while left > 0 and time.monotonic() < deadline:
            left -= 1
            started += 1
            if await guarded(t, chat(t, payload, max_tokens)) is not None:
                ok += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, time.perf_counter() - t0, started


async def alternate_throughput(
    targets: list[Target], payload: bytes, max_tokens: int, n: int, concurrency: int, block: int, budget_s: float
) -> tuple[dict[str, tuple[int, float]], bool]:
    totals = {t.name: (0, 0.0) for t in targets}
    deadline = time.monotonic() + budget_s
    done = 0
    while done < n:
        size = min(block, n - done)
        order = targets if (done // block) % 2 == 0 else targets[::-1]
        for t in order:
            if time.monotonic() > deadline:
                return totals, True
            ok, secs, started = await burst(t, payload, max_tokens, size, concurrency, deadline)
            prev_ok, prev_s = totals[t.name]
            totals[t.name] = (prev_ok + ok, prev_s + secs)
            if started < size:
                return totals, True
            t.block_rps.append(ok / secs)
        done += size
    return totals, False


# ---- statistics ----


@dataclass
class Result:
    setting: str
    lat: dict[str, list[float]]
    ttft: dict[str, list[float]]
    tput: dict[str, tuple[int, float]]
    errors: dict[str, list[str]]
    short: dict[str, int]
    first_event: dict[str, list[float]]
    block_rps: dict[str, list[float]]
    truncated: list[str]
    health: dict[str, Any]
    seconds: float
    gw_cpu_ms: dict[str, float]  # CPU time of the gateway (and its local compute endpoint) per call, per point

    def rps(self, who: str) -> float:
        ok, secs = self.tput[who]
        return ok / secs if secs else float("nan")

    def cpu_cell(self) -> str:
        return " / ".join(fmt(self.gw_cpu_ms.get(k, float("nan"))) for k in ("latency", "ttft", "throughput"))

    @property
    def added_ms(self) -> float:
        return median(self.lat["gateway"]) - median(self.lat["direct"])

    @property
    def added_ci(self) -> tuple[float, float]:
        return diff_ci(self.lat["direct"], self.lat["gateway"])

    @property
    def ratio(self) -> float:
        return median(self.lat["gateway"]) / median(self.lat["direct"])

    @property
    def added_ttft_ms(self) -> float:
        return median(self.ttft["gateway"]) - median(self.ttft["direct"])

    @property
    def tput_ratio(self) -> float:
        return self.rps("gateway") / self.rps("direct")


# ---- one setting ----


async def measure(setting: str, url: str, stack: Stack, direct: Target, args: argparse.Namespace) -> Result:
    body, stream_body = bodies(args.max_tokens)
    gw = Target("gateway", make_client(url + "/v1", stack.api_key))
    direct.reset()
    targets = [direct, gw]
    t0 = time.monotonic()
    gw_pid = stack.gateways[setting].pid
    try:
        log(f"  warming up ({args.warmup} calls per target and kind)")
        for t in targets:
            for _ in range(args.warmup):
                await chat(t, body, args.max_tokens)
                await ttft(t, stream_body)
            await burst(t, body, args.max_tokens, args.concurrency, args.concurrency)
        direct.reset()
        gw.reset()
        truncated = []
        cpu: dict[str, float] = {}  # gateway CPU ms per gateway call, per point
        mark = (tree_cpu_s(gw_pid), 0)

        def cpu_per_call(point: str, ok: int) -> None:
            nonlocal mark
            now = (tree_cpu_s(gw_pid), len(gw.errors))
            calls = ok + now[1] - mark[1]
            cpu[point] = (now[0] - mark[0]) * 1000 / calls if calls else float("nan")
            mark = now

        log(f"  a) latency, c=1: {args.requests} non-streaming calls per target, alternating blocks of {args.block}")

        def call_chat(t: Target) -> Any:
            return chat(t, body, args.max_tokens)

        lat, cut = await alternate_c1(targets, call_chat, args.requests, args.block, args.point_budget)
        if cut:
            truncated.append("latency")
        cpu_per_call("latency", len(lat["gateway"]))
        log(
            f"     direct p50 {median(lat['direct']):.1f} ms, gateway p50 {median(lat['gateway']):.1f} ms "
            f"(n={len(lat['direct'])}/{len(lat['gateway'])})"
        )

        log(f"  b) time to first token, c=1: {args.requests} streaming calls per target")

        def call_stream(t: Target) -> Any:
            return ttft(t, stream_body)

        first, cut = await alternate_c1(targets, call_stream, args.requests, args.block, args.point_budget)
        if cut:
            truncated.append("ttft")
        cpu_per_call("ttft", len(first["gateway"]))
        log(
            f"     direct p50 {median(first['direct']):.1f} ms, gateway p50 {median(first['gateway']):.1f} ms "
            f"(first data event of any kind: {median(direct.first_event):.1f} / {median(gw.first_event):.1f} ms)"
        )

        block = args.concurrency * 5
        c, n = args.concurrency, args.requests_c16
        log(f"  c) throughput, c={c}: {n} calls per target, alternating blocks of {block}")
        tput, cut = await alternate_throughput(
            targets, body, args.max_tokens, args.requests_c16, args.concurrency, block, args.point_budget
        )
        if cut:
            truncated.append("throughput")
        cpu_per_call("throughput", tput["gateway"][0])
        rps = {k: (ok / s if s else float("nan")) for k, (ok, s) in tput.items()}
        log(f"     direct {rps['direct']:.1f} req/s, gateway {rps['gateway']:.1f} req/s")
        await asyncio.sleep(3 if setting == "sample" else 0)  # let the recorder catch up before reading /health
        health = stack.health(setting, url)
        return Result(
            setting=setting, lat=lat, ttft=first, tput=tput,
            errors={t.name: list(t.errors) for t in targets}, short={t.name: t.short for t in targets},
            first_event={t.name: list(t.first_event) for t in targets},
            block_rps={t.name: list(t.block_rps) for t in targets},
            truncated=truncated, health=health, seconds=time.monotonic() - t0,
            gw_cpu_ms=cpu,
        )  # fmt: skip
    finally:
        await gw.client.aclose()


# ---- the rest of the API surface: embeddings and a Responses stream ----

API_BEGIN = "<!-- bench/overhead.py api surface: begin (generated; rerun the script to replace this section) -->"
API_END = "<!-- bench/overhead.py api surface: end -->"


async def embed_call(t: Target, payload: bytes) -> float:
    t0 = time.perf_counter()
    r = await t.client.post("/embeddings", content=payload)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200 or len(r.json()["data"]) != 4:
        raise BenchError(f"HTTP {r.status_code}: {r.text[:200]}")
    return ms


async def responses_ttft(t: Target, payload: bytes) -> float:
    """ms until the first ``response.output_text.delta`` event of a Responses stream (read to its end)."""
    t0 = time.perf_counter()
    first: float | None = None
    async with t.client.stream("POST", "/responses", content=payload) as r:
        if r.status_code != 200:
            await r.aread()
            raise BenchError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if first is None and line.startswith("data:") and '"response.output_text.delta"' in line:
                first = (time.perf_counter() - t0) * 1000
    if first is None:
        raise BenchError("the Responses stream had no output_text delta")
    return first


async def measure_api_surface(url: str, stack: Stack, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Embeddings (4 inputs) at c=1 and a Responses stream's time to first token, vLLM directly against the
    gateway, alternating blocks as for chat. The first embeddings call warms tiny-embed up (through the gateway)."""
    gw = Target("gateway", make_client(url + "/v1", stack.api_key))
    texts = ["federated inference", "across HPC clusters", "with one API", "metered per request"]
    embed = json.dumps({"model": "tiny-embed", "input": texts}).encode()
    # store: false to both, as the gateway always asks vLLM (a stored response costs vLLM more: unequal otherwise).
    stream = json.dumps({"model": "tiny", "input": "Summarize federated inference in one line.", "store": False,
                         "max_output_tokens": args.max_tokens, "stream": True}).encode()  # fmt: skip
    try:
        log("  api surface: warming tiny-embed up through the gateway (its first request)")
        await embed_call(gw, embed)
        direct_embed = Target("direct", make_client(f"http://127.0.0.1:{stack.vllm_port + 1}/v1",
                                                     vllm_key(stack.home, "tiny-embed")))  # fmt: skip
        direct_chat = Target("direct", make_client(f"http://127.0.0.1:{stack.vllm_port}/v1", vllm_key(stack.home)))
        for t, tw in ((direct_embed, gw), (direct_chat, gw)):
            for _ in range(args.warmup):
                await (embed_call(t, embed) if t is direct_embed else responses_ttft(t, stream))
                await (embed_call(tw, embed) if t is direct_embed else responses_ttft(tw, stream))
        out = {}
        log(f"  embeddings, c=1: {args.requests} calls per target")
        out["embeddings"], _ = await alternate_c1(
            [direct_embed, gw], lambda t: embed_call(t, embed), args.requests, args.block, args.point_budget
        )
        log(f"  Responses stream, time to first delta, c=1: {args.requests} calls per target")
        out["responses"], _ = await alternate_c1(
            [direct_chat, gw], lambda t: responses_ttft(t, stream), args.requests, args.block, args.point_budget
        )
        errors = [*direct_embed.errors, *direct_chat.errors, *gw.errors]
        if errors:
            log(f"  [yellow]{len(errors)} failed calls[/yellow]: {errors[:3]}")
        await direct_embed.client.aclose()
        await direct_chat.client.aclose()
        return out
    finally:
        await gw.client.aclose()


def api_markdown(samples: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    rows = ["| call | n per target | p50 direct / gateway (ms) | added p50 (ms) [95% CI] | ratio |",
            "|---|---:|---|---|---:|"]  # fmt: skip
    what = {"embeddings": "embeddings, 4 inputs (`tiny-embed`)",
            "responses": f"Responses stream, time to first delta (`tiny`, {args.max_tokens} tokens)"}  # fmt: skip
    for name, s in samples.items():
        lo, hi = diff_ci(s["direct"], s["gateway"])
        d, g = median(s["direct"]), median(s["gateway"])
        n = min(len(s["direct"]), len(s["gateway"]))
        added = f"{fmt(g - d, '+.1f')} [{fmt(lo, '+.1f')}, {fmt(hi, '+.1f')}]"
        rows.append(f"| {what[name]} | {n} | {fmt(d)} / {fmt(g)} | {added} | {fmt(g / d, '.2f')}x |")
    return (
        "\n".join(
            [
                API_BEGIN,
                "### The rest of the API surface (`bench/overhead.py`)",
                "",
                "The same method as chat above, in the same run, through a gateway with the default `sample` "
                "tracking: embeddings from the tiny embedding model (vLLM CPU, its own server) and a Responses-API "
                "stream from `tiny` (time to the first `response.output_text.delta` event), vLLM directly against "
                "the gateway, alternating "
                f"blocks of {args.block} calls at concurrency 1.",
                "",
                *rows,
                API_END,
            ]
        )
        + "\n"
    )


# ---- output ----


def targets_met(r: Result, args: argparse.Namespace) -> tuple[bool, bool]:
    return r.added_ms <= args.target_added_ms, r.tput_ratio >= args.target_tput_ratio


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    table = Table(title=f"Gateway overhead (tiny model, vLLM CPU, max_tokens={args.max_tokens})")
    for col in (
        "setting", "c=1 p50 direct/gw ms", "added p50 ms [95% CI]", "ratio", "c=1 p95 direct/gw ms",
        "TTFT p50 direct/gw ms", "added TTFT ms", f"c={args.concurrency} req/s direct/gw", "tput ratio",
        "gw CPU ms/call c=1/stream/c=16", "errors",
    ):  # fmt: skip
        table.add_column(col, justify="right" if col != "setting" else "left")
    for r in results:
        lo, hi = r.added_ci
        ok_lat, ok_tput = targets_met(r, args)
        errors = sum(len(v) for v in r.errors.values())
        table.add_row(
            r.setting,
            f"{fmt(median(r.lat['direct']))} / {fmt(median(r.lat['gateway']))}",
            f"[{'green' if ok_lat else 'red'}]{fmt(r.added_ms, '+.1f')}[/] [{fmt(lo, '+.1f')}, {fmt(hi, '+.1f')}]",
            fmt(r.ratio, ".2f") + "x",
            f"{fmt(p95(r.lat['direct']))} / {fmt(p95(r.lat['gateway']))}",
            f"{fmt(median(r.ttft['direct']))} / {fmt(median(r.ttft['gateway']))}",
            fmt(r.added_ttft_ms, "+.1f"),
            f"{fmt(r.rps('direct'))} / {fmt(r.rps('gateway'))}",
            f"[{'green' if ok_tput else 'red'}]{fmt(r.tput_ratio, '.2f')}x[/]",
            r.cpu_cell(),
            f"{len(r.errors['direct'])} / {len(r.errors['gateway'])}" if errors else "0",
        )
    console.print(table)
    console.print(
        f"Targets: added median latency ≤ {args.target_added_ms:g} ms at c=1 (sample setting); "
        f"throughput ≥ {args.target_tput_ratio:g}x direct at c={args.concurrency}."
    )


def notes(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        for who, errs in r.errors.items():
            if errs:
                out.append(f"{r.setting}: {len(errs)} failed calls to {who}; first: {errs[0]}")
        for who, n in r.short.items():
            if n:
                out.append(f"{r.setting}: {n} responses from {who} had fewer than max_tokens completion tokens")
        fe = r.first_event
        if fe.get("direct") and fe.get("gateway"):
            out.append(
                f"{r.setting}: streams' first data event (of any kind) p50 {median(fe['direct']):.1f} ms "
                f"direct / {median(fe['gateway']):.1f} ms gateway; first content chunk (TTFT) "
                f"{median(r.ttft['direct']):.1f} / {median(r.ttft['gateway']):.1f} ms"
            )
        b = r.block_rps
        if len(b.get("direct", [])) > 1 and len(b.get("gateway", [])) > 1:
            out.append(
                f"{r.setting}: req/s per block of the throughput point ranged {min(b['direct']):.1f}-"
                f"{max(b['direct']):.1f} direct, {min(b['gateway']):.1f}-{max(b['gateway']):.1f} gateway"
            )
        if r.truncated:
            out.append(f"{r.setting}: stopped early (time budget) in: {', '.join(r.truncated)}")
        for kind, xs in (("latency", r.lat), ("TTFT", r.ttft)):
            for who, v in xs.items():
                if len(v) >= 5 and p95(v) > 3 * median(v):
                    out.append(
                        f"{r.setting}: {who} {kind} has a long tail (p95 {p95(v):.0f} ms, p50 {median(v):.0f} ms)"
                    )
        rec = (r.health or {}).get("flow_records")
        if rec:
            out.append(
                f"{r.setting}: the gateway's flow recorder reports {rec['recorded']} recorded, {rec['dropped']} dropped"
            )
    return out


def markdown(results: list[Result], args: argparse.Namespace, started: datetime, wall_s: float) -> str:
    c = args.concurrency
    rows = [
        "| Setting | c=1 latency p50, direct / gateway (ms) | Added p50 (ms) [95% CI] | Ratio | "
        "c=1 p95, direct / gateway (ms) | TTFT p50, direct / gateway (ms) | Added TTFT (ms) | "
        f"c={c} req/s, direct / gateway | Throughput ratio | Gateway CPU per call, c=1 / stream / c={c} (ms) | "
        "Failed calls, direct / gateway |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lo, hi = r.added_ci
        rows.append(
            f"| `{r.setting}` | {fmt(median(r.lat['direct']))} / {fmt(median(r.lat['gateway']))} "
            f"| {fmt(r.added_ms, '+.1f')} [{fmt(lo, '+.1f')}, {fmt(hi, '+.1f')}] | {fmt(r.ratio, '.2f')}x "
            f"| {fmt(p95(r.lat['direct']))} / {fmt(p95(r.lat['gateway']))} "
            f"| {fmt(median(r.ttft['direct']))} / {fmt(median(r.ttft['gateway']))} | {fmt(r.added_ttft_ms, '+.1f')} "
            f"| {fmt(r.rps('direct'))} / {fmt(r.rps('gateway'))} | {fmt(r.tput_ratio, '.2f')}x "
            f"| {r.cpu_cell()} | {len(r.errors['direct'])} / {len(r.errors['gateway'])} |"
        )
    checks = []
    for r in results:
        ok_lat, ok_tput = targets_met(r, args)
        checks.append(
            f"- `{r.setting}`: added p50 {fmt(r.added_ms, '+.1f')} ms ({'met' if ok_lat else 'not met'}), "
            f"throughput {fmt(r.tput_ratio, '.2f')}x ({'met' if ok_tput else 'not met'})"
        )
    extra = notes(results)
    lines = [
        BEGIN,
        "## Gateway overhead (`bench/overhead.py`)",
        "",
        machine_line(started, wall_s, quick=args.quick, rerun="`make bench` or `.venv/bin/python bench/overhead.py`"),
        "",
        "Method: `first run` starts the embedded default (Prefect server, worker, gateway, vLLM CPU serving the tiny "
        "random-weight demo model); for each `FIRST_FLOW_TRACKING` setting an extra gateway starts against the same "
        "Prefect and vLLM. Chat completions with identical bodies "
        f"(max_tokens={args.max_tokens} with `ignore_eos`, temperature 0, seed 0) go, in the same run, to vLLM "
        f"directly and through the gateway, alternating blocks of {args.block} calls at concurrency 1 "
        f"({args.requests} calls per target for latency, as many streaming for time to first token) and blocks "
        f"of {c * 5} calls at concurrency {c} ({args.requests_c16} calls per target for throughput). "
        "One reused `httpx.AsyncClient` per target. The client, the gateway and vLLM share the machine's cores, "
        "so gateway CPU time shows up as lost vLLM throughput; the gateway's CPU per call is its process's and its "
        "local compute endpoint's CPU time during each point, per gateway call. The CI is a bootstrap "
        "interval of the difference of medians.",
        "",
        *rows,
        "",
        f"Targets: added median latency ≤ {args.target_added_ms:g} ms at c=1 for `sample` (the default setting), "
        f"throughput ≥ {args.target_tput_ratio:g}x direct at c={c}.",
        "",
        *checks,
    ]
    if extra:
        lines += ["", "Notes from this run:", "", *(f"- {n}" for n in extra)]
    lines.append(END)
    return "\n".join(lines) + "\n"


# ---- main ----


async def run_all(stack: Stack, args: argparse.Namespace) -> tuple[list[Result], dict[str, Any]]:
    direct = Target("direct", make_client(f"http://127.0.0.1:{stack.vllm_port}/v1", vllm_key(stack.home)))
    results = []
    try:
        for i, setting in enumerate(args.settings):
            port = stack.port + 3 + i
            log(f"[bold]setting {setting}[/bold]: starting a gateway on :{port} with FIRST_FLOW_TRACKING={setting}")
            url = await asyncio.to_thread(stack.start_gateway, setting, port, args.sample_rate)
            try:
                results.append(await measure(setting, url, stack, direct, args))
            finally:
                await asyncio.to_thread(stack.stop_gateway, setting)
            log(f"  setting {setting} took {results[-1].seconds:.0f} s")
        port = stack.port + 3 + len(args.settings)
        log(f"[bold]API surface[/bold]: a gateway on :{port} with FIRST_FLOW_TRACKING=sample")
        url = await asyncio.to_thread(stack.start_gateway, "sample", port, args.sample_rate)
        try:
            api = await measure_api_surface(url, stack, args)
        finally:
            await asyncio.to_thread(stack.stop_gateway, "sample")
    finally:
        await direct.client.aclose()
    return results, api


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--home", type=Path, help="state folder for the stack (default: a new temporary folder)")
    ap.add_argument("--requests", type=int, help="calls per target at concurrency 1, per point (default 200)")
    ap.add_argument(
        "--requests-c16", type=int, help="calls per target for the throughput point (default 2x --requests)"
    )
    ap.add_argument("--max-tokens", type=int, default=16, help="completion tokens per call (default 16)")
    ap.add_argument(
        "--settings", default=",".join(SETTINGS), help="FIRST_FLOW_TRACKING settings (default off,sample,all)"
    )
    add_output_args(ap, "few calls (a smoke run)")
    ap.add_argument("--block", type=int, default=10, help="calls per alternating block at concurrency 1 (default 10)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrency of the throughput point (default 16)")
    ap.add_argument("--warmup", type=int, help="warm-up calls per target and kind (default 5)")
    ap.add_argument("--sample-rate", type=float, default=0.01, help="FIRST_FLOW_SAMPLE_RATE for `sample`")
    ap.add_argument("--point-budget", type=float, default=300, help="seconds after which a point stops early")
    ap.add_argument("--keep", action="store_true", help="keep the temporary state folder (logs) after a clean run")
    ap.add_argument("--prefect-port", type=int, default=4390)
    ap.add_argument(
        "--port", type=int, default=8390, help="`first run`'s gateway; vLLM +1 (tiny), +2 (tiny-embed); gateways +3.."
    )
    ap.add_argument("--start-timeout", type=float, default=420, help="seconds to wait for `first run` to be ready")
    ap.add_argument("--target-added-ms", type=float, default=5.0)
    ap.add_argument("--target-tput-ratio", type=float, default=0.9)
    args = ap.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad or not args.settings:
        ap.error(f"--settings takes a comma-separated subset of {','.join(SETTINGS)}; got {bad or 'nothing'}")
    if args.requests is None:
        args.requests = 20 if args.quick else 200
    if args.requests_c16 is None:
        args.requests_c16 = 64 if args.quick else 2 * args.requests
    if args.warmup is None:
        args.warmup = 2 if args.quick else 5
    resolve_output(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ports = [args.prefect_port, args.port, args.port + 1, args.port + 2,
             *(args.port + 3 + i for i in range(len(args.settings) + 1))]  # fmt: skip
    busy = [p for p in ports if not port_free(p)]
    if busy:
        console.print(f"[red]ports in use: {busy}[/red] (choose others with --prefect-port / --port)")
        return 2
    temp_home = args.home is None
    home = Path(tempfile.mkdtemp(prefix="first-bench-")) if temp_home else args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    stack = Stack(home, args.prefect_port, args.port)
    results: list[Result] = []
    api: dict[str, Any] = {}
    code = 0
    try:
        stack.start(args.start_timeout)
        results, api = asyncio.run(run_all(stack, args))
    except (KeyboardInterrupt, Exception) as exc:
        code = failure_code(exc)
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave vLLM behind
        try:
            left = stack.close()
        finally:
            signal.signal(signal.SIGINT, previous)
        if left:
            console.print("[red]processes were left running (now killed):[/red]\n  " + "\n  ".join(left))
            code = code or 1
        else:
            log(f"[green]✓[/green] nothing left running (pgrep -f {home})")
    wall_s = time.monotonic() - t0
    if results:
        print_table(results, args)
        for n in notes(results):
            console.print(f"[yellow]note:[/yellow] {n}")
        if api:
            console.print(api_markdown(api, args))
        if args.write and code == 0:
            write_section(args.out, markdown(results, args, started, wall_s), BEGIN, END)
            if api:
                write_section(args.out, api_markdown(api, args), API_BEGIN, API_END)
            log(f"wrote the section in {args.out}")
        elif not args.write:
            log(f"--quick: {args.out} left alone (give --out to write it)")
    log(f"total run time {wall_s / 60:.1f} min")
    failed = any(errs for r in results for errs in r.errors.values())
    if code == 0 and temp_home and not failed and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    elif temp_home:
        log(f"the state folder and its logs are kept: {home}")
    return code


if __name__ == "__main__":
    sys.exit(main())
