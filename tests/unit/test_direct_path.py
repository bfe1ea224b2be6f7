"""The direct data path (issue 18): a compute cluster whose nodes the gateway can reach. The local endpoint stands in
for Globus Compute (the same executor interface and cluster functions), and the node's vLLM is the vLLM API-server
double started by the real ``start_vllm`` on another loopback address (127.0.0.2), behind its own key."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from litestar.testing import AsyncTestClient

from blocks.registry import ClusterSpec, ModelSpec, Registry
from compute import functions
from compute.backends import ExecutorBackend
from compute.direct_path import DirectPath
from compute.model_http import ModelServerClient
from core.settings import REPO_ROOT, Settings
from first.gateway import create_gateway
from first.runner import free_port_block
from serving.auth import KeyStore

DOUBLE = REPO_ROOT / "tests" / "fakes" / "vllm_double"
NODE = "127.0.0.2"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class UnreachableNodeDouble(aiohttp.TCPConnector):
    """Test double for a network on which the gateway cannot reach the node (its endpoint still can): every
    connection fails as an unrouted address does."""

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        raise aiohttp.ClientConnectorError(req.connection_key, OSError(113, "No route to host"))


@contextlib.contextmanager
def _hot_instance(
    settings: Settings, args: list[str] | None = None, **cluster: Any
) -> Iterator[tuple[Registry, Settings, str]]:
    """A hot instance of model m on cluster 'site', its vLLM (the double) listening on 127.0.0.2; an admin key."""
    s = settings.model_copy(update={"vllm_python": Path(sys.executable)})
    site = ClusterSpec(name="site", transport="local", direct_host=NODE, **{"direct_scheme": "http", **cluster})
    model = ModelSpec(name="m", clusters=["site"], path="-", port=free_port_block(1), vllm_args=args or [],
                      vllm_env={"PYTHONPATH": f"{DOUBLE}:{REPO_ROOT}", "FAKE_VLLM_LATENCY_S": "0"})  # fmt: skip
    spec = ExecutorBackend.instance_spec(model, site, s)
    started = functions.start_vllm(spec)
    try:  # (stopped whatever fails below)
        assert started["base_url"] == f"{site.direct_scheme}://{NODE}:{model.port}"
        deadline = time.monotonic() + 30
        while functions.vllm_status(spec)["state"] != "hot":
            assert time.monotonic() < deadline, "the vLLM double did not come up"
            time.sleep(0.2)
        key = KeyStore(s.keys_db).create("ops", ["admin"])[0]
        yield Registry(clusters={"site": site}, models={"m": model}), s, key
    finally:
        functions.stop_vllm(spec)


@pytest.fixture
def node(settings: Settings) -> Iterator[tuple[Registry, Settings, str]]:
    with _hot_instance(settings) as hot:
        yield hot


def _instance(status: dict[str, Any]) -> dict[str, Any]:
    return next(i for i in status["instances"] if i["model"] == "m")


async def test_inference_goes_straight_to_the_node(node) -> None:
    registry, s, key = node
    h = {"Authorization": f"Bearer {key}"}
    async with AsyncTestClient(app=create_gateway(s, registry)) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        # A stream on the compute path would need the relay (a gateway URL the endpoint posts to, which an
        # in-process test client does not have): this one comes straight from the node.
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=h)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
        assert r.text.count("data: {") >= 4
        inst = _instance((await c.get("/v1/status", headers=h)).json())
        assert inst["data_path"] == "direct", inst
        assert inst["base_url"] == f"http://{NODE}:{registry.models['m'].port}"


async def test_a_node_the_gateway_cannot_reach_is_served_through_the_endpoint(node) -> None:
    registry, s, key = node
    h = {"Authorization": f"Bearer {key}"}
    async with AsyncTestClient(app=create_gateway(s, registry)) as c:
        backend = c.app.state.services.backends.get(registry.clusters["site"])
        backend.http = ModelServerClient(5.0, connector=UnreachableNodeDouble)
        r = await c.post("/v1/chat/completions", json=CHAT, headers=h)
        assert r.status_code == 200, r.text  # served through the endpoint; the caller sees nothing of it
        assert r.json()["usage"]["completion_tokens"] == 4
        inst = _instance((await c.get("/v1/status", headers=h)).json())
        assert inst["data_path"] == "compute", inst
        assert "unreachable" in inst["why"] and inst["retry_in_s"] > 0
        r = await c.post("/v1/chat/completions", json=CHAT, headers=h)  # within retry_s: the endpoint, at once
        assert r.status_code == 200, r.text


async def test_a_cluster_without_direct_host_uses_the_endpoint() -> None:
    plain = ClusterSpec(name="site", transport="local")
    model = ModelSpec(name="m", clusters=["site"], path="-", port=9000)
    path = DirectPath(plain, fetch=lambda m: asyncio.sleep(0, {"state": "hot", "base_url": "http://127.0.0.1:9000"}))
    assert not path.enabled and path.describe(model) == {"data_path": "compute"}
    assert await path.access(model, "http://127.0.0.1:9000") is None


async def test_access_is_fetched_once_per_instance_and_retried_after_a_fallback() -> None:
    site = ClusterSpec(name="site", transport="local", direct_host=NODE, direct_scheme="http")
    model = ModelSpec(name="m", clusters=["site"], path="-", port=9000)
    calls: list[str] = []
    now = [0.0]
    url = f"http://{NODE}:9000"

    async def fetch(m: ModelSpec) -> dict[str, Any]:
        calls.append(m.instance_name)
        await asyncio.sleep(0.01)
        return {"state": "hot", "base_url": url, "api_key": "k1"}

    path = DirectPath(site, fetch, retry_s=60, clock=lambda: now[0])
    found = await asyncio.gather(*(path.access(model, url) for _ in range(20)))
    assert len(calls) == 1 and all(a is not None and a.headers == {"Authorization": "Bearer k1"} for a in found)
    path.down(model, "vLLM at x is unreachable")
    assert await path.access(model, url) is None and path.describe(model)["data_path"] == "compute"
    now[0] = 61.0  # retry_s later: the node is tried again
    assert await path.access(model, url) is not None and len(calls) == 2
    assert await path.access(model, "http://127.0.0.2:9001") is None  # the status moved on: not this instance
    assert path.describe(model)["data_path"] == "compute"


def _self_signed(folder: Path, ip: str) -> tuple[Path, Path]:
    """A certificate for ``ip`` (the site's CA would sign the nodes' certificates; here it signs itself)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "first-test-node")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "node.pem", folder / "node.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


async def test_https_to_the_node_with_the_sites_ca(settings: Settings, tmp_path: Path) -> None:
    """The default scheme: vLLM serves TLS with the site's certificate (its vllm_args there), the gateway checks it
    against direct_ca_file; the node checks its own server's health without it."""
    cert, key_file = _self_signed(tmp_path, NODE)
    with _hot_instance(
        settings,
        direct_scheme="https",
        direct_ca_file=str(cert),
        args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key_file)],
    ) as (registry, s, key):
        assert registry.clusters["site"].direct_scheme == "https"
        h = {"Authorization": f"Bearer {key}"}
        async with AsyncTestClient(app=create_gateway(s, registry)) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=h)
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
            inst = _instance((await c.get("/v1/status", headers=h)).json())
            assert inst["data_path"] == "direct" and inst["base_url"].startswith(f"https://{NODE}:"), inst
