"""The local compute endpoint: a worker process that runs cluster functions, as a Globus Compute
endpoint would, with arguments and results round-tripped through ``globus_compute_sdk``'s
``ComputeSerializer`` so that serialization bugs show up on one machine.

``LocalComputeExecutor`` is a ``concurrent.futures.Executor`` with the same interface as
``globus_compute_sdk.Executor``: ``submit``, ``register_function`` and ``submit_to_registered_function``
(the function is serialized once, at registration, as the Globus Compute service stores it). A failed
function raises the same ``TaskExecutionFailed``; a dead endpoint process raises ``EndpointLost``, an
infrastructure failure the gateway answers with 503 and recovers from by starting a new endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from globus_compute_sdk.errors import TaskExecutionFailed
from globus_compute_sdk.serialize import ComputeSerializer


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class EndpointLost(ConnectionError):
    """The local endpoint process is gone: its pending tasks fail, and it takes no more."""


def _endpoint_main(conn: Any, workers: int, parent_pid: int) -> None:
    """Runs in the endpoint process: receive tasks, run them on a thread pool, send results back."""
    serializer = ComputeSerializer()
    send_lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="first-endpoint")

    def watchdog() -> None:  # no orphan endpoint if the gateway dies without closing us
        import time

        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()

    def run(task_id: int, packed: str) -> None:
        try:
            fn_buf, args_buf, kwargs_buf = serializer.unpack_buffers(packed)
            fn = serializer.deserialize(fn_buf)
            result = fn(*serializer.deserialize(args_buf), **serializer.deserialize(kwargs_buf))
            reply = (task_id, True, serializer.serialize(result))
        except BaseException as exc:  # report every failure to the caller, as Globus Compute does
            reply = (task_id, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        with send_lock:
            conn.send(reply)

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        pool.submit(run, *msg)
    pool.shutdown(wait=False, cancel_futures=True)


class LocalComputeExecutor(Executor):
    """Submit cluster functions to a local endpoint process."""

    def __init__(self, workers: int = 64, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the event loop that lives as long as this executor (the gateway's serving loop), on which
        results are read as they arrive; without one, a reader thread reads them."""
        self._serializer = ComputeSerializer()
        # A plain subprocess (not multiprocessing's spawn, which re-imports the caller's __main__),
        # connected back over a private Unix socket with a random auth key.
        self._tmp = tempfile.TemporaryDirectory(prefix="first-endpoint-")
        address = str(Path(self._tmp.name) / "endpoint.sock")
        authkey = secrets.token_bytes(32)
        with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "compute.local", address, str(workers), str(os.getpid())],
                env={**os.environ, "FIRST_ENDPOINT_AUTHKEY": authkey.hex()},
                stdin=subprocess.DEVNULL,
            )
            listener._listener._socket.settimeout(60)  # type: ignore[attr-defined]
            self._conn = listener.accept()
        self._ids = itertools.count()
        self._functions: dict[str, str] = {}  # function id -> the function, serialized once
        self._futures: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        if loop is not None:  # results are read on the serving loop itself: no thread between them and it
            self._loop = loop
            loop.call_soon_threadsafe(loop.add_reader, self._conn.fileno(), self._on_readable)
        else:
            threading.Thread(target=self._read, daemon=True, name="first-local-endpoint-reader").start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._send(self._serializer.serialize(fn), args, kwargs)

    def register_function(self, fn: Any, function_id: str | None = None, **_: Any) -> str:
        """Store the serialized function under an id (a new uuid unless given), as the Globus Compute service
        does; ``submit_to_registered_function`` then sends it by id."""
        function_id = function_id or str(uuid.uuid4())
        self._functions[function_id] = self._serializer.serialize(fn)
        return function_id

    def submit_to_registered_function(
        self, function_id: str, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None
    ) -> Future[Any]:
        try:
            fn_buf = self._functions[function_id]
        except KeyError:
            raise ValueError(f"no function registered with id {function_id}") from None
        return self._send(fn_buf, tuple(args or ()), dict(kwargs or {}))

    def _send(self, fn_buf: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        if self._closed:
            raise RuntimeError("the local compute endpoint is shut down")
        packed = self._serializer.pack_buffers(
            [fn_buf, self._serializer.serialize(args), self._serializer.serialize(kwargs)]
        )
        fut: Future[Any] = Future()
        with self._lock:
            if self._proc.poll() is not None:
                raise EndpointLost(f"the local compute endpoint process exited (code {self._proc.returncode})")
            task_id = next(self._ids)
            self._futures[task_id] = fut
            try:
                self._conn.send((task_id, packed))
            except OSError as exc:
                self._futures.pop(task_id, None)
                raise EndpointLost(f"the local compute endpoint is unreachable: {exc!r}") from None
        return fut

    def _read(self) -> None:
        """The reader thread (no serving loop given): results until the endpoint goes away."""
        while True:
            try:
                self._deliver(*self._conn.recv())
            except (EOFError, OSError):
                break
        self._fail_pending()

    def _on_readable(self) -> None:
        """On the serving loop, when the endpoint's socket has data: every result that has arrived."""
        try:
            while self._conn.poll():
                self._deliver(*self._conn.recv())
        except (EOFError, OSError):
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._conn.fileno())  # type: ignore[union-attr]
            self._fail_pending()

    def _deliver(self, task_id: int, ok: bool, payload: Any) -> None:
        with self._lock:
            fut = self._futures.pop(task_id, None)
        if fut is None or not fut.set_running_or_notify_cancel():
            return
        if ok:
            try:
                fut.set_result(self._serializer.deserialize(payload))
            except Exception as exc:  # a result that does not deserialize is the function's failure
                fut.set_exception(TaskExecutionFailed(f"result did not deserialize: {exc!r}"))
        else:
            fut.set_exception(TaskExecutionFailed(payload))

    def _fail_pending(self) -> None:
        """The endpoint went away: fail whatever is still waiting."""
        with self._lock:
            pending, self._futures = self._futures, {}
        for fut in pending.values():
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EndpointLost("the local compute endpoint process exited"))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._lock:
                self._conn.send(None)
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5 if wait else 0.1)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        loop = self._loop
        if loop is not None and _running_loop() is not loop and not loop.is_closed():
            try:  # the socket is watched by the serving loop: it stops watching, then closes it, there
                loop.call_soon_threadsafe(self._close_connection)
            except RuntimeError:  # that loop closed meanwhile
                self._loop = None
                self._close_connection()
        else:
            self._close_connection()
        self._tmp.cleanup()

    def _close_connection(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._conn.fileno())
        self._conn.close()
        self._fail_pending()


if __name__ == "__main__":  # the endpoint process: python -m compute.local SOCKET WORKERS PARENT_PID
    # A Ctrl-C or SIGTERM to the process group is for the gateway, which owns this process: the endpoint keeps
    # serving the gateway's last calls (a warm-up ending as Cancelled) and exits when the gateway closes its
    # connection, or within a second of the gateway's death (the watchdog). Never a traceback on a normal stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _address, _workers, _parent = sys.argv[1:4]
    _conn = Client(_address, family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop("FIRST_ENDPOINT_AUTHKEY")))
    _endpoint_main(_conn, int(_workers), int(_parent))
    os._exit(0)  # the gateway is gone: calls still running are its own, and nobody waits for their results
