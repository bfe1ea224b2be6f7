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

import itertools
import os
import secrets
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

    def __init__(self, workers: int = 64) -> None:
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
        self._reader = threading.Thread(target=self._read, daemon=True, name="first-local-endpoint-reader")
        self._reader.start()

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
        while True:
            try:
                task_id, ok, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                fut = self._futures.pop(task_id, None)
            if fut is None or not fut.set_running_or_notify_cancel():
                continue
            if ok:
                try:
                    fut.set_result(self._serializer.deserialize(payload))
                except Exception as exc:  # a result that does not deserialize is the function's failure
                    fut.set_exception(TaskExecutionFailed(f"result did not deserialize: {exc!r}"))
            else:
                fut.set_exception(TaskExecutionFailed(payload))
        # The endpoint went away: fail whatever is still waiting.
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
        self._conn.close()
        self._tmp.cleanup()


if __name__ == "__main__":  # the endpoint process: python -m compute.local SOCKET WORKERS PARENT_PID
    _address, _workers, _parent = sys.argv[1:4]
    _conn = Client(_address, family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop("FIRST_ENDPOINT_AUTHKEY")))
    _endpoint_main(_conn, int(_workers), int(_parent))
