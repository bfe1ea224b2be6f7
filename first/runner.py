"""`first run` (what `make run` calls): the whole embedded default on one machine, until Ctrl-C.

Starts, each in its own process group so that shutdown is orderly and complete:
the Prefect server (UI + API), a Prefect worker for the lifecycle deployments in prefect.yaml, the
gateway (uvicorn), and through the warm-up flow the demo model's vLLM CPU server. Ctrl-C (SIGINT) or
SIGTERM stops all of them, vLLM included: nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console

from blocks.registry import Registry
from compute import functions
from core.settings import REPO_ROOT, Settings, prefect_env
from core.stopping import STOPPING
from first import preflight
from serving.auth import KeyStore

console = Console(stderr=True, highlight=False, soft_wrap=True)
BIN = Path(sys.executable).parent


# uvicorn closes idle keep-alive connections after 5 s by default; a client that reuses one just as it is closed
# gets a read error (seen in bench runs, against vLLM too). 75 s, as nginx does, makes that race rare.
KEEP_ALIVE_S = 75
HTTP_PROTOCOL = "first.http_protocol:Guarded"
# A stop's SIGKILL comes this long after SIGTERM for a vLLM server that serves and one that is still loading (it
# ignores SIGTERM while it loads, and has nothing to lose). The gateway has stopped by then.
HOT_VLLM_GRACE_S = 5.0
LOADING_VLLM_GRACE_S = 2.0


def gateway_command(host: str, port: int, max_connections: int | None = None, workers: int | None = None) -> list[str]:
    """The gateway as its own process (uvicorn, one worker, no access log: it costs throughput), with a header
    timeout (``first/http_protocol.py``), a bound on connections, and a bounded stop (FIRST_STOP_GRACE_S)."""
    settings = Settings()
    limit = max_connections or settings.max_connections
    n = workers or settings.workers  # FIRST_WORKERS
    more = ["--workers", str(n)] if n > 1 else []
    return [str(BIN / "python"), "-m", "uvicorn", "first.asgi:app", "--host", host, "--port", str(port),
            "--no-access-log", "--log-level", "warning", "--timeout-keep-alive", str(KEEP_ALIVE_S),
            "--http", HTTP_PROTOCOL, "--limit-concurrency", str(limit),
            "--timeout-graceful-shutdown", f"{settings.stop_grace_s:g}", *more]  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (tests and benches start their servers on it). From
    below the kernel's ephemeral range: a server bound to port 0 meanwhile, or an outgoing connection, can never
    be given it before the caller binds it."""
    return free_port_block(1)


def free_port_block(n: int = 2, low: int = 20000, high: int = 32000) -> int:
    """The first of ``n`` consecutive ports on 127.0.0.1 that nothing listens on now, below the kernel's ephemeral
    range (32768 and up on Linux), where no outgoing connection can take one meanwhile: a stack's vLLM ports
    (FIRST_VLLM_PORT_BASE and the ports after it) for tests and benches."""
    import random

    for _ in range(200):
        base = random.randrange(low, high - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports between {low} and {high}")


def stop_group(
    proc: subprocess.Popen, name: str, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), grace_s: float = 8.0
) -> None:
    """Stop a child and its process group: each signal in turn, then SIGKILL."""
    t0 = time.monotonic()
    for sig in (*signals, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s if sig != signal.SIGKILL else 5)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # stragglers in the group (e.g. flow-run subprocesses)
        os.killpg(proc.pid, signal.SIGKILL)
    console.print(f"  stopped {name} ({time.monotonic() - t0:.1f} s)")


def stop_local_models(settings: Settings, grace_s: float = 8.0, loading_grace_s: float | None = None) -> list[int]:
    """Stop the vLLM servers local clusters started (they run in their own sessions): SIGTERM, SIGKILL after
    ``grace_s``, or after ``loading_grace_s`` for one that does not answer /health (it is still loading, and
    ignores SIGTERM while it loads)."""
    stopped = []
    for state in sorted(settings.instances_dir.glob("*/*.json")):
        spec = {"state_dir": str(state.parent), "model": state.stem}
        grace = grace_s
        if loading_grace_s is not None and functions.vllm_status(spec)["state"] != "hot":
            grace = loading_grace_s
        t0 = time.monotonic()
        result = functions.stop_vllm(spec, grace_s=grace)
        if result.get("stopped"):
            stopped.append(result["pid"])
            console.print(f"  stopped vLLM for {state.stem} (pid {result['pid']}, {time.monotonic() - t0:.1f} s)")
    return stopped


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it answered at {url}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout_s:.0f} s")


class Runner:
    def __init__(self, settings: Settings, prefect_port: int = 4200, warm: bool = True, replace: bool = False) -> None:
        self.s = settings
        self.prefect_port = prefect_port
        self.warm = warm
        self.replace = replace  # stop an earlier stack of this FIRST_HOME that holds a port
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.stop = threading.Event()
        self.in_flow = False  # the start-up warm-up runs: a Ctrl-C lets it end as Cancelled instead of crashing it
        self.api_url = f"http://127.0.0.1:{prefect_port}/api"
        self.env = {**os.environ, **prefect_env(settings, prefect_port)}

    # ---- steps ----

    def ports(self) -> dict[str, int]:
        """Every port this stack will listen on: what for -> port."""
        reg = Registry.embedded_default(self.s)
        return {"Prefect server": self.prefect_port, "gateway": self.s.port,
                **{f"vLLM for '{m.name}'": m.port for m in reg.models.values() if m.port}}  # fmt: skip

    def preflight(self) -> bool:
        """Each port free before anything starts; else say who holds it, and stop an earlier stack of this
        FIRST_HOME only when told to (``--replace``). False: nothing was started, the caller exits."""
        held = preflight.check(self.ports(), self.s.home)
        if held and self.replace and all(h.ours for h in held):
            for h in held:
                console.print(f"[yellow]{h.describe()}: stopping it (--replace)[/yellow]")
            preflight.stop_earlier_stack(held)
            held = preflight.check(self.ports(), self.s.home)
        if not held:
            return True
        for h in held:
            console.print(f"[red]✗[/red] {h.describe()}")
        if any(h.ours for h in held):
            console.print("Stop that stack (Ctrl-C in its terminal, or `kill` the pids above), or run `first run "
                          "--replace` (`make run RUN_ARGS=--replace`) to stop it now.")  # fmt: skip
        if not all(h.ours for h in held):
            console.print("Free those ports, or move this stack: --prefect-port N, FIRST_PORT, FIRST_VLLM_PORT_BASE "
                          "(the models' ports start there).")  # fmt: skip
        return False

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.s.logs_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.s.logs_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def ensure_model(self) -> None:
        """The two models of the embedded default: `tiny` (text) and `tiny-embed` (embeddings), built once."""
        from compute.tiny_model import build_tiny_model

        reg = Registry.embedded_default(self.s)
        for name, kind, what in (("tiny", "generate", "random-weight Llama"), ("tiny-embed", "embed", "BERT")):
            path = Path(reg.models[name].path)
            if (path / "model.safetensors").exists():
                console.print(f"[green]✓[/green] model '{name}' at {path}")
                continue
            with console.status(f"building the model '{name}' (tokenizer + {what})…"):
                build_tiny_model(path, seed=0, kind=kind)
            console.print(f"[green]✓[/green] built the model '{name}' at {path}")

    def start_vllm_early(self) -> None:
        """Start vLLM now (it takes ~30-60 s on CPU); the warm-up flow below then follows it to /health."""
        if not self.warm:
            return
        if not self.s.vllm_python.exists():
            raise RuntimeError(f"vLLM's environment is missing ({self.s.vllm_python}); run `make setup`")
        reg = Registry.embedded_default(self.s)
        from compute.backends import ExecutorBackend

        spec = ExecutorBackend.instance_spec(reg.models["tiny"], reg.clusters["local"], self.s)
        functions.start_vllm(spec)
        console.print(f"[green]✓[/green] vLLM CPU is starting for model 'tiny' (port {reg.models['tiny'].port})")

    def start_prefect(self) -> None:
        proc = self.spawn(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)],
        )
        with console.status("starting the Prefect server…"):
            wait_http(f"{self.api_url}/health", 120, proc, "the Prefect server")
        # `first apply`, `first registry ...` in another shell of this account find the server (and its password).
        (self.s.home / "prefect-api-url").write_text(self.api_url + "\n")
        console.print(f"[green]✓[/green] Prefect server at http://127.0.0.1:{self.prefect_port}")
        from flows.stack_runs import crash_orphaned_runs

        with contextlib.suppress(Exception):  # a server that cannot answer this will say so at the next step
            if orphans := crash_orphaned_runs():
                console.print(f"  marked {len(orphans)} flow run(s) a killed stack left under way Crashed: "
                              f"{', '.join(orphans)}")  # fmt: skip

    def setup_prefect(self) -> None:
        from deployments import local

        with console.status("registering blocks and deployments (prefect.yaml)…"):
            r = subprocess.run(
                [str(BIN / "first"), "registry", "init"],
                env=self.env,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=180,
            )
            if r.returncode != 0:
                raise RuntimeError(f"first registry init failed:\n{r.stderr[-2000:]}")
            local.register(self.env)
            self.apply_automations()
        self.spawn("worker", local.worker_command())
        console.print(f"[green]✓[/green] deployments {', '.join(local.DEPLOYMENTS)}; worker on pool {local.WORK_POOL}")

    def apply_automations(self) -> None:
        """The automations on the inference events, with their defaults (`first automations apply` changes them)."""
        from flows.automations import AutomationOptions, apply

        try:
            apply(AutomationOptions())
        except Exception as exc:  # the stack serves without them; say so
            console.print(f"[yellow]automations not applied ({exc}); `first automations apply` retries[/yellow]")

    def demo_key(self) -> str:
        path = self.s.home / "demo-api-key"
        store = KeyStore(self.s.keys_db)
        if path.exists():
            key = path.read_text().strip()
            from serving.auth import LocalKeyAuthenticator

            with contextlib.suppress(Exception):
                LocalKeyAuthenticator(store).check(key)
                return key
        key, _ = store.create("demo", ["demo"])
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
        return key

    def start_gateway(self) -> None:
        proc = self.spawn("gateway", gateway_command(self.s.host, self.s.port, self.s.max_connections))
        with console.status("starting the gateway…"):
            wait_http(f"http://{self.s.host}:{self.s.port}/health", 60, proc, "the gateway")
        console.print(f"[green]✓[/green] gateway at http://{self.s.host}:{self.s.port}")

    def warm_up(self) -> None:
        if not self.warm:
            return
        from prefect.exceptions import CancelledRun

        from flows.lifecycle import warm_up

        t0 = time.monotonic()
        self.in_flow = True
        try:
            with console.status("warming up 'tiny' on cluster 'local' (vLLM CPU; the flow run is in the Prefect UI)…"):
                result = asyncio.run(warm_up(model="tiny", cluster="local"))
        except CancelledRun:
            console.print("  the warm-up run ended as Cancelled (the stack is stopping)")
            raise KeyboardInterrupt from None
        finally:
            self.in_flow = False
        if self.stop.is_set():  # the signal came as the warm-up finished
            raise KeyboardInterrupt
        console.print(
            f"[green]✓[/green] model 'tiny' is hot at {result.get('base_url')} "
            f"({time.monotonic() - t0:.0f} s after the gateway)"
        )

    def banner(self, key: str) -> None:
        base = f"http://{self.s.host}:{self.s.port}"
        console.print(f"""
[bold]FIRST is running.[/bold] Ctrl-C stops everything.

  OpenAI API     {base}/v1          (API docs: {base}/docs)
  Prefect UI     http://127.0.0.1:{self.prefect_port}   (password: the line in {self.s.prefect_auth_path})
                 deployments: warm-up, scale-down, drain-cluster, model-status;
                 refresh-status (every 60 s), scale-down-idle (every 300 s)
  Demo API key   {key}
  Logs           {self.s.logs_dir}/

[bold]curl[/bold]
  curl {base}/v1/chat/completions -H "Authorization: Bearer {key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "tiny", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

[bold]python[/bold] (pip install openai)
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  r = client.chat.completions.create(model="tiny", messages=[{{"role": "user", "content": "Hello!"}}])
  print(r.choices[0].message.content)
""")
        print(
            json.dumps(
                {
                    "ready": True,
                    "base_url": base + "/v1",
                    "api_key": key,
                    "prefect_ui": f"http://127.0.0.1:{self.prefect_port}",
                }
            ),
            flush=True,
        )

    # ---- main ----

    def run(self) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            again = self.stop.is_set()
            if not again:
                console.print(f"\n[yellow]{signal.Signals(signum).name}: stopping…[/yellow]")
            self.stop.set()
            STOPPING.set()
            if self.in_flow and not again:
                return  # the warm-up sees STOPPING within half a second and ends as Cancelled (core/stopping.py)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        os.umask(0o077)  # every file of the stack (and of its children: Prefect's database, logs) is the owner's only
        self.s.make_home()
        if not self.preflight():
            return 2
        code = 0
        try:
            self.ensure_model()
            self.start_vllm_early()
            self.start_prefect()
            self.setup_prefect()
            key = self.demo_key()
            self.start_gateway()
            self.warm_up()
            self.banner(key)
            while not self.stop.wait(1.0):
                for name, proc in self.procs:
                    if proc.poll() is not None:
                        console.print(
                            f"[red]{name} exited with code {proc.returncode}; "
                            f"see {self.s.logs_dir / (name + '.log')}[/red]"
                        )
                        code = 1
                        self.stop.set()
        except KeyboardInterrupt:
            pass
        except Exception as exc:
            console.print(f"[red]error:[/red] {exc}")
            code = 1
        finally:
            # A second Ctrl-C (or SIGTERM) while stopping: everything ends at once.
            signal.signal(signal.SIGINT, lambda *_: self.kill_now())
            signal.signal(signal.SIGTERM, lambda *_: self.kill_now())
            self.shutdown()
        return code

    def shutdown(self) -> None:
        """The gateway and the worker first (nothing new starts; warm-ups under way end as Cancelled; streams
        get FIRST_STOP_GRACE_S), then the runs they left are marked Cancelled, then the models and the Prefect
        server; each pair in parallel."""
        console.print("stopping… (Ctrl-C again to stop at once)")
        t0, since = time.monotonic(), dt.datetime.now(dt.UTC)
        by_name = dict(self.procs)
        _in_parallel([lambda n=n: stop_group(by_name[n], n) for n in ("gateway", "worker") if n in by_name])
        if "prefect-server" in by_name and by_name["prefect-server"].poll() is None:
            self.end_left_runs(since)
        last = [lambda: stop_local_models(self.s, grace_s=HOT_VLLM_GRACE_S, loading_grace_s=LOADING_VLLM_GRACE_S)]
        if "prefect-server" in by_name:
            last.append(lambda: stop_group(by_name["prefect-server"], "Prefect server"))
        _in_parallel(last)
        (self.s.home / "prefect-api-url").unlink(missing_ok=True)
        console.print(f"[green]all processes stopped[/green] in {time.monotonic() - t0:.1f} s")

    def end_left_runs(self, since: dt.datetime) -> None:
        """Runs the worker was executing died with it: Cancelled, saying the stack stopped (not Crashed, not
        Running for ever). Then this process's own logs and events (of its start-up warm-up run) reach the
        server before it stops: left queued, Prefect's workers retry them at exit for a minute against a server
        that is gone."""
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        from flows.stack_runs import cancel_left_runs

        try:
            names = cancel_left_runs(since)
            if names:
                console.print(f"  marked {len(names)} flow run(s) left under way Cancelled: {', '.join(names)}")
        except Exception as exc:  # the server is unwell: the stop goes on
            console.print(f"  [yellow]could not mark the runs left under way Cancelled: {exc}[/yellow]")
        for service in (EventsWorker, APILogWorker):
            with contextlib.suppress(Exception):
                service.drain_all(timeout=5)

    def kill_now(self) -> None:
        """SIGKILL every process group of the stack: its children, and the models it started."""
        console.print("[yellow]stopping at once (SIGKILL)[/yellow]")
        for _, proc in self.procs:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        for state in self.s.instances_dir.glob("*/*.json"):  # (a pid that now names another process is spared)
            with contextlib.suppress(Exception):
                functions.stop_vllm({"state_dir": str(state.parent), "model": state.stem}, grace_s=0)


def _in_parallel(steps: list) -> None:
    threads = [threading.Thread(target=step) for step in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
