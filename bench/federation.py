"""Federation: does a model served by two backends get twice the throughput of one, through the gateway?

Two OpenAISimulatorDouble backends (tests/fakes/openai_simulator.py: OpenAI-compatible, each with a bounded
throughput: --capacity requests at a time, --latency-s each, the rest wait in line; by default 4 x 0.1 s, i.e.
~40 req/s) are declared as direct-HTTP clusters `sim-a` and `sim-b`. Model `sim` is served on both, model
`sim-one` on `sim-a` only, so ONE gateway process measures one backend against two side by side, in the same
run. Non-streaming chat completions (max_tokens --max-tokens) go, at each concurrency (16 and 64), in rounds of
alternating blocks (the order rotates every round) to:

  - direct: the `sim-a` double itself (the ceiling of one backend),
  - 1 backend: the gateway, model `sim-one`,
  - 2 backends: the gateway, model `sim`;

throughput (req/s, median over blocks), latency p50/p95, the ratio 2 backends / 1 backend (target >= 1.8x), how
the gateway split model `sim`'s calls between sim-a and sim-b (the doubles' counters), and the gateway's CPU.

The gateway runs as its own process (`tests.gateway_factory.GatewayProcess`: uvicorn with a factory that builds
the app from a registry file, where `first.asgi:app` reads its registry from Prefect or uses the embedded default),
with FIRST_FLOW_TRACKING=off and no Prefect, so the load generator's CPU does not share its GIL. The doubles run
in threads of this process, beside the load generator: they only sleep and write JSON.

It prints a table and writes (or replaces) its own section of docs/benchmarks.md.

    make bench-federation                             # = .venv/bin/python bench/federation.py (about 3 minutes)
    .venv/bin/python bench/federation.py --quick      # a smoke run; leaves docs/ alone unless --out is given
"""

from __future__ import annotations

import argparse
import asyncio
import functools
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
from rich.table import Table

from bench.common import (
    BenchError,
    add_output_args,
    console,
    failure_code,
    fmt,
    log,
    machine_line,
    median,
    p95,
    port_free,
    resolve_output,
    stop_group,
    tree_cpu_s,
    write_section,
)
from core.settings import Settings
from first.runner import free_port
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess, http_registry_yaml

BEGIN = "<!-- bench/federation.py: begin (generated; rerun the script to replace this section) -->"
END = "<!-- bench/federation.py: end -->"
TARGETS = ("direct", "one", "two")
LABEL = {"direct": "sim-a directly", "one": "gateway, 1 backend", "two": "gateway, 2 backends"}
MODEL = {"direct": "sim", "one": "sim-one", "two": "sim"}
SIMS = ("sim-a", "sim-b")
CLIENT_TIMEOUT_S = 120.0


@functools.cache
def routing_cost_section() -> str:
    """The routing decision per request, in process: ``select_cluster`` (access and maintenance checks, the live
    instances, ``serving.routing.rank``) for a model on 1, 3 and 8 hot clusters with some load, and ``rank``
    alone. Median of 7 repeats of 20,000 decisions; the target is under 50 µs. Markdown, also printed."""
    from blocks.registry import ClusterSpec, ModelSpec, Registry
    from core.settings import Settings
    from serving.auth import Principal
    from serving.live_state import LiveState
    from serving.pipeline import InferenceRequest, Outcome, Services, select_cluster
    from serving.protocol import ChatCompletionRequest
    from serving.replicas.limits import Admission

    def measure(n_clusters: int) -> tuple[float, float]:
        names = [f"c{i}" for i in range(n_clusters)]
        clusters = {c: ClusterSpec(name=c, transport="http", base_url="http://-") for c in names}
        model = ModelSpec(name="m", path="-", clusters=list(clusters))
        reg = Registry(clusters=clusters, models={"m": model})
        settings = Settings(home=Path(tempfile.gettempdir()) / "first-bench-routing")
        live = LiveState(None, settings)  # type: ignore[arg-type]  # no backend is called: every instance is hot
        for i, c in enumerate(clusters.values()):
            inst = live.instance(c, model)
            inst.state, inst.inflight, inst.last_used = "hot", i % 4, time.time() - i
        svc = Services(settings=settings, registry=reg, live=live, backends=None, spool=None, limiter=Admission())  # type: ignore[arg-type]
        body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
        req = InferenceRequest("r", "chat.completions", "/v1/chat/completions", body, Principal("u"))
        out = Outcome(model="m")
        insts = live.all()
        n = 20_000

        async def decide() -> float:
            t = time.perf_counter()
            for _ in range(n):
                await select_cluster.fn(req, model, svc, out)
            return (time.perf_counter() - t) / n * 1e6

        def rank_only() -> float:
            t = time.perf_counter()
            for _ in range(n):
                live.route(insts)
            return (time.perf_counter() - t) / n * 1e6

        full = statistics.median([asyncio.run(decide()) for _ in range(7)])
        alone = statistics.median([rank_only() for _ in range(7)])
        return full, alone

    rows = [(k, *measure(k)) for k in (1, 3, 8)]
    lines = [
        "### The routing decision",
        "",
        "In process, per request (median of 7 × 20,000 decisions; every instance hot, with unequal load). Target:",
        "under 50 µs.",
        "",
        "| clusters serving the model | `select_cluster` (checks + rank) | `rank` alone |",
        "|---|---|---|",
        *(f"| {k} | {full:.1f} µs | {alone:.1f} µs |" for k, full, alone in rows),
    ]
    return "\n".join(lines)


# ---- the gateway (its own process) ----


def gateway_cpu_s(gw: GatewayProcess) -> float:
    return tree_cpu_s(gw.proc.pid) if gw.proc else float("nan")


# ---- load ----


@dataclass
class Block:
    target: str
    concurrency: int
    ok: int
    seconds: float
    latencies_ms: list[float]
    errors: list[str]
    served: dict[str, int]  # calls each double completed during the block
    gateway_cpu_s: float
    own_cpu_s: float  # this process: the load generator and the doubles

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else float("nan")


@dataclass
class Client:
    target: str
    http: httpx.AsyncClient
    body: dict[str, Any]
    misrouted: int = 0  # answers from a double the target must not reach
    short: int = 0  # answers with fewer completion tokens than asked for
    errors: list[str] = field(default_factory=list)


async def call(c: Client, max_tokens: int) -> float:
    t0 = time.perf_counter()
    r = await c.http.post("/chat/completions", json=c.body)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise BenchError(f"HTTP {r.status_code}: {r.text[:200]}")
    doc = r.json()
    if c.target != "two" and doc.get("system_fingerprint") != SIMS[0]:
        c.misrouted += 1
    if (doc.get("usage") or {}).get("completion_tokens") != max_tokens:
        c.short += 1
    return ms


async def burst(c: Client, n: int, concurrency: int, max_tokens: int) -> tuple[float, list[float], list[str]]:
    """``n`` calls, ``concurrency`` at a time; returns (seconds, latencies of the successes, errors)."""
    left = n
    latencies: list[float] = []
    errors: list[str] = []

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                latencies.append(await call(c, max_tokens))
            except (BenchError, httpx.HTTPError, ValueError) as exc:
                errors.append((f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))[:300])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies, errors


async def measure(
    args: argparse.Namespace, sims: dict[str, OpenAISimulatorDouble], gw: GatewayProcess, key: str
) -> list:
    limits = httpx.Limits(max_connections=max(args.concurrency), max_keepalive_connections=max(args.concurrency))
    timeout = httpx.Timeout(CLIENT_TIMEOUT_S, connect=10.0)
    clients = {}
    for t in TARGETS:
        base = sims[SIMS[0]].base_url if t == "direct" else gw.url
        headers = {} if t == "direct" else {"Authorization": f"Bearer {key}"}
        http = httpx.AsyncClient(base_url=base + "/v1", headers=headers, timeout=timeout, limits=limits)
        body = {"model": MODEL[t], "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": "Which cluster answers this?"}]}  # fmt: skip
        clients[t] = Client(t, http, body)
    blocks: list[Block] = []
    try:
        for c in clients.values():  # connections, and the gateway's first /health of each backend
            _, _, errors = await burst(c, args.warmup, min(args.warmup, 8), args.max_tokens)
            if errors:
                raise BenchError(f"warm-up calls to {LABEL[c.target]} failed: {errors[0]}")
            c.misrouted = c.short = 0
        for conc in args.concurrency:
            n = args.block_factor * conc
            for r in range(args.rounds):
                order = TARGETS[r % 3 :] + TARGETS[: r % 3]
                for t in order:
                    served0 = {name: s.served for name, s in sims.items()}
                    cpu0, own0 = gateway_cpu_s(gw), time.process_time()
                    seconds, lat, errors = await burst(clients[t], n, conc, args.max_tokens)
                    cpu = gateway_cpu_s(gw) - cpu0 if t != "direct" else float("nan")
                    own = time.process_time() - own0
                    served = {name: s.served - served0[name] for name, s in sims.items()}
                    blocks.append(Block(t, conc, len(lat), seconds, lat, errors, served, cpu, own))
                rps = {b.target: b.rps for b in blocks[-3:]}
                log(f"  c={conc} round {r + 1}/{args.rounds}: " + ", ".join(f"{LABEL[t]} {rps[t]:.1f}" for t in TARGETS)
                    + " req/s")  # fmt: skip
    finally:
        for c in clients.values():
            await c.http.aclose()
    args.client_checks = {t: (c.misrouted, c.short) for t, c in clients.items()}
    return blocks


# ---- results ----


@dataclass
class Point:
    target: str
    concurrency: int
    blocks: list[Block]

    @property
    def rps(self) -> float:
        return median([b.rps for b in self.blocks])

    @property
    def latencies(self) -> list[float]:
        return [x for b in self.blocks for x in b.latencies_ms]

    @property
    def errors(self) -> list[str]:
        return [e for b in self.blocks for e in b.errors]

    def served(self, name: str) -> int:
        return sum(b.served[name] for b in self.blocks)

    @property
    def split(self) -> str:
        total = sum(self.served(n) for n in SIMS) or 1
        return " / ".join(f"{100 * self.served(n) / total:.0f}%" for n in SIMS)

    @property
    def gw_cpu(self) -> tuple[float, float]:
        """The gateway's CPU: ms per call, and % of one core over the blocks."""
        cpu, ok, secs = (sum(getattr(b, a) for b in self.blocks) for a in ("gateway_cpu_s", "ok", "seconds"))
        return (1000 * cpu / ok if ok else float("nan")), (100 * cpu / secs if secs else float("nan"))


def points(blocks: list[Block], args: argparse.Namespace) -> dict[tuple[int, str], Point]:
    return {(c, t): Point(t, c, [b for b in blocks if b.target == t and b.concurrency == c])
            for c in args.concurrency for t in TARGETS}  # fmt: skip


def ratio(pts: dict[tuple[int, str], Point], c: int) -> float:
    return pts[c, "two"].rps / pts[c, "one"].rps if pts[c, "one"].rps else float("nan")


def rows(pts: dict[tuple[int, str], Point], args: argparse.Namespace) -> list[list[str]]:
    out = []
    for c in args.concurrency:
        for t in TARGETS:
            p = pts[c, t]
            ms, pct = p.gw_cpu
            out.append([
                str(c), LABEL[t], fmt(p.rps), f"{fmt(median(p.latencies), '.0f')} / {fmt(p95(p.latencies), '.0f')}",
                f"{fmt(ratio(pts, c), '.2f')}x" if t == "two" else "", p.split,
                "–" if t == "direct" else f"{fmt(ms, '.2f')} / {fmt(pct, '.0f')}%", str(len(p.errors)),
            ])  # fmt: skip
    return out


COLUMNS = ("c", "target", "req/s (median)", "latency p50 / p95 (ms)", "2 / 1 backend", "served sim-a / sim-b",
           "gateway CPU ms/call / % core", "failed")  # fmt: skip


def print_table(pts: dict[tuple[int, str], Point], args: argparse.Namespace) -> None:
    table = Table(title=f"Federation: 2 backends vs 1 ({args.capacity} x {args.latency_s * 1000:g} ms each)")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "target" else "right")
    for row in rows(pts, args):
        if row[4]:
            ok = ratio(pts, int(row[0])) >= args.target_ratio
            row[4] = f"[{'green' if ok else 'red'}]{row[4]}[/]"
        table.add_row(*row)
    console.print(table)
    console.print(f"Target: 2 backends ≥ {args.target_ratio:g}x the throughput of 1 at every concurrency.")


def notes(pts: dict[tuple[int, str], Point], args: argparse.Namespace) -> list[str]:
    out = []
    for (c, t), p in pts.items():
        if p.errors:
            out.append(f"c={c} {LABEL[t]}: {len(p.errors)} failed calls; first: {p.errors[0]}")
        if t != "two" and p.served(SIMS[1]):
            out.append(f"c={c} {LABEL[t]}: sim-b served {p.served(SIMS[1])} calls during these blocks (expected 0)")
        if t == "two" and min(p.served(n) for n in SIMS) < 0.25 * sum(p.served(n) for n in SIMS):
            out.append(f"c={c}: the gateway did not spread model `sim` over its two clusters (sim-a / sim-b {p.split})")
        rps = [b.rps for b in p.blocks]
        if len(rps) > 1 and max(rps) > 1.25 * min(rps):
            out.append(f"c={c} {LABEL[t]}: req/s per block ranged {min(rps):.1f}-{max(rps):.1f}")
    own = [b for p in pts.values() for b in p.blocks]
    share = 100 * sum(b.own_cpu_s for b in own) / sum(b.seconds for b in own)
    out.append(f"this process (the load generator and the doubles) used {share:.0f}% of a core over the blocks")
    for t, (misrouted, short) in args.client_checks.items():
        if misrouted:
            out.append(f"{LABEL[t]}: {misrouted} answers came from a double other than sim-a")
        if short:
            out.append(f"{LABEL[t]}: {short} answers had fewer than max_tokens completion tokens")
    return out


def markdown(pts: dict[tuple[int, str], Point], args: argparse.Namespace, started: datetime, wall_s: float) -> str:
    checks = [
        f"- c={c}: 2 backends {fmt(ratio(pts, c), '.2f')}x the throughput of 1 "
        f"({'met' if ratio(pts, c) >= args.target_ratio else 'not met'}; target ≥ {args.target_ratio:g}x)"
        for c in args.concurrency
    ]
    extra = notes(pts, args)
    lines = [
        BEGIN,
        "## Federation: two backends against one (`bench/federation.py`)",
        "",
        machine_line(
            started, wall_s, quick=args.quick, rerun="`make bench-federation` or `.venv/bin/python bench/federation.py`"
        ),
        "",
        "Method: two `OpenAISimulatorDouble` backends (`tests/fakes/openai_simulator.py`), each processing at most "
        f"{args.capacity} requests at a time for {args.latency_s * 1000:g} ms each (the rest wait in line; about "
        f"{args.capacity / args.latency_s:.0f} req/s per backend), are direct-HTTP clusters `sim-a` and `sim-b`. "
        "One gateway process (uvicorn, `FIRST_FLOW_TRACKING=off`) serves model `sim` on both and `sim-one` on "
        f"`sim-a` only. Non-streaming chat completions (max_tokens={args.max_tokens}) go in {args.rounds} round(s) "
        f"of blocks of {args.block_factor} x c calls at concurrency c, to `sim-a` directly, to `sim-one` and to "
        "`sim` through the gateway (the order rotates every round); req/s is the median over blocks, latencies are "
        "over all calls. The served split counts what each double completed during the blocks. The gateway's CPU "
        "is its process's (`/proc`) over the blocks. The load generator (asyncio, one `httpx.AsyncClient` per "
        "target) and the doubles share this script's process; the gateway has its own.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(r) + " |" for r in rows(pts, args)),
        "",
        *checks,
    ]
    if extra:
        lines += ["", "Notes from this run:", "", *(f"- {n}" for n in extra)]
    routing = routing_cost_section().strip("\n")
    if routing:
        lines += ["", routing]
    lines.append(END)
    return "\n".join(lines) + "\n"


# ---- main ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_output_args(ap, "fewer calls (a smoke run)")
    ap.add_argument("--latency-s", type=float, default=0.1, help="each double's service time (default 0.1)")
    ap.add_argument("--capacity", type=int, default=4, help="each double's concurrent requests (default 4)")
    ap.add_argument("--concurrency", default="16,64", help="comma-separated client concurrencies (default 16,64)")
    ap.add_argument("--rounds", type=int, help="rounds of blocks per concurrency (default 5; quick 1)")
    # Shorter blocks understate 2 backends: the last calls of a block leave slots idle, a larger share of a short block.
    ap.add_argument("--block-factor", type=int, help="calls per block = this x concurrency (default 6; quick 5)")
    ap.add_argument("--max-tokens", type=int, default=16, help="completion tokens per call (default 16)")
    ap.add_argument("--warmup", type=int, default=8, help="warm-up calls per target (default 8)")
    ap.add_argument("--port", type=int, help="the gateway's port (default: a free one)")
    ap.add_argument("--target-ratio", type=float, default=1.8, help="target for 2 / 1 backend req/s (default 1.8)")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.block_factor is None:
        args.block_factor = 5 if args.quick else 6
    if min(args.capacity, args.rounds, args.block_factor, args.max_tokens, args.warmup, *args.concurrency) < 1:
        ap.error("counts must be at least 1")
    resolve_output(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = args.port or free_port()
    if not port_free(port):
        console.print(f"[red]port {port} is in use[/red] (choose another with --port)")
        return 2
    home = Path(tempfile.mkdtemp(prefix="first-bench-federation-"))
    started, t0 = datetime.now(UTC), time.monotonic()
    sims = {name: OpenAISimulatorDouble(args.latency_s, args.capacity, name=name) for name in SIMS}
    registry = home / "registry.yaml"
    gw = GatewayProcess(home, registry, port)
    blocks: list[Block] = []
    code = 0
    try:
        for s in sims.values():
            s.start()
        urls = {name: s.base_url for name, s in sims.items()}
        registry.write_text(http_registry_yaml(urls, {"sim": list(SIMS), "sim-one": [SIMS[0]]}))
        from serving.auth import KeyStore

        key = KeyStore(Settings(home=home).keys_db).create("bench")[0]
        log(f"doubles {', '.join(f'{n} {s.base_url}' for n, s in sims.items())}; starting the gateway on :{port}")
        try:
            gw.start()
        except RuntimeError as exc:
            raise BenchError(str(exc)) from exc
        blocks = asyncio.run(measure(args, sims, gw, key))
    except (KeyboardInterrupt, Exception) as exc:
        code = failure_code(exc)
    finally:
        if gw.proc is not None:
            stop_group(gw.proc, "gateway")
        for s in sims.values():
            s.stop()
    wall_s = time.monotonic() - t0
    if blocks:
        pts = points(blocks, args)
        print_table(pts, args)
        for n in notes(pts, args):
            console.print(f"[yellow]note:[/yellow] {n}")
        routing = routing_cost_section()
        if routing:
            console.print(routing)
        if args.write and code == 0:
            write_section(args.out, markdown(pts, args, started, wall_s), BEGIN, END)
            log(f"wrote the section in {args.out}")
        elif not args.write:
            log(f"--quick: {args.out} left alone (give --out to write it)")
        if any(p.errors for p in pts.values()):
            code = code or 1
    log(f"total run time {wall_s / 60:.1f} min")
    if code == 0:
        shutil.rmtree(home, ignore_errors=True)
    else:
        log(f"the state folder and the gateway's log are kept: {home}")
    return code


if __name__ == "__main__":
    sys.exit(main())
