"""What the gateway's own request path costs, in process: the framework, guard, routing and error path, with
no network and no model server in the way.

Each round starts a fresh process that builds the gateway (auth mode local, flow tracking off, one direct-HTTP
cluster that nothing answers), runs its lifespan, and drives the ASGI app directly: 300 warm-up calls, then
9 timed blocks of 500 calls of each kind, and reports the median µs per call of each kind:

  models   GET /v1/models                  (guard, dependency injection, visibility, JSON)
  chat404  POST /v1/chat/completions       (guard, validation, pipeline: authorize -> 404, usage row)

With ``--against PATH`` (another checkout of FIRST, e.g. a `git worktree` of an older commit), rounds alternate
between this tree and that one, so both see the same machine state; the section gives both and their ratio.

    .venv/bin/python bench/request_path.py --against /tmp/before     # writes its section of docs/benchmarks.md
    .venv/bin/python bench/request_path.py --quick                   # a smoke run; docs/ left alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* is not installed

from bench.common import (
    REPO,
    add_output_args,
    failure_code,
    git,
    log,
    machine_line,
    median,
    resolve_output,
    write_section,
)

BEGIN = "<!-- bench/request_path.py: begin (generated; rerun the script to replace this section) -->"
END = "<!-- bench/request_path.py: end -->"
KINDS = ("models", "chat404")


def serve(blocks: int, calls: int) -> None:
    """In the measured tree (cwd): build the app with that tree's own modules and time it."""
    import asyncio
    import statistics
    import tempfile

    sys.path.insert(0, os.getcwd())
    from blocks.registry import ClusterSpec, ModelSpec, Registry

    if (Path.cwd() / "core").is_dir():  # the layout of issue 12 and later
        from core.settings import FlowTracking, Settings
        from first.gateway import create_gateway as make
        from serving.auth import KeyStore
    else:  # the layout before it
        from api.auth import KeyStore  # type: ignore[no-redef]
        from first.settings import FlowTracking, Settings  # type: ignore[no-redef]

        from api.app import create_app as make  # type: ignore[no-redef]

    async def main() -> dict[str, float]:
        s = Settings(home=Path(tempfile.mkdtemp(prefix="first-bench-path-")), flow_tracking=FlowTracking.off)
        reg = Registry(
            clusters={"c": ClusterSpec(name="c", transport="http", base_url="http://127.0.0.1:9")},
            models={"m": ModelSpec(name="m", clusters=["c"], path="-")},
        )
        auth = f"Bearer {KeyStore(s.keys_db).create('bench')[0]}".encode()
        app = make(s, reg)
        lifespan: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        await lifespan.put({"type": "lifespan.startup"})
        started = asyncio.Event()

        async def lifespan_send(m: dict[str, str]) -> None:
            if m["type"] == "lifespan.startup.complete":
                started.set()

        life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, lifespan.get,
                                       lifespan_send))  # fmt: skip
        await started.wait()
        chat = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode()

        async def call(kind: str) -> None:
            method, path, body = (
                ("GET", "/v1/models", b"") if kind == "models" else ("POST", "/v1/chat/completions", chat)
            )
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "state": {},
                "headers": [(b"host", b"bench"), (b"authorization", auth), (b"content-type", b"application/json")],
                "client": ("127.0.0.1", 1), "server": ("bench", 80),
            }  # fmt: skip

            async def receive() -> dict[str, object]:
                return {"type": "http.request", "body": body, "more_body": False}

            status: list[int] = []

            async def send(m: dict[str, object]) -> None:
                if m["type"] == "http.response.start":
                    status.append(int(m["status"]))  # type: ignore[call-overload]

            await app(scope, receive, send)
            want = 200 if kind == "models" else 404
            if status != [want]:
                raise RuntimeError(f"{kind}: status {status}, expected {want}")

        result = {}
        for kind in KINDS:
            for _ in range(300):
                await call(kind)
            per_block = []
            for _ in range(blocks):
                t0 = time.perf_counter()
                for _ in range(calls):
                    await call(kind)
                per_block.append((time.perf_counter() - t0) / calls * 1e6)
            result[kind] = statistics.median(per_block)
        life.cancel()
        return result

    print(json.dumps(asyncio.run(main())))


def one_round(tree: Path, blocks: int, calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--serve", "--blocks", str(blocks), "--calls", str(calls)],
        cwd=tree, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"the round in {tree} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(
    args: argparse.Namespace, rows: dict[str, dict[str, list[float]]], started: datetime, wall_s: float
) -> str:
    trees = list(rows)
    head = "| call | " + " | ".join(f"{t} (µs, median of {len(rows[t]['models'])} rounds)" for t in trees)
    head += " | ratio |" if len(trees) == 2 else " |"
    lines = [head, "|---" * (len(trees) + 1 + (len(trees) == 2)) + "|"]
    for kind in KINDS:
        meds = [median(rows[t][kind]) for t in trees]
        ratio = f" {meds[0] / meds[1]:.2f}x |" if len(meds) == 2 else ""
        lines.append(f"| `{kind}` | " + " | ".join(f"{m:.0f}" for m in meds) + " |" + ratio)
    per_round = [
        f"- {t}: " + "; ".join(f"{k} " + ", ".join(f"{v:.0f}" for v in rows[t][k]) for k in KINDS) for t in trees
    ]
    rerun = "`.venv/bin/python bench/request_path.py --against PATH`"
    method = (
        "Method: each round is a fresh process that builds the gateway (auth mode local, flow tracking off, one "
        "direct-HTTP cluster that nothing answers), runs its lifespan and drives the ASGI app directly, no network: "
        f"300 warm-up calls, then {args.blocks} timed blocks of {args.calls} calls of each kind; a round's number is "
        "the median block. `models` is GET /v1/models (guard, dependency injection, visibility, JSON); `chat404` is "
        "POST /v1/chat/completions for an unknown model (guard, validation, the pipeline's authorize step, its "
        f"usage row, the error). {args.rounds} rounds per tree, alternating; each tree's number is the median of its "
        "rounds. Ratio: first column over the second."
    )
    return (
        "\n".join(
            [
                BEGIN,
                "## The gateway's own request path, in process (`bench/request_path.py`)",
                "",
                machine_line(started, wall_s, quick=args.quick, rerun=rerun),
                "",
                method,
                "",
                *lines,
                "",
                "Per round (µs per call):",
                "",
                *per_round,
                END,
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_output_args(ap)
    ap.add_argument("--against", type=Path, help="another checkout of FIRST to measure in alternating rounds")
    ap.add_argument("--rounds", type=int, help="rounds per tree (default 5; quick 1)")
    ap.add_argument("--blocks", type=int, default=9, help="timed blocks per kind and round (default 9)")
    ap.add_argument("--calls", type=int, default=500, help="calls per block (default 500)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.blocks, args.calls)
        return 0
    args.rounds = args.rounds or (1 if args.quick else 5)
    resolve_output(args)
    started, t0 = datetime.now(UTC), time.monotonic()
    here = f"this tree ({git('rev-parse', '--short', 'HEAD')})"
    trees = {here: REPO}
    if args.against is not None:
        other = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.against, capture_output=True,
                               text=True).stdout.strip() or "?"  # fmt: skip
        trees[f"{args.against} ({other})"] = args.against.resolve()
    rows: dict[str, dict[str, list[float]]] = {t: {k: [] for k in KINDS} for t in trees}
    try:
        for r in range(args.rounds):
            for name, tree in trees.items() if r % 2 == 0 else reversed(trees.items()):
                got = one_round(tree, args.blocks, args.calls)
                for k in KINDS:
                    rows[name][k].append(got[k])
                log(f"round {r + 1}, {name}: " + ", ".join(f"{k} {got[k]:.0f} µs" for k in KINDS))
    except (KeyboardInterrupt, Exception) as exc:
        return failure_code(exc)
    wall_s = time.monotonic() - t0
    section = markdown(args, rows, started, wall_s)
    print(section)
    if args.write:
        write_section(args.out, section, BEGIN, END)
        log(f"wrote the section in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
