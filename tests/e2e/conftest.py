"""The real stack, once per test session: a Prefect server, the gateway, and (through a cold start) a
vLLM CPU server with the tiny model. Everything lives in a temporary FIRST home and is stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import REPO_ROOT, Settings, prefect_env
from first.runner import free_port, free_port_block, gateway_command, stop_group, wait_http

BIN = Path(sys.executable).parent


def stop(proc: subprocess.Popen) -> None:
    stop_group(proc, "process", grace_s=10)


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    base_url: str
    prefect_api: str
    vllm_url: str
    keys: dict[str, str]
    settings: Settings

    def first(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "first"), *args],
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
        )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("first-home")
    prefect_port, gateway_port, vllm_port = free_port(), free_port(), free_port_block(2)  # tiny, tiny-embed
    settings = Settings(home=home, port=gateway_port, vllm_port_base=vllm_port)
    env = {
        **os.environ,
        **prefect_env(settings, prefect_port),
        "FIRST_PORT": str(gateway_port),
        "FIRST_VLLM_PORT_BASE": str(vllm_port),
        "FIRST_FLOW_SAMPLE_RATE": "0",
        "FIRST_WARM_WAIT_S": "240",
        "FIRST_REQUEST_TIMEOUT_S": "60",
    }
    procs: list[subprocess.Popen] = []
    logs = home / "logs"
    logs.mkdir()

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=open(logs / f"{name}.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        procs.append(p)
        return p

    try:
        for name, kind in (("tiny", "generate"), ("tiny-embed", "embed")):
            subprocess.run(
                [str(BIN / "first"), "model", "build-tiny", str(settings.models_dir / name), "--kind", kind],
                env=env,
                check=True,
                capture_output=True,
                timeout=120,
            )
        prefect = spawn(
            "prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
        )
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 120, prefect)
        stack = Stack(
            home,
            env,
            f"http://127.0.0.1:{gateway_port}",
            f"http://127.0.0.1:{prefect_port}/api",
            f"http://127.0.0.1:{vllm_port}",
            {},
            settings,
        )
        stack.first("registry", "init")
        stack.keys = {
            "alice": stack.first("keys", "create", "--user", "alice", "--group", "staff").stdout.strip(),
            "limited": stack.first("keys", "create", "--user", "limited", "--rpm", "2").stdout.strip(),
        }
        gateway = spawn("gateway", gateway_command("127.0.0.1", gateway_port))
        wait_http(f"{stack.base_url}/health", 60, gateway)
        yield stack
    finally:
        for p in reversed(procs[1:]):
            stop(p)
        from first.runner import stop_local_models

        stop_local_models(settings)
        for p in procs[:1]:
            stop(p)


def prefect_auth(env: dict[str, str]) -> httpx.BasicAuth:
    """The embedded Prefect server's API password (prefect_env), as HTTP basic auth for direct API calls."""
    user, _, password = env["PREFECT_API_AUTH_STRING"].partition(":")
    return httpx.BasicAuth(user, password)


def prefect_api(method: str, url: str, env: dict[str, str], **kw: Any) -> httpx.Response:
    """One Prefect API call, retried while the server answers 503 (its SQLite database is busy), as Prefect's own
    client does."""
    for _ in range(20):
        r = httpx.request(
            method, url, timeout=60, auth=prefect_auth(env), **kw
        )  # a busy SQLite server can take a while
        if r.status_code != 503:
            return r
        time.sleep(0.5)
    return r


def prefect_flow_runs(stack: Stack, flow_name: str) -> list[dict]:
    r = httpx.post(
        f"{stack.prefect_api}/flow_runs/filter",
        json={"flows": {"name": {"any_": [flow_name]}}, "limit": 200},
        timeout=10,
        auth=prefect_auth(stack.env),
    )
    r.raise_for_status()
    return r.json()


def dump(obj: object) -> str:
    return json.dumps(obj, indent=1, default=str)[:2000]


def start_make_run(
    home: Path,
    env: dict[str, str] | None = None,
    run_args: str = "",
    log: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, dict[str, Any], dict[str, str]]:
    """`make run` on FIRST_HOME ``home`` with free ports, as a new user runs it: (the make process, its ready
    line, its environment). Stop it as Ctrl-C does: ``os.killpg(make.pid, signal.SIGINT)``.

    ``env``: an earlier call's environment, to start again on the same ports. ``log``: where its messages go
    (the runner's console is stderr). ``extra_env``: settings for this stack (``FIRST_*``)."""
    if env is None:
        env = {**os.environ, "FIRST_HOME": str(home), "FIRST_PORT": str(free_port()),
               "FIRST_VLLM_PORT_BASE": str(free_port_block(2)),
               "FIRST_TEST_PREFECT_PORT": str(free_port())}  # fmt: skip
        for name in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"):
            env.pop(name, None)
        env |= extra_env or {}
    errors = open(log, "a") if log is not None else subprocess.DEVNULL
    make = subprocess.Popen(
        ["make", "run", f"RUN_ARGS=--prefect-port {env['FIRST_TEST_PREFECT_PORT']} {run_args}"], cwd=REPO_ROOT,
        env=env, stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True,
    )  # fmt: skip
    if log is not None:
        errors.close()  # type: ignore[union-attr]
    for line in make.stdout:  # type: ignore[union-attr]
        if line.startswith('{"ready"'):
            return make, json.loads(line), env
    code = make.poll()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(make.pid, signal.SIGINT)
    make.wait(timeout=120)
    said = f":\n{log.read_text()[-3000:]}" if log is not None else ""
    raise AssertionError(f"make run exited ({code}) without printing its ready line{said}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def processes_of(home: Path) -> list[int]:
    """The live processes of a stack: those whose command line or environment names its FIRST_HOME (every process
    of a stack inherits FIRST_HOME; vLLM's command line names its model under it)."""
    text, pids = str(home), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (entry / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if (text in cmdline or text in environ) and _alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def ctrl_c(make: subprocess.Popen) -> float:
    """What Ctrl-C in the terminal does (SIGINT to the foreground group); seconds until `make run` ended."""
    t0 = time.monotonic()
    os.killpg(make.pid, signal.SIGINT)
    make.wait(timeout=120)
    return time.monotonic() - t0


def kill_stack(home: Path) -> int:
    """SIGKILL every process of the stack, as a crash or the OOM killer of a whole cgroup would: those that name
    its FIRST_HOME, and every member of their process groups (vLLM's engine and workers rename themselves and
    hide their environment); again for any a dying parent started meanwhile. How many were killed."""
    killed: set[int] = set()
    own = os.getpgrp()
    for _ in range(10):
        pids = processes_of(home)
        if not pids:
            break
        groups = set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
                os.kill(pid, signal.SIGKILL)
        for group in groups - {own}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        killed |= set(pids)
        time.sleep(0.1)
    return len(killed)
