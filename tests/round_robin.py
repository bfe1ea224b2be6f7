"""A load balancer for the multi-replica tests: an HTTP reverse proxy (uvicorn in a thread, httpx upstream) that
sends each request to the next gateway replica in turn, streaming responses through as they come (SSE included).
Per request, not per connection: a cluster function's relay posts, which reuse one connection, still alternate
between replicas, as behind a real load balancer that balances requests."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import httpx
import uvicorn

from first.runner import free_port

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "host",
              "content-length"}  # fmt: skip


class RoundRobinProxy:
    def __init__(self, upstreams: list[str]) -> None:
        self.upstreams = list(upstreams)
        self._next = itertools.cycle(range(len(self.upstreams)))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sent: list[int] = [0] * len(self.upstreams)  # requests per upstream
        self.down: set[int] = set()  # upstreams that refused a connection: skipped, as a health-checking balancer does
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k.decode().lower() not in HOP_BY_HOP]
        path = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        for _ in range(len(self.upstreams)):
            i = next(self._next)
            if i in self.down and len(self.down) < len(self.upstreams):
                continue
            client = httpx.AsyncClient(base_url=self.upstreams[i], timeout=None)
            try:
                upstream = await client.send(client.build_request(scope["method"], path, headers=headers,
                                                                  content=body), stream=True)  # fmt: skip
            except httpx.ConnectError:
                self.down.add(i)
                await client.aclose()
                continue
            self.down.discard(i)
            self.sent[i] += 1
            try:
                out = [(k.encode(), v.encode()) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP]
                await send({"type": "http.response.start", "status": upstream.status_code, "headers": out})
                async for piece in upstream.aiter_raw():
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except (httpx.HTTPError, OSError):
                pass
            finally:
                await upstream.aclose()
                await client.aclose()
            return
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b"no replica answered"})

    def __enter__(self) -> RoundRobinProxy:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", interface="asgi3"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)  # type: ignore[union-attr]
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
