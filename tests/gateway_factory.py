"""The one way tests and benches start a real gateway process: uvicorn (``first.runner.gateway_command``).

Either on its own (a FIRST_HOME of its own, no Prefect) with the app built by ``gateway_app`` from the registry
file in ``$FIRST_TEST_REGISTRY``, so a test can point it at test doubles (``tests/fakes/openai_simulator.py``);
or beside a running stack (``base_env``: the stack's Prefect, keys and registry), as a second gateway with
other settings. Either way a test can kill, restart and inspect a real server process.

    gw = GatewayProcess(home, registry_path).start()   # FIRST_HOME=home, FIRST_FLOW_TRACKING=off, no Prefect
    gw = GatewayProcess(logs, base_env=stack.env, env={"FIRST_FLOW_TRACKING": "all"}).start()
    gw.url, gw.proc.pid ... gw.stop()
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from core.settings import REPO_ROOT, Settings
from first.runner import free_port, gateway_command

REGISTRY_ENV = "FIRST_TEST_REGISTRY"


def gateway_app() -> Any:
    """`uvicorn --factory tests.gateway_factory:gateway_app`: the gateway, registry from $FIRST_TEST_REGISTRY."""
    from blocks.registry import Registry
    from first.gateway import create_gateway

    return create_gateway(Settings(), Registry.from_yaml(Path(os.environ[REGISTRY_ENV]).read_text()))


def http_registry_yaml(clusters: dict[str, str], models: dict[str, list[str]]) -> str:
    """A registry of direct-HTTP clusters (name -> base URL) and models (name -> the clusters serving it)."""
    doc = {
        "clusters": [{"name": name, "transport": "http", "base_url": url} for name, url in clusters.items()],
        "models": [{"name": name, "path": "-", "clusters": list(on)} for name, on in models.items()],
    }
    return yaml.safe_dump(doc, sort_keys=False)


@contextlib.contextmanager
def stand_in_instance(home: Path, cluster: str, model: str, base_url: str, port: int) -> Iterator[None]:
    """The state file start_vllm would have written for ``model`` on the local cluster ``cluster``, its server the
    stand-in at ``base_url`` and its process a sleeping one: the gateway routes to it as to a hot vLLM, through the
    local compute endpoint and the cluster functions."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        state_dir = home / "instances" / cluster
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {"pid": sleeper.pid, "port": port, "base_url": base_url, "log": "/dev/null", "model": model}
        (state_dir / f"{model}.json").write_text(json.dumps(state))
        yield
    finally:
        sleeper.kill()
        sleeper.wait()


def tail(path: Path, n: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


class GatewayProcess:
    """One uvicorn gateway process on FIRST_HOME ``home``; ``proc.pid`` is the uvicorn process itself."""

    def __init__(
        self,
        home: Path,
        registry_path: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        base_env: dict[str, str] | None = None,
    ):
        self.home = Path(home)  # FIRST_HOME, unless base_env says otherwise; the log goes here
        self.registry_path = Path(registry_path) if registry_path is not None else None
        self.base_env = base_env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / f"gateway-{self.port}.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def settings(self) -> Settings:
        return Settings(home=self.home, port=self.port)

    def start(self, timeout_s: float = 60.0) -> GatewayProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.base_env is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("FIRST_", "PREFECT_"))}
            env.update({
                "FIRST_HOME": str(self.home), "FIRST_FLOW_TRACKING": "off", "PREFECT_HOME": str(self.home / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            })  # fmt: skip
        else:
            env = dict(self.base_env)
        env.update({"FIRST_HOST": "127.0.0.1", "FIRST_PORT": str(self.port), "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        cmd = gateway_command("127.0.0.1", self.port, workers=int(env.get("FIRST_WORKERS", "1")))
        if self.registry_path is not None:
            env[REGISTRY_ENV] = str(self.registry_path)
            cmd[cmd.index("first.asgi:app")] = "tests.gateway_factory:gateway_app"
            cmd.append("--factory")
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with code {self.proc.returncode}:\n{tail(self.log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the gateway did not answer /health within {timeout_s:g} s:\n{tail(self.log_path)}")

    def kill(self) -> None:
        """SIGKILL the uvicorn process (no shutdown: the spool's open segment is left behind as it is)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (uvicorn's graceful shutdown: the lifespan closes the spool), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
