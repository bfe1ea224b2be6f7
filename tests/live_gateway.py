"""A real gateway (the Litestar app under uvicorn, in a thread) listening on 127.0.0.1, with a local cluster
whose model server is a given URL: the relay path end to end (caller -> gateway -> local compute endpoint
-> cluster function -> model server, chunks back through POST /internal/relay) without starting vLLM.

``running_model_server`` writes the state file that ``start_vllm`` would have written, pointing at the
model server, with a ``sleep`` process standing in for vLLM's pid (so nothing real is ever stopped).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from litestar import Litestar

from blocks.registry import ClusterSpec, ModelSpec, Registry
from core.settings import Settings
from first.gateway import create_gateway
from first.runner import free_port
from serving.auth import KeyStore


@dataclass
class LiveGateway:
    url: str
    app: Litestar
    settings: Settings
    key: str

    def endpoint_pid(self) -> int:
        executor, _ = self.app.state.services.backends.pool._live[("local", "local")]
        return executor.pid

    def stream(self, body: dict[str, Any], timeout: float = 60) -> Iterator[tuple[str, Any]]:
        """POST a streaming chat request; yields ("headers", headers) first, then ("chunk", doc),
        ("error", doc) or ("done", None) per SSE event."""
        with httpx.stream(
            "POST", self.url + "/v1/chat/completions", json={**body, "stream": True},
            headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout,
        ) as r:  # fmt: skip
            assert r.status_code == 200, r.read()
            yield "headers", r.headers
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    yield "done", None
                    return
                doc = json.loads(line[6:])
                yield ("error", doc) if "error" in doc else ("chunk", doc)


@contextmanager
def running_model_server(settings: Settings, model: str, base_url: str) -> Iterator[None]:
    stand_in = subprocess.Popen(["sleep", "3600"], start_new_session=True)
    state_dir = settings.instances_dir / "local"
    state_dir.mkdir(parents=True, exist_ok=True)
    state = {"pid": stand_in.pid, "pgid": stand_in.pid, "base_url": base_url, "log": str(state_dir / "log"),
             "model": model, "port": int(base_url.rsplit(":", 1)[1])}  # fmt: skip
    (state_dir / f"{model}.json").write_text(json.dumps(state))
    try:
        yield
    finally:
        stand_in.kill()
        stand_in.wait()


@contextmanager
def live_gateway(settings: Settings, model_url: str) -> Iterator[LiveGateway]:
    """The gateway on a port of its own (``LiveGateway.settings.port``) serving model "slow" from ``model_url``
    on cluster "local"."""
    registry = Registry(
        clusters={"local": ClusterSpec(name="local", transport="local")},
        models={"slow": ModelSpec(name="slow", path="-", clusters=["local"])},
    )
    # The socket is bound here and handed to uvicorn: a port picked as free and bound later can be taken
    # meanwhile (a CI run once saw the model double's ephemeral port equal the gateway's).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    settings = settings.model_copy(update={"port": listener.getsockname()[1]})
    key = KeyStore(settings.keys_db).create("alice")[0]
    app = create_gateway(settings, registry)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    with running_model_server(settings, "slow", model_url), listener:
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
            time.sleep(0.05)
        try:
            yield LiveGateway(f"http://127.0.0.1:{settings.port}", app, settings, key)
        finally:
            server.should_exit = True
            thread.join(30)


def gateway_settings(tmp_path: Any, **kw: Any) -> Settings:
    from core.settings import FlowTracking

    port = free_port()
    return Settings(home=tmp_path / "home", port=port, flow_tracking=FlowTracking.off, local_workers=8, **kw)
