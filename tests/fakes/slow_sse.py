"""SlowStreamDouble: an OpenAI-compatible streaming server whose pace the test sets.

It stands in for a model server generating for minutes (vLLM CPU with the tiny model writes 512 tokens in
seconds, and can't be made to pause mid-stream or hang on demand). ``POST /v1/chat/completions`` with
``stream: true`` answers SSE chunks whose content is "0", "1", ... one every ``interval_s``; after
``hang_after`` chunks (if set) it goes silent with the connection open. ``GET /health`` answers 200. The
last chunk carries usage, as vLLM's does with ``stream_options.include_usage``. It closes each connection
after one answer, and says so (``connection: close``), so clients never reuse one it has closed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from first.runner import free_port


class SlowStreamDouble:
    def __init__(self, chunks: int, interval_s: float, hang_after: int | None = None) -> None:
        self.chunks, self.interval_s, self.hang_after = chunks, interval_s, hang_after
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.sent = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            if request.startswith(b"GET /health"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                await writer.drain()
                return
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in request.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                b"connection: close\r\n\r\n"
            )
            created = int(time.time())
            for i in range(self.chunks):
                if self.hang_after is not None and i >= self.hang_after:
                    await asyncio.sleep(3600)
                delta = {"role": "assistant", "content": str(i)} if i == 0 else {"content": str(i)}
                doc = {"id": "chatcmpl-double", "object": "chat.completion.chunk", "created": created,
                       "model": "slow", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
                self._write_event(writer, doc)
                await writer.drain()
                self.sent += 1
                await asyncio.sleep(self.interval_s)
            usage = {"prompt_tokens": 3, "completion_tokens": self.chunks, "total_tokens": 3 + self.chunks}
            self._write_event(writer, {"id": "chatcmpl-double", "object": "chat.completion.chunk",
                                       "created": created, "model": "slow", "choices": [], "usage": usage})  # fmt: skip
            data = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _write_event(writer: asyncio.StreamWriter, doc: dict) -> None:
        data = b"data: " + json.dumps(doc).encode() + b"\n\n"
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    def __enter__(self) -> SlowStreamDouble:
        self.thread.start()
        start = asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=2048)  # 200+ connections at once
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
