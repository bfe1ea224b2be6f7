"""What an event per inference costs (issue 21): the gateway's CPU per request with events on and off, and the
rate a Prefect server (SQLite, as `make run` starts it) stores without loss.

It starts a Prefect server of its own (its own port and PREFECT_HOME), then:

1. **The gateway's side.** The code a gateway runs per request (``PrefectControlPlane``'s ``observe`` on the
   serving loop, and the events thread that budgets, batches and posts to the server) is driven at a steady
   rate, in blocks alternating events on and off in one run; this process's CPU (all threads) per request is
   the cost. Off, ``observe`` returns at once: the difference is what the events add to a request.
2. **The server's side.** For each rate, events are posted for a while with the budget at that rate (every
   request an event of its own); after the server's write interval its stored count is compared with what was
   posted, and its process tree's CPU is read: stored/posted, and server CPU per event. The sizing rule follows:
   events a second per server core. Then the same against a Prefect server on PostgreSQL (the production
   topology's; the tests' own PostgreSQL server, `tests/services.py`), its database's CPU counted too.

    .venv/bin/python bench/inference_events.py            # about 6 minutes; writes its docs/benchmarks.md section
    .venv/bin/python bench/inference_events.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BIN,
    BenchError,
    add_output_args,
    fmt,
    log,
    machine_line,
    measure_and_write,
    median,
    resolve_output,
    stop_group,
    tree_cpu_s,
)
from first.runner import free_port_block, wait_http
from flows import inference_events
from flows.inference_events import InferenceEvents, Observed

SECTION = ("## What an event per inference costs (`bench/inference_events.py`)", "<!-- end inference events -->")


def observed(n: int) -> Observed:
    return Observed(
        request_id=f"bench{n}", endpoint="chat.completions", model="tiny", cluster="local", user="alice",
        groups=["lab"], status=200, error_type=None, error_code=None, error=None, prompt_tokens=12,
        completion_tokens=32, latency_ms=180.0, ttft_ms=25.0, cold_start=False, tried=["local"], stream=False,
        batch_id=None,
    )  # fmt: skip


def start_prefect(home: Path, database_url: str | None = None) -> tuple[subprocess.Popen, str]:
    """A Prefect server of its own, on SQLite in ``home``, or on the PostgreSQL database at ``database_url``."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port_block(1)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true"}  # fmt: skip
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"):
        env.pop(name, None)
    out = open(home / "prefect-server.log", "ab")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    wait_http(api + "/health", 120, proc, "the Prefect server")
    return proc, api


def drive(events: InferenceEvents | None, rate: float, seconds: float, start: int) -> tuple[int, float]:
    """Hand ``rate`` requests a second to ``events`` (None: events off) for ``seconds``; (requests, CPU s)."""
    cpu0, t0, n = time.process_time(), time.monotonic(), 0
    while (elapsed := time.monotonic() - t0) < seconds:
        due = int(elapsed * rate)
        while n < due:
            if events is not None:
                events.observe(observed(start + n))
            n += 1
        time.sleep(0.002)
    if events is not None:
        events.flush()  # what the thread would post next: its CPU belongs to these requests
    return n, time.process_time() - cpu0


def gateway_side(api: str, args: argparse.Namespace) -> dict[str, Any]:
    rate, block_s = args.gateway_rate, (2.0 if args.quick else 5.0)
    events = InferenceEvents(api, "bench-gw", budget_per_s=rate * 2, summary_s=10, slow_s=30)
    per_request: dict[str, list[float]] = {"off": [], "on": []}
    n0 = 0
    for _ in range(2 if args.quick else 6):
        for mode in ("off", "on"):
            n, cpu = drive(events if mode == "on" else None, rate, block_s, n0)
            n0 += n
            per_request[mode].append(1000 * cpu / max(n, 1))
    events.close()
    log(f"gateway side at {rate:g} requests/s: off {fmt(median(per_request['off']), '.3f')} ms, on "
        f"{fmt(median(per_request['on']), '.3f')} ms CPU per request")  # fmt: skip
    return {"rate": rate, **per_request, "lost": events.counts.dropped_post_failed}


def server_side(
    proc: subprocess.Popen, api: str, args: argparse.Namespace, database_pid: int | None = None
) -> list[dict[str, Any]]:
    """``database_pid``: PostgreSQL's postmaster, whose CPU (its backends included) counts as the server's too."""
    rows = []
    seconds = 10.0 if args.quick else 20.0
    for i, rate in enumerate(args.rates):
        if i:
            time.sleep(inference_events.SETTLE_S)  # each rate starts on a server that has caught up
        events = InferenceEvents(api, f"bench-server-{i}", budget_per_s=rate * 2, summary_s=1e9, slow_s=1e9)
        cpu0 = tree_cpu_s(proc.pid) + (tree_cpu_s(database_pid) if database_pid else 0.0)
        n, _ = drive(events, rate, seconds, (i + 1) * 10_000_000)  # ids of its own: Prefect drops repeated ids
        time.sleep(inference_events.SETTLE_S)  # the server writes within its interval
        stored = events._stored_count()
        events.close()
        server_cpu = tree_cpu_s(proc.pid) + (tree_cpu_s(database_pid) if database_pid else 0.0) - cpu0
        rows.append({"rate": rate, "posted": events.counts.individual, "stored": stored, "observed": n,
                     "server_cpu_ms": 1000 * server_cpu / max(events.counts.individual, 1),
                     "failed_posts": events.counts.dropped_post_failed})  # fmt: skip
        log(f"server at {rate:g}/s: stored {stored} of {events.counts.individual} posted; server CPU "
            f"{fmt(rows[-1]['server_cpu_ms'], '.2f')} ms per event")  # fmt: skip
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="first-events-bench-") as tmp:
        proc, api = start_prefect(Path(tmp) / "sqlite")
        try:
            log(f"Prefect server at {api} (SQLite)")
            gw = gateway_side(api, args)
            time.sleep(2 * inference_events.SETTLE_S)  # the server works off the gateway side's events first
            server = server_side(proc, api, args)
        finally:
            stop_group(proc, "Prefect server", grace_s=10)
        on_postgres: list[dict[str, Any]] = []
        if args.postgres:
            from tests.services import PostgresServer  # the production-topology tests' own server

            database = PostgresServer(Path(tmp) / "postgres").start()
            try:
                postmaster = int((database.data / "postmaster.pid").read_text().split()[0])
                proc, api = start_prefect(Path(tmp) / "pg", database.url)
                try:
                    log(f"Prefect server at {api} (PostgreSQL)")
                    on_postgres = server_side(proc, api, args, database_pid=postmaster)
                finally:
                    stop_group(proc, "Prefect server", grace_s=10)
            finally:
                database.stop()
        if not server:
            raise BenchError("no server measurement")
    return {"gateway": gw, "server": server, "postgres": on_postgres}


def report(args: argparse.Namespace, m: dict[str, Any], started: datetime, wall_s: float) -> str:
    gw = m["gateway"]
    off, on = median(gw["off"]), median(gw["on"])

    def table(rows_in: list[dict[str, Any]]) -> str:
        rows = []
        for r in rows_in:
            kept = r["stored"] / max(r["posted"], 1)
            per_core_cell = fmt(1000 / r["server_cpu_ms"], ",.0f") if r["server_cpu_ms"] else "-"
            rows.append(f"| {r['rate']:g}/s | {r['posted']:,} | {r['stored']:,} ({fmt(100 * kept, '.1f')} %) "
                        f"| {fmt(r['server_cpu_ms'], '.2f')} ms | {per_core_cell} |")  # fmt: skip
        return "\n".join(rows)

    def rule(rows_in: list[dict[str, Any]]) -> float:
        return median([1000 / r["server_cpu_ms"] for r in rows_in if r["server_cpu_ms"]]) if rows_in else 0.0

    pg = m.get("postgres") or []
    postgres_text = (f"""**On PostgreSQL** (the production topology's Prefect): the same, with PostgreSQL 15 on this
machine, its CPU counted with the server's.

| rate | posted | stored | server + database CPU per event | events/s per core |
|---|---|---|---|---|
{table(pg)}

**Sizing rule on PostgreSQL:** about {fmt(rule(pg), ',.0f')} events a second per core of the Prefect server and its
database together (this machine; a facility's database on its own host leaves the server's share).
""" if pg else "Not measured in this run (`--no-postgres`): the same on PostgreSQL.\n")  # fmt: skip
    lossless = [r for r in m["server"] if r["stored"] >= r["posted"]]
    best = max(lossless, key=lambda r: r["rate"]) if lossless else None
    per_core = rule(m["server"])
    verdict = (f"Highest rate stored without loss here: **{best['rate']:g} events/s**." if best
               else "No rate was stored without loss.")  # fmt: skip
    budget_line = (f"At the default budget, `FIRST_EVENT_BUDGET_PER_S=100` per gateway, a server spends about "
                   f"{fmt(100 / per_core, '.2f')} of a core on one gateway's events at full budget." if per_core
                   else "")  # fmt: skip
    return f"""{SECTION[0]}

{machine_line(started, wall_s, quick=args.quick, rerun="`.venv/bin/python bench/inference_events.py`")}

**The gateway's side** (`flows/inference_events.py`, as `PrefectControlPlane` runs it): {gw["rate"]:g} requests a
second handed to the events, in blocks alternating events on and off; this process's CPU (the serving side's
`observe` and the thread that budgets, batches and posts) per request, median of the blocks.

| events | CPU per request | blocks |
|---|---|---|
| off | {fmt(off, ".3f")} ms | {", ".join(fmt(x, ".3f") for x in gw["off"])} |
| on | {fmt(on, ".3f")} ms | {", ".join(fmt(x, ".3f") for x in gw["on"])} |

Events add **{fmt(on - off, ".3f")} ms of CPU per request** ({fmt(on / off if off else 0, ".1f")}x the loop that
only hands requests over). The `sample` mode's recorded flow run costs about 40 ms of CPU each, and the `all`
mode about half a second of latency per request (see above): an event costs hundreds of times less.

**The server's side**: a Prefect server on SQLite (as `make run` starts it) sharing this machine, events posted
for {"10" if args.quick else "20"} s at each rate, each request an event of its own; stored counted on the server
{inference_events.SETTLE_S:g} s later.

| rate | posted | stored | server CPU per event | events/s per server core |
|---|---|---|---|---|
{table(m["server"])}

{verdict}
**Sizing rule:** about {fmt(per_core, ",.0f")} events a second per Prefect server core (SQLite, this machine).
{budget_line}

{postgres_text}{SECTION[1]}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway-rate", type=float, default=200.0, help="requests/s for the gateway side (200)")
    ap.add_argument("--rates", default="100,200,400", help="event rates for the server side (100,200,400)")
    ap.add_argument(
        "--no-postgres",
        dest="postgres",
        action="store_false",
        help="leave out the server on PostgreSQL (which needs PostgreSQL's server: `make services`)",
    )
    add_output_args(ap, "short blocks")
    args = ap.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    resolve_output(args)
    return measure_and_write(args, SECTION, measure, report)


if __name__ == "__main__":
    sys.exit(main())
