"""How long `make run` takes to start, to stop on Ctrl-C, and to come back after a crash (issue 20).

Each round runs the embedded stack on one FIRST_HOME, on the same ports every time, as a user would:

1. start, warm (`make run`: the ready line comes once the model is hot); Ctrl-C with the model hot and idle;
2. start again; Ctrl-C while four callers stream;
3. start with --no-warm; a caller's request starts a cold start; Ctrl-C while vLLM loads;
4. start again; under load from four callers, SIGKILL every process of the stack at once (a crash); start again
   over what it left (state files, a spool, sockets in TIME_WAIT): time until ready, then one request.

A stop is timed from the SIGINT to the end of `make run`; a start from `make run` to its ready line. The first
start of the first round builds the model and is reported on its own line.

    .venv/bin/python bench/stop_restart.py            # 3 rounds (about 8 min); writes its docs/benchmarks.md section
    .venv/bin/python bench/stop_restart.py --quick    # 1 round, a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BenchError, add_output_args, fmt, log, machine_line, measure_and_write, median, resolve_output
from tests.e2e.conftest import ctrl_c, kill_stack, processes_of, start_make_run

SECTION = ("## Stop and restart of `make run` (`bench/stop_restart.py`)", "<!-- end stop restart -->")
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 16}
STREAM = {**CHAT, "max_tokens": 480, "stream": True}


class Callers:
    """Four callers sending requests (or streams) in a loop until told to stop or the stack goes away."""

    def __init__(self, ready: dict[str, Any], body: dict[str, Any], n: int = 4) -> None:
        self.ready, self.body, self.answered = ready, body, 0
        self.started = threading.Event()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        headers = {"Authorization": f"Bearer {self.ready['api_key']}"}
        with httpx.Client(base_url=self.ready["base_url"], headers=headers, timeout=60) as http:
            while not self.stop.is_set():
                try:
                    with http.stream("POST", "/chat/completions", json=self.body) as r:
                        for _ in r.iter_lines():
                            self.started.set()
                    self.answered += r.status_code == 200
                except httpx.HTTPError:
                    return

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def timed_start(home: Path, env: dict[str, str] | None, log_to: Path, args: str = "") -> tuple[Any, Any, Any, float]:
    t0 = time.monotonic()
    make, ready, env = start_make_run(home, env=env, run_args=args, log=log_to)
    return make, ready, env, time.monotonic() - t0


def one_round(work: Path, n: int) -> dict[str, float]:
    home, out = work / f"home-{n}", work / f"run-{n}.log"
    got: dict[str, float] = {}
    make, ready, env, got["first start (builds the model)"] = timed_start(home, None, out)
    got["stop, model hot and idle"] = ctrl_c(make)

    make, ready, env, got["start (warm)"] = timed_start(home, env, out)
    streams = Callers(ready, STREAM)
    if not streams.started.wait(60):
        raise BenchError("no stream started")
    time.sleep(1.0)
    got["stop, 4 streams under way"] = ctrl_c(make)
    streams.join()

    make, ready, env, got["start (--no-warm)"] = timed_start(home, env, out, "--no-warm")
    cold = Callers(ready, CHAT, n=1)
    deadline = time.monotonic() + 60
    while not list((home / "instances").glob("*/tiny.json")):
        if time.monotonic() > deadline:
            raise BenchError("the cold start did not begin")
        time.sleep(0.2)
    time.sleep(1.0)
    got["stop, during a cold start"] = ctrl_c(make)
    cold.join()

    make, ready, env, _ = timed_start(home, env, out)
    load = Callers(ready, CHAT)
    time.sleep(5.0)
    killed = kill_stack(home)
    load.join()
    make.wait(30)
    if processes_of(home):
        raise BenchError(f"processes of the stack survived SIGKILL: {processes_of(home)}")
    make, ready, env, got["restart after SIGKILL of all processes"] = timed_start(home, env, out)
    t0 = time.monotonic()
    r = httpx.post(ready["base_url"] + "/chat/completions", json=CHAT, timeout=60,
                   headers={"Authorization": f"Bearer {ready['api_key']}"})  # fmt: skip
    got["first request after the restart"] = time.monotonic() - t0
    if r.status_code != 200:
        raise BenchError(f"the request after the restart got {r.status_code}: {r.text[:300]}")
    ctrl_c(make)
    log(f"round {n}: " + ", ".join(f"{k} {v:.1f} s" for k, v in got.items()) + f" ({killed} processes killed)")
    return got


def measure(args: argparse.Namespace) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="first-stop-bench-") as tmp:
        return [one_round(Path(tmp), n) for n in range(1 if args.quick else args.rounds)]


def report(args: argparse.Namespace, rounds: list[dict[str, float]], started: datetime, wall_s: float) -> str:
    rows = [f"| {what} | {fmt(median([r[what] for r in rounds]))} s | {', '.join(fmt(r[what]) for r in rounds)} |"
            for what in rounds[0]]  # fmt: skip
    return f"""{SECTION[0]}

{machine_line(started, wall_s, quick=args.quick, rerun="`.venv/bin/python bench/stop_restart.py`")}

Each round runs `make run` on one FIRST_HOME and the same ports throughout; a stop is timed from the SIGINT (what
Ctrl-C sends) to the end of `make run`, a start from `make run` to its ready line (the model hot, except with
--no-warm). After the SIGKILL, every process of the stack (runner, Prefect server, worker, gateway, local endpoint,
vLLM) is gone at once, and the next `make run` starts over its state files, spool and sockets.

| what | median | each round |
|---|---|---|
{chr(10).join(rows)}

The stop's bound is 10 s on this machine with a hot model (issue 20): the gateway gives streams under way
FIRST_STOP_GRACE_S (5 s) to finish, then ends them with an error event that says the gateway is stopping;
vLLM is stopped after the gateway (SIGKILL after 5 s, or 2 s while it is still loading).
{SECTION[1]}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the four scenarios (default 3)")
    add_output_args(ap, "one round")
    args = ap.parse_args(argv)
    resolve_output(args)
    return measure_and_write(args, SECTION, measure, report)


if __name__ == "__main__":
    sys.exit(main())
