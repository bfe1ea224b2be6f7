"""The batching of ``openai_stream`` (the cluster function that relays a stream): chunks that arrive in a burst go
out together, at most ``batch_chunks`` per post, without each waiting out the batch window (issue 18: bytes the
HTTP reader had already buffered did not show on the socket, and every chunk of a burst waited the whole window)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from compute.functions import openai_stream
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.fakes.slow_sse import SlowStreamDouble


class RelayReceiverDouble:
    """Stands in for the gateway's relay route: records each post's batch and answers 200."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.batches.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/internal/relay/r1"


@pytest.fixture
def relay() -> Iterator[RelayReceiverDouble]:
    r = RelayReceiverDouble()
    yield r
    r.server.shutdown()


@pytest.mark.parametrize("server", ["chunked", "close-delimited"])
def test_a_burst_goes_out_in_full_batches_not_one_window_per_chunk(relay: RelayReceiverDouble, server: str) -> None:
    """Two kinds of model server: chunked transfer encoding over a kept-alive connection (vLLM's, and the
    simulator's: where the old select missed buffered chunks), and a body that ends when the connection closes."""
    body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 64}
    double = OpenAISimulatorDouble(latency_s=0.0, capacity=4) if server == "chunked" else SlowStreamDouble(64, 0.0)
    with double as model:
        url = model.base_url if server == "chunked" else model.url
        # A 3 s window: were chunks held one window each, this stream would take minutes, in 64 posts.
        summary = openai_stream(url, "/v1/chat/completions", body, 60.0, relay.url, "token",
                                batch_chunks=16, batch_ms=3_000)  # fmt: skip
    assert summary["status"] == 200
    chunks = [c for b in relay.batches for c in b["chunks"]]
    text = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    assert len([t for t in text if t]) == 64 and summary["chunks"] == len(chunks)
    assert relay.batches[-1]["done"] and [b["seq"] for b in relay.batches] == list(range(len(relay.batches)))
    # The first token at once, then full batches of 16, then what is left with the end.
    assert len(relay.batches[0]["chunks"]) <= 2 and all(len(b["chunks"]) == 16 for b in relay.batches[1:-1])
    assert summary["posts"] == len(relay.batches) <= 2 + 66 // 16
