"""The cost of auth: Globus mode (a token cache in front of Globus Auth) against local API keys.

Globus cannot be reached from here, so FakeGlobusServer (tests/fakes/globus_server.py), a stand-in for Globus
Auth and Groups on 127.0.0.1 that the real globus-sdk talks to, plays Globus. Only cache misses touch it.

  1. In process (no servers but the fake): the per-call cost of `GlobusAuthenticator.authenticate` for a token
     it has already checked (a cache hit: a SHA-256 and a dict lookup), beside `LocalKeyAuthenticator` with 1
     and with --many-keys keys, and an await of a no-op coroutine (the floor); timed in batches of
     --batch-size calls, interleaved, median and p95 over --batches batches. Then the latency of a cache miss
     (a fresh token: introspection, dependent token, my_groups), a lower bound on real Globus latency.
  2. Through the gateway: `first run` (Prefect server, worker, gateway, vLLM CPU with the tiny model) on its
     own ports and state folder; `first globus configure` saves the Globus block (pointed at the fake) in its
     Prefect; two more gateways start against the same Prefect and vLLM, FIRST_AUTH_MODE=local and
     FIRST_AUTH_MODE=globus, both FIRST_FLOW_TRACKING=off, so only auth differs. It checks that the Globus
     one is in globus mode (/health, and the stack's API key is refused with 401), then alternates identical
     chat calls between vLLM directly, the local-key gateway and the Globus gateway: latency at concurrency 1
     and requests/s at --concurrency. The fake's call counts at the end show the hot path never touched it.

It prints tables and writes (or replaces) its own section of docs/benchmarks.md. Everything it started is
stopped at the end, on Ctrl-C and on errors too.

    make bench-auth                            # = .venv/bin/python bench/auth.py
    .venv/bin/python bench/auth.py --quick     # a smoke run; leaves docs/ alone unless --out is given
    .venv/bin/python bench/auth.py --in-process-only --quick    # part 1 only (seconds; never writes docs)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* and tests.* are not installed

import httpx
from rich.table import Table

from bench.common import (
    BIN,
    REPO,
    BenchError,
    console,
    diff_ci,
    failure_code,
    fmt,
    log,
    machine_line,
    median,
    p95,
    port_free,
    tree_cpu_s,
    vllm_key,
    write_section,
)
from bench.overhead import Stack, Target, alternate_c1, alternate_throughput, bodies, burst, chat, make_client
from blocks.globus import GlobusAuthBlock
from serving.auth import KeyStore, LocalKeyAuthenticator
from serving.globus_auth import GlobusAuthenticator
from tests.fakes.globus_server import FakeGlobusServer

BEGIN = "<!-- bench/auth.py: begin (generated; rerun the script to replace this section) -->"
END = "<!-- bench/auth.py: end -->"
GATEWAYS = ("local", "globus")  # FIRST_AUTH_MODE of the two gateways under test
LABEL = {"direct": "vLLM direct", "local": "gateway, local API key", "globus": "gateway, Globus token"}
FAKE_NOTE = (
    "Globus cannot be reached from this machine: FakeGlobusServer (`tests/fakes/globus_server.py`), a stand-in "
    "for Globus Auth and Groups on 127.0.0.1 that the real `globus-sdk` talks to, played Globus. Only cache "
    "misses touch it."
)


# ---- 1. in process ----


@dataclass
class InProcess:
    per_call_us: dict[str, list[float]]  # series -> µs per call, one value per batch
    miss_ms: list[float]
    miss_calls: Counter[str]  # calls the misses made to the fake

    @property
    def hit_us(self) -> float:
        return median(self.per_call_us["globus_hit"])


SERIES = {
    "globus_hit": "Globus: cache hit (`GlobusAuthenticator.authenticate`)",
    "local_1": "local: API key, 1 key in the store (`LocalKeyAuthenticator.authenticate`)",
    "local_many": "local: API key, {n} keys in the store",
    "noop": "floor: `await` of a no-op coroutine",
    "app_local": "whole request, local key: `GET /v1/models` through the app in process ({r} per batch)",
    "app_globus": "whole request, Globus token: the same ({r} per batch)",
}
APP_REQUESTS = 200  # requests per batch of the whole-request series (each costs ~1 ms)


def series_label(key: str, args: argparse.Namespace) -> str:
    return SERIES[key].format(n=args.many_keys, r=APP_REQUESTS)


async def in_process(args: argparse.Namespace, tmp: Path) -> InProcess:
    with FakeGlobusServer() as fake:
        block = GlobusAuthBlock(
            client_id=fake.client_id, client_secret=fake.client_secret, auth_base_url=fake.url,
            groups_base_url=fake.url,
        )  # fmt: skip
        auth = GlobusAuthenticator(block)
        try:
            token = fake.user_token("alice@uchicago.edu", groups=["staff"])
            await auth.authenticate(token)  # the miss; every later call is a hit
            one = LocalKeyAuthenticator(KeyStore(tmp / "keys-1.db"))
            key_1, _ = one.store.create("alice")
            many = LocalKeyAuthenticator(KeyStore(tmp / "keys-many.db"))
            keys = [many.store.create(f"user{i}")[0] for i in range(args.many_keys)]
            key_many = keys[len(keys) // 2]

            async def noop(_token: str) -> None:
                return None

            calls: dict[str, tuple[Any, str]] = {
                "globus_hit": (auth.authenticate, token), "local_1": (one.authenticate, key_1),
                "local_many": (many.authenticate, key_many), "noop": (noop, token),
            }  # fmt: skip
            for fn, arg in calls.values():  # warm up, and check that each one succeeds
                for _ in range(100):
                    await fn(arg)
            n = args.batch_size
            log(f"1) in process: {args.batches} batches of {n:,} calls each, interleaved, for: " + ", ".join(calls))
            per_call: dict[str, list[float]] = {k: [] for k in calls}
            gc.collect()
            for b in range(args.batches):
                order = list(calls.items()) if b % 2 == 0 else list(calls.items())[::-1]
                for name, (fn, arg) in order:
                    t0 = time.perf_counter_ns()
                    for _ in range(n):
                        await fn(arg)
                    per_call[name].append((time.perf_counter_ns() - t0) / n / 1000)
            for name in calls:
                log(
                    f"     {name}: median {median(per_call[name]):.2f} µs/call, "
                    f"p95 {p95(per_call[name]):.2f} µs/call over batches"
                )
            if fake.calls["introspect"] != 1:
                raise BenchError(f"the hits touched the fake Globus: {dict(fake.calls)}")

            log(f"   cache misses: {args.misses} fresh tokens, one at a time")
            before = Counter(fake.calls)
            miss_ms = []
            for i in range(args.misses):
                fresh = fake.user_token(f"user{i}@uchicago.edu", groups=["staff"])
                t0 = time.perf_counter()
                await auth.authenticate(fresh)
                miss_ms.append((time.perf_counter() - t0) * 1000)
            miss_calls = Counter(fake.calls)
            miss_calls.subtract(before)
            log(f"     miss: median {median(miss_ms):.2f} ms, p95 {p95(miss_ms):.2f} ms ({dict(miss_calls)})")
            per_call.update(await whole_requests(args, tmp, fake, block))
        finally:
            auth.close()
    return InProcess(per_call, miss_ms, +miss_calls)


async def whole_requests(
    args: argparse.Namespace, tmp: Path, fake: FakeGlobusServer, block: GlobusAuthBlock
) -> dict[str, list[float]]:
    """The whole request path of the gateway in each auth mode, in process (Litestar's test client, no sockets,
    no vLLM): routing, the guard, the handler and the response, so the two modes compare without the noise of
    a loaded machine's network and model server."""
    from litestar.testing import AsyncTestClient

    from blocks.registry import Registry
    from core.settings import FlowTracking, Settings
    from first.gateway import create_gateway

    local = Settings(home=tmp / "app-local", flow_tracking=FlowTracking.off)
    globus = Settings(home=tmp / "app-globus", flow_tracking=FlowTracking.off, auth_mode="globus")
    key = KeyStore(local.keys_db).create("alice")[0]
    token = fake.user_token("alice@uchicago.edu", groups=["staff"])
    registry = Registry.embedded_default(local)
    out: dict[str, list[float]] = {"app_local": [], "app_globus": []}
    async with (
        AsyncTestClient(app=create_gateway(local, registry)) as c_local,
        AsyncTestClient(app=create_gateway(globus, registry, globus=block)) as c_globus,
    ):
        clients = {
            "app_local": (c_local, {"Authorization": f"Bearer {key}"}),
            "app_globus": (c_globus, {"Authorization": f"Bearer {token}"}),
        }
        for client, headers in clients.values():
            for _ in range(50):  # warm up; the first Globus call is its one cache miss
                r = await client.get("/v1/models", headers=headers)
                if r.status_code != 200:
                    raise BenchError(f"in-process GET /v1/models: HTTP {r.status_code}: {r.text[:200]}")
        batches = max(4, args.batches // 2)
        log(f"   whole requests in process: {batches} batches of {APP_REQUESTS} GET /v1/models per mode, interleaved")
        for b in range(batches):
            for name, (client, headers) in list(clients.items())[:: 1 if b % 2 == 0 else -1]:
                t0 = time.perf_counter_ns()
                for _ in range(APP_REQUESTS):
                    await client.get("/v1/models", headers=headers)
                out[name].append((time.perf_counter_ns() - t0) / APP_REQUESTS / 1000)
        for name, xs in out.items():
            log(f"     {name}: median {median(xs):.0f} µs/request")
    return out


# ---- 2. through the gateway ----


@dataclass
class GatewayResult:
    lat: dict[str, list[float]]
    tput: dict[str, tuple[int, float]]
    errors: dict[str, list[str]]
    short: dict[str, int]
    block_rps: dict[str, list[float]]
    cpu_ms: dict[str, dict[str, float]]  # gateway -> point -> its CPU ms per call
    checks: list[str]
    fake_total: Counter[str]
    fake_measured: Counter[str]  # calls to the fake after the warm-up (the measured calls): should be none
    truncated: list[str]
    seconds: float
    cache_ttl_s: float
    health: dict[str, dict[str, Any]] = field(default_factory=dict)

    def rps(self, who: str) -> float:
        ok, secs = self.tput[who]
        return ok / secs if secs else float("nan")

    def added(self, who: str, base: str = "direct") -> float:
        return median(self.lat[who]) - median(self.lat[base])

    def cpu_cell(self, who: str) -> str:
        cpu = self.cpu_ms.get(who)
        return f"{fmt(cpu['latency'])} / {fmt(cpu['throughput'])}" if cpu else "–"

    @property
    def globus_ci(self) -> tuple[float, float]:
        return diff_ci(self.lat["local"], self.lat["globus"])

    @property
    def tput_ratio(self) -> float:
        return self.rps("globus") / self.rps("local")


def configure_globus(stack: Stack, fake: FakeGlobusServer, cache_ttl_s: float) -> None:
    """`first globus configure`, as an operator runs it, into the stack's Prefect (the secret through the env)."""
    cmd = [
        str(BIN / "first"), "globus", "configure", "--client-id", fake.client_id, "--auth-url", fake.url,
        "--groups-url", fake.url, "--cache-ttl", str(cache_ttl_s),
    ]  # fmt: skip
    env = {**stack.env, "FIRST_GLOBUS_CLIENT_SECRET": fake.client_secret}
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise BenchError(f"`first globus configure` failed (code {r.returncode}):\n{(r.stderr or r.stdout)[-2000:]}")
    log(f"  {' '.join(r.stderr.split()) or 'saved the Globus Auth block'}")  # rich wrapped its stderr at 80


async def status_of(url: str, credential: str, body: bytes) -> int:
    async with make_client(url + "/v1", credential) as client:
        r = await client.post("/chat/completions", content=body)
        return r.status_code


async def verify(urls: dict[str, str], stack: Stack, token: str, body: bytes) -> tuple[list[str], dict]:
    """Each gateway is in the auth mode it should be, and refuses the other mode's credential."""
    checks, health = [], {}
    async with httpx.AsyncClient(timeout=10) as client:
        for mode, url in urls.items():
            health[mode] = (await client.get(url + "/health")).json()
            got = (health[mode].get("auth_mode"), health[mode].get("flow_tracking"))
            if got != (mode, "off"):
                raise BenchError(f"the {mode} gateway reports auth_mode={got[0]!r}, flow_tracking={got[1]!r}")
            checks.append(f'the {mode} gateway\'s `/health` says `"auth_mode": "{mode}"`, flow tracking `off`')
    refused = {
        "globus": (stack.api_key, "the stack's local API key"),
        "local": (token, "the Globus token"),
    }
    for mode, (credential, what) in refused.items():
        code = await status_of(urls[mode], credential, body)
        if code != 401:
            raise BenchError(f"the {mode} gateway answered {what} with HTTP {code}, not 401")
        checks.append(f"the {mode} gateway refuses {what} with 401")
    return checks, health


async def measure_gateways(stack: Stack, fake: FakeGlobusServer, args: argparse.Namespace) -> GatewayResult:
    log("2) through the gateway")
    log(f"  saving the Globus Auth block with `first globus configure` (the fake Globus at {fake.url})")
    await asyncio.to_thread(configure_globus, stack, fake, args.cache_ttl)
    urls: dict[str, str] = {}
    for i, mode in enumerate(GATEWAYS):
        port = stack.port + 2 + i
        log(f"  starting a gateway on :{port} with FIRST_AUTH_MODE={mode}, FIRST_FLOW_TRACKING=off")
        urls[mode] = await asyncio.to_thread(
            stack.start_gateway, "off", port, 0.0, {"FIRST_AUTH_MODE": mode}, f"auth-{mode}"
        )
    body, _ = bodies(args.max_tokens)
    token = fake.user_token("alice@uchicago.edu", groups=["staff"], expires_in=int(args.cache_ttl) + 3600)
    checks, health = await verify(urls, stack, token, body)
    for c in checks:
        log(f"  [green]✓[/green] {c}")
    targets = [
        Target("direct", make_client(f"http://127.0.0.1:{stack.vllm_port}/v1", vllm_key(stack.home))),
        Target("local", make_client(urls["local"] + "/v1", stack.api_key)),
        Target("globus", make_client(urls["globus"] + "/v1", token)),
    ]
    pids = {mode: stack.gateways[f"auth-{mode}"].pid for mode in GATEWAYS}
    t0 = time.monotonic()
    try:
        log(f"  warming up ({args.warmup} calls per target, then one burst at c={args.concurrency})")
        for t in targets:
            for _ in range(args.warmup):
                await chat(t, body, args.max_tokens)
            await burst(t, body, args.max_tokens, args.concurrency, args.concurrency)
        for t in targets:
            if t.errors:
                raise BenchError(f"warm-up calls to {t.name} failed: {t.errors[0]}")
            t.reset()
        after_warmup = Counter(fake.calls)
        truncated: list[str] = []
        cpu: dict[str, dict[str, float]] = {mode: {} for mode in GATEWAYS}
        marks = {mode: (tree_cpu_s(pid), 0) for mode, pid in pids.items()}

        def cpu_per_call(point: str, ok: dict[str, int]) -> None:
            for mode, pid in pids.items():
                t = next(x for x in targets if x.name == mode)
                now = (tree_cpu_s(pid), len(t.errors))
                calls = ok[mode] + now[1] - marks[mode][1]
                cpu[mode][point] = (now[0] - marks[mode][0]) * 1000 / calls if calls else float("nan")
                marks[mode] = now

        log(f"  a) latency, c=1: {args.requests} calls per target, alternating blocks of {args.block}")

        def call_chat(t: Target) -> Any:
            return chat(t, body, args.max_tokens)

        lat, cut = await alternate_c1(targets, call_chat, args.requests, args.block, args.point_budget)
        if cut:
            truncated.append("latency")
        cpu_per_call("latency", {m: len(lat[m]) for m in GATEWAYS})
        log("     p50 " + ", ".join(f"{k} {median(v):.1f} ms" for k, v in lat.items()))

        block = args.concurrency * 5
        c, n = args.concurrency, args.requests_c16
        log(f"  b) throughput, c={c}: {n} calls per target, alternating blocks of {block}")
        tput, cut = await alternate_throughput(
            targets, body, args.max_tokens, args.requests_c16, args.concurrency, block, args.point_budget
        )
        if cut:
            truncated.append("throughput")
        cpu_per_call("throughput", {m: tput[m][0] for m in GATEWAYS})
        log("     " + ", ".join(f"{k} {(ok / s if s else float('nan')):.1f} req/s" for k, (ok, s) in tput.items()))
        measured = Counter(fake.calls)
        measured.subtract(after_warmup)
        return GatewayResult(
            lat=lat, tput=tput, errors={t.name: list(t.errors) for t in targets},
            short={t.name: t.short for t in targets}, block_rps={t.name: list(t.block_rps) for t in targets},
            cpu_ms=cpu, checks=checks, fake_total=Counter(fake.calls), fake_measured=+measured,
            truncated=truncated, seconds=time.monotonic() - t0, cache_ttl_s=args.cache_ttl, health=health,
        )  # fmt: skip
    finally:
        for t in targets:
            await t.client.aclose()


# ---- output ----


def calls_text(calls: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(calls.items())) or "none"


def hit_verdict(ip: InProcess, args: argparse.Namespace) -> str:
    verdict = "met" if ip.hit_us < args.target_hit_us else "not met"
    return f"{verdict}: median {ip.hit_us:.2f} µs per cache hit (target < {args.target_hit_us:g} µs)"


def print_tables(ip: InProcess | None, gw: GatewayResult | None, args: argparse.Namespace) -> None:
    if ip is not None:
        t = Table(title=f"1) In process: per call, over {args.batches} batches of {args.batch_size:,} calls")
        for col in ("what", "per call, median", "p95"):
            t.add_column(col, justify="left" if col == "what" else "right")
        for key, xs in ip.per_call_us.items():
            t.add_row(series_label(key, args), f"{fmt(median(xs), '.2f')} µs", f"{fmt(p95(xs), '.2f')} µs")
        t.add_row(
            f"Globus: cache miss, {len(ip.miss_ms)} fresh tokens (the fake on localhost: a lower bound)",
            f"{fmt(median(ip.miss_ms), '.2f')} ms", f"{fmt(p95(ip.miss_ms), '.2f')} ms",
        )  # fmt: skip
        console.print(t)
        ok = ip.hit_us < args.target_hit_us
        console.print(f"Target, a cache hit under 0.1 ms: [{'green' if ok else 'red'}]{hit_verdict(ip, args)}[/]")
        console.print(f"Calls to the fake Globus per {len(ip.miss_ms)} misses: {calls_text(ip.miss_calls)}")
    if gw is not None:
        c = args.concurrency
        title = f"2) Through the gateway (tiny model, vLLM CPU, max_tokens={args.max_tokens}, flow tracking off)"
        t = Table(title=title)
        for col in (
            "target", "c=1 p50 ms", "c=1 p95 ms", "added p50 vs direct ms", f"c={c} req/s",
            f"gw CPU ms/call c=1 / c={c}", "errors",
        ):  # fmt: skip
            t.add_column(col, justify="left" if col == "target" else "right")
        for who in ("direct", "local", "globus"):
            t.add_row(
                LABEL[who], fmt(median(gw.lat[who])), fmt(p95(gw.lat[who])),
                "–" if who == "direct" else fmt(gw.added(who), "+.1f"), fmt(gw.rps(who)), gw.cpu_cell(who),
                str(len(gw.errors[who])),
            )  # fmt: skip
        console.print(t)
        lo, hi = gw.globus_ci
        console.print(
            f"Globus − local, c=1 median: [bold]{fmt(gw.added('globus', 'local'), '+.1f')} ms[/bold] "
            f"[95% CI {fmt(lo, '+.1f')}, {fmt(hi, '+.1f')}]; req/s at c={c}, Globus / local: "
            f"[bold]{fmt(gw.tput_ratio, '.2f')}x[/bold]"
        )
        console.print(
            f"Calls to the fake Globus: {calls_text(gw.fake_total)} in all; during the measured calls: "
            f"{calls_text(gw.fake_measured)}"
        )
    console.print(f"[dim]{FAKE_NOTE}[/dim]")


def notes(gw: GatewayResult | None) -> list[str]:
    if gw is None:
        return []
    out = []
    for who, errs in gw.errors.items():
        if errs:
            out.append(f"{len(errs)} failed calls to {LABEL[who]}; first: {errs[0]}")
    for who, n in gw.short.items():
        if n:
            out.append(f"{n} responses from {LABEL[who]} had fewer than max_tokens completion tokens")
    if all(len(v) > 1 for v in gw.block_rps.values()):
        ranges = ", ".join(f"{min(v):.1f}-{max(v):.1f} {who}" for who, v in gw.block_rps.items())
        out.append(f"req/s per block of the throughput point ranged {ranges}")
    if gw.truncated:
        out.append(f"stopped early (time budget) in: {', '.join(gw.truncated)}")
    for who, v in gw.lat.items():
        if len(v) >= 5 and p95(v) > 3 * median(v):
            out.append(f"{LABEL[who]} latency has a long tail (p95 {p95(v):.0f} ms, p50 {median(v):.0f} ms)")
    if gw.fake_measured:
        out.append(f"the measured calls reached the fake Globus: {calls_text(gw.fake_measured)}")
    return out


def markdown(ip: InProcess, gw: GatewayResult, args: argparse.Namespace, started: datetime, wall_s: float) -> str:
    c = args.concurrency
    lo, hi = gw.globus_ci
    in_rows = [
        "| What | Per call, median of batches | p95 of batches |",
        "|---|---|---|",
        *(
            f"| {series_label(k, args)} | {fmt(median(xs), '.2f')} µs | {fmt(p95(xs), '.2f')} µs |"
            for k, xs in ip.per_call_us.items()
        ),
        f"| Globus: cache miss ({len(ip.miss_ms)} fresh tokens, the fake on 127.0.0.1) | "
        f"{fmt(median(ip.miss_ms), '.2f')} ms | {fmt(p95(ip.miss_ms), '.2f')} ms |",
    ]
    gw_rows = [
        f"| Target | c=1 latency p50 (ms) | c=1 p95 (ms) | Added p50 vs direct (ms) | c={c} req/s | "
        f"Gateway CPU per call, c=1 / c={c} (ms) | Failed calls |",
        "|---|---|---|---|---|---|---|",
    ]
    for who in ("direct", "local", "globus"):
        cpu = gw.cpu_cell(who)
        gw_rows.append(
            f"| {LABEL[who]} | {fmt(median(gw.lat[who]))} | {fmt(p95(gw.lat[who]))} "
            f"| {'–' if who == 'direct' else fmt(gw.added(who), '+.1f')} | {fmt(gw.rps(who))} "
            f"| {cpu} | {len(gw.errors[who])} |"
        )
    lines = [
        BEGIN,
        "## Cost of auth (`bench/auth.py`)",
        "",
        machine_line(started, wall_s, quick=args.quick, rerun="`make bench-auth` or `.venv/bin/python bench/auth.py`"),
        "",
        FAKE_NOTE + " A real cache miss goes over the Internet to Globus and is slower than the one below.",
        "",
        "### In process",
        "",
        f"One `GlobusAuthenticator` (default block settings, pointed at the fake) checks one token once (the miss), "
        f"then `await auth.authenticate(token)` runs in batches of {args.batch_size:,} calls, {args.batches} "
        f"batches, interleaved with `LocalKeyAuthenticator` (a `KeyStore` with 1 key, and one with {args.many_keys} "
        "keys: it looks the key's hash up in a dict) and with an `await` of a "
        "no-op coroutine. Each batch gives one per-call time; the table gives their median and p95. The "
        "whole-request rows run `GET /v1/models` through the gateway app itself (Litestar's test client: no "
        "sockets, no vLLM), in each auth mode, alternating batches: the two modes side by side without the noise "
        "of the loaded machine. A cache miss is a fresh token: introspection, a dependent token and `my_groups`, "
        "three HTTP calls to the fake.",
        "",
        *in_rows,
        "",
        f"Target: a cache hit costs under 0.1 ms: **{hit_verdict(ip, args)}**. Calls to the fake for the "
        f"{len(ip.miss_ms)} misses: {calls_text(ip.miss_calls)}.",
        "",
        "### Through the gateway",
        "",
        "`first run` starts the embedded default (Prefect server, worker, gateway, vLLM CPU serving the tiny "
        "random-weight demo model); `first globus configure` saves the Globus Auth block (the fake's URLs, "
        f"`--cache-ttl {args.cache_ttl:g}` so that no re-check falls inside the run; the default is 300 s, one "
        "re-check per token every 5 minutes) in its Prefect; two more gateways start against the same Prefect "
        "and vLLM with `FIRST_AUTH_MODE=local` and `FIRST_AUTH_MODE=globus`, both `FIRST_FLOW_TRACKING=off`, so "
        "only auth differs. The local one gets the stack's API key, the Globus one a token of the fake. Chat "
        f"completions with identical bodies (max_tokens={args.max_tokens} with `ignore_eos`, temperature 0, "
        "seed 0) go, in the same run, to vLLM directly and through each gateway, alternating blocks of "
        f"{args.block} calls at concurrency 1 ({args.requests} calls per target) and blocks of {c * 5} calls at "
        f"concurrency {c} ({args.requests_c16} calls per target). One reused `httpx.AsyncClient` per target. "
        "The CI is a bootstrap interval of the difference of medians.",
        "",
        *gw_rows,
        "",
        f"- Globus − local, c=1 median: **{fmt(gw.added('globus', 'local'), '+.1f')} ms** "
        f"[95% CI {fmt(lo, '+.1f')}, {fmt(hi, '+.1f')}]",
        f"- requests/s at c={c}, Globus / local: **{fmt(gw.tput_ratio, '.2f')}x**",
        *(f"- checked: {x}" for x in gw.checks),
        f"- calls to the fake Globus: {calls_text(gw.fake_total)} in all (the Globus token's one check, and the "
        f"refused local key's introspection); during the measured calls: {calls_text(gw.fake_measured)}",
    ]
    extra = notes(gw)
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
    ap.add_argument("--home", type=Path, help="state folder for the stack (default: a new temporary folder)")
    ap.add_argument("--requests", type=int, help="calls per target at concurrency 1 (default 200; --quick 20)")
    ap.add_argument(
        "--requests-c16", type=int, help="calls per target at --concurrency (default 2x --requests; --quick 48)"
    )
    ap.add_argument("--concurrency", type=int, default=16, help="concurrency of the throughput point (default 16)")
    ap.add_argument("--block", type=int, default=10, help="calls per alternating block at concurrency 1 (default 10)")
    ap.add_argument("--max-tokens", type=int, default=16, help="completion tokens per call (default 16)")
    ap.add_argument("--warmup", type=int, help="warm-up calls per target (default 5; --quick 2)")
    ap.add_argument("--batches", type=int, help="in process: batches per series (default 50; --quick 10)")
    ap.add_argument("--batch-size", type=int, help="in process: calls per batch (default 2000; --quick 500)")
    ap.add_argument("--misses", type=int, help="in process: fresh tokens for the cache miss (default 30; --quick 10)")
    ap.add_argument("--many-keys", type=int, default=100, help="keys in the larger local key store (default 100)")
    ap.add_argument(
        "--cache-ttl", type=float, default=3600, help="cache_ttl_s of the gateway's Globus block (default 3600)"
    )
    ap.add_argument("--point-budget", type=float, default=300, help="seconds after which a point stops early")
    ap.add_argument("--out", type=Path, help="markdown file whose section is replaced (default docs/benchmarks.md)")
    ap.add_argument("--quick", action="store_true", help="few calls (a smoke run); writes --out only when given")
    ap.add_argument("--in-process-only", action="store_true", help="only part 1 (no stack, seconds); never writes docs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary state folder (logs) after a clean run")
    ap.add_argument("--prefect-port", type=int, default=4490)
    ap.add_argument(
        "--port", type=int, default=8490, help="gateway of `first run`; vLLM gets +1, the local/Globus gateways +2, +3"
    )
    ap.add_argument("--start-timeout", type=float, default=420, help="seconds to wait for `first run` to be ready")
    ap.add_argument("--target-hit-us", type=float, default=100.0, help="target for a cache hit, µs (default 100)")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {"requests": (200, 20), "warmup": (5, 2), "batches": (50, 10), "batch_size": (2000, 500)}
    defaults["misses"] = (30, 10)
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.requests_c16 is None:
        args.requests_c16 = 48 if q else 2 * args.requests
    if min(args.requests, args.requests_c16, args.batches, args.batch_size, args.misses, args.many_keys) < 1:
        ap.error("counts must be at least 1")
    args.write = not args.in_process_only and (args.out is not None or not q)
    if args.out is None:
        args.out = REPO / "docs" / "benchmarks.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    if args.in_process_only:
        with tempfile.TemporaryDirectory(prefix="first-bench-auth-") as tmp:
            try:
                ip = asyncio.run(in_process(args, Path(tmp)))
            except KeyboardInterrupt:
                console.print("\n[yellow]interrupted[/yellow]")
                return 130
        print_tables(ip, None, args)
        log(f"--in-process-only: {args.out} left alone")
        return 0
    ports = [args.prefect_port, args.port, args.port + 1, args.port + 2, args.port + 3]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        console.print(f"[red]ports in use: {busy}[/red] (choose others with --prefect-port / --port)")
        return 2
    temp_home = args.home is None
    home = Path(tempfile.mkdtemp(prefix="first-bench-auth-")) if temp_home else args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    stack = Stack(home, args.prefect_port, args.port)
    ip: InProcess | None = None
    gw: GatewayResult | None = None
    code = 0
    try:
        ip = asyncio.run(in_process(args, home))  # first, while the machine is quiet
        with FakeGlobusServer() as fake:
            log(f"the fake Globus (a stand-in for Globus Auth and Groups) listens at {fake.url}")
            stack.start(args.start_timeout)
            gw = asyncio.run(measure_gateways(stack, fake, args))
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
    if ip is not None or gw is not None:
        print_tables(ip, gw, args)
        for n in notes(gw):
            console.print(f"[yellow]note:[/yellow] {n}")
    if ip is not None and gw is not None and args.write and code == 0:
        write_section(args.out, markdown(ip, gw, args, started, wall_s), BEGIN, END)
        log(f"wrote the section in {args.out}")
    elif not args.write:
        log(f"--quick: {args.out} left alone (give --out to write it)")
    log(f"total run time {wall_s / 60:.1f} min")
    failed = gw is None or any(gw.errors.values())
    if code == 0 and temp_home and not failed and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    elif temp_home:
        log(f"the state folder and its logs are kept: {home}")
    return code


if __name__ == "__main__":
    sys.exit(main())
