"""OpenAISimulatorDouble: a test double for a vLLM (OpenAI-compatible) server, cheap enough to run many of.

Federation tests and benchmarks need several model servers with a known, bounded throughput, that can be made
slow, unhealthy or broken on demand; vLLM CPU can do none of that (one instance takes a core and a minute to
start, and its speed is whatever the machine gives). This double answers like vLLM without a model:

- ``GET /health`` (200; 503 while ``healthy`` is False), ``GET /v1/models``;
- ``POST /v1/chat/completions`` and ``POST /v1/completions``, non-streaming or SSE streaming (vLLM's chunk shapes,
  a final usage chunk with ``stream_options.include_usage``, then ``data: [DONE]``). Completion tokens are
  ``max_tokens`` (or 16), deterministic words; the model id is the request's; ``system_fingerprint`` is ``name``,
  so a caller can tell which double served it.

Service model: each request takes ``latency_s`` once admitted; at most ``capacity`` are admitted at a time and
the rest wait in arrival order (an asyncio.Semaphore on the server's loop), like a server with a bounded batch.
``fail_mode``: None, "500" (an OpenAI error body), "close" (the connection is dropped with no answer) or "hang"
(never answers). Attributes can be changed while it runs; a new ``capacity`` applies to requests arriving after.
Counters: ``requests`` (completion requests received), ``served`` (answered OK), ``active`` (admitted now),
``max_active_seen``.

It runs a raw ASGI app under uvicorn in a thread on 127.0.0.1 (a free port): ``with OpenAISimulatorDouble() as
sim: sim.base_url``, or ``start()`` / ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import socket
import threading
import time
import uuid
from typing import Any

import uvicorn

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "birds")
DEFAULT_MAX_TOKENS = 16
_DROP = "drop"  # an ASGI app that returns a value makes uvicorn close the connection, having sent nothing


def text_tokens(n: int) -> list[str]:
    """The deterministic completion: ``n`` words, each one token (with its leading space)."""
    return [" " + w for w in itertools.islice(itertools.cycle(WORDS), n)]


class OpenAISimulatorDouble:
    def __init__(
        self,
        latency_s: float = 0.05,
        capacity: int = 4,
        name: str = "sim",
        api_key: str | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ) -> None:
        self.latency_s, self.capacity, self.name = latency_s, capacity, name
        self._port = port  # 0: a free one
        self.host = host
        self.ssl = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile} if ssl_certfile else {}  # as vLLM's
        self.api_key = api_key  # as vLLM's --api-key: /v1 routes want "Authorization: Bearer <key>", /health not
        self.healthy = True
        self.fail_mode: str | None = None  # None | "500" | "close" | "hang"
        self.tokens_generated = self.streams_aborted = 0  # stream tokens made; streams stopped by a disconnect
        self.token_times: dict[str, list[float]] = {}  # per request "user" field: when each token was made
        self.failing_models: set[str] | None = None  # fail_mode for these served names only (None: for all)
        self.requests = self.served = self.active = self.max_active_seen = 0
        self._sem: asyncio.Semaphore | None = None
        self._sem_capacity = 0
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._sock is not None, "not started"
        return self._sock.getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}"

    # ---- lifecycle ----

    def start(self) -> OpenAISimulatorDouble:
        self._sock = socket.socket()
        self._sock.bind((self.host, self._port))
        config = uvicorn.Config(
            self._app, interface="asgi3", lifespan="off", log_level="critical", access_log=False,
            backlog=2048, timeout_keep_alive=75,  # hundreds of connections at once, reused as vLLM's are
            timeout_graceful_shutdown=0.2,  # "hang" requests must not hold up stop()
            **self.ssl,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("OpenAISimulatorDouble did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> OpenAISimulatorDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the ASGI app ----

    async def _app(self, scope: dict, receive: Any, send: Any) -> str | None:
        if scope["type"] != "http":
            return None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method, path = scope["method"], scope["path"]
        if self.api_key and path.startswith("/v1"):
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode(errors="replace")
            if authorization != f"Bearer {self.api_key}":
                return await self._json(send, 401, {"error": "Unauthorized"})
        if method == "GET" and path == "/health":
            return await self._json(send, 200 if self.healthy else 503, {} if self.healthy else {"status": "down"})
        if method == "GET" and path == "/v1/models":
            return await self._json(send, 200, {"object": "list", "data": [{"id": self.name, "object": "model"}]})
        if method != "POST" or path not in ROUTES:
            return await self._json(send, 404, _error(f"no route {method} {path}", "NotFoundError", 404))
        self.requests += 1
        mode = self.fail_mode
        if self.failing_models is not None:  # only these served names fail (one model's server is broken)
            with contextlib.suppress(ValueError, AttributeError):
                mode = mode if json.loads(body or b"{}").get("model") in self.failing_models else None
        if mode == "500":
            return await self._json(send, 500, _error("simulated failure", "InternalServerError", 500))
        if mode == "close":
            return _DROP
        if mode == "hang":
            await asyncio.Event().wait()  # cancelled by stop()
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return await self._json(send, 400, _error("the body is not JSON", "BadRequestError", 400))
        if path == "/v1/embeddings":
            await asyncio.sleep(self.latency_s)
            self.served += 1
            return await self._json(send, 200, self._embeddings(req))
        if path in ("/v1/responses", "/v1/messages"):
            return await self._typed(send, req, path, receive)
        chat = path == "/v1/chat/completions"
        if self._sem is None or self._sem_capacity != self.capacity:
            self._sem, self._sem_capacity = asyncio.Semaphore(self.capacity), self.capacity
        async with self._sem:
            self.active += 1
            self.max_active_seen = max(self.max_active_seen, self.active)
            try:
                if req.get("stream"):
                    await self._stream(send, req, chat, receive)
                else:
                    await asyncio.sleep(self.latency_s)
                    await self._json(send, 200, self._completion(req, chat))
                self.served += 1
            finally:
                self.active -= 1
        return None

    async def _typed(self, send: Any, req: dict, path: str, receive: Any) -> None:
        """The Responses API and Anthropic's Messages API, as vLLM answers them: a whole response, or (stream) the
        typed events, each an ``event:`` line and a ``data:`` line, at the double's pace."""
        responses = path == "/v1/responses"
        prompt = max(1, len(json.dumps(req.get("input") if responses else req.get("messages")).split()))
        n = int((req.get("max_output_tokens") if responses else req.get("max_tokens")) or DEFAULT_MAX_TOKENS)
        tokens = text_tokens(n)
        events = _responses_events(req, prompt, tokens) if responses else _messages_events(req, prompt, tokens)
        if not req.get("stream"):
            await asyncio.sleep(self.latency_s)
            self.served += 1
            return await self._json(send, 200, events[-1]["response"] if responses else _message(req, prompt, tokens))
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        gone = asyncio.ensure_future(receive())
        pause = self.latency_s / max(len(tokens), 1)
        try:
            for event in events:
                if str(event["type"]).endswith("delta") and "text" in json.dumps(event):
                    await asyncio.sleep(pause)
                    if gone.done():
                        self.streams_aborted += 1
                        return
                    self.tokens_generated += 1
                data = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            self.served += 1
        finally:
            gone.cancel()

    @staticmethod
    def _embeddings(req: dict) -> dict:
        """Like vLLM's: one vector per input (a hash of it, unit length), ``dimensions`` long (default 8), floats or
        base64 float32; usage counts words (or token ids) as prompt tokens."""
        import base64
        import hashlib
        import struct

        items = req.get("input")
        items = items if isinstance(items, list) and items and not isinstance(items[0], int) else [items]
        size = int(req.get("dimensions") or 8)
        data, tokens = [], 0
        for i, item in enumerate(items):
            tokens += len(item) if isinstance(item, list) else max(1, len(str(item).split()))
            digest = hashlib.sha256(json.dumps(item).encode()).digest() * (size // 32 + 1)
            vec = [b - 127.5 for b in digest[:size]]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            vec = [v / norm for v in vec]
            encoded: Any = vec
            if req.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{size}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
        return {"object": "list", "model": req.get("model"), "data": data, "usage": usage}

    @staticmethod
    async def _json(send: Any, status: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def _head(self, req: dict, chat: bool, chunk: bool = False) -> dict:
        kind = ("chat.completion" + ".chunk" * chunk) if chat else "text_completion"
        prefix = "chatcmpl-" if chat else "cmpl-"
        return {"id": prefix + uuid.uuid4().hex[:16], "object": kind, "created": int(time.time()),
                "model": req.get("model", ""), "system_fingerprint": self.name}  # fmt: skip

    @staticmethod
    def _usage(req: dict, chat: bool) -> dict[str, int]:
        if chat:
            texts = [m.get("content") for m in req.get("messages") or []]
            words = sum(len(str(t).split()) + 4 for t in texts)  # ~ a chat template's tokens per message
        else:
            words = len(str(req.get("prompt", "")).split())
        prompt = max(words, 1)
        completion = int(req.get("max_tokens") or req.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion(self, req: dict, chat: bool) -> dict:
        usage = self._usage(req, chat)
        text = "".join(text_tokens(usage["completion_tokens"]))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {**self._head(req, chat), "choices": [choice], "usage": usage}

    async def _stream(self, send: Any, req: dict, chat: bool, receive: Any = None) -> None:
        """SSE chunks at the double's pace. Like vLLM, it stops generating when its client disconnects."""
        usage = self._usage(req, chat)
        tokens = text_tokens(usage["completion_tokens"])
        with_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        head = self._head(req, chat, chunk=True)
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def event(doc: dict | str) -> None:
            data = doc if isinstance(doc, str) else json.dumps(doc)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        def chunk(i: int, piece: str, finish: str | None) -> dict:
            if chat:
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], **({"usage": None} if with_usage else {})}

        pause = self.latency_s / max(len(tokens), 1)  # the service time, spread over the tokens
        gone = asyncio.ensure_future(receive()) if receive is not None else None  # http.disconnect when it leaves
        user = str(req.get("user") or "")
        try:
            for i, piece in enumerate(tokens):
                await asyncio.sleep(pause)
                if gone is not None and gone.done():
                    self.streams_aborted += 1
                    return
                self.tokens_generated += 1
                if user:
                    self.token_times.setdefault(user, []).append(time.monotonic())
                await event(chunk(i, piece, "length" if i == len(tokens) - 1 else None))
        finally:
            if gone is not None and not gone.done():
                gone.cancel()
        if with_usage:
            await event({**head, "choices": [], "usage": usage})
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b""})


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages")


def _responses_events(req: dict, prompt: int, tokens: list[str]) -> list[dict]:
    """The Responses API's stream for ``tokens``; the last event's ``response`` is the whole (non-stream) answer."""
    text = "".join(tokens)
    usage = {
        "input_tokens": prompt,
        "output_tokens": len(tokens),
        "total_tokens": prompt + len(tokens),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    item = {
        "type": "message",
        "id": "msg_sim",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    base = {
        "id": "resp_sim",
        "object": "response",
        "created_at": int(time.time()),
        "model": req.get("model"),
        "output": [],
        "status": "in_progress",
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": None,
    }
    done = {**base, "status": "completed", "output": [item], "usage": usage}
    events: list[dict] = [{"type": "response.created", "response": base}]
    events.append(
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "status": "in_progress", "content": []},
        }
    )
    events.append(
        {
            "type": "response.content_part.added",
            "item_id": "msg_sim",
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []},
        }
    )
    for piece in tokens:
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": "msg_sim",
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
                "logprobs": [],
            }
        )
    events.append(
        {
            "type": "response.output_text.done",
            "item_id": "msg_sim",
            "output_index": 0,
            "content_index": 0,
            "text": text,
            "logprobs": [],
        }
    )
    events.append(
        {
            "type": "response.content_part.done",
            "item_id": "msg_sim",
            "output_index": 0,
            "content_index": 0,
            "part": item["content"][0],
        }
    )
    events.append({"type": "response.output_item.done", "output_index": 0, "item": item})
    events.append({"type": "response.completed", "response": done})
    for n, event in enumerate(events):
        event["sequence_number"] = n
    return events


def _message(req: dict, prompt: int, tokens: list[str]) -> dict:
    return {
        "id": "msg_sim",
        "type": "message",
        "role": "assistant",
        "model": req.get("model"),
        "content": [{"type": "text", "text": "".join(tokens)}],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": len(tokens)},
    }


def _messages_events(req: dict, prompt: int, tokens: list[str]) -> list[dict]:
    start = {**_message(req, prompt, []), "stop_reason": None, "usage": {"input_tokens": prompt, "output_tokens": 1}}
    events: list[dict] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}} for piece in tokens
    ]
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": len(tokens)},
        },
        {"type": "message_stop"},
    ]
    return events


def _error(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}  # OpenAI's (and vLLM's) shape
