"""Where the gateway's CPU goes per request: py-spy samples one gateway under load, against an instant backend.

Starts the stand-in of ``bench/gateway_bound.py`` and one gateway (flow tracking as given; its local endpoint
process too with ``--path endpoint``), keeps ``--concurrency`` requests in flight for ``--seconds`` while py-spy
records the gateway (and its children), then prints the CPU by package (the frame that was running) and the
busiest functions. ``--svg`` also writes py-spy's flame graph.

    make bench-profile                                           # = .venv/bin/python bench/profile_gateway.py
    .venv/bin/python bench/profile_gateway.py --path endpoint --stream --svg /tmp/endpoint.svg

This is how issue 18's cuts were found (docs/benchmarks.md): httpx, httpcore, h11 and anyio were 42 % of the
samples on the `http` path before the model-server client moved to aiohttp.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* and tests.* are not installed

import yaml
from rich.table import Table

from bench.common import BIN, BenchError, console, log
from core.settings import Settings
from serving.auth import KeyStore
from tests.gateway_factory import GatewayProcess, stand_in_instance

HERE = Path(__file__).resolve().parent


def where(frame: str) -> tuple[str, str]:
    """``"func (path/file.py:12)"`` -> (package or top-level file, function)."""
    func, _, loc = frame.partition(" (")
    path = loc.split(":")[0]
    parts = path.split("/")
    return (parts[0] if len(parts) > 1 else path or "?"), func


def summarize(raw: Path, top: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    """py-spy's raw (collapsed) stacks -> the share of samples by package and by function, where each ran."""
    packages: collections.Counter[str] = collections.Counter()
    funcs: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ")]  # --subprocesses names each one
        if not frames:
            continue
        package, func = where(frames[-1])
        packages[package] += n
        funcs[f"{func} ({package})"] += n
    share = lambda c: [(k, 100 * v / max(total, 1)) for k, v in c.most_common(top)]  # noqa: E731
    return share(packages), share(funcs), total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", choices=("http", "endpoint", "direct"), default="http",
                    help="how the gateway reaches the stand-in: an http cluster, the local endpoint, or the direct "
                    "data path of a local cluster (default http)")  # fmt: skip
    ap.add_argument("--flow-tracking", default="off", choices=("off", "sample"))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--stream", action="store_true", help="8-chunk streams, one after another, instead")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--svg", type=Path, help="also write py-spy's flame graph here")
    args = ap.parse_args()
    spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy (or `make bench-profile`)")
    tmp = Path(tempfile.mkdtemp(prefix="first-profile-"))
    home = tmp / "home"
    home.mkdir()
    sim = subprocess.Popen([sys.executable, str(HERE / "gateway_bound.py"), "_sim"], stdout=subprocess.PIPE,
                           text=True, start_new_session=True)  # fmt: skip
    gw: GatewayProcess | None = None
    try:
        url = sim.stdout.readline().strip()  # type: ignore[union-attr]
        port = int(url.rsplit(":", 1)[1])
        cluster = {"http": {"name": "c", "transport": "http", "base_url": url},
                   "endpoint": {"name": "c", "transport": "local"},
                   "direct": {"name": "c", "transport": "local", "direct_host": "127.0.0.1", "direct_scheme": "http"},
                   }[args.path]  # fmt: skip
        (tmp / "registry.yaml").write_text(yaml.safe_dump({
            "clusters": [{**cluster, "max_concurrency": 1024}],
            "models": [{"name": "m", "clusters": ["c"], "path": "-", "port": port}],
        }))  # fmt: skip
        key = KeyStore(Settings(home=home).keys_db).create("profile")[0]
        with stand_in_instance(home, "c", "m", url, port):
            gw = GatewayProcess(
                home,
                tmp / "registry.yaml",
                env={"FIRST_FLOW_TRACKING": args.flow_tracking, "FIRST_MAX_INFLIGHT_PER_CALLER": "1024"},
            ).start()
            assert gw.proc is not None
            kind = "stream" if args.stream else f"c{args.concurrency}"
            plan = tmp / "plan.json"
            plan.write_text(json.dumps({
                "targets": [{"name": "first", "url": gw.url, "headers": {"Authorization": f"Bearer {key}"},
                             "pid": gw.proc.pid, "model": "m"}],
                "rounds": 1, "n": 10**9, "n_streams": 10**9, "window_s": args.seconds, "kinds": [kind],
                "one_by_one_s": args.seconds,
            }))  # fmt: skip
            raw = tmp / "profile.txt"
            log(f"profiling the gateway (pid {gw.proc.pid}, path {args.path}, {kind}) for {args.seconds:g} s…")
            record = [spy, "record", "-p", str(gw.proc.pid), "--subprocesses", "--nonblocking", "-r", "250", "-d",
                      str(int(args.seconds) + 2)]  # fmt: skip
            spying = subprocess.Popen([*record, "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)  # fmt: skip
            svg = subprocess.Popen([*record, "-o", str(args.svg)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) if args.svg else None  # fmt: skip
            load = subprocess.run([sys.executable, str(HERE / "gateway_bound.py"), "_load", str(plan)],
                                  capture_output=True, text=True)  # fmt: skip
            spying.wait()
            if svg is not None:
                svg.wait()
            if load.returncode != 0 or not raw.exists():
                raise BenchError(f"the load or py-spy failed:\n{load.stderr[-1500:]}")
        block = json.loads(load.stdout.strip().splitlines()[-1])["first"][kind][0]
        packages, funcs, total = summarize(raw, args.top)
        console.print(f"{block['rate']:.0f} requests/s, {block['cpu_ms']:.2f} ms of gateway CPU per request, "
                      f"{block['errors']} errors; {total} samples")  # fmt: skip
        for title, rows in (("where the CPU went, by package", packages), ("busiest functions", funcs)):
            table = Table(title=title)
            table.add_column("share", justify="right")
            table.add_column("package" if "package" in title else "function")
            for name, pct in rows:
                table.add_row(f"{pct:.1f}%", name)
            console.print(table)
        if args.svg:
            log(f"flame graph: {args.svg}")
        return 0
    finally:
        if gw is not None:
            gw.stop()
        sim.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
