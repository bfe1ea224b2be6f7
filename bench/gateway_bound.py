"""What the gateway itself costs a request, when the model server answers at once (issue 18).

An instant stand-in OpenAI server (``OpenAISimulatorDouble``, latency 0) is the backend. In front of it, side by side
in one run, rounds alternating between them:

  direct       the stand-in alone (the floor every other column is measured against);
  first        FIRST's default gateway (flow tracking ``sample`` with a real Prefect server), one worker process,
               the stand-in reached through an ``http`` cluster;
  first-2w     the same with two worker processes (``FIRST_WORKERS=2``);
  litellm      LiteLLM's proxy (one worker, no database) in front of the same stand-in, when ``--litellm`` names
               its ``litellm`` executable (``make bench-gateway`` installs it in ``.venv-litellm``).

Each round and target: ``--n`` non-streamed chat calls one after another (latency; added median and p99 over the
direct column), ``--window-s`` seconds at concurrency 16 and 64 (requests/s), and ``--n-streams`` streams of 8
chunks one after another (streams/s). The gateway's CPU (its process and children, from /proc) per request and per
stream comes from the same blocks. The load generator (aiohttp, a process of its own) sends identical bodies.

    make bench-gateway                                   # = .venv/bin/python bench/gateway_bound.py --litellm ...
    .venv/bin/python bench/gateway_bound.py --quick      # a smoke run; docs/ left alone unless --out is given
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* and tests.* are not installed

import yaml

from bench.common import (
    BIN,
    REPO,
    BenchError,
    add_output_args,
    fmt,
    log,
    machine_line,
    measure_and_write,
    resolve_output,
    serve_stand_in,
    stop_group,
    tree_cpu_s,
)
from core.settings import Settings, prefect_env
from first.runner import free_port, wait_http
from serving.auth import KeyStore
from tests.gateway_factory import GatewayProcess, stand_in_instance
from tests.services import RedisServer

SECTION = ("<!-- bench/gateway_bound.py: begin (generated; rerun the script to replace this section) -->",
           "<!-- bench/gateway_bound.py: end -->")  # fmt: skip
BODY = {"model": "m", "messages": [{"role": "user", "content": "How far is the moon?"}], "max_tokens": 8}
STREAM_BODY = {**BODY, "stream": True}
CONCURRENCY = (16, 64)


# ---- the load generator (a process of its own: its CPU is not the gateway's) ----


async def _one(session: Any, url: str, body: bytes, stream: bool) -> bool:
    async with session.post(url, data=body) as r:
        if r.status != 200:
            await r.read()
            return False
        if not stream:
            await r.read()
            return True
        done = False
        async for line in r.content:
            done = done or line.startswith(b"data: [DONE]")
        return done


async def _block(
    target: dict[str, Any], kind: str, n: int, window_s: float, one_by_one_s: float | None = None
) -> dict[str, Any]:
    """One block against one target; its latencies, rate, errors and the target's CPU over the block."""
    import aiohttp

    stream = kind == "stream"
    concurrency = int(kind[1:]) if kind.startswith("c") else 1
    url = target["url"] + "/v1/chat/completions"
    body = json.dumps({**(STREAM_BODY if stream else BODY), "model": target["model"]}).encode()
    headers = {"Content-Type": "application/json", **target["headers"]}
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    lat: list[float] = []
    errors = done = 0
    async with aiohttp.ClientSession(connector=conn, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as s:
        for _ in range(min(10, n)):  # warm the connections
            await _one(s, url, body, stream)
        cpu0, t0 = tree_cpu_s(target["pid"]), time.perf_counter()
        stop = t0 + window_s
        cut = t0 + one_by_one_s if one_by_one_s else float("inf")  # calls one after another: a count, or a time

        def more(count: int | None) -> bool:
            if count is None:
                return time.perf_counter() < stop
            return done + errors < count and time.perf_counter() < cut

        async def worker(count: int | None) -> None:
            nonlocal errors, done
            while more(count):
                start = time.perf_counter()
                try:
                    ok = await _one(s, url, body, stream)
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                lat.append((time.perf_counter() - start) * 1000)
                done, errors = done + ok, errors + (not ok)

        if concurrency == 1:
            await worker(n)
        else:
            await asyncio.gather(*(worker(None) for _ in range(concurrency)))
        took = time.perf_counter() - t0
        cpu = tree_cpu_s(target["pid"]) - cpu0
    return {"lat": lat, "rate": done / took, "errors": errors, "cpu_ms": cpu * 1000 / max(done + errors, 1)}


def load_main(plan_path: str) -> None:
    """``_load PLAN``: run the plan (rounds x targets x blocks) and print one JSON line of results."""
    plan = json.loads(Path(plan_path).read_text())
    out: dict[str, dict[str, list[Any]]] = {t["name"]: {} for t in plan["targets"]}
    targets = plan["targets"]
    kinds = plan.get("kinds") or ["c1", *(f"c{c}" for c in CONCURRENCY), "stream"]
    for r in range(plan["rounds"]):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]  # who goes first rotates
        for kind in kinds:
            for t in order:
                n = plan["n_streams"] if kind == "stream" else plan["n"]
                res = asyncio.run(_block(t, kind, n, plan["window_s"], plan.get("one_by_one_s")))
                out[t["name"]].setdefault(kind, []).append(res)
                print(f"round {r + 1} {kind:6} {t['name']:9} {res['rate']:8.1f}/s  errors {res['errors']}",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(json.dumps(out))


# ---- the processes ----


def _wait(url: str, timeout_s: float, proc: subprocess.Popen, what: str, log_path: Path) -> None:
    """first.runner.wait_http, as a BenchError that names the log to read."""
    try:
        wait_http(url, timeout_s, proc, what)
    except RuntimeError as exc:
        raise BenchError(f"{exc}; see {log_path}") from None


def start_prefect(home: Path, env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=open(home / "prefect.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    _wait(f"http://127.0.0.1:{port}/api/health", 120, proc, "the Prefect server", home / "prefect.log")
    return proc


def start_other_tree(tree: Path, tmp: Path, sim_url: str, sim_port: int, env: dict[str, str]) -> subprocess.Popen:
    """A gateway built from another checkout's modules (its own tests/gateway_factory.py and registry schema), on
    the same Prefect server, keys and stand-in; its usage spool is a folder of its own (FIRST_REPLICA=before)."""
    registry = tmp / "registry-before.yaml"
    registry.write_text(yaml.safe_dump({
        "clusters": [{"name": "sim", "transport": "http", "base_url": sim_url, "max_concurrency": 1024},
                     {"name": "endpoint", "transport": "local", "max_concurrency": 1024}],
        "models": [{"name": "m", "clusters": ["sim"], "path": "-"},
                   {"name": "m-endpoint", "clusters": ["endpoint"], "path": "-", "port": sim_port}],
    }))  # fmt: skip
    port = free_port()
    child = {**env, "PYTHONPATH": str(tree), "FIRST_TEST_REGISTRY": str(registry), "FIRST_PORT": str(port),
             "FIRST_HOST": "127.0.0.1", "FIRST_REPLICA": "before"}  # fmt: skip
    cmd = [str(BIN / "python"), "-m", "uvicorn", "tests.gateway_factory:gateway_app", "--factory", "--host",
           "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning", "--timeout-keep-alive",
           "75", "--http", "first.http_protocol:Guarded"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tree, env=child, stdout=open(tmp / "gateway-before.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    _wait(f"http://127.0.0.1:{port}/health", 120, proc, "the --against gateway", tmp / "gateway-before.log")
    return proc


def start_litellm(exe: str, sim_url: str, tmp: Path) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    config = tmp / "litellm.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "m", "litellm_params": {
        "model": "openai/m", "api_base": sim_url + "/v1", "api_key": "none"}}]}))  # fmt: skip
    master = "sk-" + secrets.token_hex(32)  # LiteLLM checks it on every request, as FIRST checks its keys
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "LITELLM_MASTER_KEY": master}
    proc = subprocess.Popen([exe, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", "1"], env=env, stdout=open(tmp / "litellm.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/health/liveliness", 180, proc, "LiteLLM", tmp / "litellm.log")
    return proc, url, master


def measure(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="first-bench-gateway-"))
    home = tmp / "home"
    home.mkdir()
    procs: list[tuple[subprocess.Popen, str]] = []
    gateways: list[GatewayProcess] = []
    cleanups: list[Any] = []
    try:
        sim = subprocess.Popen([sys.executable, __file__, "_sim"], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
        procs.append((sim, "stand-in"))
        sim_url = sim.stdout.readline().strip()  # type: ignore[union-attr]
        registry = tmp / "registry.yaml"
        sim_port = int(sim_url.rsplit(":", 1)[1])
        # m: the stand-in as an http cluster. m-endpoint: the same stand-in as a model "running" on a local cluster
        # (the Globus Compute-shaped path: a task through the local endpoint process per request, streams through
        # the relay). m-direct: the same local cluster with direct_host, the direct data path.
        registry.write_text(yaml.safe_dump({
            "clusters": [
                {"name": "sim", "transport": "http", "base_url": sim_url, "max_concurrency": 1024},
                {"name": "endpoint", "transport": "local", "max_concurrency": 1024},
                {"name": "direct", "transport": "local", "max_concurrency": 1024, "direct_host": "127.0.0.1",
                 "direct_scheme": "http"},
            ],
            "models": [{"name": "m", "clusters": ["sim"], "path": "-"},
                       {"name": "m-endpoint", "clusters": ["endpoint"], "path": "-", "port": sim_port},
                       {"name": "m-direct", "clusters": ["direct"], "path": "-", "port": sim_port}],
        }))  # fmt: skip
        for cluster, model in (("endpoint", "m-endpoint"), ("direct", "m-direct")):
            ctx = stand_in_instance(home, cluster, model, sim_url, sim_port)
            ctx.__enter__()
            cleanups.append(lambda c=ctx: c.__exit__(None, None, None))
        prefect_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FIRST_", "PREFECT_"))}
        env.update(prefect_env(Settings(home=home), prefect_port))
        env["FIRST_FLOW_TRACKING"] = args.flow_tracking
        env["FIRST_MAX_INFLIGHT_PER_CALLER"] = "1024"  # one caller sends all of the load: its cap (64) is not measured
        log(f"starting the Prefect server (port {prefect_port})…")
        procs.append((start_prefect(home, env, prefect_port), "Prefect server"))
        key = KeyStore(Settings(home=home).keys_db).create("bench")[0]
        auth = {"Authorization": f"Bearer {key}"}
        targets = [{"name": "direct", "url": sim_url, "headers": {}, "pid": sim.pid, "model": "m"}]
        redis: RedisServer | None = None
        for name, workers, shared in (("first", 1, False), ("first-redis", 1, True), ("first-2w", 2, True)):
            if workers > args.max_workers or (shared and workers == 1 and args.max_workers < 2):
                continue
            extra = {"FIRST_WORKERS": str(workers)}
            if shared:  # several workers share their state through Redis (FIRST_REDIS_URL), as replicas do
                if redis is None:
                    redis = RedisServer(tmp / "redis").start()
                    cleanups.append(redis.stop)
                extra.update(FIRST_REDIS_URL=redis.url, FIRST_REDIS_PREFIX=f"first-{name}")
            gw = GatewayProcess(home, registry, base_env=env, env=extra).start(120)
            gateways.append(gw)
            assert gw.proc is not None
            targets.append({"name": name, "url": gw.url, "headers": auth, "pid": gw.proc.pid, "model": "m"})
            if name == "first" and args.paths:
                for path in ("endpoint", "direct"):
                    targets.append({"name": f"first-{path}", "url": gw.url, "headers": auth, "pid": gw.proc.pid,
                                    "model": f"m-{path}"})  # fmt: skip
        if args.against:  # the same gateway from another checkout (e.g. before a change), in the same run
            before = start_other_tree(Path(args.against), tmp, sim_url, sim_port, env)
            procs.append((before, "gateway (--against)"))
            url = f"http://127.0.0.1:{before.args[before.args.index('--port') + 1]}"  # type: ignore[union-attr]
            targets.append({"name": "before", "url": url, "headers": auth, "pid": before.pid, "model": "m"})
            if args.paths:
                targets.append({"name": "before-endpoint", "url": url, "headers": auth, "pid": before.pid,
                                "model": "m-endpoint"})  # fmt: skip
        if args.litellm:
            log("starting LiteLLM…")
            proc, url, master = start_litellm(args.litellm, sim_url, tmp)
            procs.append((proc, "LiteLLM"))
            headers = {"Authorization": f"Bearer {master}"}
            targets.append({"name": "litellm", "url": url, "headers": headers, "pid": proc.pid, "model": "m"})
        plan = tmp / "plan.json"
        plan.write_text(json.dumps({"targets": targets, "rounds": args.rounds, "n": args.n,
                                    "n_streams": args.n_streams, "window_s": args.window_s}))  # fmt: skip
        log(f"measuring {', '.join(t['name'] for t in targets)}: {args.rounds} rounds…")
        out = subprocess.run([sys.executable, __file__, "_load", str(plan)], stdout=subprocess.PIPE, text=True,
                             timeout=3600)  # fmt: skip
        if out.returncode != 0:
            raise BenchError("the load generator failed (see above)")
        results = json.loads(out.stdout.strip().splitlines()[-1])
        import importlib.metadata as md

        results["_versions"] = {"litellm": _litellm_version(args.litellm), "aiohttp": md.version("aiohttp")}
        return results
    finally:
        for gw in gateways:
            gw.stop()
        for proc, name in reversed(procs):
            stop_group(proc, name, grace_s=10)
        for cleanup in cleanups:
            cleanup()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")


def _litellm_version(exe: str | None) -> str:
    if not exe:
        return ""
    python = Path(exe).parent / "python"
    r = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                       capture_output=True, text=True)  # fmt: skip
    return r.stdout.strip()


# ---- the report ----


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per target: median and p99 at c=1 (all rounds' calls pooled), median over rounds of each rate and CPU."""
    import statistics

    out: dict[str, dict[str, float]] = {}
    for name, kinds in res.items():
        if name.startswith("_"):
            continue
        lat = [x for block in kinds["c1"] for x in block["lat"]]
        row = {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99),
               "errors": sum(b["errors"] for blocks in kinds.values() for b in blocks)}  # fmt: skip
        for kind, blocks in kinds.items():
            row[f"rate_{kind}"] = statistics.median(b["rate"] for b in blocks)
            row[f"cpu_{kind}"] = statistics.median(b["cpu_ms"] for b in blocks)
        out[name] = row
    return out


def rows_of(d: dict[str, float], conc: tuple[int, ...]) -> list[tuple[str, Any]]:
    """The table's rows: a label and how to read a target's cell (``d``: the stand-in alone)."""
    kinds = ("c1", *(f"c{c}" for c in conc))
    return [
        ("added median latency, non-streamed, c=1", lambda r: f"+{fmt(r['p50'] - d['p50'], '.2f')} ms"),
        ("added p99, non-streamed, c=1", lambda r: f"+{fmt(r['p99'] - d['p99'], '.2f')} ms"),
        (f"requests/s, non-streamed, c=1 / {' / '.join(map(str, conc))}",
         lambda r: " / ".join(fmt(r[f"rate_{k}"], ".0f") for k in kinds)),
        ("streams/s (8 chunks), c=1", lambda r: fmt(r["rate_stream"], ".0f")),
        ("gateway CPU per non-streamed request (c=16)", lambda r: f"{fmt(r['cpu_c16'], '.2f')} ms"),
        ("gateway CPU per 8-chunk stream", lambda r: f"{fmt(r['cpu_stream'], '.2f')} ms"),
        ("errors in the run", lambda r: str(int(r["errors"]))),
    ]  # fmt: skip


def report(args: argparse.Namespace, res: dict[str, Any], started: datetime, wall_s: float) -> str:
    s = summarize(res)
    d = s["direct"]

    def table(columns: dict[str, str]) -> list[str]:
        """Rows of the measures, one column per target that was measured (``name: heading``)."""
        names = [n for n in columns if n in s]
        out = ["| measure | " + " | ".join(columns[n] for n in names) + " |", "|---|" + "---|" * len(names)]
        for label, f in rows_of(d, CONCURRENCY):
            out.append(f"| {label} | " + " | ".join(f(s[n]) for n in names) + " |")
        return out

    lines = [SECTION[0], "## The gateway alone, against an instant backend (`bench/gateway_bound.py`)", "",
             machine_line(started, wall_s, quick=args.quick, rerun="`make bench-gateway`",
                          extra=f"{args.rounds} rounds, aiohttp {res['_versions']['aiohttp']} load generator, "),
             "", f"The stand-in alone: {fmt(d['p50'], '.2f')} ms median, {fmt(d['p99'], '.2f')} ms p99 at c=1; "
             f"{fmt(d['rate_c16'], '.0f')} requests/s at c=16. Flow tracking `{args.flow_tracking}`. Medians over the "
             "rounds; latencies pooled over them.", ""]  # fmt: skip
    lines += table({"litellm": f"LiteLLM {res['_versions']['litellm']}", "first": "FIRST (1 worker)",
                    "first-redis": "FIRST (1 worker, Redis)", "first-2w": "FIRST (2 workers, Redis)"})  # fmt: skip
    if "litellm" in s and "first" in s:
        lit, fir = s["litellm"], s["first"]
        ratios = [f"c={k[1:]}: {fir[f'rate_{k}'] / lit[f'rate_{k}']:.1f}x" for k in ("c1", "c16", "c64")]
        ratios.append(f"streams: {fir['rate_stream'] / lit['rate_stream']:.1f}x")
        lines += ["", f"FIRST (1 worker) against LiteLLM, requests/s: {', '.join(ratios)}; CPU per request "
                  f"{lit['cpu_c16'] / fir['cpu_c16']:.1f}x less."]  # fmt: skip
    if "first-2w" in s and "first" in s:
        two, one = s["first-2w"], s["first"]
        lines.append(f"Two workers against one: {two['rate_c16'] / one['rate_c16']:.2f}x the requests/s at c=16, "
                     f"{two['rate_c64'] / one['rate_c64']:.2f}x at c=64.")  # fmt: skip
        if "first-redis" in s:
            red = s["first-redis"]
            lines.append(f"Redis (what several workers share) costs one worker "
                         f"{red['cpu_c16'] - one['cpu_c16']:.2f} ms of CPU per request and "
                         f"{red['p50'] - one['p50']:.2f} ms at the median, c=1.")  # fmt: skip
    if "first-endpoint" in s or "first-direct" in s:
        lines += ["", "The same gateway (1 worker), the same stand-in, by each path a request can take "
                  "(docs/architecture.md); CPU is the gateway's and its local endpoint process's.", ""]  # fmt: skip
        lines += table({"first": "`http` cluster", "first-endpoint": "local endpoint (Globus Compute-shaped)",
                        "first-direct": "direct data path (`direct_host`)"})  # fmt: skip
        if "first-endpoint" in s:
            e, h = s["first-endpoint"], s["first"]
            lines.append(f"\nThe local endpoint hop adds {fmt(e['p50'] - h['p50'], '.2f')} ms at the median and "
                         f"{fmt(e['p99'] - h['p99'], '.2f')} ms at p99 over the `http` path, at c=1.")  # fmt: skip
    if "before" in s:
        lines += ["", f"Before and after, in this run: the gateway of commit `{args.against_commit}` (`--against`), "
                  "1 worker, beside this one.", ""]  # fmt: skip
        lines += table({"before": "before, `http`", "first": "now, `http`", "before-endpoint": "before, local endpoint",
                        "first-endpoint": "now, local endpoint"})  # fmt: skip
        b, n = s["before"], s["first"]
        lines.append(f"\nNow against before, `http` path: {n['rate_c16'] / b['rate_c16']:.2f}x the requests/s at "
                     f"c=16, {b['cpu_c16'] / n['cpu_c16']:.2f}x less CPU per request.")  # fmt: skip
    lines += ["", SECTION[1]]
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_sim":
        serve_stand_in(0.0, capacity=4096)
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "_load":
        load_main(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds, alternating the targets (default 3)")
    ap.add_argument("--n", type=int, default=400, help="non-streamed calls one after another per block (400)")
    ap.add_argument("--n-streams", type=int, default=150, help="streams one after another per block (150)")
    ap.add_argument("--window-s", type=float, default=6.0, help="seconds per concurrent block (6)")
    ap.add_argument("--max-workers", type=int, default=2, help="also measure FIRST with 2 workers (2) or not (1)")
    ap.add_argument("--flow-tracking", default="sample", choices=("off", "sample", "all"))
    ap.add_argument(
        "--no-paths",
        dest="paths",
        action="store_false",
        help="leave out the local endpoint path and the direct data path (m-endpoint, m-direct)",
    )
    default_litellm = REPO / ".venv-litellm" / "bin" / "litellm"
    ap.add_argument(
        "--litellm",
        default=str(default_litellm) if default_litellm.exists() else None,
        help="LiteLLM's `litellm` executable, measured beside FIRST (default .venv-litellm's, if any)",
    )
    ap.add_argument(
        "--against",
        metavar="PATH",
        help="also measure the gateway of another checkout (e.g. `git "
        "worktree add /tmp/before <commit>`), 1 worker, in the same run",
    )
    ap.add_argument("--keep", action="store_true", help="keep the state folder and logs")
    add_output_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.n, args.n_streams, args.window_s = 1, 100, 40, 2.0
    resolve_output(args)
    if args.against:
        r = subprocess.run(["git", "-C", args.against, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        args.against_commit = r.stdout.strip() or args.against
    return measure_and_write(args, SECTION, measure, report)


if __name__ == "__main__":
    raise SystemExit(main())
