"""The gateway's HTTP client for model servers it reaches itself: a direct-HTTP cluster, or a batch cluster's
vLLM on a node the gateway can reach (the direct data path, ``ClusterSpec.direct_host``).

aiohttp, not httpx, on this path: profiled under load against an instant backend, httpx with httpcore, h11 and
anyio took 42 % of the gateway's CPU per request (docs/benchmarks.md, issue 18); aiohttp's C parser and plain
asyncio do the same work for a fraction. Bodies are encoded and decoded with msgspec.

Failures come back as the cluster functions give them (``functions.backend_unreachable``), so a caller turns
them into the same OpenAI-shaped errors whichever path a request took.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec

from compute import functions
from compute.failures import backend_error

# An idle pooled connection is closed after this: below vLLM's own keep-alive (uvicorn's default, 5 s), so the
# gateway never sends a request on a connection the server is closing at that moment.
KEEPALIVE_S = 4.0

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class ModelServerUnreachable(Exception):
    """No answer from the model server: refused, reset, or past the timeout. ``result`` is the cluster functions'
    account of it (status 503 or 504, kind, message); ``not_sent`` when no connection was made, so the server
    cannot have seen the request (it is safe to send it elsewhere)."""

    def __init__(self, result: dict[str, Any], not_sent: bool = False) -> None:
        super().__init__(result["message"])
        self.result = result
        self.not_sent = not_sent


class ModelServerClient:
    """One connection pool per cluster, created on first use inside the serving loop."""

    def __init__(
        self,
        timeout_s: float,
        ca_file: str | None = None,
        limit: int = 512,
        connector: Callable[[], aiohttp.BaseConnector] | None = None,
    ) -> None:
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, timeout_s), sock_read=timeout_s)
        self._ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._limit = limit
        self._connector = connector  # how connections are made (default: TCP, TLS per the CA file)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = self._connector() if self._connector else aiohttp.TCPConnector(
                limit=self._limit, limit_per_host=0, keepalive_timeout=KEEPALIVE_S, ssl=self._ssl)  # fmt: skip
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                                  json_serialize=lambda o: _encode(o).decode(),
                                                  skip_auto_headers=("User-Agent",),
                                                  read_bufsize=2**20)  # an SSE line may be long  # fmt: skip
        return self._session

    async def post(self, base_url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        """POST a JSON body; the status and the decoded answer (an error body for one that is not JSON)."""
        try:
            async with self.session.post(base_url + path, data=_encode(body), headers=_json(headers)) as r:
                raw = await r.read()
                return r.status, _payload(raw)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ModelServerUnreachable(_unreachable(base_url, exc), not_sent=_not_sent(exc)) from exc

    async def get_status(self, url: str, headers: dict[str, str], timeout_s: float = 5.0) -> int:
        try:
            async with self.session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ModelServerUnreachable(_unreachable(url, exc)) from exc

    async def stream(
        self, base_url: str, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming request; yields each SSE ``data:`` chunk, decoded, until ``[DONE]``. A non-200 answer
        raises ``ModelServerError`` with its body."""
        try:
            async with self.session.post(base_url + path, data=_encode(body), headers=_json(headers)) as r:
                if r.status != 200:
                    raise ModelServerError(r.status, _payload(await r.read()))
                async for line in r.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    yield _loads(data)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ModelServerUnreachable(_unreachable(base_url, exc), not_sent=_not_sent(exc)) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)  # aiohttp closes its transports on the next loop turn


class ModelServerError(Exception):
    """The model server answered with an error status; ``status`` and the decoded ``body``."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"model server answered {status}")
        self.status, self.body = status, body


def _json(headers: dict[str, str]) -> dict[str, str]:
    return {"Content-Type": "application/json", **headers}


def _loads(raw: bytes) -> Any:
    """msgspec, or the standard library for what msgspec rejects and Python's json accepts (NaN, Infinity)."""
    try:
        return _decode(raw)
    except msgspec.DecodeError:
        return json.loads(raw)


def _payload(raw: bytes) -> Any:
    try:
        return _loads(raw)
    except ValueError:
        return {"error": {"message": raw[:500].decode(errors="replace")}}


def _unreachable(base_url: str, exc: BaseException) -> dict[str, Any]:
    timed_out = isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError)
    return functions.backend_unreachable(base_url, exc if isinstance(exc, Exception) else Exception(exc), timed_out)


def _not_sent(exc: BaseException) -> bool:
    """The connection itself failed (refused, no route, connect timeout): the request never left."""
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


async def http_complete(
    http: ModelServerClient, base_url: str, path: str, body: dict[str, Any], headers: dict[str, str], cluster: str
) -> dict[str, Any]:
    """One non-streamed call to a model server the gateway reaches itself; failures as OpenAI-shaped errors."""
    try:
        status, payload = await http.post(base_url, path, body, headers)
    except ModelServerUnreachable as exc:
        raise backend_error(exc.result, f"Cluster '{cluster}'") from exc
    if status != 200:
        raise backend_error({"status": status, "body": payload}, f"Cluster '{cluster}'")
    return payload


async def http_stream(
    http: ModelServerClient, base_url: str, path: str, body: dict[str, Any], headers: dict[str, str], cluster: str
) -> AsyncIterator[dict]:
    where = f"Cluster '{cluster}'"
    try:
        async for chunk in http.stream(base_url, path, body, headers):
            yield chunk
    except ModelServerError as exc:
        raise backend_error({"status": exc.status, "body": exc.body}, where) from exc
    except ModelServerUnreachable as exc:
        raise backend_error(exc.result, where) from exc
